"""The PCI function model: identity, masked writes, Bus Master, MSI-X capability, reset, bad accesses."""

from __future__ import annotations

import struct

import pytest

from vhost_iommu.pci.function import (
    BAR0,
    CAP_ID_MSIX,
    COMMAND,
    COMMAND_BUS_MASTER,
    MSIX_CAPABILITY_OFFSET,
    MsixLayout,
    PciAccessError,
    PciFunction,
    PciIdentity,
)

IDENTITY = PciIdentity(
    vendor=0x1234, device=0x11E9, class_code=0x088000, subsystem_vendor=0x1AF4, subsystem=0x1100
)
MSIX = MsixLayout(vectors=2, table_bar=0, table_offset=0x1000, pba_bar=0, pba_offset=0x1800)


def function() -> PciFunction:
    return PciFunction(IDENTITY, (8192,), MSIX)


def word(pci: PciFunction, offset: int, size: int = 2) -> int:
    return int.from_bytes(pci.config_read(offset, size), "little")


def test_identity_and_class_are_what_lspci_shows() -> None:
    pci = function()
    assert word(pci, 0) == 0x1234 and word(pci, 2) == 0x11E9
    assert word(pci, 0x08, 4) >> 8 == 0x088000
    assert word(pci, 0x2C) == 0x1AF4 and word(pci, 0x2E) == 0x1100


def test_bus_master_is_writable_and_read_only_fields_are_not() -> None:
    pci = function()
    assert not pci.bus_master
    pci.config_write(COMMAND, struct.pack("<H", 0xFFFF))
    assert pci.bus_master
    assert word(pci, COMMAND) == 0x0406  # memory, bus master, INTx disable: nothing else sticks
    pci.config_write(0, b"\xff\xff\xff\xff")  # vendor and device IDs are read-only
    assert word(pci, 0) == 0x1234 and word(pci, 2) == 0x11E9
    pci.config_write(COMMAND, struct.pack("<H", 0))
    assert not pci.bus_master


def test_bar_sizing_reads_back_the_size_mask() -> None:
    pci = function()
    pci.config_write(BAR0, b"\xff\xff\xff\xff")
    assert word(pci, BAR0, 4) == 0xFFFF_E000  # 8 KiB, 32-bit memory
    assert word(pci, BAR0 + 4, 4) == 0  # no BAR1


def test_msix_capability_points_at_table_and_pba() -> None:
    pci = function()
    assert word(pci, 0x06) & 0x10  # capability list
    assert pci.config_read(0x34, 1)[0] == MSIX_CAPABILITY_OFFSET
    cap_id, next_cap, control, table, pba = struct.unpack_from(
        "<BBHII", pci.config_read(MSIX_CAPABILITY_OFFSET, 8) + pci.config_read(MSIX_CAPABILITY_OFFSET + 8, 4)
    )
    assert (cap_id, next_cap, control & 0x7FF, table, pba) == (CAP_ID_MSIX, 0, 1, 0x1000, 0x1800)
    pci.config_write(MSIX_CAPABILITY_OFFSET + 2, struct.pack("<H", 0xFFFF))
    assert pci.msix_enabled and word(pci, MSIX_CAPABILITY_OFFSET + 2) == 0xC001


def test_reset_restores_power_on_values() -> None:
    pci = function()
    pci.config_write(COMMAND, struct.pack("<H", COMMAND_BUS_MASTER))
    pci.config_write(BAR0, b"\x00\x00\x00\xfe")
    pci.reset()
    assert not pci.bus_master and word(pci, BAR0, 4) == 0


def test_configuration_space_is_read_and_written_in_any_span() -> None:
    pci = function()
    whole = pci.config_read(0, 256)  # what QEMU reads when it realizes the device
    assert whole[:4] == struct.pack("<HH", 0x1234, 0x11E9) and pci.config_read(1, 3) == whole[1:4]
    pci.config_write(COMMAND, bytes(12))  # a write spanning command, status, class...: masked bytewise
    assert pci.config_read(0, 256) == whole


@pytest.mark.parametrize(("offset", "size"), [(-1, 1), (255, 2), (256, 1), (0, 0), (0, 257)])
def test_out_of_range_accesses_are_refused(offset: int, size: int) -> None:
    pci = function()
    with pytest.raises(PciAccessError):
        pci.config_read(offset, size)
    with pytest.raises(PciAccessError):
        pci.config_write(offset, bytes(size))


def test_an_msix_table_outside_its_bar_is_a_model_error() -> None:
    with pytest.raises(ValueError, match="MSI-X table"):
        PciFunction(IDENTITY, (4096,), MSIX)
