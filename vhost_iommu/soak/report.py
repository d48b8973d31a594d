"""The soak's files: every sample as JSON, and a markdown summary of the figures and the verdict."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from vhost_iommu.soak.measure import Growth, Sample
from vhost_iommu.soak.run import SoakResult


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def _load(load: tuple[float, float, float]) -> str:
    return " ".join(f"{value:.2f}" for value in load)


def growth_record(measured: Growth | None) -> dict[str, Any] | None:
    if measured is None:
        return None
    return {
        "warmup_seconds": measured.warmup_seconds,
        "measured_seconds": measured.measured_seconds,
        "reference": dataclasses.asdict(measured.reference),
        "end": dataclasses.asdict(measured.end),
        "rss_growth_percent": measured.rss_growth_percent,
        "anon_growth_percent": measured.anon_growth_percent,
        "fd_growth": measured.fd_growth,
        "thread_growth": measured.thread_growth,
        "rss_max_kib": measured.rss_max_kib,
    }


def to_json(result: SoakResult, command: str, commit: str) -> dict[str, Any]:
    return {
        "command": command,
        "commit": commit,
        "started": result.started,
        "config": dataclasses.asdict(result.config),
        "passed": result.passed,
        "reasons": result.reasons,
        "growth": growth_record(result.growth),
        "findings": dataclasses.asdict(result.findings),
        "backend_pid": result.backend_pid,
        "qemu_pid": result.qemu_pid,
        "backend_exit": result.backend_exit,
        "job_rc": result.job_rc,
        "guest": dataclasses.asdict(result.final),
        "mappings_left": result.mappings_left,
        "device_requests": result.device_requests,
        "control_actions": result.actions,
        "load_start": result.load_start,
        "load_end": result.load_end,
        "wall_seconds": result.wall_seconds,
        "interrupted": result.interrupted,
        "samples": [dataclasses.asdict(sample) for sample in result.samples],
    }


def _figures(measured: Growth, samples: list[Sample]) -> list[tuple[str, str, str, str]]:
    before, after = measured.reference.process, measured.end.process
    seconds = measured.measured_seconds or 1.0
    rows = [
        ("VmRSS", _mib(before.rss_kib), _mib(after.rss_kib), f"{measured.rss_growth_percent:+.2f}%"),
        (
            "RssAnon (private)",
            _mib(before.anon_kib),
            _mib(after.anon_kib),
            f"{measured.anon_growth_percent:+.2f}%",
        ),
        (
            "RssFile",
            _mib(before.file_kib),
            _mib(after.file_kib),
            f"{after.file_kib - before.file_kib:+d} KiB",
        ),
        (
            "RssShmem (guest RAM touched)",
            _mib(before.shmem_kib),
            _mib(after.shmem_kib),
            f"{after.shmem_kib - before.shmem_kib:+d} KiB",
        ),
        ("open fds", str(before.fds), str(after.fds), f"{measured.fd_growth:+d}"),
        ("threads", str(before.threads), str(after.threads), f"{measured.thread_growth:+d}"),
        (
            "CPU time",
            f"{before.cpu_seconds:.1f} s",
            f"{after.cpu_seconds:.1f} s",
            f"{100 * (after.cpu_seconds - before.cpu_seconds) / seconds:.0f}% of a core",
        ),
    ]
    guest_before, guest_after = measured.reference.guest, measured.end.guest
    rows += [
        ("guest rounds", str(guest_before.rounds), str(guest_after.rounds), ""),
        (
            "guest VFIO map/unmap calls",
            str(guest_before.vfio_ops),
            str(guest_after.vfio_ops),
            f"{(guest_after.vfio_ops - guest_before.vfio_ops) / seconds:.0f}/s",
        ),
        ("guest disk MiB written+verified", str(guest_before.blk_mb), str(guest_after.blk_mb), ""),
        ("guest vfio-pci rebinds", str(guest_before.rebinds), str(guest_after.rebinds), ""),
        (
            "device requests served",
            str(measured.reference.device_requests),
            str(measured.end.device_requests),
            f"{(measured.end.device_requests - measured.reference.device_requests) / seconds:.0f}/s",
        ),
    ]
    return rows


def _backend(result: SoakResult) -> str:
    pids = result.samples[-1].pids if result.samples else ()
    if result.config.state_dir is None:
        return f"`vhost-iommu serve`, pid {result.backend_pid}"
    return (
        "`vhost-iommu serve --state-dir`: the keeper and its device worker "
        f"(pids {', '.join(map(str, pids))}), their figures added up"
    )


def markdown(result: SoakResult, command: str, commit: str) -> str:
    config = result.config
    lines = [
        "# Soak result",
        "",
        f"`{command}` at {commit}, started {result.started}: {config.minutes:g} min of guest workload "
        f"(`{config.plan}`), a sample every {config.interval:g} s, warm-up {config.warmup_seconds:.0f} s; "
        f"{len(result.samples)} samples, {result.wall_seconds / 60:.1f} min in all.",
        "",
        f"**Verdict: {'PASSED' if result.passed else 'FAILED'}**"
        + ("" if result.passed else "\n\n" + "\n".join(f"- {reason}" for reason in result.reasons[:50])),
        "",
    ]
    measured = result.growth
    if measured is not None:
        lines += [
            f"From the end of the warm-up ({measured.reference.seconds:.0f} s) to the last sample "
            f"({measured.end.seconds:.0f} s); the back-end's largest VmRSS of the run "
            f"{_mib(measured.rss_max_kib)}, VmHWM at the end {_mib(measured.end.process.rss_max_kib)}.",
            "",
            "| figure | after warm-up | end | change |",
            "| --- | ---: | ---: | ---: |",
            *(
                f"| {name} | {before} | {after} | {change} |"
                for name, before, after, change in _figures(measured, result.samples)
            ),
            "",
        ]
    loads = [sample.load[0] for sample in result.samples]
    actions = ", ".join(f"{name} {count}" for name, count in sorted(result.actions.items()))
    final = result.final
    lines += [
        f"- Guest, whole run: {final.rounds} rounds, {final.vfio_ops} VFIO map/unmap calls, "
        f"{final.blk_mb} MiB written to the disk and read back, {final.rebinds} rebinds, "
        f"{final.errors} failed operations; job rc {result.job_rc}.",
        "- Device requests served: "
        + (", ".join(f"{name} {count}" for name, count in result.device_requests.items()) or "unknown")
        + f"; mappings left once VFIO closed: {result.mappings_left}.",
        f"- Control channel: {actions or 'nothing'}.",
        f"- Back-end: {_backend(result)}; exit status on SIGTERM: {result.backend_exit}.",
        f"- Load average (1, 5, 15 min): {_load(result.load_start)} at the start, "
        f"{_load(result.load_end)} at the end"
        + (f"; 1-min load over the samples {min(loads):.2f}-{max(loads):.2f}." if loads else "."),
        "",
    ]
    return "\n".join(lines)


def write(result: SoakResult, output: Path, command: str, commit: str) -> list[Path]:
    """soak.json and soak.md in ``output``."""
    data = output / "soak.json"
    data.write_text(json.dumps(to_json(result, command, commit), indent=1, default=str) + "\n")
    summary = output / "soak.md"
    summary.write_text(markdown(result, command, commit))
    return [data, summary]
