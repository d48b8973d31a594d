"""Driver conformance (vhost_iommu.conformance): each checked driver-normative statement, flagged when
broken and only then; and the control channel's conformance and trace commands on a served device."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vhost_iommu.conformance import STATEMENTS, ConformanceChecker
from vhost_iommu.control import ControlClient, ControlError
from vhost_iommu.control.server import ControlServer
from vhost_iommu.control.service import ControlService
from vhost_iommu.device import IommuDevice, ReservedRegion, ResvMemType, Status
from vhost_iommu.device.layout import (
    ATTACH_F_BYPASS,
    CONFIG_BYPASS,
    F_BYPASS_CONFIG,
    F_DOMAIN_RANGE,
    F_INPUT_RANGE,
    F_MAP_UNMAP,
    F_PROBE,
    F_VERSION_1,
    MAP_F_MMIO,
    MAP_F_READ,
    decode_status,
    encode_attach,
    encode_detach,
    encode_map,
    encode_probe,
    encode_unmap,
)
from vhost_iommu.harness.background import RunningServer
from vhost_iommu.harness.iommu_driver import IommuDriver
from vhost_iommu.jit import warm_up
from vhost_iommu.trace import TraceDirectory, TraceDirectoryError, read_trace, replay
from vhost_iommu.virtio_iommu import VirtioIommuBackend

EP = 0x20
MSI = 0xFEE0_0000
ALL = F_VERSION_1 | F_MAP_UNMAP | F_PROBE | F_INPUT_RANGE | F_DOMAIN_RANGE | F_BYPASS_CONFIG
PROBE_WRITABLE = 512 + 4


class Driver:
    """A device core with a checker in front of it, as the control layer wires them."""

    def __init__(self, features: int = ALL) -> None:
        self.device = IommuDevice()
        self.checker = ConformanceChecker(self.device)
        self.device.set_features(features)
        self.checker.check_features(features)

    def send(self, request: bytes, writable: int = 4) -> int | None:
        self.checker.check_request(request, writable)
        response, used = self.device.handle_request(request, writable)
        return decode_status(response) if used else None

    def attach(self, domain: int = 1, endpoint: int = EP, flags: int = 0) -> None:
        self.send(encode_probe(endpoint), PROBE_WRITABLE)
        self.send(encode_attach(domain, endpoint, flags))

    @property
    def counts(self) -> dict[str, int]:
        return self.checker.counts


def test_a_well_behaved_driver_breaks_nothing() -> None:
    driver = Driver()
    driver.attach()
    assert driver.send(encode_map(1, 0x10000, 0x1FFFF, 0x200000)) == Status.OK
    assert driver.send(encode_map(1, 0x20000, 0x2FFFF, 0x300000)) == Status.OK
    assert driver.send(encode_unmap(1, 0x10000, 0x2FFFF)) == Status.OK
    assert driver.send(encode_unmap(1, 0x0, 0xFFFFFFFF)) == Status.OK  # spilling over unmapped space is fine
    driver.attach(2, 0x21, ATTACH_F_BYPASS)
    driver.send(encode_attach(2, 0x21, ATTACH_F_BYPASS))  # again: consistent
    driver.send(encode_detach(2, 0x21))
    driver.checker.check_config_write(CONFIG_BYPASS, b"\x00")
    assert driver.counts == {}


BREAKERS: dict[str, Callable[[Driver], object]] = {
    "head-reserved": lambda d: d.send(encode_detach(1, EP, head_reserved=b"\x01\x00\x00")),
    "attach-reserved": lambda d: d.send(encode_attach(1, EP, reserved=b"\x00\x00\x00\x01")),
    "attach-flags-undefined": lambda d: d.send(encode_attach(1, EP, 0x10)),
    "detach-reserved": lambda d: d.send(encode_detach(1, EP, reserved=b"\x01" + bytes(7))),
    "unmap-reserved": lambda d: d.send(encode_unmap(1, 0, 0xFFF, reserved=b"\x00\x01\x00\x00")),
    "probe-reserved": lambda d: d.send(encode_probe(EP, reserved=b"\x01" + bytes(63)), PROBE_WRITABLE),
    "probe-size": lambda d: d.send(encode_probe(EP), 64 + 4),
    "domain-range": lambda d: d.send(encode_attach(0, EP)),
    "input-range": lambda d: d.send(encode_map(1, 1 << 48, (1 << 48) + 0xFFF, 0)),
    "request-layout": lambda d: d.send(encode_attach(1, EP)[:-1]),
    "map-virt-end": lambda d: d.send(encode_map(1, 0x2000, 0x1FFF, 0)),
    "map-flags-undefined": lambda d: d.send(encode_map(1, 0, 0xFFF, 0, MAP_F_READ | 0x80)),
    "map-mmio-unnegotiated": lambda d: d.send(encode_map(1, 0, 0xFFF, 0, MAP_F_READ | MAP_F_MMIO)),
    "config-write-other": lambda d: d.checker.check_config_write(0, bytes(8)),
    "config-bypass-value": lambda d: d.checker.check_config_write(CONFIG_BYPASS, b"\x02"),
}


@pytest.mark.parametrize("statement", sorted(BREAKERS))
def test_each_broken_statement_is_counted(statement: str) -> None:
    driver = Driver()
    driver.attach()
    BREAKERS[statement](driver)
    assert driver.counts == {statement: 1}
    BREAKERS[statement](driver)
    assert driver.counts == {statement: 2}
    assert statement in driver.checker.first


def test_attach_before_probe_and_after_a_reset() -> None:
    driver = Driver()
    driver.send(encode_attach(1, EP))
    assert driver.counts == {"probe-before-attach": 1}
    driver.send(encode_probe(0x21), PROBE_WRITABLE)
    driver.send(encode_attach(1, 0x21))
    assert driver.counts == {"probe-before-attach": 1}
    driver.checker.device_reset()
    driver.device.reset()
    driver.checker.check_features(ALL)
    driver.device.set_features(ALL)
    driver.send(encode_attach(1, 0x21))  # probed before the reset: not enough
    assert driver.counts == {"probe-before-attach": 2}
    # Without PROBE negotiated there is nothing to send first.
    plain = Driver(ALL & ~F_PROBE)
    plain.send(encode_attach(1, EP))
    assert plain.counts == {"features-accept": 1}


def test_bypass_flag_must_match_an_existing_domain() -> None:
    driver = Driver()
    driver.attach(1, EP)
    driver.attach(1, 0x21, ATTACH_F_BYPASS)
    driver.attach(2, 0x22, ATTACH_F_BYPASS)
    driver.attach(2, 0x23)
    assert driver.counts == {"attach-bypass-consistent": 2}


def test_reserved_regions_count_as_the_driver_was_told_them() -> None:
    driver = Driver()
    driver.attach(1, EP)
    # A tool reserves a range after the driver's PROBE: the device refuses a MAP there, but the driver was
    # not told, so it broke nothing ...
    driver.device.set_reserved_regions(EP, (ReservedRegion(ResvMemType.RESERVED, 0x200000, 0x2FFFFF),))
    assert driver.send(encode_map(1, 0x200000, 0x200FFF, 0)) == Status.RANGE
    assert driver.counts == {}
    # ... until it probes the endpoint again and is told.
    driver.send(encode_probe(EP), PROBE_WRITABLE)
    assert driver.send(encode_map(1, 0x201000, 0x201FFF, 0)) == Status.RANGE
    assert driver.counts == {"map-reserved-region": 1}
    # And the region it was told about before is no longer one it must avoid (the MSI window is gone).
    assert driver.send(encode_map(1, MSI, MSI + 0xFFF, MSI)) == Status.OK
    assert driver.counts == {"map-reserved-region": 1}


def test_maps_and_unmaps_against_the_domain_state() -> None:
    driver = Driver()
    driver.attach(1, EP)
    driver.attach(2, 0x21, ATTACH_F_BYPASS)
    driver.send(encode_map(1, 0x10000, 0x1FFFF, 0x200000))
    driver.send(encode_map(1, 0x18000, 0x18FFF, 0x200000))
    assert driver.counts == {"map-overlap": 1}
    driver.send(encode_map(1, MSI, MSI + 0xFFF, MSI))
    assert driver.counts["map-reserved-region"] == 1
    driver.send(encode_unmap(1, 0x11000, 0x1FFFF))
    driver.send(encode_unmap(1, 0x10000, 0x10FFF))
    assert driver.counts["unmap-split"] == 2
    driver.send(encode_map(2, 0, 0xFFF, 0))
    driver.send(encode_unmap(2, 0, 0xFFF))
    assert driver.counts["map-bypass-domain"] == 1 and driver.counts["unmap-bypass-domain"] == 1


def test_unnegotiated_features() -> None:
    driver = Driver(F_VERSION_1)
    driver.send(encode_map(1, 0, 0xFFF, 0))
    driver.send(encode_probe(EP), PROBE_WRITABLE)
    driver.checker.check_config_write(CONFIG_BYPASS, b"\x01")
    driver.send(encode_attach(0, EP))  # DOMAIN_RANGE not negotiated: any domain is the driver's to use
    assert driver.counts == {
        "features-accept": 1,
        "request-unnegotiated": 2,
        "config-bypass-unnegotiated": 1,
    }


def test_requests_before_features_and_garbage() -> None:
    device = IommuDevice()
    checker = ConformanceChecker(device)
    checker.check_request(b"\x01", 4)
    checker.check_request(b"\x09" + bytes(20), 4)
    assert checker.counts == {"request-before-features": 2, "request-layout": 2}


def test_each_kind_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    driver = Driver()
    driver.attach()
    with caplog.at_level(logging.WARNING, logger="vhost_iommu.conformance"):
        for _ in range(5):
            driver.send(encode_detach(1, EP, head_reserved=b"\x01\x00\x00"))
    assert len(caplog.records) == 1 and "head-reserved" in caplog.records[0].getMessage()
    assert driver.counts == {"head-reserved": 5}


def test_every_statement_id_has_text_and_section() -> None:
    for key, statement in STATEMENTS.items():
        assert key == key.lower() and statement.text and statement.section


# -- through the control channel ----------------------------------------------------------------------------


@dataclass
class Served:
    server: RunningServer
    control: str

    def call(self, command: str, **arguments: Any) -> Any:
        with ControlClient(self.control) as client:
            return client.call(command, **arguments)


async def _start(service: ControlService, path: str) -> ControlServer:
    control = ControlServer(service, path)
    await control.start()
    return control


@pytest.fixture
def served_with(fd_leak_check: None) -> Iterator[Callable[..., Served]]:
    warm_up()
    started: list[tuple[RunningServer, ControlServer, ControlService]] = []
    with tempfile.TemporaryDirectory(prefix="vconf-") as directory:

        def start(**options: Any) -> Served:
            service = ControlService(**options)
            server = RunningServer(service.track(lambda: VirtioIommuBackend(None)), f"{directory}/sock")
            service.server = server.server
            control = asyncio.run_coroutine_threadsafe(
                _start(service, f"{directory}/ctl"), server.loop
            ).result(10)
            started.append((server, control, service))
            return Served(server, f"{directory}/ctl")

        try:
            yield start
        finally:
            for server, control, service in started:
                asyncio.run_coroutine_threadsafe(control.close(), server.loop).result(10)
                server.call(service.close)
                server.stop()
                if service.trace_dir is not None:
                    service.trace_dir.close()


def test_a_served_driver_is_checked_from_its_first_request(served_with: Callable[..., Served]) -> None:
    served = served_with(conformance=True)
    with IommuDriver(served.server.connect(), event_queue_size=16, own_frontend=True) as ring:
        assert ring.status(encode_attach(1, EP)) == Status.OK  # no PROBE first
        assert ring.status(encode_map(1, 0x10000, 0x1FFFF, 0)) == Status.OK
        assert ring.status(encode_map(1, 0x10000, 0x1FFFF, 0)) == Status.INVAL
        report = served.call("conformance", statements=True)
        assert report["enabled"] and report["total"] == 2
        assert report["counts"] == {"probe-before-attach": 1, "map-overlap": 1}
        assert set(report["statements"]) == set(STATEMENTS)
        served.call("conformance-reset")
        assert served.call("conformance")["total"] == 0
        stopped = served.call("conformance-stop")
        assert stopped["total"] == 0 and served.call("conformance")["enabled"] is False
        with pytest.raises(ControlError) as caught:
            served.call("conformance-reset")
        assert caught.value.code == "unavailable"
        served.call("conformance-start")
        ring.status(encode_attach(1, 0x21, reserved=b"\x01\x00\x00\x00"))
        assert served.call("conformance")["counts"] == {"attach-reserved": 1, "probe-before-attach": 1}
        del ring


def test_trace_start_and_stop_record_a_replayable_trace(
    served_with: Callable[..., Served], tmp_path: Path
) -> None:
    served = served_with(trace_dir=TraceDirectory(tmp_path / "traces"))
    trace = tmp_path / "traces" / "served.jsonl"
    with IommuDriver(served.server.connect(), event_queue_size=16, own_frontend=True) as ring:
        started = served.call("trace-start", name="served.jsonl")
        assert started["path"] == str(trace) and started["note"] == ""
        assert stat.S_IMODE(trace.stat().st_mode) == 0o600
        with pytest.raises(ControlError) as caught:
            served.call("trace-start", name="other.jsonl")
        assert caught.value.code == "unavailable"
        ring.status(encode_attach(1, EP))
        # The compiled request path steps aside while a trace records: the MAPs are in it too.
        for index in range(10):
            ring.status(encode_map(1, index << 16, (index << 16) + 0xFFFF, 0))
        served.call("inject", type="MAP", status="NOMEM")
        assert ring.status(encode_map(1, 0x100000, 0x10FFFF, 0)) == Status.NOMEM
        served.call("bypass", value=0)
        served.call("resv", endpoint=EP, regions=[{"type": "RESERVED", "start": 0x300000, "end": 0x3FFFFF}])
        assert ring.status(encode_map(1, 0x300000, 0x300FFF, 0)) == Status.RANGE
        stopped = served.call("trace-stop")
        assert stopped["records"] == 15 and stopped["parts"] == 1
        ring.status(encode_map(1, 0x200000, 0x20FFFF, 0))  # after the stop: not recorded
        # A name is used once: the file it names is never replaced.
        with pytest.raises(ControlError) as caught:
            served.call("trace-start", name="served.jsonl")
        assert caught.value.code == "bad-argument" and "exists" in caught.value.message
        del ring
    # The replay applies the resv change too: the MAP into the new region is refused again.
    result = replay(trace)
    assert result.ok and result.requests == 13 and result.replay_ns["MAP"][0] == 12


@pytest.mark.parametrize(
    "name", ["../escape.jsonl", "/tmp/abs.jsonl", "sub/dir.jsonl", "..", ".", "", "nul\0.jsonl", "x" * 201]
)
def test_trace_start_takes_only_a_plain_file_name(
    served_with: Callable[..., Served], tmp_path: Path, name: str
) -> None:
    served = served_with(trace_dir=TraceDirectory(tmp_path / "traces"))
    with IommuDriver(served.server.connect(), event_queue_size=16, own_frontend=True) as ring:
        with pytest.raises(ControlError) as caught:
            served.call("trace-start", name=name)
        assert caught.value.code == "bad-argument"
        del ring
    assert list((tmp_path / "traces").iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == [
        "traces"
    ]


def test_trace_start_refuses_paths_and_symlinks(served_with: Callable[..., Served], tmp_path: Path) -> None:
    outside = tmp_path / "outside.jsonl"
    outside.write_text("precious")
    (tmp_path / "traces").mkdir(mode=0o700)
    (tmp_path / "traces" / "link.jsonl").symlink_to(outside)
    served = served_with(trace_dir=TraceDirectory(tmp_path / "traces"))
    with IommuDriver(served.server.connect(), event_queue_size=16, own_frontend=True) as ring:
        with pytest.raises(ControlError) as caught:
            served.call("trace-start", path=str(outside))
        assert caught.value.code == "bad-argument" and "--trace-dir" in caught.value.message
        with pytest.raises(ControlError) as caught:
            served.call("trace-start", name="link.jsonl")  # O_EXCL|O_NOFOLLOW: never through a link
        assert caught.value.code == "bad-argument"
        del ring
    assert outside.read_text() == "precious"


def test_without_a_trace_directory_trace_start_is_refused(served_with: Callable[..., Served]) -> None:
    unconfined = served_with()
    with IommuDriver(unconfined.server.connect(), event_queue_size=16, own_frontend=True) as ring:
        with pytest.raises(ControlError) as caught:
            unconfined.call("trace-start", name="t.jsonl")
        assert caught.value.code == "unavailable" and "--trace-dir" in caught.value.message
        del ring


def test_a_trace_directory_must_be_private(tmp_path: Path) -> None:
    created = TraceDirectory(tmp_path / "new")
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
    created.close()
    (tmp_path / "open").mkdir()
    os.chmod(tmp_path / "open", 0o777)
    with pytest.raises(TraceDirectoryError, match="group or others"):
        TraceDirectory(tmp_path / "open")
    (tmp_path / "link").symlink_to(tmp_path / "new")
    with pytest.raises(TraceDirectoryError, match="not a directory"):
        TraceDirectory(tmp_path / "link")
    (tmp_path / "file").write_text("")
    with pytest.raises(TraceDirectoryError, match="not a directory"):
        TraceDirectory(tmp_path / "file")
    if os.geteuid() != 0 and os.path.isdir("/"):
        with pytest.raises(TraceDirectoryError, match="owned by uid"):
            TraceDirectory("/")


def test_a_trace_from_the_first_request(served_with: Callable[..., Served], tmp_path: Path) -> None:
    trace = tmp_path / "first.jsonl"
    served = served_with(trace_path=str(trace))
    with IommuDriver(served.server.connect(), event_queue_size=16, own_frontend=True) as ring:
        ring.send(encode_probe(EP), PROBE_WRITABLE)  # its answer is not what this test looks at
        ring.status(encode_attach(1, EP))
        del ring
    served.server.wait_all_closed()
    result = replay(trace)
    assert result.ok and result.requests == 2
    kinds = [event.kind for event in read_trace(trace)[1]]
    assert kinds[0] == "features" and kinds.count("request") == 2


def test_ctl_shows_conformance_and_drives_traces(served_with: Callable[..., Served], tmp_path: Path) -> None:
    served = served_with(conformance=True, trace_dir=TraceDirectory(tmp_path / "traces"))

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "vhost_iommu", "ctl", "--control-socket", served.control, *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path)

    with IommuDriver(served.server.connect(), event_queue_size=16, own_frontend=True) as ring:
        assert ctl("trace-start", "ctl.jsonl", "--max-bytes", "65536").returncode == 0
        ring.status(encode_attach(1, EP))
        shown = ctl("conformance", "--statements")
        assert shown.returncode == 0, shown.stderr
        assert "1 violation(s)" in shown.stdout and "probe-before-attach" in shown.stdout
        assert "map-overlap: [IOMMU Device / Device operations / MAP request]" in shown.stdout
        stopped = ctl("--json", "trace-stop")
        assert stopped.returncode == 0 and '"records": 1' in stopped.stdout
        refused = ctl("trace-start", "../up.jsonl")
        assert refused.returncode != 0 and "plain file name" in refused.stderr
        del ring
    # The back-end wrote it in its trace directory, whatever ctl's directory.
    assert replay(tmp_path / "traces" / "ctl.jsonl").requests == 1


def test_each_connection_records_its_own_trace(served_with: Callable[..., Served], tmp_path: Path) -> None:
    trace = tmp_path / "boot.jsonl"
    served = served_with(trace_path=str(trace))
    for endpoint in (EP, 0x21):
        with IommuDriver(served.server.connect(), event_queue_size=16, own_frontend=True) as ring:
            ring.status(encode_attach(1, endpoint))
            del ring
        served.server.wait_all_closed()
    # The first connection's back-end is gone with its connection, and its trace with it (closed).
    first, second = replay(trace), replay(tmp_path / "boot-2.jsonl")
    assert first.ok and second.ok and first.requests == second.requests == 1
