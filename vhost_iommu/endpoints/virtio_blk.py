"""A virtio block device (virtio 1.3, "Block Device") over a raw image file, one request queue.

The device is what :class:`~vhost_iommu.endpoints.virtio_pci.VirtioPciFunction` puts behind the PCI
transport: its configuration bytes, its features and what it does with the chains of its queue. The
buffers of a chain are views of guest memory the queue's memory gave (translated through the endpoint's
IOMMU domain when served over vfio-user), and the data moves between them and the image with one
``preadv``/``pwritev`` per request, no copy in between.

Requests: IN (read), OUT (write), FLUSH (``fdatasync``), GET_ID (the image's name, at most 20 bytes);
any other type gets UNSUPP. A request whose sectors reach past the image's end, whose data is not whole
sectors, or that writes to a read-only disk gets IOERR and touches nothing. A chain too short to hold the
header and the status byte is the driver's error: the queue's walk cannot say so, so the device puts the
chain back used with nothing written and the transport goes on (a driver never makes one).

The image is opened by :meth:`open` (when a client starts being served) and closed by :meth:`close` (when
it goes); the device model itself lives as long as the endpoint.

Once the kernels are compiled, a queue whose memory is an endpoint's translated view is served by
``jit/blk.serve_blk``: the same walk, translations, transfers and completion without a Python object per
request. It serves the requests that complete OK and hands every other chain, unserved, to the Python
path below (``_serve_chain``), which is where each error, fault and status other than OK is decided.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vhost_iommu.abi import (
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_HEADER_SIZE,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_SECTOR_SIZE,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_ID_BLOCK,
)
from vhost_iommu.endpoints.translated_memory import TranslatedMemory
from vhost_iommu.jit import blk as kernel
from vhost_iommu.memory import ByteView
from vhost_iommu.virtqueue import DescriptorChain, SplitQueue

log = logging.getLogger(__name__)

QUEUE_SIZE = 128
"""The queue's largest size. At 128 entries Linux's split ring (descriptors, available and used rings,
cache-line aligned) fits in one 4 KiB page, so its IOVA range is contiguous in guest-physical memory
whatever pages the guest's DMA API gave it (the transport needs each ring contiguous)."""
SEG_MAX = QUEUE_SIZE - 2
"""Data segments per request: the queue's entries less the header's and the status byte's."""
CONFIG_SIZE = 36
"""struct virtio_blk_config through num_queues."""
_HEADER = struct.Struct("<IIQ")  # type, reserved, sector
_IOV_MAX = os.sysconf("SC_IOV_MAX")


@dataclass
class BlockCounters:
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0
    unsupported: int = 0
    compiled: int = 0  # requests of all of the above served by the kernel (jit/blk.py)


class VirtioBlock:
    """A virtio-blk device over the raw image at ``path`` (``readonly``: offered as RO, writes refused)."""

    kind = "virtio-blk"
    device_id = VIRTIO_ID_BLOCK
    queue_count = 1
    queue_max_size = QUEUE_SIZE
    config_size = CONFIG_SIZE

    def __init__(self, path: str, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        read_only = VIRTIO_BLK_F_RO if readonly else 0
        self.device_features = VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_FLUSH | read_only
        self._counts = BlockCounters()  # the Python path's; the kernel's are words of _disk
        self._fd: int | None = None
        self._size = 0
        self._header = bytearray(VIRTIO_BLK_HEADER_SIZE)
        self._disk = np.zeros(kernel.DISK_WORDS, np.int64)
        self._disk[kernel.D_FD] = -1
        self._disk[kernel.D_READONLY] = int(readonly)
        self._scratch = np.zeros((kernel.SCRATCH_ROWS, 2 * kernel.IOV_MAX), np.uint64)

    @property
    def counters(self) -> BlockCounters:
        """Requests served so far, by either path."""
        counts, disk = self._counts, self._disk
        return BlockCounters(
            reads=counts.reads + int(disk[kernel.D_READS]),
            writes=counts.writes + int(disk[kernel.D_WRITES]),
            flushes=counts.flushes + int(disk[kernel.D_FLUSHES]),
            bytes_read=counts.bytes_read + int(disk[kernel.D_BYTES_READ]),
            bytes_written=counts.bytes_written + int(disk[kernel.D_BYTES_WRITTEN]),
            errors=counts.errors,
            unsupported=counts.unsupported,
            compiled=int(disk[kernel.D_SERVED]),
        )

    # -- the image --------------------------------------------------------------------------------------

    def open(self) -> None:
        """Open the image (a client starts being served). Raises OSError."""
        if self._fd is not None:
            return
        fd = os.open(self.path, (os.O_RDONLY if self.readonly else os.O_RDWR) | os.O_CLOEXEC)
        try:
            self._size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._disk[kernel.D_FD] = fd
        self._disk[kernel.D_SIZE] = self._size

    def close(self) -> None:
        """Close the image (the client went)."""
        fd, self._fd = self._fd, None
        self._disk[kernel.D_FD] = -1
        if fd is not None:
            os.close(fd)

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    @property
    def capacity(self) -> int:
        """512-byte sectors (a partial last sector is not offered)."""
        return self._size // VIRTIO_BLK_SECTOR_SIZE

    # -- configuration ----------------------------------------------------------------------------------

    def config_read(self, offset: int, size: int) -> bytes:
        config = bytearray(CONFIG_SIZE)
        struct.pack_into("<Q", config, 0, self.capacity)
        struct.pack_into("<I", config, 12, SEG_MAX)
        struct.pack_into("<H", config, 34, self.queue_count)
        return bytes(config[offset : offset + size])

    def reset(self) -> None:
        """Nothing of a request outlives it: the image stays open for the client."""

    # -- requests ---------------------------------------------------------------------------------------

    def serve(self, queue: SplitQueue) -> int:
        served = 0
        memory = queue.memory
        while True:
            arguments = memory.kernel_arguments() if isinstance(memory, TranslatedMemory) else None
            if arguments is not None:
                reason = kernel.serve_blk(*(queue.state, self._disk, *arguments, self._scratch))
                served += int(self._disk[kernel.D_COMPLETED])
                if reason == kernel.BLK_EMPTY:
                    return served
                if reason == kernel.BLK_STALE:
                    continue  # the translation arrays again
            # The Python path: one chain the kernel left (then the kernel again), or all of them.
            chain = queue.pop()
            if chain is None:
                return served
            queue.push_used(chain.head, self._serve_chain(chain))
            served += 1

    def _serve_chain(self, chain: DescriptorChain) -> int:
        """Serve one request; the bytes written into its writable buffers (data, then the status)."""
        if chain.readable_len < VIRTIO_BLK_HEADER_SIZE or chain.writable_len < 1:
            log.warning("%s: a chain of %r is too short for a request; returned untouched", self.kind, chain)
            self._counts.errors += 1
            return 0
        header = self._header
        chain.read_into(header)
        kind, _reserved, sector = _HEADER.unpack(header)
        data_in = chain.writable_len - 1
        status = VIRTIO_BLK_S_OK
        written = 0
        if kind == VIRTIO_BLK_T_IN:
            status = self._data(sector, _span(chain.writable, 0, data_in), write=False)
            written = data_in if status == VIRTIO_BLK_S_OK else 0
        elif kind == VIRTIO_BLK_T_OUT:
            length = chain.readable_len - VIRTIO_BLK_HEADER_SIZE
            status = self._data(sector, _span(chain.readable, VIRTIO_BLK_HEADER_SIZE, length), write=True)
        elif kind == VIRTIO_BLK_T_FLUSH:
            status = self._flush()
        elif kind == VIRTIO_BLK_T_GET_ID:
            ident = os.path.basename(self.path).encode()[:VIRTIO_BLK_ID_BYTES]
            ident += bytes(VIRTIO_BLK_ID_BYTES - len(ident))  # NUL-padded; no NUL when it is 20 bytes
            written = chain.write(ident[: min(data_in, VIRTIO_BLK_ID_BYTES)])
        else:
            self._counts.unsupported += 1
            status = VIRTIO_BLK_S_UNSUPP
        if status == VIRTIO_BLK_S_IOERR:
            self._counts.errors += 1
        chain.write(bytes((status,)), data_in)
        return written + 1

    def _range(self, sector: int, length: int) -> int | None:
        """The image offset of ``length`` bytes at ``sector``, or None if they are not whole sectors
        inside the image."""
        offset = sector * VIRTIO_BLK_SECTOR_SIZE
        if self._fd is None or length % VIRTIO_BLK_SECTOR_SIZE or offset + length > self._size:
            return None
        return offset

    def _data(self, sector: int, buffers: list[ByteView], *, write: bool) -> int:
        """An IN (the image into ``buffers``) or, with ``write``, an OUT; its status."""
        length = sum(len(buffer) for buffer in buffers)
        offset = self._range(sector, length)
        if offset is None or (write and self.readonly):
            return VIRTIO_BLK_S_IOERR
        assert self._fd is not None
        if _transfer(os.pwritev if write else os.preadv, self._fd, buffers, offset, length) != length:
            return VIRTIO_BLK_S_IOERR
        counters = self._counts
        if write:
            counters.writes += 1
            counters.bytes_written += length
        else:
            counters.reads += 1
            counters.bytes_read += length
        return VIRTIO_BLK_S_OK

    def _flush(self) -> int:
        if self._fd is None:
            return VIRTIO_BLK_S_IOERR
        if not self.readonly:
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                log.warning("%s: flush of %s: %s", self.kind, self.path, exc)
                return VIRTIO_BLK_S_IOERR
        self._counts.flushes += 1
        return VIRTIO_BLK_S_OK


def _span(segments: list[ByteView], skip: int, length: int) -> list[ByteView]:
    """The views of ``length`` bytes of ``segments`` (a buffer in pieces) from byte ``skip`` on."""
    span: list[ByteView] = []
    for segment in segments:
        if length <= 0:
            break
        if skip >= len(segment):
            skip -= len(segment)
            continue
        piece = segment[skip : skip + length]
        span.append(piece)
        length -= len(piece)
        skip = 0
    return span


def _transfer(call: Callable[..., int], fd: int, buffers: list[ByteView], offset: int, length: int) -> int:
    """``preadv``/``pwritev`` of every buffer (at most IOV_MAX at a time), going on after a short
    transfer; the bytes moved (short only at the image's end or on an error, which it logs)."""
    done = 0
    while done < length:
        try:
            moved = call(fd, _span(buffers, done, length - done)[:_IOV_MAX], offset + done)
        except OSError as exc:
            log.warning("virtio-blk: %s at offset %d: %s", call.__name__, offset + done, exc)
            return done
        if moved <= 0:
            return done
        done += moved
    return done
