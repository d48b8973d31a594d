"""serve's options for the driver-testing tools: --trace-dir, --trace, --conformance.

Kept beside the control layer so the program's own module only adds them and hands them on. Light at import:
the trace module (and the device it imports) is loaded only when an option asks for it.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

CONFORMANCE_MODES = ("off", "warn", "strict")
#: serve's exit status when --conformance=strict found the driver breaking a driver-normative statement.
EXIT_VIOLATIONS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trace-dir",
        metavar="DIR",
        help="the only directory request traces are written to (created 0700 if missing; refused if another "
        "user owns it or group or others may write in it); without it `ctl trace-start` is refused",
    )
    parser.add_argument(
        "--trace",
        metavar="NAME",
        help="record every guest's requests from its first one into NAME in --trace-dir (the second guest "
        "to NAME-2.EXT, ...); NAME must not exist yet",
    )
    parser.add_argument(
        "--conformance",
        choices=CONFORMANCE_MODES,
        default="off",
        help="check every guest's driver against the spec's driver-normative statements from its first "
        "message: warn logs each broken statement once; strict also makes the program exit with status "
        f"{EXIT_VIOLATIONS} at shutdown if any was broken (docs/toolkit.md)",
    )


def service_options(args: argparse.Namespace, *, worker: bool = False) -> dict[str, Any] | None:
    """ControlService keyword arguments the options ask for (None: no tool asked for); ValueError with
    a message naming the option for anything refused. ``worker``: for a device worker under a keeper,
    whose --trace file may exist already (the keeper checked it was new; a previous worker made it)."""
    trace_dir = getattr(args, "trace_dir", None)
    trace_name = getattr(args, "trace", None)
    mode = getattr(args, "conformance", "off")
    if trace_dir is None and trace_name is None and mode == "off":
        return None
    if trace_name is not None and trace_dir is None:
        raise ValueError("--trace needs --trace-dir (it names a file there)")
    from vhost_iommu.trace import TraceDirectory, TraceDirectoryError

    # "strict" is the program's (its exit status), not the service's.
    options: dict[str, Any] = {"conformance": mode != "off", "strict": mode == "strict"}
    if trace_dir is not None:
        try:
            directory = TraceDirectory(trace_dir)
        except TraceDirectoryError as exc:
            raise ValueError(f"--trace-dir: {exc}") from None
        options["trace_dir"] = directory
        if trace_name is not None:
            try:
                TraceDirectory.check_name(trace_name)
                os.stat(trace_name, dir_fd=directory.fd, follow_symlinks=False)
            except TraceDirectoryError as exc:
                directory.close()
                raise ValueError(f"--trace: {exc}") from None
            except FileNotFoundError:
                options["trace_name"] = trace_name
            else:
                if worker:
                    options["trace_name"] = trace_name
                    return options
                directory.close()
                raise ValueError(f"--trace: {trace_name} exists in {trace_dir}; traces are not overwritten")
    return options


def check_new_trace(args: argparse.Namespace) -> None:
    """ValueError if --trace names a file that exists in --trace-dir: the keeper's check, light (no trace
    module), made once for the program, since its workers continue what their predecessors wrote."""
    trace_dir, trace_name = getattr(args, "trace_dir", None), getattr(args, "trace", None)
    if trace_dir is None or trace_name is None:
        return
    if os.path.lexists(os.path.join(trace_dir, trace_name)):
        raise ValueError(f"--trace: {trace_name} exists in {trace_dir}; traces are not overwritten")
