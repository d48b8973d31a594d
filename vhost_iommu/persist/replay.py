"""Rebuilding a device from a snapshot and its journal, and what the rings need afterwards.

Only records of requests answered OK are replayed: the device core refuses a request before changing
anything (``Domains.attach``/``detach``, ``IommuDevice._map``/``_unmap``, the table's OVERLAP/SPLIT/LIMIT
checks), so a failed request left no trace to redo. Each replayed request must be answered OK again; if
one is not, the journal does not describe this device and the state is refused rather than half-applied.
Answers forced by an injection (``F_FORCED``) changed nothing and are not replayed either.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from vhost_iommu.device import IommuDevice, RequestType, Status
from vhost_iommu.device.layout import READABLE_SIZE, TAIL_SIZE
from vhost_iommu.persist.image import RingPosition, restore
from vhost_iommu.persist.journal import (
    F_FORCED,
    KIND_BYPASS,
    KIND_FEATURES,
    KIND_REQUEST,
    KIND_RESET,
    KIND_RING,
    Record,
)
from vhost_iommu.persist.persistence import Loaded
from vhost_iommu.persist.statedir import StateError

__all__ = ["Recovered", "recover"]

_CHANGES_STATE = frozenset(
    int(kind) for kind in (RequestType.ATTACH, RequestType.DETACH, RequestType.MAP, RequestType.UNMAP)
)
MAX_PENDING = 1 << 15
"""The largest ring: no more chains than this can be served and not yet published."""


@dataclass
class Recovered:
    """Where each ring stood after the last record, and the requestq's records not known published."""

    rings: list[RingPosition | None]
    requests: deque[Record] = field(default_factory=lambda: deque(maxlen=MAX_PENDING))
    replayed: int = 0
    #: Queues whose indices were already put back (``queue_restored`` acts once per queue).
    restored: set[int] = field(default_factory=set)


def recover(
    device: IommuDevice,
    loaded: Loaded,
    apply_features: Callable[[int], None],
    reset_device: Callable[[], None],
) -> Recovered:
    """Apply the snapshot and the journal to ``device`` (fresh); StateError when they do not fit it."""
    recovered = Recovered(rings=[None, None])
    if loaded.snapshot is not None:
        restore(device, loaded.snapshot, apply_features, loaded.snapshot_where)
        recovered.rings = list(loaded.snapshot.rings)
    for number, record in enumerate(loaded.records):
        where = f"{loaded.where}: record {number}"
        kind = record.kind
        if kind == KIND_REQUEST:
            _request(device, record, recovered, where)
        elif kind == KIND_FEATURES:
            apply_features(record.value)
        elif kind == KIND_BYPASS:
            if record.value not in (0, 1):
                raise StateError(f"{where}: bypass {record.value} is neither 0 nor 1")
            device.config.bypass = record.value
        elif kind == KIND_RESET:
            reset_device()
        elif kind == KIND_RING:
            if record.queue > 1:
                raise StateError(f"{where}: queue {record.queue} does not exist")
            recovered.rings[record.queue] = RingPosition(record.avail_pos, record.used_pos)
            if record.queue == 0:
                recovered.requests.clear()
    return recovered


def _request(device: IommuDevice, record: Record, recovered: Recovered, where: str) -> None:
    position = recovered.rings[0]
    if record.queue != 0 or position is None:
        raise StateError(f"{where}: a request of queue {record.queue} before the ring was started")
    if (record.avail_pos, record.used_pos) != (position.next_avail, position.used_idx):
        raise StateError(
            f"{where}: request at ring position {record.avail_pos}/{record.used_pos}, expected "
            f"{position.next_avail}/{position.used_idx}: the journal is out of order"
        )
    recovered.rings[0] = RingPosition((position.next_avail + 1) & 0xFFFF, (position.used_idx + 1) & 0xFFFF)
    recovered.requests.append(record)
    request_type = record.request[0]
    if record.status != Status.OK or record.used_length != TAIL_SIZE or record.flags & F_FORCED:
        return
    if request_type not in _CHANGES_STATE:
        return  # PROBE (used length TAIL_SIZE only with no properties) changes nothing
    size = READABLE_SIZE[request_type]
    response, used = device.handle_request(record.request[:size], TAIL_SIZE, observed=False)
    if used != TAIL_SIZE or response[0] != Status.OK:
        status = Status(response[0]).name if response else "no answer"
        raise StateError(
            f"{where}: {RequestType(request_type).name} was answered OK, replayed it is answered {status}: "
            "the journal does not describe this device"
        )
    recovered.replayed += 1
