"""Device states with many mappings, for tests and benchmarks: loaded straight into the mapping table,
far quicker than as many MAP requests."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from vhost_iommu.device.core import IommuDevice
from vhost_iommu.jit.bulk import load_sorted
from vhost_iommu.jit.tables import OK, MappingTable

PAGE = 0x1000


def add_mappings(device: IommuDevice, domain: int, start: int, count: int) -> npt.NDArray[np.uint64]:
    """``count`` one-page read-write identity mappings in ``domain`` (which must exist), on every other
    page from ``start`` up, so that no two merge or touch; their start addresses."""
    pages = np.arange(count, dtype=np.uint64) * np.uint64(2 * PAGE) + np.uint64(start)
    table = device.store
    assert isinstance(table, MappingTable)
    flags = np.full(count, 3, np.uint64)
    offsets = np.array([0, count], np.int64)
    status = load_sorted(
        table, np.array([domain], np.int64), offsets, pages, pages + np.uint64(PAGE - 1), pages, flags
    )
    assert status == OK, status
    device.domain_table.mapping_count[domain - device.domain_table.first] += count
    return pages
