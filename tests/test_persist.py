"""Device state under a state directory: journal, snapshots, recovery into a fresh back-end.

A "restart" here is what the keeper does for a respawned worker, played in-process: the old back-end is
dropped without any clean-up, a new one is built with ``restoring=True`` over the same guest RAM and the
same state directory, its rings are set up at the same addresses, and ``session_restored`` then
``queue_restored`` run before any kick. tests/test_persist_crash.py kills a real child process instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhost_iommu.device import IommuDevice, ReservedRegion, ResvMemType, Status
from vhost_iommu.device.layout import (
    MAP_F_READ,
    MAP_F_WRITE,
    RequestType,
    encode_attach,
    encode_detach,
    encode_map,
    encode_probe,
    encode_unmap,
)
from vhost_iommu.harness.context import StandaloneContext
from vhost_iommu.harness.driver_queue import DriverQueue
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.memory import GuestMemory
from vhost_iommu.persist import StateDir, StateError
from vhost_iommu.persist.journal import Journal
from vhost_iommu.virtio_iommu import VirtioIommuBackend

GPA_BASE = 0x1_0000_0000
RAM_SIZE = 4 << 20
EP = 0x20
PAGE = 0x1000
RW = MAP_F_READ | MAP_F_WRITE
PathKind = Literal["python", "compiled"]


@dataclass
class Guest:
    ram: GuestRam
    memory: GuestMemory
    requests: DriverQueue
    events: DriverQueue
    state: Path
    path: PathKind
    slots: int
    backend: VirtioIommuBackend | None = None

    def start(self, *, restoring: bool = False) -> VirtioIommuBackend:
        """A back-end as the server sets it up for a new session, or as a new worker under the keeper
        takes one over (the calls and their order of `RestorableBackend`)."""
        backend = VirtioIommuBackend(
            request_path=self.path, state_dir=StateDir(str(self.state)), journal_slots=self.slots
        )
        queues = [
            q.device_queue(self.memory, indirect=True, next_avail=q.used_idx)
            for q in (self.requests, self.events)
        ]
        backend.attach(StandaloneContext(self.memory, queues, session_key="guest0"))
        backend.set_features(backend.device_features())
        backend.memory_changed()
        if restoring:
            backend.session_restored()
            backend.queue_restored(0)
            backend.queue_restored(1)
        backend.queue_started(0)
        backend.queue_started(1)
        self.backend = backend
        return backend

    def send(self, request: bytes, writable: int = 4) -> int:
        """Post one request and kick; the status byte the device wrote."""
        head = self.requests.post([request], [writable])
        assert self.backend is not None
        self.backend.queue_kicked(0)
        used = self.requests.used()
        assert [h for h, _ in used] == [head]
        return self.requests.written(head)[writable - 4]


@pytest.fixture(params=["python", "compiled"])
def guest(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Guest]:
    state = tmp_path / "state"
    with GuestRam(RAM_SIZE, gpa_base=GPA_BASE) as ram:
        memory = ram.guest_memory()
        try:
            yield Guest(
                ram,
                memory,
                DriverQueue(ram, 64, event_idx=True),
                DriverQueue(ram, 8, event_idx=True),
                state,
                request.param,
                slots=16,
            )
        finally:
            memory.close()


def state_of(backend: VirtioIommuBackend) -> object:
    device = backend.device
    return (
        [(d.domain, d.bypass, d.endpoints, d.mapping_count) for d in device.domains()],
        {d.domain: device.mappings(d.domain) for d in device.domains()},
        device.config.bypass,
        device.acked_features,
    )


def test_state_survives_a_restart_across_journal_rotations(guest: Guest) -> None:
    backend = guest.start()
    assert guest.send(encode_attach(1, EP)) == Status.OK
    for page in range(40):  # 16-record journals: several snapshots and rotations
        assert (
            guest.send(encode_map(1, page * PAGE, page * PAGE + PAGE - 1, 0x10_0000 + page * PAGE, RW)) == 0
        )
    assert guest.send(encode_map(1, 0, PAGE - 1, 0, RW)) == Status.INVAL  # overlap: refused, not replayed
    for page in range(0, 40, 3):
        assert guest.send(encode_unmap(1, page * PAGE, page * PAGE + PAGE - 1)) == Status.OK
    assert guest.send(encode_attach(2, EP + 1)) == Status.OK
    assert guest.send(encode_detach(2, EP + 1)) == Status.OK
    assert guest.send(encode_probe(EP), 4 + 512) == Status.OK
    before = state_of(backend)
    names = sorted(os.listdir(guest.state / "guest0"))
    assert len([n for n in names if n.startswith("snapshot-")]) == 1, names

    restarted = guest.start(restoring=True)
    assert state_of(restarted) == before
    # And it goes on serving, journaling from where the old one stopped.
    assert guest.send(encode_map(1, 0x100_0000, 0x100_0FFF, 0, RW)) == Status.OK
    after = state_of(restarted)
    assert state_of(guest.start(restoring=True)) == after


def test_a_new_connection_starts_empty(guest: Guest) -> None:
    guest.start()
    assert guest.send(encode_attach(1, EP)) == Status.OK
    fresh = guest.start()  # a new session under the same key: its ring start erases the old state
    assert fresh.device.domains() == []
    assert state_of(guest.start(restoring=True)) == state_of(fresh)


def test_a_committed_but_unpublished_request_is_completed_not_repeated(guest: Guest) -> None:
    """The instant between the journal commit and the used index: played by putting the guest-visible
    used index (and the status the device wrote) back to what they were before the MAP."""
    backend = guest.start()
    assert guest.send(encode_attach(1, EP)) == Status.OK
    head = guest.requests.post([encode_map(1, 0, PAGE - 1, 0x20_0000, RW)], [4])
    [(status_gpa, _size)] = guest.requests.writable_buffers(head)
    guest.ram.write(status_gpa, b"\xee\xee\xee\xee")
    used_before = guest.requests.used_idx
    backend.queue_kicked(0)
    assert guest.requests.used_idx == (used_before + 1) & 0xFFFF
    before = state_of(backend)
    guest.requests.rewrite_used_idx(used_before)  # the kill came before the index was stored
    guest.ram.write(status_gpa, b"\xee\xee\xee\xee")

    restarted = guest.start(restoring=True)
    assert state_of(restarted) == before  # mapped once (a second MAP would be refused, not doubled)
    assert guest.requests.used() == [(head, 4)]
    assert guest.requests.written(head) == bytes(4)  # its status, from the record
    assert restarted.device.request_counters()["MAP"] == 1  # replayed once, not executed again


def test_no_state_dir_leaves_the_kernel_call_unchanged(guest: Guest) -> None:
    backend = VirtioIommuBackend(request_path=guest.path)
    assert backend.persistence is None
    if backend._compiled is not None:
        assert backend._compiled.journal is None


# -- hostile state directories -------------------------------------------------------------------------


def filled(guest: Guest) -> Path:
    guest.start()
    assert guest.send(encode_attach(1, EP)) == Status.OK
    for page in range(20):
        assert guest.send(encode_map(1, page * PAGE, page * PAGE + PAGE - 1, 0, RW)) == Status.OK
    return guest.state / "guest0"


def refused(guest: Guest, match: str) -> None:
    with pytest.raises(StateError, match=match):
        guest.start(restoring=True)


def journal_file(directory: Path) -> Path:
    return max(p for p in directory.iterdir() if p.name.startswith("journal-"))


def test_a_torn_record_ends_the_journal(guest: Guest) -> None:
    directory = filled(guest)
    before = state_of(guest.backend)  # type: ignore[arg-type]
    data = bytearray(journal_file(directory).read_bytes())
    records = np.frombuffer(data, np.uint64, offset=4096).reshape(-1, 8)
    last = int(np.flatnonzero(records[:, 0])[-1])
    # A record whose payload was stored and commit word not: it does not exist.
    records[last + 1, 1:] = records[last, 1:]
    journal_file(directory).write_bytes(bytes(data))
    assert state_of(guest.start(restoring=True)) == before


def test_a_commit_after_the_end_is_corruption(guest: Guest) -> None:
    directory = filled(guest)
    data = bytearray(journal_file(directory).read_bytes())
    records = np.frombuffer(data, np.uint64, offset=4096).reshape(-1, 8)
    last = int(np.flatnonzero(records[:, 0])[-1])
    records[last + 3, 0] = last + 4
    journal_file(directory).write_bytes(bytes(data))
    refused(guest, "committed after the end")


def test_a_journal_of_the_wrong_size_is_refused(guest: Guest) -> None:
    directory = filled(guest)
    path = journal_file(directory)
    with open(path, "ab") as handle:
        handle.write(bytes(64))
    refused(guest, "the file has")


def test_a_header_claiming_huge_sizes_is_refused(guest: Guest) -> None:
    directory = filled(guest)
    path = journal_file(directory)
    data = bytearray(path.read_bytes())
    np.frombuffer(data, np.uint64, 8)[3] = 2**62
    path.write_bytes(bytes(data))
    refused(guest, "header says")


def test_a_record_of_an_unknown_kind_is_refused(guest: Guest) -> None:
    directory = filled(guest)
    data = bytearray(journal_file(directory).read_bytes())
    np.frombuffer(data, np.uint64, offset=4096).reshape(-1, 8)[0, 1] = 0x77
    journal_file(directory).write_bytes(bytes(data))
    refused(guest, "unknown kind")


def test_a_changed_request_that_no_longer_succeeds_is_refused(guest: Guest) -> None:
    directory = filled(guest)
    data = bytearray(journal_file(directory).read_bytes())
    records = np.frombuffer(data, np.uint64, offset=4096).reshape(-1, 8)
    committed = records[records[:, 0] != 0]
    request_rows = [
        i for i, row in enumerate(committed) if row[1] & 0xFF == 1 and bytes(row[3:].tobytes())[0] == 3
    ]
    records[request_rows[0], 4] = records[request_rows[1], 4]  # two MAPs of one range: the second fails
    records[request_rows[0], 5] = records[request_rows[1], 5]
    journal_file(directory).write_bytes(bytes(data))
    refused(guest, "replayed it is answered")


def test_a_corrupt_snapshot_is_refused(guest: Guest) -> None:
    directory = filled(guest)
    snapshot = max(p for p in directory.iterdir() if p.name.startswith("snapshot-"))
    data = bytearray(snapshot.read_bytes())
    data[200] ^= 1
    snapshot.write_bytes(bytes(data))
    refused(guest, "checksum")
    snapshot.write_bytes(bytes(data[:100]))
    refused(guest, "header describes|shorter")


def test_a_foreign_file_is_refused(guest: Guest) -> None:
    directory = filled(guest)
    (directory / "notes.txt").write_text("hello")
    refused(guest, "unexpected file")


def test_a_planted_symlink_is_not_followed(guest: Guest, tmp_path: Path) -> None:
    directory = filled(guest)
    path = journal_file(directory)
    target = tmp_path / "elsewhere"
    target.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(target)
    refused(guest, "symlink")
    # A symlink where a guest's directory should be, and as the state directory itself.
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    (guest.state / "guest1").symlink_to(other)
    with pytest.raises(StateError, match="symlink"):
        StateDir(str(guest.state)).guest("guest1")
    (tmp_path / "link").symlink_to(guest.state)
    with pytest.raises(StateError, match="symlink"):
        StateDir(str(tmp_path / "link"))


def test_a_file_open_to_others_or_a_fifo_is_refused(guest: Guest) -> None:
    directory = filled(guest)
    path = journal_file(directory)
    path.chmod(0o644)
    refused(guest, "0600")
    path.unlink()
    os.mkfifo(path, 0o600)
    refused(guest, "not a regular file")


def test_guest_names_and_directory_modes(tmp_path: Path) -> None:
    state = StateDir(str(tmp_path / "s"))
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o700
    for bad in ("", ".", "..", "a/b", ".hidden", "x" * 200):
        with pytest.raises(StateError):
            state.guest(bad)
    state.guest("ok").close()
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o775)  # others may write it: refused (0755 is fine, as for the keeper)
    with pytest.raises(StateError, match="other users"):
        StateDir(str(tmp_path / "open"))
    (tmp_path / "s" / "wide").mkdir()
    (tmp_path / "s" / "wide").chmod(0o750)  # a guest's directory must be 0700
    with pytest.raises(StateError, match="other users"):
        state.guest("wide")
    state.close()


def test_without_a_session_key_nothing_is_persisted(guest: Guest) -> None:
    backend = VirtioIommuBackend(request_path=guest.path, state_dir=StateDir(str(guest.state)))
    queues = [q.device_queue(guest.memory, next_avail=q.used_idx) for q in (guest.requests, guest.events)]
    backend.attach(StandaloneContext(guest.memory, queues))  # served without a keeper
    backend.set_features(backend.device_features())
    backend.queue_started(0)
    guest.backend = backend
    assert guest.send(encode_attach(1, EP)) == Status.OK
    assert os.listdir(guest.state) == []


def test_an_ended_session_leaves_nothing(guest: Guest) -> None:
    backend = guest.start()
    assert guest.send(encode_attach(1, EP)) == Status.OK
    assert os.listdir(guest.state / "guest0")
    backend.session_ended()
    backend.reset()  # what the server does next
    assert os.listdir(guest.state) == []


def test_journal_files_are_0600_and_exclusive(tmp_path: Path) -> None:
    directory = StateDir(str(tmp_path)).guest("g")
    journal = Journal.create(directory, 7, slots=4)
    assert os.stat(tmp_path / "g" / journal.name).st_mode & 0o777 == 0o600
    with pytest.raises(StateError, match="cannot create"):
        Journal.create(directory, 7, slots=4)
    journal.close()
    directory.close()


def test_requests_of_every_type_round_trip_through_records(guest: Guest) -> None:
    backend = guest.start()
    assert backend.persistence is not None
    journal = backend.persistence.journal
    assert journal is not None
    assert guest.send(encode_attach(3, EP)) == Status.OK
    assert guest.send(encode_map(3, 0, PAGE - 1, 0, RW)) == Status.OK
    records = [r for r in journal.read() if r.kind == 1]
    assert [r.request[0] for r in records] == [RequestType.ATTACH, RequestType.MAP]
    assert records[1].request[:36] == encode_map(3, 0, PAGE - 1, 0, RW)
    assert [r.status for r in records] == [0, 0]


# -- the rule replay relies on ------------------------------------------------------------------------------


def _image(device: IommuDevice) -> object:
    return (
        [(d.domain, d.bypass, d.endpoints, d.mapping_count) for d in device.domains()],
        {d.domain: device.mappings(d.domain) for d in device.domains()},
    )


_requests = st.lists(
    st.one_of(
        st.builds(
            encode_attach, st.integers(0, 4), st.sampled_from([EP, EP + 1, 0x99]), st.sampled_from([0, 1])
        ),
        st.builds(encode_detach, st.integers(0, 4), st.sampled_from([EP, EP + 1, 0x99])),
        st.builds(
            lambda d, s, n, p, f: encode_map(d, s * 0x800, (s * 0x800 + n * 0x800 - 1) % 2**64, p * PAGE, f),
            st.integers(0, 4),
            st.integers(0, 16),
            st.integers(0, 4),
            st.integers(0, 4),
            st.sampled_from([0, 1, 3, 4, 8]),
        ),
        st.builds(
            lambda d, s, n: encode_unmap(d, s * PAGE, (s * PAGE + n * PAGE - 1) % 2**64),
            st.integers(0, 4),
            st.integers(0, 8),
            st.integers(0, 4),
        ),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(_requests)
def test_a_refused_request_changes_nothing_and_replaying_the_accepted_ones_rebuilds_the_state(
    requests: list[bytes],
) -> None:
    device = IommuDevice()
    device.set_features(device.device_features())
    accepted = []
    for request in requests:
        before = _image(device)
        response, _used = device.handle_request(request, 4)
        if response[0] == Status.OK:
            accepted.append(request)
        else:
            assert _image(device) == before, (request.hex(), Status(response[0]).name)
    replayed = IommuDevice()
    replayed.set_features(replayed.device_features())
    for request in accepted:
        assert replayed.handle_request(request, 4)[0][0] == Status.OK
    assert _image(replayed) == _image(device)


def test_tool_changes_survive_and_forced_answers_are_not_replayed(guest: Guest) -> None:
    """What the control channel does between kicks: bypass, reserved-region overrides, injections."""
    backend = guest.start()
    device = backend.device
    assert guest.send(encode_attach(1, EP)) == Status.OK
    device.set_bypass(0)
    device.set_reserved_regions(EP, (ReservedRegion(ResvMemType.RESERVED, 0x40_0000, 0x40_FFFF),))
    assert guest.send(encode_map(1, 0x40_0000, 0x40_0FFF, 0, RW)) == Status.RANGE  # the override applies
    device.inject(RequestType.MAP, Status.OK)
    assert guest.send(encode_map(1, 0, PAGE - 1, 0, RW)) == Status.OK  # forced: nothing mapped
    assert device.mappings(1) == []
    assert guest.send(encode_map(1, PAGE, 2 * PAGE - 1, 0, RW)) == Status.OK
    before = state_of(backend)

    restarted = guest.start(restoring=True)
    assert state_of(restarted) == before
    assert restarted.device.reserved_regions(EP) == device.reserved_regions(EP)
    assert guest.send(encode_map(1, 0x40_0000, 0x40_0FFF, 0, RW)) == Status.RANGE


def test_a_tool_change_is_journaled_as_the_command_ends(guest: Guest) -> None:
    """Control commands run inside ``quiesced()``; what they changed is journaled on its way out, before
    any further request (the worker may die before the next one)."""
    backend = guest.start()
    assert guest.send(encode_attach(1, EP)) == Status.OK
    assert backend.device.config.bypass == 1
    with backend.quiesced():
        backend.device.set_bypass(0)
    assert guest.start(restoring=True).device.config.bypass == 0
