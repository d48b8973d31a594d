"""DMA translation and fault events: the decisions documented in vhost_iommu/device/translation.py."""

from __future__ import annotations

import pytest

from vhost_iommu.device import (
    Access,
    Fault,
    FaultReason,
    IommuDevice,
    ResvMemType,
    Status,
    Topology,
    Translation,
)
from vhost_iommu.device.layout import (
    ATTACH_F_BYPASS,
    CONFIG_BYPASS,
    FAULT_F_ADDRESS,
    FAULT_F_EXEC,
    FAULT_F_READ,
    FAULT_F_WRITE,
    FAULT_SIZE,
    MAP_F_READ,
    MAP_F_WRITE,
    TAIL_SIZE,
    decode_fault,
    encode_attach,
    encode_detach,
    encode_map,
)
from vhost_iommu.device.topology import PciRange, ReservedRegion

EP, EP2 = 0x20, 0x21
PAGE = 0x1000
RW = MAP_F_READ | MAP_F_WRITE
MSI_START, MSI_END = 0xFEE0_0000, 0xFEEF_FFFF


def send(device: IommuDevice, request: bytes) -> Status:
    response, used = device.handle_request(request, TAIL_SIZE)
    assert used == TAIL_SIZE
    return Status(response[0])


@pytest.fixture
def device() -> IommuDevice:
    """Default topology, features negotiated, bypass off, EP attached to domain 1."""
    device = IommuDevice()
    device.set_features(device.device_features())
    device.set_config(CONFIG_BYPASS, b"\x00")
    assert send(device, encode_attach(1, EP)) == Status.OK
    return device


def translated(result: Translation | Fault) -> Translation:
    assert isinstance(result, Translation), result
    return result


def faulted(result: Translation | Fault) -> Fault:
    assert isinstance(result, Fault), result
    return result


def test_adjacent_mappings_contiguous_in_both_spaces_give_one_segment(device: IommuDevice) -> None:
    assert send(device, encode_map(1, 0x1000, 0x1FFF, 0x50000)) == Status.OK
    assert send(device, encode_map(1, 0x2000, 0x3FFF, 0x51000)) == Status.OK
    result = translated(device.translate(EP, 0x1F00, 0x200, Access.READ))
    assert result.segments == ((0x50F00, 0x200),) and result.contiguous and not result.bypass


def test_adjacent_mappings_apart_in_physical_space_give_two_segments(device: IommuDevice) -> None:
    assert send(device, encode_map(1, 0x1000, 0x1FFF, 0x50000)) == Status.OK
    assert send(device, encode_map(1, 0x2000, 0x2FFF, 0x90000)) == Status.OK
    result = translated(device.translate(EP, 0x1F00, 0x200, Access.WRITE))
    assert result.segments == ((0x50F00, 0x100), (0x90000, 0x100))
    assert result.phys == 0x50F00 and not result.contiguous


def test_access_running_into_a_gap_faults_at_the_first_unmapped_byte(device: IommuDevice) -> None:
    assert send(device, encode_map(1, 0x1000, 0x1FFF, 0x50000)) == Status.OK
    assert send(device, encode_map(1, 0x3000, 0x3FFF, 0x52000)) == Status.OK
    fault = faulted(device.translate(EP, 0x1800, 0x2000, Access.READ))
    assert (fault.reason, fault.address, fault.endpoint) == (FaultReason.MAPPING, 0x2000, EP)


def test_access_running_into_a_read_only_mapping_faults_there_on_write(device: IommuDevice) -> None:
    assert send(device, encode_map(1, 0x1000, 0x1FFF, 0x50000)) == Status.OK
    assert send(device, encode_map(1, 0x2000, 0x2FFF, 0x51000, MAP_F_READ)) == Status.OK
    assert translated(device.translate(EP, 0x1FFC, 8, Access.READ)).segments == ((0x50FFC, 8),)
    fault = faulted(device.translate(EP, 0x1FFC, 8, Access.WRITE))
    assert fault.address == 0x2000
    assert decode_fault(device.take_event() or b"").flags == FAULT_F_WRITE | FAULT_F_ADDRESS


def test_write_only_mapping_refuses_reads(device: IommuDevice) -> None:
    assert send(device, encode_map(1, 0x1000, 0x1FFF, 0x50000, MAP_F_WRITE)) == Status.OK
    assert translated(device.translate(EP, 0x1000, 4, Access.WRITE)).phys == 0x50000
    fault = faulted(device.translate(EP, 0x1000, 4, Access.READ))
    assert fault.flags == FAULT_F_READ | FAULT_F_ADDRESS


def test_instruction_fetch_needs_read_and_reports_exec(device: IommuDevice) -> None:
    assert send(device, encode_map(1, 0x1000, 0x1FFF, 0x50000, MAP_F_READ)) == Status.OK
    assert send(device, encode_map(1, 0x2000, 0x2FFF, 0x60000, MAP_F_WRITE)) == Status.OK
    assert translated(device.translate(EP, 0x1000, 4, Access.EXEC)).phys == 0x50000
    fault = faulted(device.translate(EP, 0x2000, 4, Access.EXEC))
    assert fault.flags == FAULT_F_EXEC | FAULT_F_ADDRESS


def test_mapping_then_msi_region(device: IommuDevice) -> None:
    assert send(device, encode_map(1, MSI_START - PAGE, MSI_START - 1, 0x7000)) == Status.OK
    result = translated(device.translate(EP, MSI_START - 4, 8, Access.WRITE))
    assert result.segments == ((0x7FFC, 4), (MSI_START, 4))


def test_msi_region_is_identity_even_unattached_without_bypass(device: IommuDevice) -> None:
    assert translated(device.translate(EP2, MSI_START + 0x1000, 4, Access.WRITE)).phys == MSI_START + 0x1000
    fault = faulted(device.translate(EP2, MSI_START - 4, 8, Access.WRITE))
    assert (fault.reason, fault.address) == (FaultReason.DOMAIN, MSI_START - 4)


def test_bypass_is_identity_for_the_whole_access_regions_included() -> None:
    topology = Topology(
        pci_ranges=(PciRange(0, 0x20, 0x27, 0x20, (ReservedRegion(ResvMemType.RESERVED, 0x8000, 0x8FFF),)),)
    )
    device = IommuDevice(topology)
    device.set_features(device.device_features())
    assert translated(device.translate(EP, 0x7000, 0x3000, Access.READ)).segments == ((0x7000, 0x3000),)
    assert send(device, encode_attach(3, EP, ATTACH_F_BYPASS)) == Status.OK
    device.set_config(CONFIG_BYPASS, b"\x00")
    assert translated(device.translate(EP, 0x7000, 0x3000, Access.WRITE)).bypass
    assert send(device, encode_detach(3, EP)) == Status.OK
    assert faulted(device.translate(EP, 0x7000, 0x3000, Access.WRITE)).reason == FaultReason.DOMAIN


def test_translation_at_the_top_of_the_address_space() -> None:
    device = IommuDevice(Topology(pci_ranges=(PciRange(0, 0x20, 0x27, 0x20),), input_end=2**64 - 1))
    device.set_features(device.device_features())
    device.set_config(CONFIG_BYPASS, b"\x00")
    assert send(device, encode_attach(1, EP)) == Status.OK
    assert send(device, encode_map(1, 2**64 - PAGE, 2**64 - 1, 0x3000)) == Status.OK
    assert translated(device.translate(EP, 2**64 - 8, 8, Access.READ)).segments == ((0x3FF8, 8),)


def test_report_off_queues_nothing(device: IommuDevice) -> None:
    fault = faulted(device.translate(EP, 0x1000, 4, Access.READ, report=False))
    assert not fault.reported and device.pending_event_count == 0
    assert device.fault_counters()["MAPPING"] == 1


def test_fault_event_bytes(device: IommuDevice) -> None:
    fault = faulted(device.translate(EP, 0x1234_5678, 4, Access.READ | Access.WRITE))
    assert fault.reported
    event = device.take_event()
    assert event is not None and len(event) == FAULT_SIZE == 24
    assert event == fault.encode()
    assert event[0] == FaultReason.MAPPING and event[1:4] == bytes(3)
    assert int.from_bytes(event[4:8], "little") == FAULT_F_READ | FAULT_F_WRITE | FAULT_F_ADDRESS
    assert int.from_bytes(event[8:12], "little") == EP
    assert event[12:16] == bytes(4)
    assert int.from_bytes(event[16:24], "little") == 0x1234_5678
    assert device.take_event() is None


def test_events_come_out_in_order_and_overflow_is_counted() -> None:
    device = IommuDevice(max_pending_events=3)
    device.set_features(device.device_features())
    device.set_config(CONFIG_BYPASS, b"\x00")
    results = [device.translate(EP, page * PAGE, 4, Access.READ) for page in range(5)]
    assert [faulted(result).reported for result in results] == [True, True, True, False, False]
    assert device.dropped_event_count == 2 and device.fault_counters()["DROPPED"] == 2
    assert [event.address for event in device.pending_events()] == [0, PAGE, 2 * PAGE]
    assert [decode_fault(device.take_event() or b"").address for _ in range(3)] == [0, PAGE, 2 * PAGE]
    assert device.take_event() is None
    assert faulted(device.translate(EP, 0, 4, Access.READ)).reported


def test_report_fault_for_tools() -> None:
    device = IommuDevice(max_pending_events=1)
    assert device.report_fault(FaultReason.UNKNOWN, 0, EP)
    assert not device.report_fault(FaultReason.UNKNOWN, 0, EP)
    assert decode_fault(device.take_event() or b"").reason == FaultReason.UNKNOWN


@pytest.mark.parametrize(
    ("iova", "size", "access"),
    [(0, 0, Access.READ), (2**64 - 4, 8, Access.READ), (-1, 4, Access.READ), (0, 4, 0), (0, 4, 8)],
)
def test_bad_translate_arguments(device: IommuDevice, iova: int, size: int, access: int) -> None:
    with pytest.raises(ValueError):
        device.translate(EP, iova, size, access)
