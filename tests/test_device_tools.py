"""The device core's hooks for tools: observers, forced answers at a seeded rate, bypass and reserved
regions changed at run time (what the control channel drives)."""

from __future__ import annotations

import random

import pytest

from vhost_iommu.device import IommuDevice, ReservedRegion, ResvMemType, Status, domains
from vhost_iommu.device.layout import (
    TAIL_SIZE,
    RequestType,
    ResvMemProperty,
    decode_properties,
    encode_attach,
    encode_map,
    encode_probe,
)
from vhost_iommu.device.observers import DeviceObserver
from vhost_iommu.device.translation import Fault, Translation

EP, EP2 = 0x20, 0x21
PAGE = 0x1000
MSI = ReservedRegion(ResvMemType.MSI, 0xFEE00000, 0xFEEFFFFF)
HOLE = ReservedRegion(ResvMemType.RESERVED, 0x200000, 0x2FFFFF)


@pytest.fixture
def device() -> IommuDevice:
    device = IommuDevice()
    device.set_features(device.device_features())
    return device


def status(device: IommuDevice, request: bytes) -> Status:
    response, used = device.handle_request(request, TAIL_SIZE)
    assert used == TAIL_SIZE
    return Status(response[-TAIL_SIZE])


def probed(device: IommuDevice, endpoint: int) -> list[tuple[int, int, int]]:
    size = device.topology.probe_size
    response, used = device.handle_request(encode_probe(endpoint), size + TAIL_SIZE)
    assert used == size + TAIL_SIZE and response[-TAIL_SIZE] == Status.OK
    return [
        (p.subtype, p.start, p.end)
        for p in decode_properties(response[:-TAIL_SIZE])
        if isinstance(p, ResvMemProperty)
    ]


class Recorder(DeviceObserver):
    def __init__(self, device: IommuDevice) -> None:
        self.device = device
        self.events: list[tuple[object, ...]] = []

    def request(self, request: bytes | memoryview, writable_size: int) -> None:
        # Before the device applies it: the domain of an ATTACH does not exist yet.
        self.events.append(("request", request[0], len(self.device.domains())))

    def response(
        self,
        request: bytes | memoryview,
        writable_size: int,
        response: bytes,
        used: int,
        *,
        forced: bool,
        ns: int,
    ) -> None:
        assert ns >= 0
        self.events.append(("response", request[0], response[-TAIL_SIZE], forced))

    def features(self, acked: int) -> None:
        self.events.append(("features", acked))

    def config_write(self, offset: int, data: bytes) -> None:
        self.events.append(("config", offset, data))

    def reset(self) -> None:
        self.events.append(("reset",))

    def bypass(self, value: int) -> None:
        self.events.append(("bypass", value))

    def reserved_regions(self, endpoint: int | None, regions: tuple[ReservedRegion, ...] | None) -> None:
        self.events.append(("resv", endpoint, regions))


def test_observers_see_requests_before_and_answers_after(device: IommuDevice) -> None:
    recorder = Recorder(device)
    device.observers.append(recorder)
    assert status(device, encode_attach(1, EP)) == Status.OK
    device.inject(RequestType.MAP, Status.NOMEM)
    assert status(device, encode_map(1, 0, PAGE - 1, 0)) == Status.NOMEM
    device.set_features(device.device_features())
    with pytest.raises(ValueError):
        device.set_config(0, b"\1")  # refused, but the observer saw the driver try
    device.set_bypass(0)
    device.set_reserved_regions(EP, (HOLE,))
    device.reset()
    assert recorder.events == [
        ("request", RequestType.ATTACH, 0),
        ("response", RequestType.ATTACH, Status.OK, False),
        ("request", RequestType.MAP, 1),
        ("response", RequestType.MAP, Status.NOMEM, True),
        ("features", device.device_features()),
        ("config", 0, b"\1"),
        ("bypass", 0),
        ("resv", EP, (HOLE,)),
        ("reset",),
    ]
    device.observers.remove(recorder)
    assert status(device, encode_attach(1, EP)) == Status.OK
    assert len(recorder.events) == 9


def test_forced_answers_at_a_rate_are_seeded_and_reproducible(device: IommuDevice) -> None:
    assert status(device, encode_attach(1, EP)) == Status.OK
    injection = device.inject_rate(RequestType.MAP, Status.NOMEM, 0.25, seed=42)
    assert injection is not None and device.has_injections
    statuses = [status(device, encode_map(1, n * PAGE, n * PAGE + PAGE - 1, 0)) for n in range(200)]
    draws = random.Random(42)
    assert [s == Status.NOMEM for s in statuses] == [draws.random() < 0.25 for _ in range(200)]
    assert injection.seen == 200 and injection.forced == statuses.count(Status.NOMEM) > 0
    # A forced MAP changed nothing: exactly the others are mapped.
    assert len(device.mappings(1)) == statuses.count(Status.OK)
    # Other types are not drawn for.
    assert status(device, encode_attach(1, EP2)) == Status.OK and injection.seen == 200
    # A count injection answers first, without a draw.
    device.inject(RequestType.MAP, Status.RANGE)
    assert status(device, encode_map(1, 1 << 30, (1 << 30) + PAGE - 1, 0)) == Status.RANGE
    assert injection.seen == 200
    assert device.inject_rate(RequestType.MAP, Status.NOMEM, 0.0, seed=1) is None
    assert not device.has_injections and device.rate_injections == []
    assert status(device, encode_map(1, 1 << 31, (1 << 31) + PAGE - 1, 0)) == Status.OK


def test_rate_one_forces_every_request_and_clear_stops_it(device: IommuDevice) -> None:
    device.inject_rate(RequestType.ATTACH, None, 1.0, seed=0)
    assert device.handle_request(encode_attach(1, EP), TAIL_SIZE) == (b"", 0)  # used length 0
    device.clear_injections()
    assert status(device, encode_attach(1, EP)) == Status.OK
    for rate in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            device.inject_rate(RequestType.MAP, Status.NOMEM, rate, seed=0)


def test_bypass_set_by_a_tool_changes_translation(device: IommuDevice) -> None:
    assert device.bypass  # the default topology boots in bypass
    assert isinstance(device.translate(EP, 0x5000, 4, 1, report=False), Translation)
    device.set_bypass(0)
    assert device.get_config(36, 1) == b"\0"
    fault = device.translate(EP, 0x5000, 4, 1, report=False)
    assert isinstance(fault, Fault) and fault.reason.name == "DOMAIN"
    device.set_bypass(True)
    assert device.get_config(36, 1) == b"\1"
    with pytest.raises(ValueError):
        device.set_bypass(2)


def test_reserved_regions_replaced_for_probe_map_and_translate(device: IommuDevice) -> None:
    assert status(device, encode_attach(1, EP)) == Status.OK
    assert status(device, encode_attach(1, EP2)) == Status.OK
    assert status(device, encode_map(1, 0x200000, 0x200FFF, 0)) == Status.OK  # before: not reserved
    device.set_reserved_regions(EP, (HOLE, MSI))
    assert probed(device, EP) == [(0, 0x200000, 0x2FFFFF), (1, 0xFEE00000, 0xFEEFFFFF)]
    assert probed(device, EP2) == [(1, 0xFEE00000, 0xFEEFFFFF)]  # its neighbour keeps its own
    # The domain EP is attached to refuses MAPs into the new region; the old mapping stays.
    assert status(device, encode_map(1, 0x201000, 0x201FFF, 0)) == Status.RANGE
    assert [m[0] for m in device.mappings(1)] == [0x200000]
    assert status(device, encode_map(1, 0x300000, 0x300FFF, 0)) == Status.OK
    fault = device.translate(EP, 0x201000, 4, 1, report=False)
    assert isinstance(fault, Fault) and fault.reason.name == "MAPPING"
    assert device.domains()[0].reserved[0] == (0x200000, 0x2FFFFF)
    # It survives a device reset (the driver probes again afterwards) ...
    device.reset()
    device.set_features(device.device_features())
    assert probed(device, EP)[0] == (0, 0x200000, 0x2FFFFF)
    assert status(device, encode_attach(2, EP)) == Status.OK
    assert status(device, encode_map(2, 0x200000, 0x200FFF, 0)) == Status.RANGE
    # ... until a tool restores the topology's regions; the domain follows at once.
    device.set_reserved_regions(None, None)
    assert probed(device, EP) == [(1, 0xFEE00000, 0xFEEFFFFF)]
    assert status(device, encode_map(2, 0x200000, 0x200FFF, 0)) == Status.OK
    assert device.endpoints()[0].reserved == (MSI,)


@pytest.mark.parametrize(
    "regions",
    [
        (ReservedRegion(ResvMemType.RESERVED, 0, 0xFFF), ReservedRegion(ResvMemType.RESERVED, 0x800, 0x1FFF)),
        (MSI, ReservedRegion(ResvMemType.MSI, 0x8000000, 0x80FFFFF)),
        tuple(ReservedRegion(ResvMemType.RESERVED, n << 12, (n << 12) + 0xFFF) for n in range(22)),
        (ReservedRegion(ResvMemType.RESERVED, 0x2000, 0x1000),),
        (ReservedRegion(ResvMemType.RESERVED, 0, 1 << 64),),
    ],
    ids=["overlapping", "two-msi", "beyond-probe-size", "end-before-start", "beyond-64-bits"],
)
def test_reserved_regions_probe_cannot_report_are_refused(
    device: IommuDevice, regions: tuple[ReservedRegion, ...]
) -> None:
    with pytest.raises(ValueError):
        device.set_reserved_regions(None, regions)
    assert all(info.reserved == (MSI,) for info in device.endpoints())
    with pytest.raises(ValueError, match="not managed"):
        device.set_reserved_regions(0x2, ())


def test_replacements_stop_before_region_sets_grow_without_bound(
    device: IommuDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(domains, "MAX_REGION_SETS", device.domain_table.regions.count + 2)
    for n in range(2):
        device.set_reserved_regions(EP, (ReservedRegion(ResvMemType.RESERVED, n << 12, (n << 12) + 0xFFF),))
    with pytest.raises(ValueError, match="no more replacements"):
        device.set_reserved_regions(EP, (HOLE,))
    assert device.reserved_regions(EP)[0].start == 1 << 12  # unchanged
