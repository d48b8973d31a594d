"""The MAP and UNMAP rules of `vhost_iommu.jit.rules` mean the same compiled and as Python.

The device core runs them as Python (unbounded ints), the compiled request path compiles them into its
kernel (u64 addresses, i64 indices): a rule written with arithmetic that wraps in one and not the other
(``virt_end + 1`` on the last page, say) would answer differently. Here each rule function runs both
ways, compiled with the argument types the kernel passes, on inputs drawn around every boundary.
tests/test_conformance.py breaks each rule alone through both request paths; tests/test_request_path.py
runs random request streams through both and compares the guest memory and the tables.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from vhost_iommu import abi
from vhost_iommu.device import layout
from vhost_iommu.jit import rules, tables

U64_MAX = (1 << 64) - 1
PAGE = 0x1000


@njit
def _compiled_map_status(
    map_unmap: bool,
    mmio: bool,
    index: np.int64,
    exists: np.ndarray,
    bypass: np.ndarray,
    resv_set: np.ndarray,
    resv_starts: np.ndarray,
    resv_ends: np.ndarray,
    resv_offsets: np.ndarray,
    virt_start: np.uint64,
    virt_end: np.uint64,
    phys_start: np.uint64,
    flags: np.int64,
    granule: np.uint64,
    input_start: np.uint64,
    input_end: np.uint64,
) -> int:
    return rules.map_status(  # type: ignore[no-any-return]
        map_unmap,
        mmio,
        index,
        exists,
        bypass,
        resv_set,
        resv_starts,
        resv_ends,
        resv_offsets,
        virt_start,
        virt_end,
        phys_start,
        flags,
        granule,
        input_start,
        input_end,
    )


@njit
def _compiled_unmap_status(
    map_unmap: bool,
    reserved: np.int64,
    index: np.int64,
    exists: np.ndarray,
    bypass: np.ndarray,
    virt_start: np.uint64,
    virt_end: np.uint64,
) -> int:
    return rules.unmap_status(map_unmap, reserved, index, exists, bypass, virt_start, virt_end)  # type: ignore[no-any-return]


@njit
def _compiled_table_statuses(table_status: np.int64) -> tuple[int, int]:
    return rules.mapped_status(table_status), rules.unmapped_status(table_status)


# Domains 0..3: 0 and 1 exist, 1 is a bypass domain; domain 0's endpoints reserve two intervals (set 1),
# the others none (set 0).
EXISTS = np.array([True, True, False, False])
BYPASS = np.array([False, True, False, False])
RESV_SET = np.array([1, 0, 0, 0], np.int32)
RESV_STARTS = np.array([0xFEE0_0000, U64_MAX - PAGE + 1], np.uint64)
RESV_ENDS = np.array([0xFEEF_FFFF, U64_MAX], np.uint64)
RESV_OFFSETS = np.array([0, 0, 2], np.int64)

_near = st.sampled_from([0, 1, PAGE - 1, PAGE, 0xFEE0_0000, 1 << 48, (1 << 63) - 1, 1 << 63, U64_MAX - PAGE])
_addresses = st.one_of(
    st.integers(0, U64_MAX),
    st.builds(lambda base, delta: min(max(base + delta, 0), U64_MAX), _near, st.integers(-PAGE, PAGE)),
    st.builds(lambda page: page * PAGE, st.integers(0, 64)),
    st.builds(lambda pages: U64_MAX + 1 - pages * PAGE, st.integers(1, 4)),  # the last pages
)


@st.composite
def _ranges(draw: st.DrawFn) -> tuple[int, int]:
    """(virt_start, virt_end): mostly whole pages from an address near a boundary, sometimes anything."""
    start = draw(_addresses)
    end = draw(
        st.one_of(
            st.builds(lambda pages: min(start + pages * PAGE - 1, U64_MAX), st.integers(1, 4)),
            st.builds(lambda pages: max(start - pages * PAGE, 0), st.integers(0, 2)),
            _addresses,
        )
    )
    return start, end


# Mostly what passes the first rules, so that the later ones (alignment, ranges, overflow, reserved
# regions) are reached often.
_map_arguments = {
    "map_unmap": st.sampled_from([True, True, True, False]),
    "mmio": st.booleans(),
    "index": st.sampled_from([0, 0, 0, 1, 2, -1, 4]),
    "virt_range": _ranges(),
    "phys_start": _addresses,
    "flags": st.sampled_from([3, 3, 1, 2, 0, 4, 8, 0xFFFF_FFFF]),
    "granule_shift": st.sampled_from([12, 12, 0, 21]),
    "input_range": st.sampled_from([(0, U64_MAX), (0, (1 << 48) - 1), (PAGE, (1 << 32) - 1)]),
}


@settings(max_examples=1000, deadline=None)
@given(**_map_arguments)
def test_map_rules_compiled_and_as_python_agree(
    map_unmap: bool,
    mmio: bool,
    index: int,
    virt_range: tuple[int, int],
    phys_start: int,
    flags: int,
    granule_shift: int,
    input_range: tuple[int, int],
) -> None:
    virt_start, virt_end = virt_range
    arrays = (EXISTS, BYPASS, RESV_SET, RESV_STARTS, RESV_ENDS, RESV_OFFSETS)
    as_python = rules.map_status(
        map_unmap,
        mmio,
        index,
        *arrays,
        virt_start,
        virt_end,
        phys_start,
        flags,
        1 << granule_shift,
        *input_range,
    )
    compiled = _compiled_map_status(
        map_unmap,
        mmio,
        np.int64(index),
        *arrays,
        np.uint64(virt_start),
        np.uint64(virt_end),
        np.uint64(phys_start),
        np.int64(flags),
        np.uint64(1 << granule_shift),
        np.uint64(input_range[0]),
        np.uint64(input_range[1]),
    )
    assert compiled == as_python


@settings(max_examples=300, deadline=None)
@given(
    map_unmap=st.sampled_from([True, True, True, False]),
    reserved=st.sampled_from([0, 0, 1, 1 << 24, 0xFFFF_FFFF]),
    index=st.sampled_from([0, 0, 1, 2, -1, 4]),
    virt_range=_ranges(),
)
def test_unmap_rules_compiled_and_as_python_agree(
    map_unmap: bool, reserved: int, index: int, virt_range: tuple[int, int]
) -> None:
    virt_start, virt_end = virt_range
    as_python = rules.unmap_status(map_unmap, reserved, index, EXISTS, BYPASS, virt_start, virt_end)
    compiled = _compiled_unmap_status(
        map_unmap,
        np.int64(reserved),
        np.int64(index),
        EXISTS,
        BYPASS,
        np.uint64(virt_start),
        np.uint64(virt_end),
    )
    assert compiled == as_python


def test_table_answers_map_to_the_same_statuses() -> None:
    for table_status in tables.STATUS_NAMES:
        as_python = (rules.mapped_status(table_status), rules.unmapped_status(table_status))
        assert _compiled_table_statuses(np.int64(table_status)) == as_python
    assert rules.mapped_status(tables.OVERLAP) == abi.S_INVAL
    assert rules.unmapped_status(tables.SPLIT) == abi.S_RANGE


def test_struct_layouts_have_the_sizes_of_the_numbers() -> None:
    """`vhost_iommu.device.layout`'s struct formats and `vhost_iommu.abi`'s sizes describe the same bytes."""
    assert (layout.HEAD.size, layout.TAIL.size) == (abi.HEAD_SIZE, abi.TAIL_SIZE)
    assert layout.ATTACH.size == abi.ATTACH_SIZE
    assert layout.DETACH.size == abi.DETACH_SIZE
    assert layout.MAP.size == abi.MAP_SIZE
    assert layout.UNMAP.size == abi.UNMAP_SIZE
    assert layout.PROBE.size == abi.PROBE_SIZE
    assert layout.CONFIG.size == abi.CONFIG_SIZE
    assert layout.FAULT.size == abi.FAULT_SIZE
    assert layout.PROPERTY_HEAD.size == abi.PROPERTY_HEAD_SIZE
    assert layout.RESV_MEM.size == abi.RESV_MEM_SIZE
    request = layout.encode_map(0x0102_0304, 0x1111 << 12, 0x2222 << 12, 0x3333 << 12, 0x0506_0708)
    fields = {
        abi.REQ_DOMAIN: (4, 0x0102_0304),
        abi.REQ_VIRT_START: (8, 0x1111 << 12),
        abi.REQ_VIRT_END: (8, 0x2222 << 12),
        abi.MAP_PHYS_START: (8, 0x3333 << 12),
        abi.MAP_FLAGS: (4, 0x0506_0708),
    }
    for offset, (width, value) in fields.items():
        assert int.from_bytes(request[offset : offset + width], "little") == value
    unmap = layout.encode_unmap(1, 0, PAGE - 1, reserved=b"\x01\x02\x03\x04")
    assert unmap[abi.UNMAP_RESERVED : abi.UNMAP_RESERVED + 4] == b"\x01\x02\x03\x04"
