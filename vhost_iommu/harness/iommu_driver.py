"""The guest's virtio-iommu driver, as much of it as tests need: one served device, requests and answers.

:class:`IommuDriver` starts the requestq and the eventq on a connected :class:`Frontend` the way QEMU
starts them, over memfd guest RAM, and sends requests as a driver does: post, kick, wait for the call
eventfd, read each answer back and check that every request was answered once, whole. It is the driver
side of every test of a served device (the in-process server, the real program, the keeper), so that a
test asserts the device's behaviour and keeps no ring handling of its own::

    with IommuDriver.connect(path) as driver:
        assert driver.attach() == Status.OK          # ENDPOINT into DOMAIN
        assert driver.status(encode_map(DOMAIN, 0, 0xFFF, 0)) == Status.OK

The pytest plugin's ``iommu_driver`` and ``attached_driver`` fixtures build one on the ``frontend`` fixture.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

from vhost_iommu.device.layout import (
    FAULT_SIZE,
    TAIL_SIZE,
    Status,
    decode_fault,
    decode_status,
    encode_attach,
)
from vhost_iommu.harness.driver_queue import DriverQueue
from vhost_iommu.harness.frontend import Frontend
from vhost_iommu.harness.guest_ram import GuestRam

ENDPOINT = 0x20
"""The first endpoint of the default topology (0000:00:04.0)."""
DOMAIN = 1
"""The domain a test attaches ENDPOINT to when the domain's number does not matter."""
TIMEOUT = 10.0
"""Longest wait for an answer: generous, the machine is shared."""


class IommuDriver:
    """The requestq (queue 0) and the eventq (queue 1) of one virtio-iommu device, started on
    ``frontend`` over ``ram`` (default: ``ram_size`` bytes of its own); requests go one at a time
    (:meth:`send`, :meth:`status`) or several per kick (:meth:`submit`, :meth:`statuses`).

    ``start=False`` leaves starting the rings (``queues``) to the caller, as after a migration, where the
    destination's rings start without the connection's set-up. :meth:`close` closes the RAM it made and,
    with ``own_frontend``, the front-end."""

    def __init__(
        self,
        frontend: Frontend,
        ram: GuestRam | None = None,
        *,
        ram_size: int = 1 << 20,
        queue_size: int = 64,
        event_queue_size: int = 64,
        event_idx: bool = False,
        timeout: float = TIMEOUT,
        own_frontend: bool = False,
        start: bool = True,
    ) -> None:
        self.frontend = frontend
        self._own_frontend = own_frontend
        self._own_ram = ram is None
        self.ram = GuestRam(ram_size) if ram is None else ram
        self.timeout = timeout
        #: [requestq, eventq]; emptied by :meth:`close`.
        self.queues = [
            DriverQueue(self.ram, queue_size, event_idx=event_idx),
            DriverQueue(self.ram, event_queue_size, event_idx=event_idx),
        ]
        if start:
            try:
                frontend.start_device(self.ram, self.queues)
            except BaseException:
                self.close()
                raise

    @classmethod
    def connect(
        cls,
        path: str,
        *,
        ram_size: int = 1 << 20,
        queue_size: int = 64,
        event_queue_size: int = 64,
        event_idx: bool = False,
        timeout: float = TIMEOUT,
    ) -> IommuDriver:
        """A driver on a front-end of its own connected to the back-end's socket ``path`` (its calls, too,
        wait at most ``timeout``), with RAM of its own; :meth:`close` closes both."""
        frontend = Frontend.connect(path, timeout=timeout)
        return cls(
            frontend,
            ram_size=ram_size,
            queue_size=queue_size,
            event_queue_size=event_queue_size,
            event_idx=event_idx,
            timeout=timeout,
            own_frontend=True,
        )

    def __enter__(self) -> IommuDriver:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        # The rings' views of the RAM go first, or its mapping outlives close() while anything (a test
        # framework holding a fixture's value) still holds this object.
        self.queues.clear()
        if self._own_ram:
            self.ram.close()
        if self._own_frontend:
            self.frontend.close()

    @property
    def requests(self) -> DriverQueue:
        return self.queues[0]

    @property
    def events(self) -> DriverQueue:
        return self.queues[1]

    def post(self, requests: Sequence[bytes], writable: int = TAIL_SIZE) -> list[int]:
        """Post every request (an empty one as no readable buffer) with ``writable`` bytes for its answer
        (0: none) and kick once; their heads, for :meth:`answers`."""
        heads = [
            self.requests.post([request] if request else [], [writable] if writable else [])
            for request in requests
        ]
        self.frontend.kick(0)
        return heads

    def answers(self, heads: Sequence[int]) -> list[tuple[bytes, int]]:
        """Wait until every posted chain of ``heads`` is answered; per head, in that order, what the device
        wrote (up to the used length) and the used length. Each is answered exactly once."""
        answered: dict[int, tuple[bytes, int]] = {}
        for head, length in self.harvest(len(heads)):
            assert head not in answered, f"head {head} answered twice"
            answered[head] = (self.requests.written(head)[:length], length)
        assert set(answered) == set(heads), f"answered {sorted(answered)}, posted {sorted(heads)}"
        return [answered[head] for head in heads]

    def harvest(self, count: int) -> list[tuple[int, int]]:
        """Wait until ``count`` more chains are used; their (head, length) in the order the device used them.

        The first wait is for the interrupt the device owes for the first entry it publishes after the last
        harvest (used_event was left at that harvest's end), which it consumes. After a partial harvest it
        looks at used.idx before each sleep, as Linux's virtqueue_poll after enable_cb does: with EVENT_IDX
        the device may publish more entries before used() moved used_event past them, and it owes no
        interrupt for those."""
        entries: list[tuple[int, int]] = []
        assert self.frontend.wait_used(0, timeout=self.timeout), f"0 of {count} answered"
        while len(entries) < count:
            harvested = self.requests.used()  # raises for a head that was not posted
            entries += harvested
            if not harvested and len(entries) < count:
                assert self.frontend.wait_used(0, timeout=self.timeout), f"{len(entries)} of {count} answered"
        return entries

    def answer_statuses(self, heads: Sequence[int]) -> list[Status]:
        """:meth:`answers` of requests with a bare tail for an answer: their statuses."""
        answers = self.answers(heads)
        assert all(length == TAIL_SIZE for _written, length in answers), answers
        return [Status(decode_status(written)) for written, _length in answers]

    def submit(self, requests: Sequence[bytes], writable: int = TAIL_SIZE) -> list[tuple[bytes, int]]:
        """:meth:`post` then :meth:`answers`."""
        return self.answers(self.post(requests, writable))

    def send(self, request: bytes, writable: int = TAIL_SIZE) -> bytes:
        """Post one request, kick, wait for its answer; the ``writable`` bytes the device wrote, every one
        of them used (as for every request the device completes)."""
        [(written, length)] = self.submit([request], writable)
        assert length == writable, f"{length} bytes used of {writable}"
        return written

    def status(self, request: bytes) -> Status:
        return Status(decode_status(self.send(request)))

    def statuses(self, requests: Sequence[bytes]) -> list[Status]:
        """All posted with one kick; their statuses in posting order."""
        return self.answer_statuses(self.post(requests))

    def attach(self, domain: int = DOMAIN, endpoint: int = ENDPOINT) -> Status:
        return self.status(encode_attach(domain, endpoint))

    def restart(self, bases: Sequence[int] | None = None) -> None:
        """QEMU's ``vhost_dev_start`` after a ``vhost_dev_stop`` (``Frontend.stop_device``): the features
        again, then every ring resumed where ``bases`` (GET_VRING_BASE's answers) left it, as after a VM
        pause; or, without ``bases``, on new rings from index 0, as a driver sets them up after a reset."""
        if bases is None:
            self.queues[:] = [
                DriverQueue(self.ram, queue.size, event_idx=queue.event_idx) for queue in self.queues
            ]
            bases = [0] * len(self.queues)
        frontend = self.frontend
        frontend.set_features(frontend.get_features())
        for index, (queue, base) in enumerate(zip(self.queues, bases, strict=True)):
            frontend.set_vring_num(index, queue.size)
            frontend.set_vring_base(index, base)
            frontend.set_vring_addr(index, queue)
            frontend.set_vring_kick(index)
            frontend.set_vring_call(index)
        for index in range(len(self.queues)):
            frontend.set_vring_enable(index, True)

    def fault_events(self) -> list[tuple[int, int, int, int]]:
        """(reason, flags, endpoint, address) of each fault event the device wrote into the eventq
        buffers since the last call."""
        events = []
        for _head, length, data in self.events.used_with_data():
            if length != FAULT_SIZE:
                raise ValueError(
                    f"an eventq buffer came back with {length} bytes, not a fault's {FAULT_SIZE}"
                )
            fault = decode_fault(data)
            events.append((fault.reason, fault.flags, fault.endpoint, fault.address))
        return events

    def post_event_buffers(self, count: int, size: int = 24) -> list[int]:
        """Give the device ``count`` eventq buffers of ``size`` bytes (a fault record is 24); their heads."""
        heads = [self.events.post([], [size]) for _ in range(count)]
        self.frontend.kick(1)
        return heads
