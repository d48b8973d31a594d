"""A blocking vfio-user client that plays QEMU's ``vfio-user-pci`` over a real unix socket.

It speaks through the server's own codec (``encode_request``) and reads replies by the header the
codec defines. Typical use::

    with VfioUserClient.connect(path) as client, GuestRam(1 << 20) as ram:
        client.start(ram)                       # VERSION, DMA_MAP of the RAM, device info
        client.config_write(COMMAND, b"\\x06\\x00")  # memory decoding and bus master
        client.bar_write(0, 0x08, struct.pack("<Q", iova))
        status = client.bar_read(0, 0x30, 4)

An error reply raises :class:`VfioUserRequestFailed` with its errno; a server that closes the connection
raises :class:`ConnectionError`. Fds passed in stay the caller's (the kernel gives the server copies).
"""

from __future__ import annotations

import array
import os
import select
import socket
import struct
import time
from types import TracebackType

from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.vfio_user import codec, messages
from vhost_iommu.vfio_user import constants as vu

_HEADER = struct.Struct("=HHIII")


class VfioUserRequestFailed(Exception):
    def __init__(self, command: int, errno: int) -> None:
        super().__init__(f"{codec.command_name(command)} failed: {os.strerror(errno)} ({errno})")
        self.command = command
        self.errno = errno


class VfioUserClient:
    def __init__(self, sock: socket.socket, timeout: float = 5.0) -> None:
        self.sock = sock
        self.timeout = timeout
        self._next_id = 1
        self.server_capabilities: dict[str, object] = {}

    @classmethod
    def connect(cls, path: str, timeout: float = 5.0) -> VfioUserClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return cls(sock, timeout)

    def __enter__(self) -> VfioUserClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    # -- raw ------------------------------------------------------------------------------------------------

    def msg_id(self) -> int:
        value = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFF
        return value

    def send(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            self.sock.sendall(data)

    def _recv_exactly(self, size: int) -> bytes:
        data = bytearray()
        deadline = time.monotonic() + self.timeout
        while len(data) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.sock], [], [], remaining)[0]:
                raise TimeoutError(f"no reply within {self.timeout} s")
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("the server closed the connection")
            data += chunk
        return bytes(data)

    def read_reply(self) -> tuple[int, int, int, int, bytes]:
        """(msg_id, command, flags, error, payload) of the next message from the server."""
        msg_id, command, size, flags, error = _HEADER.unpack(self._recv_exactly(_HEADER.size))
        return msg_id, command, flags, error, self._recv_exactly(size - _HEADER.size)

    def request(self, message: messages.Request) -> bytes:
        """Send ``message`` and return its reply's payload (nothing waited for a NO_REPLY message)."""
        data, fds = codec.encode_request(message)
        self.send(data, fds)
        if getattr(message, "no_reply", False):
            return b""
        msg_id, command, flags, error, payload = self.read_reply()
        if msg_id != message.msg_id or command != message.COMMAND:
            raise ConnectionError(f"reply {msg_id}/{command} to request {message.msg_id}/{message.COMMAND}")
        if flags & vu.FLAG_ERROR:
            raise VfioUserRequestFailed(command, error)
        return payload

    # -- what QEMU does -------------------------------------------------------------------------------------

    def version(self) -> bytes:
        return self.request(
            messages.Version(self.msg_id(), vu.VERSION_MAJOR, vu.VERSION_MINOR, {"max_msg_fds": 16})
        )

    def dma_map(
        self, address: int, size: int, fd: int | None, offset: int = 0, flags: int = vu.DMA_MAP_FLAGS
    ) -> None:
        self.request(messages.DmaMap(self.msg_id(), flags, offset, address, size, fd))

    def dma_unmap(self, address: int, size: int, flags: int = 0) -> None:
        self.request(messages.DmaUnmap(self.msg_id(), flags, address, size))

    def start(self, ram: GuestRam) -> None:
        """VERSION, then the VM's RAM as one DMA region at its guest-physical address."""
        self.version()
        self.dma_map(ram.gpa_base, ram.size, ram.fd)

    def region_read(self, region: int, offset: int, count: int) -> bytes:
        payload = self.request(messages.RegionRead(self.msg_id(), region, offset, count))
        return payload[vu.REGION_ACCESS_SIZE :]

    def region_write(self, region: int, offset: int, data: bytes, *, posted: bool = False) -> None:
        self.request(messages.RegionWrite(self.msg_id(), region, offset, data, no_reply=posted))

    def config_read(self, offset: int, count: int) -> bytes:
        return self.region_read(vu.VFIO_PCI_CONFIG_REGION_INDEX, offset, count)

    def config_write(self, offset: int, data: bytes) -> None:
        self.region_write(vu.VFIO_PCI_CONFIG_REGION_INDEX, offset, data)

    def bar_read(self, bar: int, offset: int, count: int) -> int:
        return int.from_bytes(self.region_read(bar, offset, count), "little")

    def bar_write(self, bar: int, offset: int, value: int, count: int = 4) -> None:
        """A posted write, as QEMU sends stores to a memory BAR."""
        self.region_write(bar, offset, value.to_bytes(count, "little"), posted=True)

    def set_msix_eventfds(self, start: int, fds: tuple[int, ...]) -> None:
        flags = vu.IRQ_SET_DATA_EVENTFD | vu.IRQ_SET_ACTION_TRIGGER
        self.request(messages.SetIrqs(self.msg_id(), flags, vu.VFIO_PCI_MSIX_IRQ_INDEX, start, len(fds), fds))

    def reset(self) -> None:
        self.request(messages.DeviceReset(self.msg_id()))
