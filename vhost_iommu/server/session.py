"""The protocol session of one connection as data: what a new device worker needs to take it over.

With ``serve --state-dir`` the vhost-user connection lives in the keeper (:mod:`vhost_iommu.keeper`) and
the device worker exports its session after every message it handles (``ConnectionHandler.export_session``)
so that a worker started after a crash or for an upgrade rebuilds the same server state
(``ConnectionHandler.restore_session``). fds are not numbers of this process here but *fd ids*: the keeper
numbers every fd the front-end sent and keeps it open while a session references its id.

The encoded form is JSON (small, versioned, and readable by a person looking at a problem). Decoding
treats it as untrusted: every field is type- and range-checked, sizes are bounded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

#: Encoded sessions larger than this are refused (a session is a few kilobytes).
MAX_SESSION_BYTES = 1 << 18
#: SET_CONFIG writes remembered per session (the latest per offset and size; config space is tiny).
MAX_CONFIG_WRITES = 64
#: Memory regions a session may hold in keeper mode: their fds travel in one SCM_RIGHTS message to the
#: next worker together with the rings' (the kernel's SCM_MAX_FD is 253).
MAX_SESSION_REGIONS = 128
MAX_RINGS = 64
VERSION = 1

_U64 = (1 << 64) - 1


class SessionError(ValueError):
    """An encoded session that cannot be taken over."""


@dataclass(frozen=True)
class RingState:
    """One VringSlot as data."""

    size: int | None = None
    #: (flags, descriptor, used, available, log) of SET_VRING_ADDR; None before it.
    address: tuple[int, int, int, int, int] | None = None
    base: int = 0
    enabled: bool = False
    started: bool = False
    kick: int | None = None
    call: int | None = None
    err: int | None = None
    #: (size, base, address) at the last GET_VRING_BASE, until the ring restarts (reset detection).
    stopped_layout: tuple[int | None, int, tuple[int, int, int, int, int] | None] | None = None


@dataclass(frozen=True)
class RegionState:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    fd: int


@dataclass(frozen=True)
class SessionState:
    """Everything of a connection's protocol session that is not re-derived from guest memory."""

    acked_features: int = 0
    protocol_features: int = 0
    owner: bool = False
    status: int = 0
    broken_reason: str | None = None
    config_change_pending: bool = False
    config_writes: tuple[tuple[int, bytes], ...] = ()
    regions: tuple[RegionState, ...] = ()
    channel: int | None = None
    rings: tuple[RingState, ...] = field(default_factory=tuple)

    def fd_ids(self) -> list[int]:
        """Every fd id the session references, each once, in a stable order."""
        ids: list[int] = [region.fd for region in self.regions]
        if self.channel is not None:
            ids.append(self.channel)
        for ring in self.rings:
            ids.extend(fd for fd in (ring.kick, ring.call, ring.err) if fd is not None)
        return list(dict.fromkeys(ids))

    def encode(self) -> bytes:
        document = {
            "version": VERSION,
            "acked_features": self.acked_features,
            "protocol_features": self.protocol_features,
            "owner": self.owner,
            "status": self.status,
            "broken_reason": self.broken_reason,
            "config_change_pending": self.config_change_pending,
            "config_writes": [[offset, data.hex()] for offset, data in self.config_writes],
            "regions": [
                [r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset, r.fd]
                for r in self.regions
            ],
            "channel": self.channel,
            "rings": [
                {
                    "size": ring.size,
                    "address": list(ring.address) if ring.address is not None else None,
                    "base": ring.base,
                    "enabled": ring.enabled,
                    "started": ring.started,
                    "kick": ring.kick,
                    "call": ring.call,
                    "err": ring.err,
                    "stopped_layout": _layout_out(ring.stopped_layout),
                }
                for ring in self.rings
            ],
        }
        data = json.dumps(document, separators=(",", ":")).encode()
        if len(data) > MAX_SESSION_BYTES:
            raise SessionError(f"session of {len(data)} bytes exceeds {MAX_SESSION_BYTES}")
        return data

    @classmethod
    def decode(cls, data: bytes) -> SessionState:
        if len(data) > MAX_SESSION_BYTES:
            raise SessionError(f"session of {len(data)} bytes exceeds {MAX_SESSION_BYTES}")
        try:
            document = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise SessionError(f"session is not JSON: {exc}") from None
        if not isinstance(document, dict) or document.get("version") != VERSION:
            raise SessionError("session has no known version")
        writes = _list(document, "config_writes", MAX_CONFIG_WRITES)
        config_writes: list[tuple[int, bytes]] = []
        for item in writes:
            if not isinstance(item, list) or len(item) != 2 or not isinstance(item[1], str):
                raise SessionError("config_writes: malformed entry")
            try:
                payload = bytes.fromhex(item[1])
            except ValueError:
                raise SessionError("config_writes: malformed data") from None
            config_writes.append((_uint(item[0], 0xFFFFFFFF, "config offset"), payload))
        regions = []
        for item in _list(document, "regions", MAX_SESSION_REGIONS):
            if not isinstance(item, list) or len(item) != 5:
                raise SessionError("regions: malformed entry")
            gpa, size, uva, offset = (_uint(value, _U64, "region field") for value in item[:4])
            regions.append(RegionState(gpa, size, uva, offset, _fd_id(item[4])))
        rings = [_ring(item) for item in _list(document, "rings", MAX_RINGS)]
        reason = document.get("broken_reason")
        if reason is not None and not isinstance(reason, str):
            raise SessionError("broken_reason: not a string")
        channel = document.get("channel")
        return cls(
            acked_features=_uint(document.get("acked_features"), _U64, "acked_features"),
            protocol_features=_uint(document.get("protocol_features"), _U64, "protocol_features"),
            owner=_bool(document.get("owner"), "owner"),
            status=_uint(document.get("status"), 0xFF, "status"),
            broken_reason=reason,
            config_change_pending=_bool(document.get("config_change_pending"), "config_change_pending"),
            config_writes=tuple(config_writes),
            regions=tuple(regions),
            channel=None if channel is None else _fd_id(channel),
            rings=tuple(rings),
        )


def _layout_out(
    layout: tuple[int | None, int, tuple[int, int, int, int, int] | None] | None,
) -> list[Any] | None:
    if layout is None:
        return None
    size, base, address = layout
    return [size, base, list(address) if address is not None else None]


def _ring(item: object) -> RingState:
    if not isinstance(item, dict):
        raise SessionError("rings: malformed entry")
    size = item.get("size")
    layout = item.get("stopped_layout")
    stopped: tuple[int | None, int, tuple[int, int, int, int, int] | None] | None = None
    if layout is not None:
        if not isinstance(layout, list) or len(layout) != 3:
            raise SessionError("stopped_layout: malformed")
        stopped = (
            None if layout[0] is None else _uint(layout[0], 0x8000, "ring size"),
            _uint(layout[1], 0xFFFF, "ring base"),
            _address(layout[2]),
        )
    return RingState(
        size=None if size is None else _uint(size, 0x8000, "ring size"),
        address=_address(item.get("address")),
        base=_uint(item.get("base"), 0xFFFF, "ring base"),
        enabled=_bool(item.get("enabled"), "enabled"),
        started=_bool(item.get("started"), "started"),
        kick=_optional_fd(item.get("kick")),
        call=_optional_fd(item.get("call")),
        err=_optional_fd(item.get("err")),
        stopped_layout=stopped,
    )


def _address(value: object) -> tuple[int, int, int, int, int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 5:
        raise SessionError("ring address: malformed")
    flags, descriptor, used, available, log = (_uint(v, _U64, "ring address") for v in value)
    return (flags, descriptor, used, available, log)


def _list(document: dict[str, Any], key: str, limit: int) -> list[Any]:
    value = document.get(key, [])
    if not isinstance(value, list) or len(value) > limit:
        raise SessionError(f"{key}: not a list of at most {limit} entries")
    return value


def _uint(value: object, limit: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise SessionError(f"{what}: {value!r} is not an integer between 0 and {limit}")
    return value


def _bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise SessionError(f"{what}: {value!r} is not a boolean")
    return value


def _fd_id(value: object) -> int:
    return _uint(value, 0x7FFFFFFF, "fd id")


def _optional_fd(value: object) -> int | None:
    return None if value is None else _fd_id(value)


__all__ = [
    "MAX_CONFIG_WRITES",
    "MAX_SESSION_BYTES",
    "MAX_SESSION_REGIONS",
    "RegionState",
    "RingState",
    "SessionError",
    "SessionState",
]
