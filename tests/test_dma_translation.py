"""The compiled translation and DMA kernels (vhost_iommu/jit/dma.py) against the device core's Python
translate (vhost_iommu/device/translation.py), on random topologies: attachments, bypass (global and
per domain), reserved and MSI regions (some over existing mappings), mappings of mixed permissions, and
accesses spanning several mappings."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhost_iommu.device import IommuDevice
from vhost_iommu.device.dma import NOT_GUEST_RAM, DmaPort
from vhost_iommu.device.layout import (
    ATTACH_F_BYPASS,
    MAP_F_READ,
    MAP_F_WRITE,
    TAIL_SIZE,
    Access,
    ResvMemType,
    encode_attach,
    encode_map,
)
from vhost_iommu.device.topology import ReservedRegion
from vhost_iommu.device.translation import Fault, Translation
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.memory import FlatRegions

PAGE = 0x1000
WINDOW = 48  # pages of IOVA space the mappings, regions and accesses live in
RAM_PAGES = 40  # guest RAM; mappings may point past it (NOT_GUEST_RAM)
ENDPOINTS = (0x20, 0x21, 0x22)
UNMANAGED = 0x05
ACCESSES = (Access.READ, Access.WRITE, Access.READ | Access.WRITE, Access.EXEC, Access.READ | Access.EXEC)
RW = MAP_F_READ | MAP_F_WRITE
FLAGS = (RW, RW, RW, MAP_F_READ, MAP_F_WRITE, 0)  # mostly usable


@pytest.fixture(scope="module")
def ram() -> Iterator[tuple[GuestRam, FlatRegions]]:
    with GuestRam(RAM_PAGES * PAGE) as guest_ram:
        guest_ram.data[:] = np.random.default_rng(3).integers(0, 256, guest_ram.size, dtype=np.uint8)
        memory = guest_ram.guest_memory()
        yield guest_ram, memory.flat_tables()
        memory.close()


attachment = st.sampled_from(["none", "domain1", "domain1", "domain2", "domain2", "bypass"])
# A domain's mappings: runs laid one after the other from IOVA 0, with an occasional hole.
mapping_run = st.tuples(
    st.integers(1, 4),  # pages
    st.integers(0, RAM_PAGES + 4),  # physical page (a few past the RAM)
    st.sampled_from(FLAGS),
    st.sampled_from([0, 0, 0, 0, 0, 1]),  # pages left unmapped before the run
)
mapping_runs = st.lists(mapping_run, max_size=16)
region = st.tuples(st.integers(0, WINDOW - 1), st.integers(1, 2), st.booleans())  # page, pages, MSI
access = st.tuples(
    st.sampled_from((*ENDPOINTS, *ENDPOINTS, UNMANAGED)),
    st.integers(0, WINDOW * PAGE),
    st.one_of(st.integers(1, PAGE), st.integers(PAGE, 6 * PAGE)),
    st.sampled_from(ACCESSES),
)


def build(
    attachments: list[str],
    global_bypass: bool,
    mappings: list[list[tuple[int, int, int, int]]],
    regions: list[list[tuple[int, int, bool]]],
) -> IommuDevice:
    device = IommuDevice()
    device.set_features(device.device_features())
    device.set_bypass(int(global_bypass))
    for endpoint, how in zip(ENDPOINTS, attachments, strict=True):
        if how == "bypass":
            device.handle_request(encode_attach(9, endpoint, ATTACH_F_BYPASS), TAIL_SIZE)
        elif how != "none":
            device.handle_request(encode_attach(int(how[-1]), endpoint), TAIL_SIZE)
    for domain, runs in enumerate(mappings, start=1):
        page = 0
        for pages, phys_page, flags, hole in runs:
            start = (page + hole) * PAGE
            request = encode_map(domain, start, start + pages * PAGE - 1, phys_page * PAGE, flags)
            device.handle_request(request, TAIL_SIZE)  # a domain no endpoint created refuses it: fine
            page += hole + pages
    for endpoint, wanted in zip(ENDPOINTS, regions, strict=True):
        chosen: list[ReservedRegion] = []
        msi = False
        for page, pages, is_msi in sorted(wanted):
            start = page * PAGE
            if chosen and start <= chosen[-1].end:
                continue  # regions must not overlap
            kind = ResvMemType.MSI if is_msi and not msi else ResvMemType.RESERVED
            msi = msi or kind == ResvMemType.MSI
            chosen.append(ReservedRegion(kind, start, start + pages * PAGE - 1))
        # Set after the mappings: a region over an existing mapping must win over it.
        device.set_reserved_regions(endpoint, tuple(chosen))
    return device


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    attachments=st.lists(attachment, min_size=3, max_size=3),
    global_bypass=st.booleans(),
    mappings=st.lists(mapping_runs, min_size=2, max_size=2),
    regions=st.lists(st.lists(region, max_size=2), min_size=3, max_size=3),
    accesses=st.lists(access, min_size=1, max_size=8),
)
def test_the_kernels_translate_and_move_bytes_as_the_python_rules_say(
    ram: tuple[GuestRam, FlatRegions],
    attachments: list[str],
    global_bypass: bool,
    mappings: list[list[tuple[int, int, int, int]]],
    regions: list[list[tuple[int, int, bool]]],
    accesses: list[tuple[int, int, int, Access]],
) -> None:
    guest_ram, memory = ram
    device = build(attachments, global_bypass, mappings, regions)
    for endpoint, iova, length, kind in accesses:
        expected = device.translate(endpoint, iova, length, kind, report=False)
        port = DmaPort(device, endpoint)
        assert port.translate(iova, length, kind) == expected
        if kind == Access.READ:
            check_read(device, port, memory, guest_ram, iova, length, expected)


def check_read(
    device: IommuDevice,
    port: DmaPort,
    memory: FlatRegions,
    guest_ram: GuestRam,
    iova: int,
    length: int,
    whole: Translation | Fault,
) -> None:
    """A DMA read ends where the Python rules say, chunk by chunk: at the first chunk (4 KiB-aligned
    piece) with a fault, else at the first chunk outside RAM; the bytes read are RAM's."""
    out = np.zeros(length, np.uint8)
    result = port.read(memory, iova, out)
    done = 0
    expected_bytes = bytearray()
    while done < length:
        chunk = min(length - done, PAGE - (iova + done) % PAGE)
        translated = device.translate(port.endpoint, iova + done, chunk, Access.READ, report=False)
        if isinstance(translated, Fault):
            assert isinstance(whole, Fault) and translated.address == whole.address
            assert result.fault is not None
            assert (result.fault.reason, result.fault.address) == (translated.reason, translated.address)
            break
        outside = [max(phys, guest_ram.size) for phys, n in translated.segments if phys + n > guest_ram.size]
        if outside:
            first = outside[0]  # segments are checked in access order
            assert (result.error, result.error_address) == (NOT_GUEST_RAM, first)
            break
        for phys, n in translated.segments:
            expected_bytes += guest_ram.read(phys, n)
        done += chunk
    else:
        assert result.ok
    assert result.done_bytes == done
    assert bytes(out[:done]) == bytes(expected_bytes)
