"""A snapshot file: the device state a journal starts from, and where the rings stood.

The device state is `vhost_iommu.device.snapshot`'s (the format migration uses: features, bypass,
domains, endpoints, mappings, pending events, reserved-region overrides, counters; checked field by
field and applied in one step on restore). This file wraps it with what only a restarted worker needs:
the generation it belongs to, the acked features as the back-end saw them (ring bits included) and each
ring's position.

Layout (little-endian u64 words): a header of ``HEADER_WORDS`` (``S_*``), the device state of
``S_STATE_BYTES`` bytes, then the SHA-256 of everything before it. Sizes are checked against the file's
before anything is parsed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import numpy as np

from vhost_iommu.device import IommuDevice
from vhost_iommu.device import snapshot as device_snapshot
from vhost_iommu.persist.statedir import StateError

__all__ = ["DeviceImage", "RingPosition", "capture", "decode", "encode", "restore"]

MAGIC: Final = int.from_bytes(b"VIOMSNAP", "little")
VERSION: Final = 2
S_MAGIC: Final = 0
S_VERSION: Final = 1
S_GENERATION: Final = 2
S_ACKED: Final = 3
S_RINGS: Final = 4
"""Two words, one per queue: bit 32 set when known, next_avail in bits 0-15, used_idx in 16-31."""
S_STATE_BYTES: Final = 6
HEADER_WORDS: Final = 8
DIGEST_BYTES: Final = 32


@dataclass(frozen=True, slots=True)
class RingPosition:
    next_avail: int
    used_idx: int


@dataclass(frozen=True, slots=True)
class DeviceImage:
    generation: int
    acked_features: int
    rings: tuple[RingPosition | None, RingPosition | None]
    state: bytes
    """`vhost_iommu.device.snapshot.save`'s bytes."""
    mappings: int = 0
    """How many mappings ``state`` holds (known when captured; 0 when decoded)."""


def capture(
    device: IommuDevice,
    acked_features: int,
    rings: tuple[RingPosition | None, RingPosition | None],
    generation: int,
) -> DeviceImage:
    return DeviceImage(generation, acked_features, rings, device_snapshot.save(device), device.store.count())


def _ring_word(position: RingPosition | None) -> int:
    if position is None:
        return 0
    return 1 << 32 | position.next_avail | position.used_idx << 16


def encode(image: DeviceImage) -> bytes:
    header = np.zeros(HEADER_WORDS, "<u8")
    header[S_MAGIC] = MAGIC
    header[S_VERSION] = VERSION
    header[S_GENERATION] = image.generation
    header[S_ACKED] = image.acked_features
    header[S_RINGS] = _ring_word(image.rings[0])
    header[S_RINGS + 1] = _ring_word(image.rings[1])
    header[S_STATE_BYTES] = len(image.state)
    body = header.tobytes() + image.state
    return body + hashlib.sha256(body).digest()


def decode(data: bytes, where: str) -> DeviceImage:
    """Parse a snapshot file's bytes; StateError for anything that is not a complete, intact snapshot
    (the device state inside is checked when it is restored)."""
    header_bytes = HEADER_WORDS * 8
    if len(data) < header_bytes + DIGEST_BYTES:
        raise StateError(f"{where}: {len(data)} bytes, shorter than a snapshot's header")
    header = [int(word) for word in np.frombuffer(data, "<u8", HEADER_WORDS)]
    if header[S_MAGIC] != MAGIC or header[S_VERSION] != VERSION:
        raise StateError(f"{where}: not a snapshot of this version (magic or version)")
    expected = header_bytes + header[S_STATE_BYTES] + DIGEST_BYTES
    if len(data) != expected:
        raise StateError(f"{where}: {len(data)} bytes, its header describes {expected}")
    if hashlib.sha256(data[:-DIGEST_BYTES]).digest() != data[-DIGEST_BYTES:]:
        raise StateError(f"{where}: checksum mismatch: the file is corrupt")
    rings: list[RingPosition | None] = []
    for word in header[S_RINGS : S_RINGS + 2]:
        if word >> 33 or (word >> 32 == 0 and word):
            raise StateError(f"{where}: bad ring position word {word:#x}")
        rings.append(RingPosition(word & 0xFFFF, (word >> 16) & 0xFFFF) if word >> 32 else None)
    return DeviceImage(
        header[S_GENERATION], header[S_ACKED], (rings[0], rings[1]), data[header_bytes:-DIGEST_BYTES]
    )


def restore(
    device: IommuDevice, image: DeviceImage, apply_features: Callable[[int], None], where: str
) -> None:
    """Put ``image``'s state into ``device``; StateError (naming ``where``) if it does not fit it:
    another topology, limits it exceeds, a field out of range."""
    try:
        device_snapshot.restore(device, image.state)
    except device_snapshot.SnapshotError as exc:
        raise StateError(f"{where}: {exc}") from None
    apply_features(image.acked_features)
