"""The device worker of tests/test_persist_crash.py: a back-end with a state directory in a process of
its own, serving rings that the test drives from the parent over shared memfd guest RAM.

    python tests/persist_child.py CONFIG_JSON

CONFIG_JSON names the inherited fds (the RAM's memfd, the kick and call pipes, or with ``thread`` the kick
and call eventfds, served by the back-end's requestq thread), the RAM's and the
rings' addresses, the state directory, whether this worker is a respawn (``restoring``: it rebuilds the
state with ``session_restored``/``queue_restored`` as under the keeper) and the test hook ``trap``
(SIGKILL itself right after committing the journal record that many records ahead, before publishing
it). It prints ``ready`` once serving, then serves a kick at a time and writes the call eventfd after
each (a byte on the call pipe), until the parent kills it or closes the kick pipe.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from vhost_iommu.harness.context import StandaloneContext
from vhost_iommu.memory import GuestMemory, MemoryRegionDesc
from vhost_iommu.persist import StateDir
from vhost_iommu.virtio_iommu import VirtioIommuBackend
from vhost_iommu.virtqueue import SplitQueue


class Context(StandaloneContext):
    call_fd = -1
    """With the kick thread: the call eventfd, written for what the event loop serves (the thread writes
    it itself for what it serves)."""

    def signal_used(self, index: int) -> None:
        super().signal_used(index)
        if index == 0 and self.call_fd >= 0:
            os.write(self.call_fd, (1).to_bytes(8, sys.byteorder))

    def device_broken(self, reason: str) -> None:
        super().device_broken(reason)
        print(f"broken: {reason}", flush=True)


def main() -> None:
    config = json.loads(sys.argv[1])
    memory = GuestMemory()
    memory.add_region(
        MemoryRegionDesc(config["gpa_base"], config["ram_size"], config["uva_base"], 0), config["ram_fd"]
    )
    backend = VirtioIommuBackend(
        request_path=config["path"], state_dir=StateDir(config["state"]), journal_slots=config["slots"]
    )
    queues = []
    for ring in config["rings"]:
        queues.append(
            SplitQueue(
                memory,
                ring["size"],
                ring["desc"],
                ring["avail"],
                ring["used"],
                next_avail=ring["next_avail"],
                event_idx=True,
                indirect=True,
            )
        )
    context = Context(memory, queues, session_key="guest0")
    # The calls, in their order, of a new session or (restoring) of a worker taking one over under the
    # keeper (`RestorableBackend`).
    backend.attach(context)
    backend.set_features(backend.device_features())
    backend.memory_changed()
    if config["restoring"]:
        backend.session_restored()
        backend.queue_restored(0)
        backend.queue_restored(1)
    backend.queue_started(0)
    backend.queue_started(1)
    if config["trap"] >= 0:
        assert backend.persistence is not None
        journal = backend.persistence.journal
        assert journal is not None
        journal.trap = journal.next + config["trap"]
    if config["thread"]:
        serve_from_thread(backend, context, config["kick_fd"], config["call_fd"])
        return
    print("ready", flush=True)
    while os.read(config["kick_fd"], 1):
        ring = queues[0]
        while True:
            backend.queue_kicked(0)
            if context.broken is not None or not ring.has_available():
                break
        os.write(config["call_fd"], b"c")


def serve_from_thread(backend: VirtioIommuBackend, context: Context, kick_fd: int, call_fd: int) -> None:
    """As the server runs a back-end that takes the kick fd: the requestq thread serves, this event
    loop takes its hand-overs (ATTACH, PROBE, table growth, a full journal)."""
    context.call_fd = call_fd

    async def run() -> None:
        assert backend.takes_kick_fd(0, kick_fd, call_fd), "the kick thread was not taken"
        print("ready", flush=True)
        await asyncio.Event().wait()  # served until killed

    asyncio.run(run())


if __name__ == "__main__":
    main()
