"""Fuzz target ``snapshot``: hostile device states into ``snapshot.restore`` (what a migrating front-end
or a damaged state file hands the back-end).

One execution takes a saved state of a device with domains, bypass domains, mappings, fault events and
reserved-region overrides, damages it (bytes set anywhere, whole fields of a section set to values around
the ones there, truncation, extension), and mostly recomputes its checksum, as a hostile writer would, so
that the checks behind it are reached. Then it restores the result into a device that holds a state of
its own.

Checked:

* only :class:`SnapshotError` is raised;
* a refused state leaves the device exactly as it was (its own saved state, byte for byte);
* a restored state is consistent: the mapping table passes ``verify``, and the device's state saves and
  restores again to the same bytes.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable

from vhost_iommu.device import snapshot
from vhost_iommu.device.core import IommuDevice
from vhost_iommu.device.layout import (
    ATTACH_F_BYPASS,
    CONFIG_BYPASS,
    MAP_F_MMIO,
    ResvMemType,
    encode_attach,
    encode_map,
)
from vhost_iommu.device.snapshot import (
    DIGEST_SIZE,
    HEADER,
    SECTION_HEADER,
    Header,
    SnapshotError,
    checksum,
)
from vhost_iommu.device.topology import ReservedRegion
from vhost_iommu.fuzz.engine import Choices, FuzzFailure, FuzzTarget, Script, struct_fields
from vhost_iommu.jit.tables import MappingTable

__all__ = ["SnapshotTarget"]

_PAGE = 0x1000
_VARIANTS = 4  # saved states, of devices with more and more in them
_EDITS = 5  # kinds of damage
_BASE = 1 << 32
#: Where the header's fields are, but the magic (damaging it says nothing new).
_HEADER_FIELDS = [offset for offset, _size, _code in struct_fields(HEADER)[1:]]


def _device(variant: int) -> IommuDevice:
    device = IommuDevice(max_pending_events=8)
    device.set_features(device.device_features())
    if variant == 0:
        return device
    device.handle_request(encode_attach(3, 0x20), 4)
    device.handle_request(encode_attach(3, 0x21), 4)
    device.handle_request(encode_attach(7, 0x22, ATTACH_F_BYPASS), 4)
    for page in range(3 * variant):
        start = _BASE + 2 * page * _PAGE
        flags = MAP_F_MMIO if page % 5 == 4 else 1 + page % 3
        device.handle_request(encode_map(3, start, start + _PAGE - 1, page * _PAGE, flags), 4)
    if variant >= 2:
        device.handle_request(encode_attach(9, 0x23), 4)
        device.handle_request(encode_map(9, _BASE, _BASE + 4 * _PAGE - 1, 0), 4)
        device.set_reserved_regions(0x21, (ReservedRegion(ResvMemType.RESERVED, _BASE, _BASE + 0xFFF),))
        device.set_config(CONFIG_BYPASS, b"\x00")
        device.report_fault(1, 2, 0x20, 0xDEAD000)
    return device


def _sections(state: bytes) -> list[tuple[int, int]]:
    """(payload offset, payload length) of each section of a well-formed state."""
    found = []
    at = HEADER.size
    for _ in range(Header._make(HEADER.unpack_from(state)).section_count):
        _tag, _reserved, length = SECTION_HEADER.unpack_from(state, at)
        found.append((at + SECTION_HEADER.size, length))
        at += SECTION_HEADER.size + length
    return found


def _reseal(data: bytearray, set_length: bool) -> bytearray:
    """What a hostile writer does last: the header's total length (``set_length``) and the checksum made
    to fit the bytes it wrote."""
    if set_length and len(data) >= HEADER.size + DIGEST_SIZE:
        header = Header._make(HEADER.unpack_from(data))._replace(total_length=len(data))
        HEADER.pack_into(data, 0, *header)
    body = bytes(data[: len(data) - DIGEST_SIZE])
    return bytearray(body + checksum(body))


class SnapshotTarget(FuzzTarget):
    name = "snapshot"
    description = "damaged and hostile (resealed) device states into snapshot.restore"
    max_input = 256

    def setup(self) -> None:
        self.states = [snapshot.save(_device(variant)) for variant in range(_VARIANTS)]
        self.holder = _device(1)
        self.holder.handle_request(encode_attach(5, 0x24), 4)

    def run(self, choices: Choices) -> Iterable[Hashable]:
        base = choices.pick(self.states)
        data = bytearray(base)
        sections = _sections(base)
        features: list[Hashable] = []
        for _ in range(choices.between(1, 4)):
            kind = choices.below(_EDITS)
            if kind == 0:  # a byte anywhere but the checksum
                data[choices.below(len(data) - DIGEST_SIZE)] = choices.byte()
            elif kind in (1, 2):  # a whole field of a section, around what is there
                offset, length = choices.pick(sections)
                if length < 8:
                    continue
                at = offset + 4 * choices.below(length // 4 - 1)
                width = 8 if kind == 2 and at + 8 <= offset + length else 4
                current = int.from_bytes(data[at : at + width], "little")
                value = choices.pick((current + 1, current - 1, 0, 1, (1 << (8 * width)) - 1, choices.u64()))
                data[at : at + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
            elif kind == 3:  # a header field
                data[choices.pick(_HEADER_FIELDS)] ^= 1 << choices.below(8)
            else:  # truncated or extended before the checksum
                body_end = len(data) - DIGEST_SIZE
                if choices.chance(128):
                    del data[body_end - choices.between(1, min(64, body_end - HEADER.size)) : body_end]
                else:
                    data[body_end:body_end] = bytes(8 * choices.between(1, 4))
            features.append(("edit", kind))
        if not choices.chance(16):  # mostly what a hostile writer sends: length and checksum made to fit
            data = _reseal(data, set_length=not choices.chance(32))
        before = snapshot.save(self.holder)
        try:
            snapshot.restore(self.holder, bytes(data))
        except SnapshotError as exc:
            if snapshot.save(self.holder) != before:
                raise FuzzFailure(f"a refused state changed the device: {exc}") from None
            features.append(("refused", re.sub(r"\d+|0x[0-9a-f]+", "N", str(exc))[:60]))
            return features
        table = self.holder.store
        assert isinstance(table, MappingTable)
        try:
            table.verify()
        except ValueError as exc:
            raise FuzzFailure(f"a restored state left an inconsistent mapping table: {exc}") from None
        again = IommuDevice(max_pending_events=8)
        saved = snapshot.save(self.holder)
        snapshot.restore(again, saved)
        if snapshot.save(again) != saved:
            raise FuzzFailure("a restored state does not save and restore to itself")
        features.append(("restored", bytes(data) == base))
        return features

    def seeds(self) -> list[bytes]:
        """Each kind of damage once on each saved state (the rest of the execution is the input's own)."""
        return [
            Script().below(_VARIANTS, variant).between(1, 4, 1).below(_EDITS, edit).data
            for variant in range(_VARIANTS)
            for edit in range(_EDITS)
        ]
