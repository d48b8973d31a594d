"""Fuzz target ``backend``: the requestq served by the compiled request path and by the Python path, which
must give the same answers.

:class:`~vhost_iommu.virtio_iommu.VirtioIommuBackend` serves MAP and UNMAP chains with a numba kernel that
walks the rings and guest memory through raw addresses, and hands everything else (and any chain it does
not like) to the Python path (``SplitQueue.pop`` and ``IommuDevice.handle_request``). Two identical worlds
(guest RAM of two regions adjacent in guest-physical space, a ring, a device) are built, one served each
way. Each execution writes the same chains into both over a few rounds (valid ATTACH/MAP/UNMAP/DETACH/
PROBE requests with plausible fields, hostile bytes, and sometimes hostile descriptors: bad addresses and
lengths, flags, next indices, indirect tables, buffers crossing the region boundary, avail indices), kicks
both, and compares:

* no exception leaves ``queue_kicked`` (a crash of the kernel kills the process: the input is then in
  ``<artifacts>/backend-current.bin``);
* both broke the device, or neither; the rings' indices, every byte of guest memory (responses, used
  ring), the used-buffer notifications sent, the mappings of the domains used and the request and status
  counters are the same.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Hashable, Iterable

import numpy as np

from vhost_iommu.abi import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from vhost_iommu.device import IommuDevice, Topology
from vhost_iommu.device.layout import (
    TAIL_SIZE,
    encode_attach,
    encode_detach,
    encode_map,
    encode_probe,
    encode_unmap,
    writable_size,
)
from vhost_iommu.fuzz.engine import Choices, FuzzFailure, FuzzTarget, Script
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.memory import GuestMemory
from vhost_iommu.virtio_iommu import VirtioIommuBackend
from vhost_iommu.virtqueue import (
    DESC_SIZE,
    DESC_STRUCT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    SplitQueue,
)

__all__ = ["BackendTarget"]

GPA_BASE = 0x4000_0000
MAIN_SIZE = 64 * 1024
EXTRA_SIZE = 16 * 1024
DESC, AVAIL, USED = 0x0000, 0x1000, 0x2000  # ring offsets in the main RAM
BUFFERS = 0x4000
DOMAINS = range(1, 5)
ENDPOINTS = (0x20, 0x21, 0x22)
#: Kinds of request (_request): below 2 ATTACH, 6 MAP, 9 UNMAP, then DETACH, PROBE, noise.
_REQUEST_KINDS = 12
_SEED_KINDS = {"ATTACH": 0, "MAP": 2, "UNMAP": 6, "DETACH": 9, "PROBE": 10, "noise": 11}
_SEED_QUEUE_SIZE = 8


class _Context:
    """The server's side of the seam, reduced to what the back-end asks of it."""

    session_key: str | None = None  # served without a keeper

    def __init__(self, memory: GuestMemory, queue: SplitQueue) -> None:
        self.memory = memory
        self.requestq = queue
        self.broken: str | None = None
        self.signals = 0

    def queue(self, index: int) -> SplitQueue | None:
        return self.requestq if index == 0 and self.broken is None else None

    def signal_used(self, index: int) -> None:
        self.signals += 1

    def reschedule(self, index: int) -> None:
        pass  # a static ring never holds more than one call serves

    def config_changed(self) -> None:
        pass

    def offer_kick_fds(self) -> None:
        pass

    def device_broken(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason


class _World:
    def __init__(self, name: str) -> None:
        self.main = GuestRam(MAIN_SIZE, gpa_base=GPA_BASE, name=name)
        self.extra = GuestRam(EXTRA_SIZE, gpa_base=GPA_BASE + MAIN_SIZE, name=name)
        self.memory = GuestMemory()
        for ram in (self.main, self.extra):
            self.memory.add_region(ram.region_desc(), ram.dup_fd())

    def write(self, gpa: int, data: bytes) -> None:
        for ram in (self.main, self.extra):
            if ram.gpa_base <= gpa < ram.gpa_base + ram.size:
                take = min(len(data), ram.gpa_base + ram.size - gpa)
                ram.write(gpa, data[:take])
                if take < len(data):
                    self.write(gpa + take, data[take:])
                return

    def close(self) -> None:
        self.memory.close()
        self.main.close()
        self.extra.close()


class BackendTarget(FuzzTarget):
    name = "backend"
    description = "hostile requestq rings through the compiled request path and the Python path: same answers"
    max_input = 4096

    def setup(self) -> None:
        # Every broken ring is logged as a warning: millions of them would be the campaign's output.
        self._logger = logging.getLogger("vhost_iommu")
        self._saved_level = self._logger.level
        self._logger.setLevel(logging.ERROR)
        self.worlds = (_World("fuzz-backend-compiled"), _World("fuzz-backend-python"))
        self.topology = Topology.default()
        # Compile (or load) the kernel before the time bound applies.
        self._serve(self._fresh(8, 0, False, False, 4096), [])

    def teardown(self) -> None:
        for world in self.worlds:
            world.close()
        self._logger.setLevel(self._saved_level)

    def _fresh(
        self, size: int, next_avail: int, event_idx: bool, indirect: bool, max_mappings: int
    ) -> list[tuple[_World, VirtioIommuBackend, _Context]]:
        sides = []
        for world, path in zip(self.worlds, ("compiled", "python"), strict=True):
            world.main.data[:] = 0
            world.extra.data[:] = 0
            uva = world.main.uva_base
            queue = SplitQueue(
                world.memory,
                size,
                uva + DESC,
                uva + AVAIL,
                uva + USED,
                next_avail=next_avail,
                event_idx=event_idx,
                indirect=indirect,
            )
            device = IommuDevice(self.topology, max_mappings=max_mappings)
            backend = VirtioIommuBackend(device=device, request_path=path)  # type: ignore[arg-type]
            context = _Context(world.memory, queue)
            backend.attach(context)  # _Context has every BackendContext member the back-end uses
            sides.append((world, backend, context))
        return sides

    # -- what the driver writes -----------------------------------------------------------------------------

    def _request(self, choices: Choices) -> tuple[bytes, int]:
        """Request bytes and the writable size a driver gives them."""
        kind = choices.below(_REQUEST_KINDS)
        domain = choices.pick(DOMAINS) if choices.chance(240) else choices.bits(32)
        endpoint = choices.pick(ENDPOINTS)
        start = 0x1000 * choices.below(32) if choices.chance(230) else choices.u64()
        end = start + 0x1000 * choices.between(1, 4) - 1 if choices.chance(230) else choices.u64()
        if kind < 2:
            request = encode_attach(domain, endpoint, 0 if choices.chance(240) else choices.bits(32))
        elif kind < 6:
            phys = 0x1000 * choices.below(1 << 20) if choices.chance(240) else choices.u64()
            flags = choices.between(0, 3) if choices.chance(230) else choices.bits(32)
            request = encode_map(domain, start % (1 << 64), end % (1 << 64), phys, flags)
        elif kind < 9:
            request = encode_unmap(domain, start % (1 << 64), end % (1 << 64))
        elif kind == 9:
            request = encode_detach(domain, endpoint)
        elif kind == 10:
            request = encode_probe(endpoint)
        else:
            return choices.take(choices.between(1, 72)), choices.pick((0, TAIL_SIZE, 2 * TAIL_SIZE))
        return request, writable_size(request[0], self.topology.probe_size)

    def _chains(
        self, choices: Choices, size: int, indirect: bool, state: dict[str, int]
    ) -> list[tuple[int, bytes]]:
        """Writes (gpa, bytes) that make ``count`` more chains available, some of them hostile."""
        writes: list[tuple[int, bytes]] = []
        avail_idx = state["avail_idx"]
        for _ in range(choices.between(1, size)):
            request, writable = self._request(choices)
            buffers: list[tuple[int, int, int]] = []  # (gpa, len, flags)
            split = choices.chance(32) and len(request) > 1
            pieces = [request[: len(request) // 2], request[len(request) // 2 :]] if split else [request]
            for piece in pieces:
                gpa = self._alloc(choices, state, len(piece))
                writes.append((gpa, piece))
                buffers.append((gpa, len(piece), 0))
            if writable:
                buffers.append((self._alloc(choices, state, writable), writable, VIRTQ_DESC_F_WRITE))
            entries = [
                (gpa, length, flags | (VIRTQ_DESC_F_NEXT if i + 1 < len(buffers) else 0))
                for i, (gpa, length, flags) in enumerate(buffers)
            ]
            if choices.chance(24):  # bend one field of one descriptor
                i = choices.below(len(entries))
                gpa, length, flags = entries[i]
                field = choices.below(3)
                entries[i] = (
                    choices.u64() if field == 0 else gpa,
                    choices.pick((0, 1, 0xFFFFFFFF, choices.bits(32))) if field == 1 else length,
                    choices.bits(16) if field == 2 else flags,
                )
            head = state["next_desc"] % size
            use_indirect = indirect and choices.chance(48)
            if use_indirect:
                table_gpa = self._alloc(choices, state, DESC_SIZE * len(entries), align=DESC_SIZE)
                table = b"".join(
                    DESC_STRUCT.pack(gpa, length, flags, i + 1 if flags & VIRTQ_DESC_F_NEXT else 0)
                    for i, (gpa, length, flags) in enumerate(entries)
                )
                writes.append((table_gpa, table))
                writes.append(
                    (
                        GPA_BASE + DESC + DESC_SIZE * head,
                        DESC_STRUCT.pack(table_gpa, len(table), VIRTQ_DESC_F_INDIRECT, 0),
                    )
                )
                state["next_desc"] += 1
            else:
                indices = [(head + i) % size for i in range(len(entries))]
                for i, (gpa, length, flags) in enumerate(entries):
                    next_index = indices[i + 1] if i + 1 < len(indices) else 0
                    if choices.chance(8):
                        next_index = choices.bits(16)
                    writes.append(
                        (
                            GPA_BASE + DESC + DESC_SIZE * indices[i],
                            DESC_STRUCT.pack(gpa, length, flags, next_index),
                        )
                    )
                state["next_desc"] += len(entries)
            slot = avail_idx % size
            writes.append(
                (
                    GPA_BASE + AVAIL + 4 + 2 * slot,
                    struct.pack("<H", head if choices.chance(250) else choices.bits(16)),
                )
            )
            avail_idx += 1
        if choices.chance(8):
            avail_idx += choices.pick((-1, size, choices.bits(16)))
        state["avail_idx"] = avail_idx & 0xFFFF
        writes.append((GPA_BASE + AVAIL + 2, struct.pack("<H", avail_idx & 0xFFFF)))
        return writes

    @staticmethod
    def _alloc(choices: Choices, state: dict[str, int], size: int, align: int = 8) -> int:
        """A buffer: bump-allocated in the main RAM, sometimes across into the adjacent region."""
        if choices.chance(16) and size > 1:
            return GPA_BASE + MAIN_SIZE - choices.between(1, size - 1)
        offset = -(-state["heap"] // align) * align
        if offset + size > MAIN_SIZE - 0x100:
            offset = BUFFERS
        state["heap"] = offset + size
        return GPA_BASE + offset

    def seeds(self) -> list[bytes]:
        """On a ring of 8 without EVENT_IDX or INDIRECT, everything acked: an ATTACH of domain 1, then one
        request of each kind in it, each in two plain descriptors (its values and what follows are the
        input's own)."""
        seeds = [b""]
        for kind in _SEED_KINDS.values():
            script = Script().between(0, 6, _SEED_QUEUE_SIZE.bit_length() - 1).chance(128, False)
            script.chance(200, False).bits(16, 0).below(4, 0).pick((8, 64, 4096), 4096).chance(220, True)
            script.between(1, 3, 1).between(1, _SEED_QUEUE_SIZE, 2)
            for chain_kind in (_SEED_KINDS["ATTACH"], kind):
                self._script_chain(script, chain_kind)
            seeds.append(script.chance(8, False).data)
        return seeds

    @staticmethod
    def _script_chain(script: Script, kind: int) -> None:
        """The decisions of :meth:`_request` and :meth:`_chains` for one plain chain of a request of
        ``kind`` in domain 1, endpoint 0x20, at 0 .. 0xfff."""
        script.below(_REQUEST_KINDS, kind).chance(240, True).pick(DOMAINS, 1).pick(ENDPOINTS, 0x20)
        script.chance(230, True).below(32, 0).chance(230, True).between(1, 4, 1)
        if kind == _SEED_KINDS["ATTACH"]:
            script.chance(240, True)
        elif kind == _SEED_KINDS["MAP"]:
            script.chance(240, True).below(1 << 20, 0).chance(230, True).between(0, 3, 3)
        elif kind == _SEED_KINDS["noise"]:
            script.between(1, 72, 8).bits(64, 0).pick((0, TAIL_SIZE, 2 * TAIL_SIZE), TAIL_SIZE)
        script.chance(32, False).chance(16, False).chance(16, False)  # one piece; no buffer across regions
        script.chance(24, False).chance(8, False).chance(8, False).chance(250, True)  # unbent; its own head

    # -- running both ---------------------------------------------------------------------------------------

    def run(self, choices: Choices) -> Iterable[Hashable]:
        size = 1 << choices.between(0, 6)
        event_idx, indirect = choices.chance(128), choices.chance(200)
        next_avail = choices.pick((0, 0xFFFF, 0x10000 - size // 2 if size > 1 else 0, choices.bits(16)))
        sides = self._fresh(size, next_avail, event_idx, indirect, choices.pick((8, 64, 4096)))
        features = sides[0][1].device_features()
        acked = features if choices.chance(220) else choices.u64() & features
        acked &= ~(VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC)
        acked |= (VIRTIO_RING_F_EVENT_IDX if event_idx else 0) | (
            VIRTIO_RING_F_INDIRECT_DESC if indirect else 0
        )
        for _, backend, _ in sides:
            backend.set_features(acked)
        state = {"avail_idx": next_avail, "next_desc": 0, "heap": BUFFERS}
        outcome: list[Hashable] = []
        for _ in range(choices.between(1, 3)):
            writes = self._chains(choices, size, indirect, state)
            outcome += self._serve(sides, writes)
            if sides[0][2].broken is not None:
                break
        return outcome

    def _serve(
        self, sides: list[tuple[_World, VirtioIommuBackend, _Context]], writes: list[tuple[int, bytes]]
    ) -> list[Hashable]:
        for world, backend, _context in sides:
            for gpa, data in writes:
                world.write(gpa, data)
            backend.queue_kicked(0)
        (world_a, backend_a, context_a), (world_b, backend_b, context_b) = sides
        if (context_a.broken is None) != (context_b.broken is None):
            raise FuzzFailure(f"broken: compiled {context_a.broken!r}, python {context_b.broken!r}")
        queue_a, queue_b = context_a.requestq, context_b.requestq
        if (queue_a.next_avail, queue_a.used_idx) != (queue_b.next_avail, queue_b.used_idx):
            raise FuzzFailure(
                f"ring indices: compiled {(queue_a.next_avail, queue_a.used_idx)}, "
                f"python {(queue_b.next_avail, queue_b.used_idx)}"
            )
        for ram_a, ram_b in ((world_a.main, world_b.main), (world_a.extra, world_b.extra)):
            if not np.array_equal(ram_a.data, ram_b.data):
                offsets = np.flatnonzero(ram_a.data != ram_b.data)
                first = int(offsets[0])
                raise FuzzFailure(
                    f"guest memory differs at {len(offsets)} bytes from gpa {ram_a.gpa_base + first:#x} "
                    f"(compiled {ram_a.data[first]}, python {ram_b.data[first]})"
                )
        if context_a.signals != context_b.signals:
            raise FuzzFailure(
                f"used-buffer notifications: compiled {context_a.signals}, python {context_b.signals}"
            )
        device_a, device_b = backend_a.device, backend_b.device
        for domain in DOMAINS:
            compiled, python = device_a.mappings(domain), device_b.mappings(domain)
            if compiled != python:
                raise FuzzFailure(f"domain {domain} mappings: compiled {compiled}, python {python}")
        if device_a.request_counters() != device_b.request_counters():
            raise FuzzFailure(
                f"requests: compiled {device_a.request_counters()}, python {device_b.request_counters()}"
            )
        if device_a.status_counters() != device_b.status_counters():
            raise FuzzFailure(
                f"statuses: compiled {device_a.status_counters()}, python {device_b.status_counters()}"
            )
        served = sum(device_a.request_counts)
        outcome: list[Hashable] = [("served", min(served, 8)), ("broken", context_a.broken is not None)]
        outcome += [("requests", name) for name, count in device_a.request_counters().items() if count]
        return outcome + [(name, count > 0) for name, count in device_a.status_counters().items()]
