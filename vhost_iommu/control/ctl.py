"""``vhost-iommu ctl``: the control channel from a shell, as tables (rich) or JSON (``--json``).

Each invocation connects to ``--control-socket``, sends one request and prints its result; an error reply
is one line on stderr and exit status 1. ``ctl mappings`` prints one page and, when there is more, the
``--after`` that continues it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from vhost_iommu.cli import CliError, Command
from vhost_iommu.control.client import ControlClient
from vhost_iommu.control.protocol import ControlError

REQUEST_TYPES = ("ATTACH", "DETACH", "MAP", "UNMAP", "PROBE")
STATUSES = ("OK", "IOERR", "UNSUPP", "DEVERR", "INVAL", "RANGE", "NOENT", "FAULT", "NOMEM", "NONE")


def _integer(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer (decimal or 0x hex)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def _cursor(text: str) -> list[int]:
    domain, sep, iova = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not DOMAIN:IOVA")
    return [_integer(domain), _integer(iova)]


def _region(text: str) -> dict[str, object]:
    kind, sep, span = text.partition(":")
    start, dash, end = span.partition("-")
    if not sep or not dash or kind.upper() not in ("RESERVED", "MSI"):
        raise argparse.ArgumentTypeError(f"{text!r} is not TYPE:START-END with TYPE reserved or msi")
    return {"type": kind.upper(), "start": _integer(start), "end": _integer(end)}


def _rate(text: str) -> float:
    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate such as 0.01 or 1%") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and 1 (or 0% and 100%)")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--control-socket", metavar="PATH", required=True, help="the back-end's control socket"
    )
    parser.add_argument("--json", action="store_true", help="print the reply's result as JSON")
    parser.add_argument(
        "--connection", type=_integer, metavar="N", help="the front-end connection (see 'connections')"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help)

    add("hello", "the protocol version and the commands the back-end knows")
    add("upgrade", "serve --state-dir: a new device worker (the code on disk) takes over, as SIGHUP does")
    add("connections", "one row per connected front-end")
    endpoints = add(
        "endpoints",
        "endpoints, their PCI address, domain and reserved regions; the vfio-user endpoints served for "
        "them: client, guest, DMA counters and last faults with their explanations",
    )
    endpoints.add_argument(
        "--served", action="store_true", help="only the vfio-user endpoints, of every guest"
    )
    add("domains", "domains, their endpoints and mapping counts")
    mappings = add("mappings", "mappings, filtered and paged")
    mappings.add_argument("--domain", type=_integer)
    mappings.add_argument("--endpoint", type=_integer, help="the mappings of the endpoint's domain")
    mappings.add_argument("--iova-start", type=_integer, help="only mappings that end at or after it")
    mappings.add_argument("--iova-end", type=_integer, help="only mappings that start at or before it")
    mappings.add_argument("--limit", type=_integer, default=50, help="rows per page (default 50)")
    mappings.add_argument("--after", type=_cursor, metavar="DOMAIN:IOVA", help="continue after this mapping")
    counters = add("counters", "request, status and fault counters; latency per request type")
    counters.add_argument("--buckets", action="store_true", help="also print the latency histograms")
    add("latency-reset", "start the latency histograms afresh")
    add("features", "virtio and vhost-user protocol features, by name")
    add("queues", "the rings: size, next avail, used idx, started/enabled")
    add("config", "the config space, decoded")
    add("events", "fault events waiting for eventq buffers, and the dropped count")
    fault = add("fault", "send fault events to the driver on the eventq")
    fault.add_argument("--endpoint", type=_integer, required=True)
    fault.add_argument(
        "--reason", default="MAPPING", help="UNKNOWN, DOMAIN, MAPPING or a number (default MAPPING)"
    )
    fault.add_argument("--address", type=_integer, help="faulting address (sets the ADDRESS flag)")
    fault.add_argument("--access", default="r", help="r, w, x or a combination (default r)")
    fault.add_argument("--flags", type=_integer, default=0, help="extra raw flag bits")
    fault.add_argument("--count", type=_integer, default=1)
    add("events-clear", "drop the fault events not yet delivered")
    translate = add("translate", "translate a DMA access; --report sends the fault, if any, to the driver")
    translate.add_argument("--endpoint", type=_integer, required=True)
    translate.add_argument("--iova", type=_integer, required=True)
    translate.add_argument("--size", type=_integer, default=1)
    translate.add_argument("--access", default="r")
    translate.add_argument("--report", action="store_true")
    inject = add("inject", "answer the next N requests of a type with a status (NONE: buffers unwritten)")
    inject.add_argument("type", type=str.upper, choices=REQUEST_TYPES)
    inject.add_argument("status", type=str.upper, choices=STATUSES)
    inject.add_argument("--times", type=_integer, default=1)
    rate = add("inject-rate", "answer a fraction of the requests of a type with a status (rate 0: off)")
    rate.add_argument("type", type=str.upper, choices=REQUEST_TYPES)
    rate.add_argument("status", type=str.upper, choices=STATUSES)
    rate.add_argument("rate", type=_rate, help="0.01 or 1%%")
    rate.add_argument("--seed", type=_integer)
    add("inject-clear", "every forced answer, rate and added latency off")
    delay = add(
        "delay", "hold each requestq batch (or with --type each request of a type) this long (0: off)"
    )
    delay.add_argument("us", type=_integer, help="microseconds")
    delay.add_argument("--type", type=str.upper, choices=REQUEST_TYPES)
    bypass = add("bypass", "set config.bypass and send CONFIG_CHANGE_MSG")
    bypass.add_argument("value", choices=("0", "1", "boot"))
    resv = add("resv", "an endpoint's reserved regions: its next PROBE, MAP checks and translation")
    resv.add_argument("--endpoint", type=_integer, required=True)
    resv.add_argument("regions", type=_region, nargs="*", metavar="TYPE:START-END")
    resv_clear = add("resv-clear", "the topology's reserved regions again")
    resv_clear.add_argument("--endpoint", type=_integer)
    conformance = add("conformance", "driver-normative statements the driver broke, with counts")
    conformance.add_argument("--statements", action="store_true", help="also the text of every statement")
    add("conformance-start", "check the driver's requests from now on")
    add("conformance-stop", "stop checking (returns the last report)")
    add("conformance-reset", "zero the conformance counters")
    trace = add("trace-start", "record every request and its answer to a JSON-lines file in --trace-dir")
    trace.add_argument(
        "name", help="a new file in the back-end's --trace-dir (a name, not a path; parts NAME.1 ...)"
    )
    trace.add_argument("--max-bytes", type=_integer, default=64 << 20, help="rotate past this size")
    trace.add_argument("--keep", type=_integer, default=4, help="rotated parts kept (default 4)")
    add("trace-stop", "stop recording and close the trace")


def _request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    command: str = args.command
    request: dict[str, Any] = {"connection": args.connection}
    if command == "mappings":
        request.update(
            domain=args.domain,
            endpoint=args.endpoint,
            iova_start=args.iova_start,
            iova_end=args.iova_end,
            limit=args.limit,
            after=args.after,
        )
    elif command == "fault":
        reason: object = args.reason
        if isinstance(reason, str) and reason.strip().isdigit():
            reason = int(reason)
        request.update(
            endpoint=args.endpoint,
            reason=reason,
            address=args.address,
            access=args.access,
            flags=args.flags,
            count=args.count,
        )
    elif command == "endpoints":
        if args.served:
            request.update(served=True)
            request.pop("connection")
    elif command == "translate":
        request.update(
            endpoint=args.endpoint, iova=args.iova, size=args.size, access=args.access, report=args.report
        )
    elif command == "inject":
        request.update(type=args.type, status=args.status, times=args.times)
    elif command == "inject-rate":
        request.update(type=args.type, status=args.status, rate=args.rate, seed=args.seed)
    elif command == "delay":
        request.update(us=args.us, type=args.type)
    elif command == "bypass":
        if args.value == "boot":
            request.update(boot=True)
        else:
            request.update(value=int(args.value))
    elif command == "resv":
        request.update(endpoint=args.endpoint, regions=args.regions)
    elif command == "resv-clear":
        request.update(endpoint=args.endpoint)
    elif command == "conformance":
        request.update(statements=args.statements)
    elif command == "trace-start":
        request.update(name=args.name, max_bytes=args.max_bytes, keep=args.keep)
    elif command in ("hello", "upgrade"):
        request.pop("connection")
    return command, request


def run(args: argparse.Namespace) -> int:
    command, request = _request(args)
    try:
        with ControlClient(args.control_socket, timeout=args.timeout) as client:
            result = client.call(command, **request)
    except ControlError as exc:
        raise CliError(f"{command}: {exc.message} ({exc.code})") from None
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    _PRINTERS.get(command, _print_object)(result, args)
    return 0


# -- human output -------------------------------------------------------------------------------------------


def _hex(value: object) -> str:
    return f"{value:#x}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _bdf(bdf: int) -> str:
    return f"{bdf >> 8:02x}:{(bdf >> 3) & 0x1F:02x}.{bdf & 7}"


def _table(title: str | None, columns: list[str], rows: list[list[str]]) -> None:
    from rich.box import SIMPLE
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, box=SIMPLE, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console(width=max(100, min(200, _terminal_width()))).print(table)


def _terminal_width() -> int:
    import shutil

    return shutil.get_terminal_size((120, 24)).columns


#: Fields printed in hex: addresses, masks, flag words, endpoint IDs.
_HEX_FIELDS = {
    "address",
    "iova",
    "iova_start",
    "iova_end",
    "start",
    "end",
    "phys",
    "flags",
    "endpoint",
    "input_start",
    "input_end",
    "page_size_mask",
}


def _print_object(result: Any, _args: argparse.Namespace) -> None:
    if isinstance(result, dict) and result:
        _table(None, ["field", "value"], [[str(k), _render(v, k)] for k, v in result.items()])
    elif isinstance(result, list) and result and all(isinstance(r, dict) for r in result):
        columns = list(result[0])
        _table(None, columns, [[_render(row.get(c), c) for c in columns] for row in result])
    else:
        print("ok" if result in ({}, [], None) else _render(result))


def _render(value: object, field: str = "") -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "-"
    if isinstance(value, int):
        return _hex(value) if field in _HEX_FIELDS else str(value)
    if isinstance(value, list):
        return ", ".join(_render(v, field) for v in value) or "-"
    if isinstance(value, dict):
        return " ".join(f"{k}={_render(v, k)}" for k, v in value.items())
    return str(value)


def _regions(regions: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['type'].lower()} {r['start']:#x}-{r['end']:#x}" for r in regions) or "-"


def _print_connections(result: Any, _args: argparse.Namespace) -> None:
    import datetime

    rows = [
        [
            str(c["connection"]),
            c["name"],
            datetime.datetime.fromtimestamp(c["since"]).isoformat(timespec="seconds"),
            str(c["started_queues"]),
            str(c["attached_endpoints"]),
            str(c["domains"]),
            str(c["requests"]),
            c["broken"] or "-",
        ]
        for c in result
    ]
    columns = ["connection", "name", "since", "queues started", "attached", "domains", "requests", "broken"]
    _table(None, columns, rows)


def _print_resv(result: Any, _args: argparse.Namespace) -> None:
    if "reserved" in result:
        print(
            f"endpoint {result['endpoint']:#x} reserved (its next PROBE, MAP and translation): "
            f"{_regions(result['reserved'])}"
        )
    else:
        print("every endpoint reports the topology's reserved regions again")


def _print_served(served: list[Any]) -> None:
    for e in served:
        client = e["client"] or "no client"
        guest = f"paired with {e['paired']['name']}" if e["paired"] else f"not paired: {e['unpaired']}"
        print(f"{e['kind']} {e['bdf']} endpoint {e['endpoint']:#x} on {e['socket']}: {client}, {guest}")
        if e["counters"] is not None:
            print(
                "  DMA: "
                + ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in e["counters"].items())
            )
        for fault in e["last_faults"]:
            explanation = fault["explanation"]
            print(f"  fault {fault['reason']} {fault['access']} {fault['address']:#x}")
            if explanation is not None:
                print(f"    {explanation['verdict']}: {explanation['text']}")


def _print_endpoints(result: Any, args: argparse.Namespace) -> None:
    if args.served:
        _print_served(result)
        return
    served = [e["vfio_user"] for e in result if e.get("vfio_user") is not None]
    rows = [
        [
            _hex(e["endpoint"]),
            f"{e['segment']:04x}:{_bdf(e['bdf'])}",
            _render(e["domain"]),
            _regions(e["reserved"]),
        ]
        for e in result
        if e["domain"] is not None
    ]
    detached = len(result) - len(rows)
    _table(f"{len(result)} endpoints, {len(rows)} attached", ["endpoint", "PCI", "domain", "reserved"], rows)
    if detached:
        print(f"({detached} endpoints not attached; --json lists them all)")
    _print_served(served)


def _print_domains(result: Any, _args: argparse.Namespace) -> None:
    rows = [
        [
            str(d["domain"]),
            "identity" if d["bypass"] else "paging",
            ", ".join(_hex(e) for e in d["endpoints"]) or "-",
            str(d["mappings"]),
        ]
        for d in result
    ]
    _table(f"{len(result)} domains", ["domain", "kind", "endpoints", "mappings"], rows)


def _flags(flags: int) -> str:
    text = ("R" if flags & 1 else "") + ("W" if flags & 2 else "") + ("M" if flags & 4 else "")
    return text or "-"


def _print_mappings(result: Any, _args: argparse.Namespace) -> None:
    rows = [
        [str(m["domain"]), _hex(m["iova_start"]), _hex(m["iova_end"]), _hex(m["phys"]), _flags(m["flags"])]
        for m in result["mappings"]
    ]
    _table(None, ["domain", "IOVA start", "IOVA end", "guest-physical", "flags"], rows)
    if result["next"] is not None:
        domain, iova = result["next"]
        print(f"more: --after {domain}:{iova:#x}")


def _bound(microseconds: float) -> str:
    """A histogram bucket's upper bound: whole µs once they are many."""
    return f"<{microseconds:.0f}" if microseconds >= 10 else f"<{microseconds:.3g}"


def _print_counters(result: Any, args: argparse.Namespace) -> None:
    requests, statuses, faults = result["requests"], result["statuses"], result["faults"]
    print("requests: " + ", ".join(f"{k} {v}" for k, v in requests.items()))
    print(
        "statuses: "
        + ", ".join(f"{k} {v}" for k, v in statuses.items() if v)
        + f"  (injected {result['injected']})"
    )
    print("faults:   " + ", ".join(f"{k} {v}" for k, v in faults.items()))
    rows = []
    for name, summary in [*result["latency"].items(), ("batch", result["batches"])]:
        rows.append(
            [
                name,
                str(summary["count"]),
                f"{summary['mean_us']:.1f}",
                f"{summary['min_us']:.1f}",
                _bound(summary["p50_us"]),
                _bound(summary["p99_us"]),
                f"{summary['max_us']:.1f}",
            ]
        )
    _table(
        "service time per request (µs), from requestq kick batches",
        ["type", "requests", "mean", "min", "p50", "p99", "max"],
        rows,
    )
    if args.buckets:
        for name, summary in result["latency"].items():
            print(f"{name}: " + "  ".join(f"{_bound(le)}us {count}" for le, count in summary["buckets"]))
    if result["delay_us"]:
        print(f"added latency: {result['delay_us']} us per requestq batch ({result['delayed_batches']} held)")
    for kind, microseconds in result["type_delays_us"].items():
        print(f"added latency: {microseconds} us per {kind} request")
    if result["type_delays_us"] or result["delayed_requests"]:
        print(f"requests held by a per-type delay: {result['delayed_requests']}")
    for rate in result["rates"]:
        print(
            f"rate injection: {rate['status']} on {rate['rate']:.2%} of {rate['type']} "
            f"(seed {rate['seed']}; {rate['forced']} of {rate['seen']} so far)"
        )


def _print_queues(result: Any, _args: argparse.Namespace) -> None:
    columns = [
        "index",
        "size",
        "started",
        "enabled",
        "next_avail",
        "used_idx",
        "in_flight",
        "event_idx",
        "served_by",
        "path",
        "scheduling",
    ]
    _table(None, columns, [[_render(q.get(c)) for c in columns] for q in result])
    if result and result[0]["broken"]:
        print(f"device needs reset: {result[0]['broken']}")


def _print_features(result: Any, _args: argparse.Namespace) -> None:
    print(f"offered  {result['offered']:#018x}  " + " ".join(result["offered_names"]))
    print(f"acked    {result['acked']:#018x}  " + " ".join(result["acked_names"]))
    print(f"protocol {result['protocol']:#018x}  " + " ".join(result["protocol_names"]))


def _print_events(result: Any, _args: argparse.Namespace) -> None:
    rows = [
        [str(e["reason"]), _hex(e["flags"]), _hex(e["endpoint"]), _hex(e["address"])]
        for e in result["pending"]
    ]
    print(
        f"{len(rows)} pending (capacity {result['capacity']}), {result['queued_total']} queued in all, "
        f"{result['dropped']} dropped"
    )
    if rows:
        _table(None, ["reason", "flags", "endpoint", "address"], rows)


def _print_translate(result: Any, _args: argparse.Namespace) -> None:
    if result["translated"]:
        segments = ", ".join(f"{phys:#x}+{length:#x}" for phys, length in result["segments"])
        print(f"translated{' (bypass)' if result['bypass'] else ''}: {segments}")
    else:
        reported = "reported to the driver" if result["reported"] else "not reported"
        print(
            f"fault {result['reason']} endpoint {result['endpoint']:#x} address {result['address']:#x} "
            f"flags {result['flags']:#x} ({reported})"
        )
        explanation = result.get("explanation")
        if explanation is not None:
            print(f"{explanation['verdict']}: {explanation['text']}")


def _print_conformance(result: Any, _args: argparse.Namespace) -> None:
    if "enabled" in result and not result["enabled"]:
        print("no conformance checker runs on this connection (ctl conformance-start)")
        return
    print(f"{result['total']} violation(s) of driver-normative statements")
    rows = [[key, str(count), result["first"].get(key, "")] for key, count in result["counts"].items()]
    if rows:
        _table(None, ["statement", "count", "first seen"], rows)
    for key, statement in result.get("statements", {}).items():
        print(f"{key}: [{statement['section']}] {statement['text']}")


_PRINTERS: dict[str, Callable[[Any, argparse.Namespace], None]] = {
    "conformance": _print_conformance,
    "conformance-stop": _print_conformance,
    "connections": _print_connections,
    "resv": _print_resv,
    "resv-clear": _print_resv,
    "endpoints": _print_endpoints,
    "domains": _print_domains,
    "mappings": _print_mappings,
    "counters": _print_counters,
    "queues": _print_queues,
    "features": _print_features,
    "events": _print_events,
    "translate": _print_translate,
}

CTL = Command("ctl", "inspect and break a running back-end through its control socket", configure, run)
