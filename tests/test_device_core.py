"""IommuDevice beyond the spec's sentences: framing of hostile chains, limits, config space, reset,
inspection and counters."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhost_iommu.device import IommuDevice, Status, Topology
from vhost_iommu.device.layout import (
    ATTACH_F_BYPASS,
    CONFIG_BYPASS,
    CONFIG_SIZE,
    F_BYPASS_CONFIG,
    F_DOMAIN_RANGE,
    F_INPUT_RANGE,
    F_MAP_UNMAP,
    F_MMIO,
    F_PROBE,
    F_VERSION_1,
    MAP_F_READ,
    TAIL_SIZE,
    RequestType,
    decode_config,
    encode_attach,
    encode_detach,
    encode_map,
    encode_probe,
    encode_unmap,
)
from vhost_iommu.device.topology import PciRange

EP, EP2, EP3 = 0x20, 0x21, 0x22
PAGE = 0x1000


def negotiated(
    topology: Topology | None = None, *, max_domains: int | None = None, max_mappings: int = 1 << 20
) -> IommuDevice:
    device = IommuDevice(topology, max_domains=max_domains, max_mappings=max_mappings)
    device.set_features(device.device_features())
    return device


def status(device: IommuDevice, request: bytes | memoryview, writable: int = TAIL_SIZE) -> Status:
    response, used = device.handle_request(request, writable)
    assert used == writable == len(response)
    return Status(response[-TAIL_SIZE])


@pytest.fixture
def device() -> IommuDevice:
    return negotiated()


# -- framing -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        encode_attach(1, EP)[:-1],  # one byte short
        encode_attach(1, EP) + b"\x00",  # one byte long
        encode_detach(1, EP)[:8],
        encode_map(1, 0, PAGE - 1, 0)[:-4],  # MAP without its flags
        encode_unmap(1, 0, PAGE - 1) + bytes(4),
        bytes([RequestType.MAP, 0, 0, 0]),  # a bare head
    ],
)
def test_readable_part_of_the_wrong_size_is_ioerr(device: IommuDevice, request_bytes: bytes) -> None:
    assert status(device, request_bytes) == Status.IOERR
    assert device.domains() == []


def test_probe_with_wrong_readable_size_is_ioerr_and_writes_no_property(device: IommuDevice) -> None:
    response, used = device.handle_request(encode_probe(EP)[:-1], 512 + TAIL_SIZE)
    assert used == 516 and response == bytes(512) + bytes([Status.IOERR, 0, 0, 0])


@pytest.mark.parametrize("writable", [0, 1, 3, 5, 8, 64])
def test_tail_that_cannot_be_found_is_not_written(device: IommuDevice, writable: int) -> None:
    assert device.handle_request(encode_attach(1, EP), writable) == (b"", 0)
    assert device.domain_of(EP) is None
    assert device.request_counters()["UNSERVED"] == 1


def test_probe_writable_part_larger_than_probe_size_is_not_written(device: IommuDevice) -> None:
    assert device.handle_request(encode_probe(EP), 512 + TAIL_SIZE + 1) == (b"", 0)
    assert device.handle_request(encode_probe(EP), 1 << 30) == (b"", 0)


def test_memoryview_requests(device: IommuDevice) -> None:
    assert status(device, memoryview(bytearray(encode_attach(1, EP)))) == Status.OK


def test_map_with_virt_end_below_virt_start_is_inval(device: IommuDevice) -> None:
    assert status(device, encode_attach(1, EP)) == Status.OK
    assert status(device, encode_map(1, 0x2000, 0xFFF, 0)) == Status.INVAL
    assert status(device, encode_unmap(1, 0x2000, 0xFFF)) == Status.INVAL


def test_map_whose_physical_end_overflows_is_range() -> None:
    device = negotiated(Topology(pci_ranges=(PciRange(0, 0x20, 0x27, 0x20),), input_end=2**64 - 1))
    assert status(device, encode_attach(1, EP)) == Status.OK
    assert status(device, encode_map(1, 0, 2 * PAGE - 1, 2**64 - PAGE)) == Status.RANGE
    assert status(device, encode_map(1, 0, PAGE - 1, 2**64 - PAGE)) == Status.OK


def test_unmap_ignores_input_range(device: IommuDevice) -> None:
    # The UNMAP rules make uncovered parts of a range fine, so "unmap everything" works as one request.
    assert status(device, encode_attach(1, EP)) == Status.OK
    assert status(device, encode_map(1, 0, PAGE - 1, 0)) == Status.OK
    assert status(device, encode_map(1, 0x7000_0000, 0x7000_0FFF, 0)) == Status.OK
    assert status(device, encode_unmap(1, 0, 2**64 - 1)) == Status.OK
    assert device.mappings(1) == []
    assert device.domains()[0].mapping_count == 0


@settings(max_examples=300, deadline=None)
@given(
    request=st.one_of(
        st.binary(max_size=96),
        st.sampled_from([1, 2, 3, 4, 5]).flatmap(
            lambda kind: st.binary(min_size=0, max_size=80).map(lambda b: bytes([kind]) + b)
        ),
    ),
    writable=st.integers(min_value=0, max_value=600),
)
def test_hostile_bytes_never_crash(request: bytes, writable: int) -> None:
    device = negotiated()
    device.handle_request(encode_attach(1, EP), TAIL_SIZE)
    response, used = device.handle_request(request, writable)
    assert used in (0, writable)
    assert len(response) == used
    if used:
        assert response[-3:] == bytes(3)
        assert response[-TAIL_SIZE] in set(Status)


# -- resource limits -----------------------------------------------------------------------------------------


def test_domain_limit_is_nomem_but_moving_a_lone_endpoint_still_works() -> None:
    device = negotiated(max_domains=2)
    assert status(device, encode_attach(1, EP)) == Status.OK
    assert status(device, encode_attach(2, EP2)) == Status.OK
    assert status(device, encode_attach(3, EP3)) == Status.NOMEM
    assert device.domain_of(EP3) is None
    # EP is alone in domain 1: moving it to 3 frees 1 as it creates 3.
    assert status(device, encode_attach(3, EP)) == Status.OK
    assert sorted(info.domain for info in device.domains()) == [2, 3]
    # Joining an existing domain never needs a new one.
    assert status(device, encode_attach(2, EP3)) == Status.OK


def test_mapping_limit_is_nomem() -> None:
    device = negotiated(max_mappings=3)
    assert status(device, encode_attach(1, EP)) == Status.OK
    for page in range(3):
        assert status(device, encode_map(1, page * PAGE, page * PAGE + PAGE - 1, 0)) == Status.OK
    assert status(device, encode_map(1, 8 * PAGE, 9 * PAGE - 1, 0)) == Status.NOMEM
    assert status(device, encode_unmap(1, 0, PAGE - 1)) == Status.OK
    assert status(device, encode_map(1, 8 * PAGE, 9 * PAGE - 1, 0)) == Status.OK


# -- features and config space -------------------------------------------------------------------------------


def test_features_offered(device: IommuDevice) -> None:
    expected = F_VERSION_1 | F_MAP_UNMAP | F_INPUT_RANGE | F_DOMAIN_RANGE | F_PROBE | F_MMIO | F_BYPASS_CONFIG
    assert device.device_features() == expected
    no_probe = IommuDevice(Topology(pci_ranges=(PciRange(0, 0x20, 0x27, 0x20),), probe_size=0))
    assert no_probe.device_features() == expected & ~F_PROBE


def test_set_features_keeps_only_offered_bits(device: IommuDevice) -> None:
    device.set_features(F_MAP_UNMAP | 1 << 40 | 1 << 3)
    assert device.acked_features == F_MAP_UNMAP
    assert device.driver_features == F_MAP_UNMAP | 1 << 40 | 1 << 3


def test_config_reads(device: IommuDevice) -> None:
    whole = device.get_config(0, CONFIG_SIZE)
    fields = decode_config(whole)
    assert fields.page_size_mask == 0xFFFF_FFFF_FFFF_F000
    assert (fields.input_start, fields.input_end) == (0, 2**48 - 1)
    assert (fields.domain_start, fields.domain_end) == (1, 0xFFFF)
    assert (fields.probe_size, fields.bypass, fields.reserved) == (512, 1, bytes(3))
    assert device.get_config(36, 1) == b"\x01"
    assert device.get_config(8, 8) == whole[8:16]
    assert device.get_config(40, 0) == b""


@pytest.mark.parametrize(("offset", "size"), [(-1, 1), (0, 41), (39, 2), (40, 1), (0, -1)])
def test_config_reads_out_of_range(device: IommuDevice, offset: int, size: int) -> None:
    with pytest.raises(ValueError):
        device.get_config(offset, size)


@pytest.mark.parametrize(
    ("offset", "data"),
    [
        (0, b"\x00"),
        (32, b"\x00\x01\x00\x00"),
        (36, b"\x00\x00"),
        (37, b"\x00"),
        (35, b"\x00\x00"),
        (40, b"\x00"),
    ],
)
def test_only_bypass_is_writable(device: IommuDevice, offset: int, data: bytes) -> None:
    before = device.get_config(0, CONFIG_SIZE)
    with pytest.raises(ValueError):
        device.set_config(offset, data)
    assert device.get_config(0, CONFIG_SIZE) == before


def test_bypass_write_needs_bypass_config_negotiated() -> None:
    device = IommuDevice()
    device.set_features(F_MAP_UNMAP)
    with pytest.raises(ValueError, match="BYPASS_CONFIG"):
        device.set_config(CONFIG_BYPASS, b"\x00")
    device.set_features(F_MAP_UNMAP | F_BYPASS_CONFIG)
    device.set_config(CONFIG_BYPASS, b"\x00")
    assert device.get_config(CONFIG_BYPASS, 1) == b"\x00" and not device.bypass
    device.set_config(CONFIG_BYPASS, b"\x01")
    assert device.bypass


# -- reset ---------------------------------------------------------------------------------------------------


def test_reset_drops_domains_mappings_events_and_features(device: IommuDevice) -> None:
    device.set_config(CONFIG_BYPASS, b"\x00")
    assert status(device, encode_attach(1, EP)) == Status.OK
    assert status(device, encode_attach(2, EP2, ATTACH_F_BYPASS)) == Status.OK
    assert status(device, encode_map(1, 0, PAGE - 1, 0, MAP_F_READ)) == Status.OK
    device.translate(EP3, 0, 4, 1)
    assert device.pending_event_count == 1
    device.reset()
    assert device.domains() == [] and device.store.count() == 0
    assert all(info.domain is None for info in device.endpoints())
    assert device.pending_event_count == 0
    assert device.acked_features == 0
    assert not device.bypass  # sticky
    device.set_features(device.device_features())
    assert status(device, encode_map(1, 0, PAGE - 1, 0)) == Status.NOENT
    assert status(device, encode_attach(2, EP)) == Status.OK  # a fresh, non-bypass domain 2


# -- inspection ----------------------------------------------------------------------------------------------


def test_inspection(device: IommuDevice) -> None:
    assert status(device, encode_attach(5, EP)) == Status.OK
    assert status(device, encode_attach(5, EP2)) == Status.OK
    assert status(device, encode_map(5, 0x4000, 0x5FFF, 0x9000, MAP_F_READ)) == Status.OK
    assert status(device, encode_map(5, 0x1000, 0x1FFF, 0x8000)) == Status.OK
    [info] = device.domains()
    assert (info.domain, info.bypass, info.endpoints, info.mapping_count) == (5, False, (EP, EP2), 2)
    assert info.reserved == ((0xFEE00000, 0xFEEFFFFF),)
    assert device.mappings(5) == [(0x1000, 0x1FFF, 0x8000, 3), (0x4000, 0x5FFF, 0x9000, 1)]
    assert device.mappings(6) == []
    endpoints = {info.endpoint: info for info in device.endpoints()}
    assert len(endpoints) == 216
    assert endpoints[EP].domain == 5 and endpoints[EP3].domain is None
    assert (endpoints[0xF7].segment, endpoints[0xF7].bdf) == (0, 0xF7)


def test_counters(device: IommuDevice) -> None:
    status(device, encode_attach(1, EP))
    status(device, encode_attach(1, 0x1000))
    status(device, encode_map(1, 0, PAGE - 1, 0))
    status(device, encode_map(1, 0, PAGE - 1, 0))
    device.handle_request(b"\x09\x00\x00\x00", TAIL_SIZE)
    requests = device.request_counters()
    assert (requests["ATTACH"], requests["MAP"], requests["UNSERVED"], requests["PROBE"]) == (2, 2, 1, 0)
    statuses = device.status_counters()
    assert (statuses["OK"], statuses["NOENT"], statuses["INVAL"]) == (2, 1, 1)


# -- injected answers ----------------------------------------------------------------------------------------


def test_injected_status_answers_without_touching_state(device: IommuDevice) -> None:
    assert status(device, encode_attach(1, EP)) == Status.OK
    device.inject(RequestType.MAP, Status.DEVERR, times=2)
    assert status(device, encode_map(1, 0, PAGE - 1, 0)) == Status.DEVERR
    assert status(device, encode_map(1, 0, PAGE - 1, 0)) == Status.DEVERR
    assert device.mappings(1) == []
    assert status(device, encode_map(1, 0, PAGE - 1, 0)) == Status.OK  # used up
    assert status(device, encode_unmap(1, 0, PAGE - 1)) == Status.OK  # other types untouched
    assert device.injected_count == 2


def test_injected_silence_and_probe(device: IommuDevice) -> None:
    device.inject(RequestType.ATTACH, None)
    device.inject(RequestType.PROBE, Status.NOMEM)
    assert device.handle_request(encode_attach(1, EP), TAIL_SIZE) == (b"", 0)
    assert device.domain_of(EP) is None
    response, used = device.handle_request(encode_probe(EP), 512 + TAIL_SIZE)
    assert used == 516 and response == bytes(512) + bytes([Status.NOMEM, 0, 0, 0])
    # A chain whose tail cannot be found is still refused as such, not given the injected answer.
    device.inject(RequestType.MAP, Status.OK)
    assert device.handle_request(encode_map(1, 0, PAGE - 1, 0), 8) == (b"", 0)
    device.clear_injections()
    assert status(device, encode_map(1, 0, PAGE - 1, 0)) == Status.NOENT
    with pytest.raises(ValueError):
        device.inject(RequestType.MAP, Status.OK, times=0)
