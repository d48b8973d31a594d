"""One vfio-user client (QEMU's ``vfio-user-pci``) served for one endpoint device: typed requests in,
reply bytes out.

The handler owns what the client gave the session: the DMA regions (guest RAM, mmap'd from the memfds
DMA_MAP passes, as a :class:`~vhost_iommu.memory.GuestMemory` keyed by the client's DMA address, which
QEMU makes the guest-physical address) and the interrupt eventfds of SET_IRQS. The device model (PCI
function, BAR registers, reset) is the endpoint's; the handler only routes region accesses to it and
refuses what the device does not have. Everything the client sends has passed the codec's checks; what
only the session can judge (a DMA region overlapping another, an unknown region index, an access outside
a region, an interrupt vector the device does not have) gets an error reply with the errno the vfio
ioctl would give, and the connection goes on. :meth:`close` releases every fd and mapping.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
from dataclasses import dataclass
from typing import Protocol

from vhost_iommu.memory import GuestMemory, GuestMemoryError, MemoryRegionDesc
from vhost_iommu.pci.function import CONFIG_SPACE_SIZE, PciAccessError, PciFunction
from vhost_iommu.vfio_user import codec, messages
from vhost_iommu.vfio_user import constants as vu

log = logging.getLogger(__name__)


class EndpointDevice(Protocol):
    """What the handler needs of a PCI endpoint model."""

    kind: str
    pci: PciFunction

    def bar_read(self, bar: int, offset: int, size: int) -> bytes: ...
    def bar_write(self, bar: int, offset: int, data: bytes) -> None: ...
    def reset(self) -> None: ...


class SessionError(Exception):
    """The client broke the session in a way no reply can mend: the connection is closed."""


@dataclass
class DmaRegionRecord:
    """A DMA_MAP the session accepted; fd-less ones (ROM, as QEMU sends them) are recorded only."""

    address: int
    size: int
    flags: int
    mapped: bool


@dataclass
class HandlerCounters:
    requests: int = 0
    errors: int = 0
    region_reads: int = 0
    region_writes: int = 0
    interrupts: int = 0
    dma_maps: int = 0
    dma_unmaps: int = 0


class VfioUserHandler:
    """The session of one client with one endpoint device (the device outlives the session)."""

    def __init__(self, device: EndpointDevice, name: str = "vfio-user") -> None:
        self.device = device
        self.name = name
        self.memory = GuestMemory()
        self.dma_regions: dict[int, DmaRegionRecord] = {}  # by start address
        self._starts: list[int] = []  # their start addresses, sorted
        self.counters = HandlerCounters()
        self.negotiated = False
        self.irq_fds: dict[tuple[int, int], int] = {}  # (interrupt type, vector) -> eventfd
        self.closed = False

    # -- requests -------------------------------------------------------------------------------------------

    def handle(self, request: messages.Request) -> bytes | None:
        """The reply to ``request`` (None when the client asked for none). Raises SessionError."""
        self.counters.requests += 1
        if not self.negotiated and not isinstance(request, messages.Version):
            self.close_fds_of(request)
            raise SessionError(f"{type(request).__name__} before VERSION")
        try:
            payload = self._dispatch(request)
        except _Refused as refused:
            self.counters.errors += 1
            log.info("%s: %s refused: %s", self.name, type(request).__name__, refused.reason)
            return codec.encode_error(request.msg_id, request.COMMAND, refused.errno)
        if getattr(request, "no_reply", False):
            return None
        return codec.encode_reply(request.msg_id, request.COMMAND, payload)

    def _dispatch(self, request: messages.Request) -> bytes:
        if isinstance(request, messages.Version):
            if self.negotiated:
                raise SessionError("VERSION sent twice")
            self.negotiated = True
            return codec.version_reply()  # the limits the decoder enforces
        if isinstance(request, messages.DmaMap):
            return self._dma_map(request)
        if isinstance(request, messages.DmaUnmap):
            return self._dma_unmap(request)
        if isinstance(request, messages.DeviceGetInfo):
            flags = vu.DEVICE_FLAGS_PCI | vu.DEVICE_FLAGS_RESET
            return codec.device_info_reply(
                request.argsz, flags, vu.VFIO_PCI_NUM_REGIONS, vu.VFIO_PCI_NUM_IRQS
            )
        if isinstance(request, messages.GetRegionInfo):
            return self._region_info(request)
        if isinstance(request, messages.GetIrqInfo):
            return self._irq_info(request)
        if isinstance(request, messages.SetIrqs):
            return self._set_irqs(request)
        if isinstance(request, messages.RegionRead):
            self.counters.region_reads += 1
            data = self._region_access(request.region, request.offset, request.count, None)
            return codec.region_read_reply(request.region, request.offset, data)
        if isinstance(request, messages.RegionWrite):
            self.counters.region_writes += 1
            self._region_access(request.region, request.offset, len(request.data), request.data)
            if request.no_reply:  # a posted write (every queue notification): no reply to encode
                return b""
            return codec.region_write_reply(request.region, request.offset, len(request.data))
        if isinstance(request, messages.DeviceReset):
            self.device.reset()
            return b""
        raise _Refused(errno.ENOTSUP, f"command {codec.command_name(request.COMMAND)} is not served")

    # -- DMA regions ----------------------------------------------------------------------------------------

    def _dma_map(self, request: messages.DmaMap) -> bytes:
        self.counters.dma_maps += 1
        if len(self.dma_regions) >= vu.MAX_DMA_MAPS:
            self.close_fds_of(request)
            raise _Refused(errno.ENOSPC, f"already {vu.MAX_DMA_MAPS} DMA regions, as advertised")
        if self._overlaps(request.address, request.size):
            self.close_fds_of(request)
            raise _Refused(
                errno.EEXIST, f"DMA region {request.address:#x}+{request.size:#x} overlaps another"
            )
        mapped = request.fd is not None
        if request.fd is not None:
            desc = MemoryRegionDesc(
                guest_phys_addr=request.address,
                memory_size=request.size,
                userspace_addr=request.address,
                mmap_offset=request.offset,
            )
            try:
                self.memory.add_region(desc, request.fd)  # closes the fd whatever happens
            except GuestMemoryError as exc:
                raise _Refused(errno.EINVAL, str(exc)) from None
        self.dma_regions[request.address] = DmaRegionRecord(
            request.address, request.size, request.flags, mapped
        )
        bisect.insort(self._starts, request.address)
        return b""

    def _overlaps(self, address: int, size: int) -> bool:
        """Whether [address, address + size) meets a region already mapped (regions never overlap, so only
        the neighbours by start address can: a hostile client's thousands of maps stay cheap)."""
        at = bisect.bisect_left(self._starts, address)
        if at < len(self._starts) and self._starts[at] < address + size:
            return True
        if at:
            before = self.dma_regions[self._starts[at - 1]]
            return before.address + before.size > address
        return False

    def _dma_unmap(self, request: messages.DmaUnmap) -> bytes:
        self.counters.dma_unmaps += 1
        if request.flags & vu.DMA_UNMAP_FLAG_ALL:
            doomed = list(self.dma_regions.values())
        else:
            record = self.dma_regions.get(request.address)
            if record is None or record.size != request.size:
                raise _Refused(errno.EINVAL, f"no DMA region {request.address:#x}+{request.size:#x}")
            doomed = [record]
        for record in doomed:
            del self.dma_regions[record.address]
            del self._starts[bisect.bisect_left(self._starts, record.address)]
            if record.mapped:
                for region in self.memory.regions:
                    if region.gpa_start == record.address:
                        self.memory.remove_region(region.desc)
                        break
        return codec.dma_unmap_reply(request)

    # -- regions and interrupts -----------------------------------------------------------------------------

    def _region_size(self, index: int) -> int:
        if index == vu.VFIO_PCI_CONFIG_REGION_INDEX:
            return CONFIG_SPACE_SIZE
        if 0 <= index < len(self.device.pci.bar_sizes):
            return self.device.pci.bar_sizes[index]
        return 0

    def _region_info(self, request: messages.GetRegionInfo) -> bytes:
        if not 0 <= request.index < vu.VFIO_PCI_NUM_REGIONS:
            raise _Refused(errno.EINVAL, f"region index {request.index}")
        size = self._region_size(request.index)
        flags = vu.REGION_INFO_FLAG_READ | vu.REGION_INFO_FLAG_WRITE if size else 0
        return codec.region_info_reply(request.argsz, request.index, flags, size, 0)

    def _irq_count(self, index: int) -> int:
        """Vectors of interrupt type ``index``: the MSI-X table's, and one eventfd each for the error and
        request notifications (QEMU sets them when they exist and warns when they do not; the device never
        signals them)."""
        if index == vu.VFIO_PCI_MSIX_IRQ_INDEX:
            msix = self.device.pci.msix
            return msix.vectors if msix is not None else 0
        if index in (vu.VFIO_PCI_ERR_IRQ_INDEX, vu.VFIO_PCI_REQ_IRQ_INDEX):
            return 1
        return 0  # no INTx (interrupt pin 0), no MSI

    def _irq_info(self, request: messages.GetIrqInfo) -> bytes:
        if not 0 <= request.index < vu.VFIO_PCI_NUM_IRQS:
            raise _Refused(errno.EINVAL, f"interrupt index {request.index}")
        count = self._irq_count(request.index)
        flags = vu.IRQ_INFO_EVENTFD | vu.IRQ_INFO_NORESIZE if count else 0
        return codec.irq_info_reply(request.argsz, request.index, flags, count)

    def _set_irqs(self, request: messages.SetIrqs) -> bytes:
        index = request.index
        if request.start + request.count > self._irq_count(index):
            self._close_all(request.fds)
            if request.count == 0 and request.flags & vu.IRQ_SET_DATA_NONE:
                return b""  # "disable every interrupt of this index": nothing is set
            raise _Refused(errno.EINVAL, f"interrupt index {index} vectors {request.start}+{request.count}")
        action_trigger = request.flags & vu.IRQ_SET_ACTION_TRIGGER
        if request.flags & vu.IRQ_SET_DATA_EVENTFD and action_trigger:
            # QEMU sends a run of vectors with one fd each, or a run without fds to take theirs away.
            for vector in range(request.start, request.start + request.count):
                self._set_vector(index, vector, None)
            for offset, fd in enumerate(request.fds):
                self._set_vector(index, request.start + offset, fd)
        elif request.flags & vu.IRQ_SET_DATA_NONE and action_trigger and request.count == 0:
            for key in [key for key in self.irq_fds if key[0] == index]:
                self._set_vector(*key, None)
        elif request.flags & vu.IRQ_SET_DATA_NONE and action_trigger and index == vu.VFIO_PCI_MSIX_IRQ_INDEX:
            for vector in range(request.start, request.start + request.count):
                self.interrupt(vector)
        else:
            self._close_all(request.fds)  # masking is QEMU's (it emulates the MSI-X table)
        return b""

    def _set_vector(self, index: int, vector: int, fd: int | None) -> None:
        old = self.irq_fds.pop((index, vector), None)
        if old is not None:
            os.close(old)
        if fd is not None:
            self.irq_fds[index, vector] = fd

    def interrupt(self, vector: int) -> None:
        """Signal MSI-X ``vector`` (the device calls this); dropped while the client set no eventfd."""
        fd = self.irq_fds.get((vu.VFIO_PCI_MSIX_IRQ_INDEX, vector))
        if fd is None:
            return
        self.counters.interrupts += 1
        try:
            os.eventfd_write(fd, 1)
        except OSError as exc:
            log.warning("%s: interrupt vector %d: %s", self.name, vector, exc)

    def _region_access(self, region: int, offset: int, count: int, data: bytes | None) -> bytes:
        size = self._region_size(region)
        if not size:
            raise _Refused(errno.EINVAL, f"region {region} does not exist")
        try:
            if region == vu.VFIO_PCI_CONFIG_REGION_INDEX:
                if data is None:
                    return self.device.pci.config_read(offset, count)
                self.device.pci.config_write(offset, data)
                return b""
            if data is None:
                return self.device.bar_read(region, offset, count)
            self.device.bar_write(region, offset, data)
            return b""
        except PciAccessError as exc:
            raise _Refused(errno.EINVAL, str(exc)) from None

    # -- ending ---------------------------------------------------------------------------------------------

    def close_fds_of(self, request: messages.Request) -> None:
        """Close the fds a request carried (one that will not be handled)."""
        self._close_all(request.fds)

    @staticmethod
    def _close_all(fds: tuple[int, ...]) -> None:
        for fd in fds:
            os.close(fd)

    def close(self) -> None:
        """The client is gone: every DMA mapping and interrupt fd is released (device state stays, as the
        protocol asks of a server whose client disconnects; the next client re-sends both)."""
        if self.closed:
            return
        self.closed = True
        for key in list(self.irq_fds):
            self._set_vector(*key, None)
        self.dma_regions.clear()
        self._starts.clear()
        self.memory.close()


class _Refused(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = code
        self.reason = reason
