"""Request traces (vhost_iommu.trace): recording, rotation, reading hostile files, replay and
`vhost-iommu replay` (tests/test_driver_conformance.py records through the control channel)."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from vhost_iommu.conformance import ConformanceChecker
from vhost_iommu.device import IommuDevice, ReservedRegion, ResvMemType, Status, Topology
from vhost_iommu.device.layout import (
    F_MAP_UNMAP,
    F_PROBE,
    F_VERSION_1,
    encode_attach,
    encode_map,
    encode_probe,
    encode_unmap,
    writable_size,
)
from vhost_iommu.trace import (
    TraceDirectory,
    TraceError,
    TraceWriter,
    read_trace,
    replay,
    topology_from_json,
    topology_to_json,
)

FEATURES = F_VERSION_1 | F_MAP_UNMAP | F_PROBE
EP = 0x20


def record(writer: TraceWriter, device: IommuDevice, request: bytes, writable: int = 4) -> tuple[bytes, int]:
    """What the control layer's wrapper does around one request."""
    response, used = device.handle_request(request, writable)
    writer.request(request, writable, response, used, forced=False, ns=1000)
    return response, used


def session(path: Path, **options: int) -> TraceWriter:
    device = IommuDevice()
    writer = TraceWriter(path, device.topology, **options)
    device.set_features(FEATURES)
    writer.features(FEATURES)
    record(writer, device, encode_probe(EP), writable_size(5, device.topology.probe_size))
    record(writer, device, encode_attach(1, EP))
    record(writer, device, encode_map(1, 0x10000, 0x1FFFF, 0x200000))
    record(writer, device, encode_map(1, 0x10000, 0x1FFFF, 0x200000))  # overlaps: INVAL, recorded so
    record(writer, device, encode_unmap(1, 0x10000, 0x1FFFF))
    writer.reset()
    writer.close()
    return writer


def test_topology_round_trips_through_json() -> None:
    default = Topology.default()
    assert topology_from_json(json.loads(json.dumps(topology_to_json(default)))) == default
    custom = Topology(
        pci_ranges=default.pci_ranges,
        endpoint_reserved={0x28: (ReservedRegion(ResvMemType.RESERVED, 0x8000_0000, 0x8FFF_FFFF),)},
        probe_size=256,
        domain_end=100,
        boot_bypass=False,
    )
    assert topology_from_json(topology_to_json(custom)) == custom


def test_an_arm_mmio_topology_round_trips_and_old_traces_stay_x86() -> None:
    from vhost_iommu.machine import Arch, IommuTransport

    # On virtio-mmio the IOMMU has no PCI function: its ranges may cover the default iommu_bdf (00:03.0).
    mmio = Topology.loads(
        'arch = "arm64"\n[iommu]\ntransport = "mmio"\n'
        '[[endpoints]]\nbdf_start = "00:00.0"\nbdf_end = "00:1f.7"\n'
    )
    assert topology_from_json(json.loads(json.dumps(topology_to_json(mmio)))) == mmio
    old = topology_to_json(Topology.default())
    for key in ("arch", "iommu_transport", "iommu_mmio_address"):
        del old[key]
    loaded = topology_from_json(old)
    assert (loaded.arch, loaded.iommu_transport, loaded.iommu_mmio_address) == (
        Arch.X86_64,
        IommuTransport.PCI,
        None,
    )
    with pytest.raises(TraceError, match="arch"):
        topology_from_json({**topology_to_json(mmio), "arch": "sparc"})


def test_a_recorded_session_replays_with_the_same_statuses(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    writer = session(path)
    assert writer.records == 7 and writer.parts == 1
    header, events = read_trace(path)
    kinds = [event.kind for event in events]
    assert header.part == 0 and header.topology == Topology.default()
    assert kinds == ["features", "request", "request", "request", "request", "request", "reset"]
    result = replay(path)
    assert result.ok and result.requests == 5
    assert result.replay_ns["MAP"][0] == 2 and result.recorded_ns["MAP"] == [2, 2000]


def test_a_changed_status_is_reported_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    session(path)
    lines = path.read_text().splitlines()
    # The overlapping MAP (line 6) was answered INVAL; say it was OK.
    record = json.loads(lines[5])
    assert record["status"] == Status.INVAL
    record["status"] = int(Status.OK)
    lines[5] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")
    result = replay(path)
    assert not result.ok and result.difference_count == 1
    [difference] = result.differences
    assert difference.line == 6 and difference.request_type == "MAP"
    assert "recorded OK (used 4), replayed INVAL (used 4)" in difference.describe()


def test_a_different_topology_can_be_given(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    session(path)
    # Domain 1 is outside 2..10: the ATTACH and what follows answer differently.
    narrow = Topology(pci_ranges=Topology.default().pci_ranges, domain_start=2, domain_end=10)
    assert not replay(path, topology=narrow).ok


def test_forced_answers_are_forced_again(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    device = IommuDevice()
    writer = TraceWriter(path, device.topology, features=FEATURES)
    device.set_features(FEATURES)
    record(writer, device, encode_attach(1, EP))
    device.inject(encode_map(1, 0, 0xFFF, 0)[0], Status.NOMEM)  # type: ignore[arg-type]
    response, used = device.handle_request(encode_map(1, 0, 0xFFF, 0), 4)
    writer.request(encode_map(1, 0, 0xFFF, 0), 4, response, used, forced=True, ns=5)
    record(writer, device, encode_map(1, 0, 0xFFF, 0))  # OK: the forced one was not applied
    writer.close()
    assert replay(path).ok


def test_files_rotate_at_the_size_bound_and_keep_a_few(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    device = IommuDevice()
    writer = TraceWriter(path, device.topology, features=FEATURES, max_bytes=4096, keep=2)
    device.set_features(FEATURES)
    for _ in range(200):
        record(writer, device, encode_attach(1, EP))
    writer.close()
    assert writer.parts > 3 and writer.rotated_away == writer.parts - 3
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["t.jsonl", "t.jsonl.1", "t.jsonl.2"]
    for name in files:
        assert (tmp_path / name).stat().st_size < 4096 + 1024
    header, _events = read_trace(tmp_path / "t.jsonl.2")
    assert header.part == writer.parts - 3 and header.first > 0
    with pytest.raises(TraceError, match="only part 0 can be replayed"):
        replay(tmp_path / "t.jsonl.1")


@pytest.mark.parametrize("keep", [0, 2])
def test_files_rotate_inside_a_trace_directory(tmp_path: Path, keep: int) -> None:
    directory = TraceDirectory(tmp_path / "traces")
    device = IommuDevice()
    writer = TraceWriter("t.jsonl", device.topology, max_bytes=4096, keep=keep, directory=directory)
    # The directory is used through its descriptor: renaming its path does not move the trace.
    (tmp_path / "traces").rename(tmp_path / "moved")
    (tmp_path / "traces").mkdir()
    device.set_features(FEATURES)
    for _ in range(200):
        record(writer, device, encode_attach(1, EP))
    writer.close()
    directory.close()
    assert writer.parts > 3
    expected = ["t.jsonl"] + [f"t.jsonl.{n}" for n in range(1, keep + 1)]
    assert sorted(p.name for p in (tmp_path / "moved").iterdir()) == expected
    assert list((tmp_path / "traces").iterdir()) == []
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (tmp_path / "moved").iterdir())


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "t.jsonl:3: not a JSON line"),
        ("[1, 2]", "t.jsonl:3: not a trace event"),
        ('{"n": 0, "t": 0, "kind": "mystery"}', "t.jsonl:3: not a trace event"),
        ('{"n": 0, "t": 0, "kind": "reset", "extra": 1}', "t.jsonl:3: unknown keys"),
        ('{"n": -1, "t": 0, "kind": "reset"}', "t.jsonl:3: n"),
        ('{"n": 0, "t": 0, "kind": "features", "acked": "lots"}', "t.jsonl:3: acked"),
        ('{"n": 0, "t": 0, "kind": "bypass", "value": 7}', "t.jsonl:3: value"),
        (
            '{"n":0,"t":0,"kind":"request","request":"zz","writable":4,"used":4,"status":0,"forced":false,"ns":1}',
            "t.jsonl:3: request: not hex",
        ),
        (
            '{"n":0,"t":0,"kind":"request","request":"01","writable":4,"used":4,"status":0,"forced":1,"ns":1}',
            "t.jsonl:3: forced",
        ),
        ("[" * 100_000, "t.jsonl:3: not a JSON line"),
    ],
)
def test_a_corrupt_line_is_an_error_naming_it(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "t.jsonl"
    session(path)
    lines = path.read_text().splitlines()
    lines[2] = line
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError, match=message.replace("[", r"\[")):
        replay(path)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("", "not a JSON line"),
        ('{"trace": "other"}', "not a vhost-iommu trace header"),
        ('{"trace": "vhost-iommu", "version": 2}', "trace version 2"),
        ('{"trace": "vhost-iommu", "version": 1}', "missing keys"),
    ],
)
def test_a_bad_header_is_refused(tmp_path: Path, header: str, message: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(header + "\n")
    with pytest.raises(TraceError, match=f"t.jsonl:1: .*{message}"):
        replay(path)


def test_an_impossible_topology_in_the_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    session(path)
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    header["topology"]["domain_start"] = 10
    header["topology"]["domain_end"] = 5
    lines[0] = json.dumps(header)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError, match=r"t\.jsonl:1: topology"):
        replay(path)


def test_replay_command_exit_status(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    session(path)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "vhost_iommu", "replay", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)

    same = run(str(path))
    assert same.returncode == 0, same.stderr
    assert "5 requests" in same.stdout and "every status as recorded" in same.stdout
    lines = path.read_text().splitlines()
    changed = json.loads(lines[3])  # the ATTACH
    changed["status"] = int(Status.NOENT)
    lines[3] = json.dumps(changed)
    path.write_text("\n".join(lines) + "\n")
    different = run("--json", str(path))
    assert different.returncode == 1
    assert json.loads(different.stdout)["differences"] == 1
    lines[3] = "garbage"
    path.write_text("\n".join(lines) + "\n")
    corrupt = run(str(path))
    assert corrupt.returncode == 2
    assert "t.jsonl:4: not a JSON line" in corrupt.stderr
    missing = run(str(tmp_path / "nothing.jsonl"))
    assert missing.returncode == 2 and "nothing.jsonl" in missing.stderr


def test_the_writer_does_not_follow_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep me")
    (tmp_path / "t.jsonl").symlink_to(target)
    with pytest.raises(OSError):
        TraceWriter(tmp_path / "t.jsonl", Topology.default())
    assert target.read_text() == "keep me"


def test_replay_checks_the_recorded_driver_offline(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    session(path)
    result = replay(path, checker=ConformanceChecker)
    assert result.ok and result.conformance is not None
    # The session's driver declined INPUT_RANGE and DOMAIN_RANGE, and sent one overlapping MAP.
    assert result.conformance["counts"] == {"features-accept": 1, "map-overlap": 1}
    assert replay(path).conformance is None
    command = [sys.executable, "-m", "vhost_iommu", "replay", "--conformance", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and "driver conformance: 2 violation(s)" in done.stdout
    assert "map-overlap x1: MAP of 0x10000-0x1ffff over a mapping of domain 1" in done.stdout
