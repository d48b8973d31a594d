"""GuestMemory over real memfds: translation, hostile region tables, fd and mapping lifetime."""

from __future__ import annotations

import fcntl
import gc
import itertools
import mmap
import os
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhost_iommu.harness.guest_ram import GuestRam, GuestRamError
from vhost_iommu.memory import MAX_MEM_SLOTS, GuestMemory, GuestMemoryError, MemoryRegionDesc

PAGE = os.sysconf("SC_PAGE_SIZE")
UVA = 0x7F12_3400_0000
_names = itertools.count()


def open_fds() -> set[str]:
    """This process's open fds (without the one listdir itself used, which is closed by now)."""

    def is_open(fd: str) -> bool:
        try:
            fcntl.fcntl(int(fd), fcntl.F_GETFD)
        except OSError:
            return False
        return True

    return {fd for fd in os.listdir("/proc/self/fd") if is_open(fd)}


def mappings_of(name: str) -> int:
    """How many mappings of memfd ``name`` this process has."""
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if line.rstrip().endswith(f"/memfd:{name} (deleted)"))


class Memfd:
    """A memfd with a unique name and known contents (byte i holds i % 251)."""

    def __init__(self, size: int) -> None:
        self.name = f"vhost-iommu-test-{os.getpid()}-{next(_names)}"
        self.fd = os.memfd_create(self.name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        os.pwrite(self.fd, bytes(i % 251 for i in range(size)), 0)
        self.size = size

    def dup(self) -> int:
        return os.dup(self.fd)

    def pread(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def memfd() -> Iterator[Memfd]:
    file = Memfd(16 * PAGE)
    yield file
    file.close()


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    guest_memory = GuestMemory()
    yield guest_memory
    guest_memory.close()


def test_views_of_both_address_spaces_share_the_file(memfd: Memfd, memory: GuestMemory) -> None:
    memory.add_region(MemoryRegionDesc(0x10_0000, 8 * PAGE, UVA, 2 * PAGE), memfd.dup())
    by_gpa = memory.gpa_view(0x10_0000 + 100, 16)
    by_uva = memory.uva_view(UVA + 100, 16)
    assert by_gpa.dtype == np.uint8
    assert bytes(by_gpa) == memfd.pread(2 * PAGE + 100, 16) == bytes(by_uva)
    by_gpa[:] = 0xAB  # no copy: the write reaches the file, and the other view
    assert memfd.pread(2 * PAGE + 100, 16) == b"\xab" * 16
    assert bytes(by_uva) == b"\xab" * 16


def test_mmap_offset_not_page_aligned_is_honoured(memfd: Memfd, memory: GuestMemory) -> None:
    memory.add_region(MemoryRegionDesc(0x2000, 4 * PAGE, UVA, PAGE + 123), memfd.dup())
    assert bytes(memory.gpa_view(0x2000, 64)) == memfd.pread(PAGE + 123, 64)
    last = memory.gpa_view(0x2000 + 4 * PAGE - 8, 8)
    assert bytes(last) == memfd.pread(PAGE + 123 + 4 * PAGE - 8, 8)


def free_huge_pages() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
    return 0


@pytest.mark.skipif(free_huge_pages() < 2, reason="needs two free huge pages (vm.nr_hugepages)")
def test_hugetlbfs_offset_inside_a_huge_page(memory: GuestMemory) -> None:
    fd = os.memfd_create("vhost-iommu-huge", os.MFD_CLOEXEC | os.MFD_HUGETLB)
    try:
        huge = os.fstat(fd).st_blksize
        os.ftruncate(fd, 2 * huge)
        with mmap.mmap(fd, 2 * huge) as writer:  # hugetlbfs has no write(2)
            writer[huge + PAGE : huge + PAGE + 4] = b"huge"
        memory.add_region(MemoryRegionDesc(0, huge - PAGE, UVA, huge + PAGE), os.dup(fd))
        assert bytes(memory.gpa_view(0, 4)) == b"huge"
    finally:
        os.close(fd)


def test_view_must_lie_in_one_region(memfd: Memfd, memory: GuestMemory) -> None:
    memory.add_region(MemoryRegionDesc(0x10000, PAGE, UVA, 0), memfd.dup())
    memory.gpa_view(0x10000, PAGE)
    for gpa, size in [
        (0x10000 - 1, 2),  # starts before
        (0x10000 + PAGE - 1, 2),  # runs past the end
        (0x10000 + PAGE, 1),  # just after
        (0, 1),
        (0x10000, 0),  # empty
        (0x10000, -1),
        (-1, 4),
        ((1 << 64) - 1, 2),  # wraps
    ]:
        with pytest.raises(GuestMemoryError):
            memory.gpa_view(gpa, size)
    with pytest.raises(GuestMemoryError):
        memory.uva_view(0x10000, 1)  # a gpa is not a uva
    with pytest.raises(GuestMemoryError):
        memory.gpa_view(UVA, 1)  # and the other way round


@pytest.mark.parametrize(
    "desc",
    [
        MemoryRegionDesc(0x1000, 0, UVA, 0),  # empty
        MemoryRegionDesc((1 << 64) - PAGE, 2 * PAGE, UVA, 0),  # gpa + size wraps
        MemoryRegionDesc(0, 2 * PAGE, (1 << 64) - PAGE, 0),  # uva + size wraps
        MemoryRegionDesc(0, PAGE, UVA, (1 << 64) - 16),  # offset + size wraps
        MemoryRegionDesc(0, PAGE, UVA, 16 * PAGE),  # past the end of the file
        MemoryRegionDesc(0, 16 * PAGE, UVA, 1),  # one byte past the end
        MemoryRegionDesc(-PAGE, PAGE, UVA, 0),
        MemoryRegionDesc(1 << 64, PAGE, UVA, 0),
    ],
    ids=[
        "size0",
        "gpa-wrap",
        "uva-wrap",
        "offset-wrap",
        "past-eof",
        "one-past-eof",
        "negative",
        "u64-overflow",
    ],
)
def test_hostile_region_is_refused_and_its_fd_closed(
    desc: MemoryRegionDesc, memfd: Memfd, memory: GuestMemory
) -> None:
    before = open_fds()
    with pytest.raises(GuestMemoryError):
        memory.add_region(desc, memfd.dup())
    assert open_fds() == before
    assert len(memory) == 0
    assert mappings_of(memfd.name) == 0


def test_overlaps_are_refused_in_either_address_space(memfd: Memfd, memory: GuestMemory) -> None:
    memory.add_region(MemoryRegionDesc(0x100000, 2 * PAGE, UVA, 0), memfd.dup())
    before = open_fds()
    with pytest.raises(GuestMemoryError, match="guest-physical"):
        memory.add_region(MemoryRegionDesc(0x100000 + PAGE, 2 * PAGE, UVA + 0x1000_0000, 0), memfd.dup())
    with pytest.raises(GuestMemoryError, match="front-end"):
        memory.add_region(MemoryRegionDesc(0x900000, 2 * PAGE, UVA + PAGE, 0), memfd.dup())
    assert open_fds() == before
    # Adjacent in both spaces is fine.
    memory.add_region(MemoryRegionDesc(0x100000 + 2 * PAGE, PAGE, UVA + 2 * PAGE, 0), memfd.dup())
    assert len(memory) == 2


def test_fd_that_is_not_a_regular_file_is_refused_and_closed(memory: GuestMemory) -> None:
    read_end, write_end = os.pipe()
    try:
        before = open_fds() - {str(read_end)}
        with pytest.raises(GuestMemoryError, match="regular file"):
            memory.add_region(MemoryRegionDesc(0, PAGE, UVA, 0), read_end)
        assert open_fds() == before
    finally:
        os.close(write_end)


def test_read_only_fd_is_refused_and_closed(memfd: Memfd, memory: GuestMemory) -> None:
    read_only = os.open(f"/proc/self/fd/{memfd.fd}", os.O_RDONLY)
    before = open_fds() - {str(read_only)}
    with pytest.raises(GuestMemoryError, match="mmap"):
        memory.add_region(MemoryRegionDesc(0, PAGE, UVA, 0), read_only)
    assert open_fds() == before
    assert len(memory) == 0


def test_closed_fd_gives_an_error_not_a_crash(memory: GuestMemory) -> None:
    fd = os.memfd_create("gone")
    os.close(fd)
    with pytest.raises(GuestMemoryError):
        memory.add_region(MemoryRegionDesc(0, PAGE, UVA, 0), fd)


def test_successful_add_closes_the_fd(memfd: Memfd, memory: GuestMemory) -> None:
    before = open_fds()
    memory.add_region(MemoryRegionDesc(0, PAGE, UVA, 0), memfd.dup())
    assert open_fds() == before
    assert mappings_of(memfd.name) == 1


def test_region_count_is_limited(memfd: Memfd, memory: GuestMemory) -> None:
    assert memory.max_regions == MAX_MEM_SLOTS
    memory.max_regions = 2
    memory.add_region(MemoryRegionDesc(0, PAGE, UVA, 0), memfd.dup())
    memory.add_region(MemoryRegionDesc(PAGE, PAGE, UVA + PAGE, PAGE), memfd.dup())
    before = open_fds()
    with pytest.raises(GuestMemoryError, match="already 2"):
        memory.add_region(MemoryRegionDesc(2 * PAGE, PAGE, UVA + 2 * PAGE, 2 * PAGE), memfd.dup())
    assert open_fds() == before
    with pytest.raises(GuestMemoryError, match="at most 2"):
        memory.replace([(MemoryRegionDesc(i * PAGE, PAGE, UVA + i * PAGE, 0), memfd.dup()) for i in range(3)])
    assert open_fds() == before


def test_lookup_among_many_regions(memfd: Memfd, memory: GuestMemory) -> None:
    # 64 one-page regions, gpas in order but uvas reversed, each mapping a different file page.
    for i in range(64):
        memory.add_region(
            MemoryRegionDesc(0x4000_0000 + i * 2 * PAGE, PAGE, UVA + (63 - i) * PAGE, (i % 16) * PAGE),
            memfd.dup(),
        )
    for i in (0, 1, 31, 62, 63):
        expected = memfd.pread((i % 16) * PAGE + 8, 8)
        assert bytes(memory.gpa_view(0x4000_0000 + i * 2 * PAGE + 8, 8)) == expected
        assert bytes(memory.uva_view(UVA + (63 - i) * PAGE + 8, 8)) == expected
        with pytest.raises(GuestMemoryError):
            memory.gpa_view(0x4000_0000 + i * 2 * PAGE + PAGE, 1)  # the hole after region i
    assert [r.gpa_start for r in memory.regions] == sorted(r.gpa_start for r in memory.regions)


def test_gpa_segments_split_across_adjacent_regions_only(memfd: Memfd, memory: GuestMemory) -> None:
    # Contiguous in guest-physical space, far apart in the front-end's and in the file.
    memory.add_region(MemoryRegionDesc(0x10000, PAGE, UVA, 4 * PAGE), memfd.dup())
    memory.add_region(MemoryRegionDesc(0x10000 + PAGE, PAGE, UVA + 0x100000, 9 * PAGE), memfd.dup())
    segments = memory.gpa_segments(0x10000 + PAGE - 10, 30)
    assert [len(s) for s in segments] == [10, 20]
    assert b"".join(bytes(s) for s in segments) == memfd.pread(5 * PAGE - 10, 10) + memfd.pread(9 * PAGE, 20)
    with pytest.raises(GuestMemoryError):
        memory.gpa_view(0x10000 + PAGE - 10, 30)  # a single view cannot cross
    with pytest.raises(GuestMemoryError):
        memory.gpa_segments(0x10000 + 2 * PAGE - 10, 30)  # runs into a hole
    with pytest.raises(GuestMemoryError):
        memory.gpa_segments(0x10000 - 1, 2)  # starts in a hole


def test_remove_region_matches_gpa_size_and_uva(memfd: Memfd, memory: GuestMemory) -> None:
    desc = MemoryRegionDesc(0x20000, PAGE, UVA, 0)
    memory.add_region(desc, memfd.dup())
    for wrong in [
        MemoryRegionDesc(0x20000, 2 * PAGE, UVA, 0),
        MemoryRegionDesc(0x20000, PAGE, UVA + PAGE, 0),
        MemoryRegionDesc(0x21000, PAGE, UVA, 0),
    ]:
        with pytest.raises(GuestMemoryError, match="no memory region"):
            memory.remove_region(wrong)
    generation = memory.generation
    memory.remove_region(MemoryRegionDesc(0x20000, PAGE, UVA, 12345))  # the offset is not compared
    assert len(memory) == 0
    assert memory.generation > generation
    assert mappings_of(memfd.name) == 0  # no view alive: unmapped at once


def test_removal_while_a_view_is_alive_neither_crashes_nor_leaks(memfd: Memfd, memory: GuestMemory) -> None:
    desc = MemoryRegionDesc(0x20000, PAGE, UVA, 0)
    memory.add_region(desc, memfd.dup())
    view = memory.gpa_view(0x20000, 16)
    derived = view[4:8].view("<u4")
    memory.remove_region(desc)
    with pytest.raises(GuestMemoryError):
        memory.gpa_view(0x20000, 16)
    assert mappings_of(memfd.name) == 1  # kept alive by the views, which still work
    assert bytes(view) == memfd.pread(0, 16)
    assert int(derived[0]) == int.from_bytes(memfd.pread(4, 4), "little")
    del view
    assert mappings_of(memfd.name) == 1
    del derived
    gc.collect()
    assert mappings_of(memfd.name) == 0


def test_close_unmaps_everything_without_views(memfd: Memfd) -> None:
    memory = GuestMemory()
    for i in range(3):
        memory.add_region(MemoryRegionDesc(i * PAGE, PAGE, UVA + i * PAGE, i * PAGE), memfd.dup())
    assert mappings_of(memfd.name) == 3
    memory.close()
    assert mappings_of(memfd.name) == 0
    assert len(memory) == 0
    memory.close()  # twice is harmless


def mapped_at(address: int) -> bool:
    """Whether anything is mapped at ``address`` in this process."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            start, end = (int(part, 16) for part in line.split(maxsplit=1)[0].split("-"))
            if start <= address < end:
                return True
    return False


def test_close_releases_the_guest_file_under_live_views(memfd: Memfd) -> None:
    memory = GuestMemory()
    memory.add_region(MemoryRegionDesc(0, 2 * PAGE, UVA, 0), memfd.dup())
    view = memory.gpa_view(PAGE, 16)
    address = view.ctypes.data
    memory.close()
    # The session is over: its guest RAM is no longer mapped, whoever still holds a view ...
    assert mappings_of(memfd.name) == 0
    # ... and the view stays usable without touching the guest's file (private zero pages, no crash).
    assert bytes(view) == bytes(16)
    view[:] = 0xFF
    assert memfd.pread(PAGE, 16) == bytes((PAGE + i) % 251 for i in range(16))
    assert mapped_at(address)
    del view
    gc.collect()
    assert not mapped_at(address)  # the range goes with the last view


def test_replace_is_all_or_nothing(memfd: Memfd, memory: GuestMemory) -> None:
    old = MemoryRegionDesc(0, PAGE, UVA, 0)
    memory.add_region(old, memfd.dup())
    other = Memfd(PAGE)
    try:
        before = open_fds()
        # The second region is past the end of its (one page) file: nothing of the new table may stay.
        with pytest.raises(GuestMemoryError, match="beyond the end"):
            memory.replace(
                [
                    (MemoryRegionDesc(0x100000, PAGE, UVA + 0x100000, 0), memfd.dup()),
                    (MemoryRegionDesc(0x200000, 2 * PAGE, UVA + 0x200000, 0), other.dup()),
                ]
            )
        assert open_fds() == before
        assert [r.desc for r in memory.regions] == [old]
        assert mappings_of(memfd.name) == 1  # only the old one
        assert mappings_of(other.name) == 0
        with pytest.raises(GuestMemoryError, match="overlap"):
            memory.replace(
                [
                    (MemoryRegionDesc(0x100000, 2 * PAGE, UVA, 0), memfd.dup()),
                    (MemoryRegionDesc(0x101000, PAGE, UVA + 0x100000, 0), other.dup()),
                ]
            )
        assert open_fds() == before
        memory.replace([(MemoryRegionDesc(0x300000, PAGE, UVA + 0x300000, 0), other.dup())])
        assert open_fds() == before
        assert [r.gpa_start for r in memory.regions] == [0x300000]
        assert mappings_of(memfd.name) == 0  # the old table is gone
        assert bytes(memory.uva_view(UVA + 0x300000, 4)) == other.pread(0, 4)
    finally:
        memory.close()
        other.close()


def test_replace_closes_a_repeated_fd_once(memfd: Memfd, memory: GuestMemory) -> None:
    fd = memfd.dup()
    before = open_fds() - {str(fd)}
    memory.replace(
        [(MemoryRegionDesc(0, PAGE, UVA, 0), fd), (MemoryRegionDesc(PAGE, PAGE, UVA + PAGE, 0), fd)]
    )
    assert open_fds() == before
    assert len(memory) == 2


def test_flat_tables_for_compiled_code(memfd: Memfd, memory: GuestMemory) -> None:
    memory.add_region(MemoryRegionDesc((1 << 64) - PAGE, PAGE, UVA, PAGE), memfd.dup())  # ends at 2**64
    memory.add_region(MemoryRegionDesc(0x1000, 2 * PAGE, UVA + PAGE, 0), memfd.dup())
    flat = memory.flat_tables()
    assert flat.gpa_starts.dtype == flat.gpa_lasts.dtype == flat.host_addresses.dtype == np.uint64
    assert list(flat.gpa_starts) == [0x1000, (1 << 64) - PAGE]
    assert list(flat.gpa_lasts) == [0x1000 + 2 * PAGE - 1, (1 << 64) - 1]
    assert [len(a) for a in flat.arrays] == [2 * PAGE, PAGE]
    assert bytes(flat.arrays[1][:8]) == memfd.pread(PAGE, 8)
    assert [int(a) for a in flat.host_addresses] == [a.ctypes.data for a in flat.arrays]
    assert bytes(memory.gpa_view((1 << 64) - 8, 8)) == memfd.pread(2 * PAGE - 8, 8)  # the very top


# --- the fake guest RAM the harness builds on ---------------------------------------------------------


def test_guest_ram_is_seen_by_guest_memory_at_both_addresses() -> None:
    with GuestRam(1 << 20, gpa_base=0x8000_0000) as ram:
        memory = ram.guest_memory()
        try:
            assert ram.uva_base != ram.gpa_base
            gpa = ram.alloc(32)
            ram.write(gpa, b"shared")
            assert bytes(memory.gpa_view(gpa, 6)) == b"shared"
            assert bytes(memory.uva_view(ram.gpa_to_uva(gpa), 6)) == b"shared"
            memory.gpa_view(gpa, 6)[:] = np.frombuffer(b"SHARED", dtype=np.uint8)
            assert ram.read(gpa, 6) == b"SHARED"
            assert ram.uva_to_gpa(ram.gpa_to_uva(gpa)) == gpa
        finally:
            memory.close()


def test_guest_ram_allocator_aligns_reuses_and_refuses() -> None:
    with GuestRam(4 * PAGE, gpa_base=0x1008) as ram:  # a base that is not itself aligned
        blocks = [ram.alloc(100, 64) for _ in range(8)]
        assert all(gpa % 64 == 0 for gpa in blocks)
        assert len(set(blocks)) == 8
        assert all(b - a >= 100 for a, b in itertools.pairwise(sorted(blocks)))
        with pytest.raises(GuestRamError, match="out of guest RAM"):
            ram.alloc(4 * PAGE)
        for gpa in blocks:
            ram.free(gpa)
        with pytest.raises(GuestRamError, match="not an allocated block"):
            ram.free(blocks[0])
        assert ram.free_bytes == 4 * PAGE
        whole = ram.alloc(4 * PAGE, 1)  # freed blocks coalesced back into one
        assert whole == ram.gpa_base
        with pytest.raises(GuestRamError):
            ram.view(ram.gpa_base + 4 * PAGE - 1, 2)
        with pytest.raises(GuestRamError):
            ram.alloc(8, 3)


def test_guest_ram_closes_its_memfd() -> None:
    before = open_fds()
    ram = GuestRam(PAGE)
    assert str(ram.fd) in open_fds()
    ram.close()
    ram.close()
    assert open_fds() == before


# --- random region tables -------------------------------------------------------------------------------

region_descs = st.builds(
    MemoryRegionDesc,
    guest_phys_addr=st.one_of(st.integers(0, 64).map(lambda n: n * 512), st.integers(0, (1 << 64) - 1)),
    memory_size=st.one_of(st.integers(0, 32).map(lambda n: n * 512), st.integers(0, 1 << 64)),
    userspace_addr=st.one_of(st.integers(0, 64).map(lambda n: UVA + n * 512), st.integers(0, (1 << 64) - 1)),
    mmap_offset=st.one_of(st.integers(0, 16 * PAGE), st.integers(0, (1 << 64) - 1)),
)


@settings(max_examples=150, deadline=None)
@given(table=st.lists(region_descs, max_size=5))
def test_any_region_table_is_mapped_faithfully_or_refused_whole(table: list[MemoryRegionDesc]) -> None:
    file = Memfd(16 * PAGE)
    memory = GuestMemory()
    try:
        memory.add_region(MemoryRegionDesc(1 << 40, PAGE, 1 << 50, 0), file.dup())
        old = [region.desc for region in memory.regions]
        before = open_fds()
        try:
            memory.replace([(desc, file.dup()) for desc in table])
        except GuestMemoryError:
            assert [region.desc for region in memory.regions] == old
        else:
            descs = [region.desc for region in memory.regions]  # descs only: regions hold views
            assert len(memory.flat_tables().gpa_starts) == len(descs)
            assert descs == sorted(table, key=lambda d: d.guest_phys_addr)
            for a, b in itertools.combinations(descs, 2):
                assert a.gpa_end <= b.guest_phys_addr or b.gpa_end <= a.guest_phys_addr
                assert a.uva_end <= b.userspace_addr or b.uva_end <= a.userspace_addr
            for desc in table:
                assert bytes(memory.gpa_view(desc.guest_phys_addr, desc.memory_size)) == file.pread(
                    desc.mmap_offset, desc.memory_size
                )
                assert bytes(memory.uva_view(desc.uva_end - 1, 1)) == file.pread(
                    desc.mmap_offset + desc.memory_size - 1, 1
                )
        assert open_fds() == before
    finally:
        memory.close()
        file.close()
    assert mappings_of(file.name) == 0


def test_several_guest_rams_fit_in_one_memory_table() -> None:
    with GuestRam(PAGE, gpa_base=0) as low, GuestRam(3 * PAGE, gpa_base=1 << 32) as high:
        assert low.uva_base != high.uva_base
        with GuestRam(PAGE) as third:
            assert third.uva_base not in (low.uva_base, high.uva_base)
        with GuestRam(PAGE) as fourth:
            assert fourth.uva_base == third.uva_base  # closed RAMs give their range back
        memory = GuestMemory()
        try:
            memory.replace([(low.region_desc(), low.dup_fd()), (high.region_desc(), high.dup_fd())])
            high.write(high.gpa_base + 2 * PAGE, b"high")
            assert bytes(memory.uva_view(high.gpa_to_uva(high.gpa_base + 2 * PAGE), 4)) == b"high"
        finally:
            memory.close()


def test_a_guest_ram_dropped_without_close_releases_its_memfd() -> None:
    before = open_fds()
    ram = GuestRam(PAGE)
    del ram
    gc.collect()
    assert open_fds() == before
