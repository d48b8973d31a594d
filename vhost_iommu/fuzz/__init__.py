"""Fuzz targets for the code that reads hostile input: the codecs, guest memory, virtqueues, requests.

``scripts/fuzz TARGET [--runs N] [--seconds S]`` runs one (see ``docs/fuzzing.md``); the test suite runs
each for a moment (``tests/test_fuzz_smoke.py``). :data:`TARGETS` maps names to target classes.
"""

from __future__ import annotations

from vhost_iommu.fuzz.backend import BackendTarget
from vhost_iommu.fuzz.blk import BlkTarget
from vhost_iommu.fuzz.chains import ChainsTarget
from vhost_iommu.fuzz.codec import CodecTarget
from vhost_iommu.fuzz.engine import Choices, Finding, FuzzFailure, FuzzReport, FuzzTarget, Hang, fuzz, replay
from vhost_iommu.fuzz.memory import MemoryTarget
from vhost_iommu.fuzz.requests import RequestsTarget
from vhost_iommu.fuzz.server import ServerTarget
from vhost_iommu.fuzz.snapshot import SnapshotTarget
from vhost_iommu.fuzz.vfio_codec import VfioCodecTarget
from vhost_iommu.fuzz.vfio_server import VfioServerTarget

TARGETS: dict[str, type[FuzzTarget]] = {
    CodecTarget.name: CodecTarget,
    MemoryTarget.name: MemoryTarget,
    ChainsTarget.name: ChainsTarget,
    RequestsTarget.name: RequestsTarget,
    BackendTarget.name: BackendTarget,
    ServerTarget.name: ServerTarget,
    SnapshotTarget.name: SnapshotTarget,
    VfioCodecTarget.name: VfioCodecTarget,
    VfioServerTarget.name: VfioServerTarget,
    BlkTarget.name: BlkTarget,
}

__all__ = [
    "TARGETS",
    "Choices",
    "Finding",
    "FuzzFailure",
    "FuzzReport",
    "FuzzTarget",
    "Hang",
    "fuzz",
    "replay",
]
