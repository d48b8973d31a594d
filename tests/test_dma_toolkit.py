"""The DMA toolkit through the control channel (docs/toolkit.md): ``endpoints`` with the vfio-user endpoints,
their clients, guests and DMA counters; ``translate`` giving what the engine does; every fault explained
from the domain's mapping history, in ``endpoints`` and in the trace. The rig of
tests/test_translated_dma.py (the engine over vfio-user, the harness driver as the guest) with a control
socket beside it."""

from __future__ import annotations

import asyncio
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.test_translated_dma import DOMAIN, ENGINE, PAGE, TOPOLOGY, WAIT, Rig
from vhost_iommu.control import ControlClient
from vhost_iommu.control.server import ControlServer
from vhost_iommu.control.service import ControlService
from vhost_iommu.device import IommuDevice, Status, Topology
from vhost_iommu.device.history import MappingHistory
from vhost_iommu.device.layout import (
    FAULT_F_ADDRESS,
    FAULT_F_READ,
    MAP_F_READ,
    MAP_F_WRITE,
    FaultReason,
    encode_attach,
    encode_detach,
    encode_map,
    encode_unmap,
)
from vhost_iommu.device.translation import Fault
from vhost_iommu.endpoints.dma_engine import R_FAULT_ADDRESS, R_FAULT_REASON, Op, StatusBit
from vhost_iommu.harness.background import running_server
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.harness.iommu_driver import IommuDriver
from vhost_iommu.harness.vfio_client import VfioUserClient
from vhost_iommu.jit import warm_up
from vhost_iommu.pci.function import COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY
from vhost_iommu.trace import TraceDirectory, read_trace, replay
from vhost_iommu.virtio_iommu import VirtioIommuBackend


@dataclass
class Toolkit:
    rig: Rig
    control_path: str
    trace_dir: Path
    request_path: str

    def call(self, command: str, **arguments: Any) -> Any:
        with ControlClient(self.control_path) as client:
            return client.call(command, **arguments)

    def served(self) -> dict[str, Any]:
        [row] = self.call("endpoints", served=True)
        return row  # type: ignore[no-any-return]

    def last_fault(self) -> dict[str, Any]:
        return self.served()["last_faults"][-1]  # type: ignore[no-any-return]


async def _start(service: ControlService, path: str) -> ControlServer:
    control = ControlServer(service, path)
    await control.start()
    return control


# The compiled request path (the kick thread's kernel records MAP and UNMAP in the history) and the
# Python one (the device core records them).
@pytest.fixture(params=["kick-thread", "python"])
def toolkit(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Toolkit]:
    warm_up()
    options = {"kick-thread": {"kick_thread": True}, "python": {"request_path": "python"}}[request.param]
    traces = tmp_path / "traces"
    traces.mkdir()
    service = ControlService(trace_dir=TraceDirectory(traces))
    factory = service.track(lambda: VirtioIommuBackend(TOPOLOGY, **options))  # type: ignore[arg-type]
    with running_server(factory) as server:
        service.server = server.server
        endpoints = server.serve_devices(TOPOLOGY, os.path.dirname(server.path))
        service.endpoint_server = endpoints
        path = os.path.join(os.path.dirname(server.path), "control")
        control = asyncio.run_coroutine_threadsafe(_start(service, path), server.loop).result(WAIT)
        try:
            with (
                GuestRam(8 << 20, name="guest-ram") as ram,
                IommuDriver(server.connect(WAIT), ram, own_frontend=True, timeout=WAIT) as driver,
                VfioUserClient.connect(endpoints.endpoints[0].path, WAIT) as engine,
            ):
                engine.start(ram)
                engine.config_write(COMMAND, struct.pack("<H", COMMAND_MEMORY | COMMAND_BUS_MASTER))
                driver.post_event_buffers(8)
                yield Toolkit(Rig(server, driver, engine, ram), path, traces, request.param)
        finally:
            asyncio.run_coroutine_threadsafe(control.close(), server.loop).result(WAIT)
            service.close()


def test_endpoints_show_the_served_endpoint_its_guest_and_its_dma_counters(toolkit: Toolkit) -> None:
    rig = toolkit.rig
    assert rig.driver.attach(DOMAIN, ENGINE) == Status.OK
    src, dst = rig.ram.alloc(2 * PAGE, PAGE), rig.ram.alloc(2 * PAGE, PAGE)
    for page in range(2):
        rig.map(0x10_0000 + page * PAGE, src + page * PAGE, PAGE)
        rig.map(0x20_0000 + page * PAGE, dst + page * PAGE, PAGE)
    assert rig.run(Op.COPY, 0x10_0000, 0x20_0000, 2 * PAGE) == StatusBit.DONE
    assert rig.run(Op.FILL, 0, 0x30_0000, 8) == StatusBit.DONE | StatusBit.FAULT

    served = toolkit.served()
    assert {key: served[key] for key in ("kind", "bdf", "segment", "endpoint", "connected", "unpaired")} == {
        "kind": "dma-engine",
        "bdf": "00:05.0",
        "segment": 0,
        "endpoint": ENGINE,
        "connected": True,
        "unpaired": None,
    }
    assert served["socket"] == rig.server.endpoints.endpoints[0].path  # type: ignore[union-attr]
    assert served["paired"]["connection"] == 1 and served["client"]
    assert served["counters"] == {
        "bytes_read": 2 * PAGE,
        "bytes_written": 2 * PAGE,
        "page_translations": 4,  # two source pages, two destination pages
        "bypassed_accesses": 0,
        "faults": 1,
    }
    [fault] = served["last_faults"]
    assert (fault["reason"], fault["access"], fault["address"], fault["reported"]) == (
        "MAPPING",
        "WRITE",
        0x30_0000,
        True,
    )
    # The IOMMU's own rows keep their shape; the engine's carries its vfio-user endpoint.
    rows = {row["endpoint"]: row for row in toolkit.call("endpoints")}
    assert rows[ENGINE]["domain"] == DOMAIN and rows[ENGINE]["vfio_user"] == toolkit.served()
    assert rows[0x20]["vfio_user"] is None and rows[0x20]["bdf"] == 0x20


CASES = [
    # (iova, length, access): a run over three scattered pages, a partial page, the read-only page read
    # and written, an unmapped page after a mapped one, and an address never mapped.
    (0x10_0000, 3 * PAGE, "r"),
    (0x10_0800, PAGE, "w"),
    (0x40_0000, 64, "r"),
    (0x40_0000, 64, "w"),
    (0x10_2000, 2 * PAGE, "w"),
    (0x90_0000, 16, "r"),
]


@pytest.mark.parametrize(("iova", "length", "access"), CASES)
def test_translate_answers_what_the_engine_does(
    toolkit: Toolkit, iova: int, length: int, access: str
) -> None:
    rig = toolkit.rig
    assert rig.driver.attach(DOMAIN, ENGINE) == Status.OK
    gpa_of_page = {}  # IOVA page -> guest-physical page
    pages = [rig.ram.alloc(PAGE, PAGE) for _ in range(3)]
    for page, gpa in enumerate(reversed(pages)):  # out of order: the segments show it
        gpa_of_page[0x10_0000 + page * PAGE] = gpa
        rig.map(0x10_0000 + page * PAGE, gpa, PAGE)
    gpa_of_page[0x40_0000] = rig.ram.alloc(PAGE, PAGE)
    rig.map(0x40_0000, gpa_of_page[0x40_0000], PAGE, MAP_F_READ)
    scratch = rig.ram.alloc(4 * PAGE, PAGE)
    rig.map(0x80_0000, scratch, 4 * PAGE)

    answer = toolkit.call("translate", endpoint=ENGINE, iova=iova, size=length, access=access)
    # The engine does the same access: a COPY to (or from) the scratch buffer.
    if access == "r":
        status = rig.run(Op.COPY, iova, 0x80_0000, length)
    else:
        status = rig.run(Op.COPY, 0x80_0000, iova, length)
    if answer["translated"]:
        assert status == StatusBit.DONE
        expected: list[list[int]] = []
        address, end = iova, iova + length
        while address < end:  # page by page, physically contiguous runs merged
            run = min((address // PAGE + 1) * PAGE, end) - address
            gpa = gpa_of_page[address - address % PAGE] + address % PAGE
            if expected and expected[-1][0] + expected[-1][1] == gpa:
                expected[-1][1] += run
            else:
                expected.append([gpa, run])
            address += run
        assert answer["segments"] == expected
    else:
        assert status == StatusBit.DONE | StatusBit.FAULT
        assert (FaultReason[answer["reason"]], answer["address"]) == (
            rig.register(R_FAULT_REASON),
            rig.register(R_FAULT_ADDRESS, 8),
        )
        assert answer["explanation"]["verdict"] == toolkit.last_fault()["explanation"]["verdict"]


def test_a_use_after_unmap_is_explained_naming_the_unmap(toolkit: Toolkit) -> None:
    rig = toolkit.rig
    assert rig.driver.attach(DOMAIN, ENGINE) == Status.OK
    buffer = rig.ram.alloc(2 * PAGE, PAGE)
    rig.map(0x20_0000, buffer, 2 * PAGE)
    rig.map(0x50_0000, buffer, PAGE)  # another mapping: not the one the explanation names
    rig.unmap(0x20_0000, 2 * PAGE)
    assert rig.run(Op.FILL, 0, 0x20_1000, 8) == StatusBit.DONE | StatusBit.FAULT

    explanation = toolkit.last_fault()["explanation"]
    assert explanation["verdict"] == "use-after-unmap"
    assert "use after unmap" in explanation["text"] and "UNMAP #" in explanation["text"]
    mapped, removed = explanation["mapped_by"], explanation["removed_by"]
    assert {k: mapped[k] for k in ("op", "domain", "start", "last", "phys", "flags")} == {
        "op": "MAP",
        "domain": DOMAIN,
        "start": 0x20_0000,
        "last": 0x20_1FFF,
        "phys": buffer,
        "flags": MAP_F_READ | MAP_F_WRITE,
    }
    assert {k: removed[k] for k in ("op", "domain", "start", "last", "removed")} == {
        "op": "UNMAP",
        "domain": DOMAIN,
        "start": 0x20_0000,
        "last": 0x20_1FFF,
        "removed": 1,
    }
    assert removed["seq"] > mapped["seq"]
    if toolkit.request_path == "kick-thread":  # recorded by the compiled kernel on the requestq's thread
        assert toolkit.call("queues")[0]["served_by"] == "thread"
    assert 0 <= explanation["removed_ns_before"] <= mapped["ns_before"]
    assert explanation["history"]["complete"] is True


def test_a_never_mapped_address_is_explained(toolkit: Toolkit) -> None:
    rig = toolkit.rig
    assert rig.driver.attach(DOMAIN, ENGINE) == Status.OK
    rig.map(0x10_0000, rig.ram.alloc(PAGE, PAGE), PAGE)
    assert rig.run(Op.FILL, 0, 0x10_1000, 8) == StatusBit.DONE | StatusBit.FAULT  # the page after
    explanation = toolkit.last_fault()["explanation"]
    assert explanation["verdict"] == "never-mapped"
    assert explanation["mapped_by"] is None and explanation["removed_by"] is None
    assert "no MAP of domain 3 ever covered" in explanation["text"]


def test_an_access_after_detach_is_explained_naming_the_detach(toolkit: Toolkit) -> None:
    rig = toolkit.rig
    assert rig.driver.attach(DOMAIN, ENGINE) == Status.OK
    page = rig.ram.alloc(PAGE, PAGE)
    rig.map(0x10_0000, page, PAGE)
    assert rig.driver.status(encode_detach(DOMAIN, ENGINE)) == Status.OK
    toolkit.call("bypass", value=0)
    assert rig.run(Op.FILL, 0, 0x10_0000, 8) == StatusBit.DONE | StatusBit.FAULT
    fault = toolkit.last_fault()
    assert fault["reason"] == "DOMAIN"
    explanation = fault["explanation"]
    assert explanation["verdict"] == "use-after-detach" and "DETACH #" in explanation["text"]
    assert explanation["domain"] is None
    assert explanation["removed_by"]["op"] == "DETACH"
    assert explanation["removed_by"]["endpoint"] == ENGINE
    assert explanation["removed_by"]["domain_removed"] is True
    assert explanation["mapped_by"]["phys"] == page


def test_a_write_through_a_read_only_mapping_is_explained(toolkit: Toolkit) -> None:
    rig = toolkit.rig
    assert rig.driver.attach(DOMAIN, ENGINE) == Status.OK
    page = rig.ram.alloc(PAGE, PAGE)
    rig.map(0x10_0000, page, PAGE, MAP_F_READ)
    assert rig.run(Op.FILL, 0, 0x10_0010, 8) == StatusBit.DONE | StatusBit.FAULT
    explanation = toolkit.last_fault()["explanation"]
    assert explanation["verdict"] == "permission"
    assert "allows R only" in explanation["text"] and "WRITE of 0x100010" in explanation["text"]
    assert explanation["mapped_by"]["flags"] == MAP_F_READ and explanation["removed_by"] is None


def test_the_trace_records_each_fault_with_its_explanation(toolkit: Toolkit) -> None:
    rig = toolkit.rig
    started = toolkit.call("trace-start", name="dma.trace")
    assert rig.driver.attach(DOMAIN, ENGINE) == Status.OK
    rig.map(0x10_0000, rig.ram.alloc(PAGE, PAGE), PAGE)
    rig.unmap(0x10_0000, PAGE)
    assert rig.run(Op.FILL, 0, 0x10_0000, 8) == StatusBit.DONE | StatusBit.FAULT
    toolkit.call("trace-stop")
    _header, events = read_trace(started["path"])
    [fault] = [event.fields["fault"] for event in events if event.kind == "fault"]
    assert fault == toolkit.last_fault()
    assert fault["explanation"]["verdict"] == "use-after-unmap"
    # A fault is no request: the trace still replays without a difference.
    assert replay(started["path"]).ok
    json.dumps(fault)  # plain JSON


def test_the_history_is_bounded_and_says_so() -> None:
    device = IommuDevice(Topology.default())
    device.set_features(device.device_features())
    device.history = MappingHistory(4)
    requests = [encode_attach(1, 0x20)] + [encode_map(1, n << 12, (n << 12) + 0xFFF, 0, 1) for n in range(6)]
    requests.append(encode_unmap(1, 0, 0xFFF))
    for request in requests:
        response, _used = device.handle_request(request, 4)
        assert response[0] == Status.OK
    records = device.history.records()
    assert [(record.sequence, record.name) for record in records] == [
        (4, "MAP"),
        (5, "MAP"),
        (6, "MAP"),
        (7, "UNMAP"),
    ]
    fault = Fault(FaultReason.MAPPING, FAULT_F_READ | FAULT_F_ADDRESS, 0x20, 0x10_0000, reported=False)
    explanation = device.explain(fault)
    assert explanation.verdict == "never-mapped" and not explanation.complete
    assert "in the last 4 changes" in explanation.text
    # The UNMAP is still in the history: its MAP fell out, the explanation says so.
    gone = device.explain(
        Fault(FaultReason.MAPPING, FAULT_F_READ | FAULT_F_ADDRESS, 0x20, 0x10, reported=False)
    )
    assert gone.verdict == "use-after-unmap" and gone.mapped_by is None
    assert "mapped before the history begins" in gone.text


def _served_device() -> IommuDevice:
    device = IommuDevice(Topology.default())
    device.set_features(device.device_features())
    return device


def _serve(device: IommuDevice, *requests: bytes) -> None:
    for request in requests:
        assert device.handle_request(request, 4)[0][0] == Status.OK


def _read_fault(address: int) -> Fault:
    return Fault(FaultReason.MAPPING, FAULT_F_READ | FAULT_F_ADDRESS, 0x20, address, reported=False)


def test_an_attach_that_moved_the_endpoint_is_explained() -> None:
    device = _served_device()
    _serve(device, encode_attach(1, 0x20), encode_attach(1, 0x28), encode_map(1, 0x1000, 0x1FFF, 0x5000, 3))
    _serve(device, encode_attach(2, 0x20))  # domain 1 keeps its mapping (0x28 is still in it)
    explanation = device.explain(_read_fault(0x1800))
    assert explanation.verdict == "moved" and explanation.domain == 2
    assert explanation.mapped_by is not None and explanation.mapped_by.domain == 1
    assert explanation.removed_by is not None and explanation.removed_by.to_json()["previous_domain"] == 1
    assert "moved the endpoint out of domain 1" in explanation.text


def test_a_mapping_dropped_by_a_device_reset_is_explained() -> None:
    device = _served_device()
    _serve(device, encode_attach(1, 0x20), encode_map(1, 0x1000, 0x1FFF, 0x5000, 3))
    device.reset()
    device.set_features(device.device_features())
    _serve(device, encode_attach(1, 0x20))
    explanation = device.explain(_read_fault(0x1000))
    assert explanation.verdict == "after-reset"
    assert explanation.removed_by is not None and explanation.removed_by.name == "RESET"
