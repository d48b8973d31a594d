"""The control protocol's framing and validation, sans-I/O: JSON lines in, JSON lines out.

One request is one JSON object on one line; the reply is one JSON object on one line, in order. Every
request carries ``"version": 1`` (the protocol version it was written for) and ``"command"``; the other
keys are the command's arguments. Replies are ``{"version": 1, "ok": true, "result": ...}`` or
``{"version": 1, "ok": false, "error": {"code": ..., "message": ...}}``. docs/control.md is the reference.

Everything a client sends is hostile: :func:`parse_request` and the typed getters of :class:`Arguments`
turn every malformed input into a :class:`ControlError` carrying a stable code and a readable message, so
that a handler only ever sees validated values.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

#: The protocol version this module speaks. A request for another version is refused, not guessed at.
VERSION = 1
#: Longest request line accepted (bytes, newline included). Real requests are a few hundred bytes; the
#: bound keeps a client that never sends a newline from growing the back-end's memory.
MAX_LINE = 64 * 1024

# Error codes (stable: clients may switch on them).
BAD_JSON = "bad-json"
BAD_REQUEST = "bad-request"
BAD_VERSION = "bad-version"
UNKNOWN_COMMAND = "unknown-command"
BAD_ARGUMENT = "bad-argument"
NO_CONNECTION = "no-connection"
NOT_FOUND = "not-found"
UNAVAILABLE = "unavailable"
LINE_TOO_LONG = "line-too-long"
INTERNAL = "internal-error"

U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1


class ControlError(Exception):
    """A request that cannot be served; becomes an error reply, never a crash."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Request:
    command: str
    arguments: Arguments


class Arguments:
    """A request's arguments with typed, validating getters; :meth:`check_used` refuses unknown keys."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)
        self._used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self._values and self._values[name] is not None

    def names(self) -> set[str]:
        return set(self._values)

    def raw(self, name: str) -> Any:
        """The value as sent (None when absent), for arguments a getter below cannot describe."""
        return self._get(name)

    def _get(self, name: str) -> Any:
        self._used.add(name)
        return self._values.get(name)

    def string(self, name: str, *, default: str) -> str:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            self._bad(name, f"{value!r} is not a string")
        return value

    def _bad(self, name: str, what: str) -> NoReturn:
        raise ControlError(BAD_ARGUMENT, f"{name}: {what}")

    def integer(self, name: str, *, default: int | None = None, low: int = 0, high: int = U64_MAX) -> int:
        value = self._get(name)
        if value is None:
            if default is None:
                self._bad(name, "missing")
            return default
        if isinstance(value, str):
            # Addresses are easier to read and to type in hex; JSON has no hex numbers.
            try:
                value = int(value, 0)
            except ValueError:
                self._bad(name, f"{value!r} is not an integer")
        if isinstance(value, bool) or not isinstance(value, int):
            self._bad(name, f"{value!r} is not an integer")
        if not low <= value <= high:
            self._bad(name, f"{value:#x} is outside [{low:#x}, {high:#x}]")
        return value

    def optional_integer(self, name: str, *, low: int = 0, high: int = U64_MAX) -> int | None:
        if name not in self:
            self._used.add(name)
            return None
        return self.integer(name, low=low, high=high)

    def number(self, name: str, *, low: float, high: float, default: float | None = None) -> float:
        value = self._get(name)
        if value is None:
            if default is None:
                self._bad(name, "missing")
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            self._bad(name, f"{value!r} is not a number")
        if not low <= value <= high:
            self._bad(name, f"{value!r} is outside [{low}, {high}]")
        return float(value)

    def boolean(self, name: str, *, default: bool) -> bool:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            self._bad(name, f"{value!r} is not true or false")
        return value

    def choice(self, name: str, choices: Mapping[str, Any], *, default: str | None = None) -> Any:
        """One of ``choices`` (case-insensitive name); returns the mapped value."""
        value = self._get(name)
        if value is None:
            if default is None:
                self._bad(name, f"missing (one of {', '.join(choices)})")
            value = default
        if not isinstance(value, str) or value.upper() not in choices:
            self._bad(name, f"{value!r} is not one of {', '.join(choices)}")
        return choices[value.upper()]

    def list_of_objects(self, name: str, *, most: int) -> list[Arguments]:
        value = self._get(name)
        if not isinstance(value, list):
            self._bad(name, "must be a list")
        if len(value) > most:
            self._bad(name, f"at most {most} entries")
        if not all(isinstance(item, dict) for item in value):
            self._bad(name, "entries must be objects")
        return [Arguments(item) for item in value]

    def check_used(self, where: str = "") -> None:
        unknown = sorted(set(self._values) - self._used)
        if unknown:
            prefix = f"{where}: " if where else ""
            raise ControlError(BAD_ARGUMENT, f"{prefix}unknown argument(s): {', '.join(unknown)}")


def parse_request(line: bytes) -> Request:
    """One request line (without or with its newline) into a Request; ControlError when malformed."""
    try:
        document = json.loads(line)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ControlError(BAD_JSON, f"not a JSON document: {exc}") from None
    if not isinstance(document, dict):
        raise ControlError(BAD_REQUEST, "a request is a JSON object")
    version = document.pop("version", None)
    if version != VERSION or isinstance(version, bool):
        raise ControlError(BAD_VERSION, f"version {version!r} is not spoken here (this is version {VERSION})")
    command = document.pop("command", None)
    if not isinstance(command, str) or not command:
        raise ControlError(BAD_REQUEST, "command: missing or not a string")
    return Request(command, Arguments(document))


def encode_result(result: object) -> bytes:
    return _line({"version": VERSION, "ok": True, "result": result})


def encode_error(code: str, message: str) -> bytes:
    return _line({"version": VERSION, "ok": False, "error": {"code": code, "message": message}})


def _line(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode() + b"\n"


def encode_request(command: str, arguments: Mapping[str, object]) -> bytes:
    """A request line (for clients)."""
    return _line({"version": VERSION, "command": command, **arguments})


def decode_reply(line: bytes) -> object:
    """The result of a reply line; ControlError for an error reply or a reply that is not one."""
    try:
        document = json.loads(line)
    except ValueError as exc:
        raise ControlError(BAD_JSON, f"the back-end's reply is not JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("version") != VERSION:
        raise ControlError(BAD_VERSION, f"the back-end's reply is not a version {VERSION} reply")
    if document.get("ok") is True:
        return document.get("result")
    error = document.get("error")
    if isinstance(error, dict):
        raise ControlError(str(error.get("code", INTERNAL)), str(error.get("message", "")))
    raise ControlError(BAD_REQUEST, "the back-end's reply has neither a result nor an error")
