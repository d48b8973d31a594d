"""What a guest's kernel log may not say: one definition for the tests, the benchmarks and the soak.

The guest's /init prints the kernel's warnings and worse (levels 0-4) as ``VHOST_IOMMU_KLOG`` lines when
its job ends. Some of them are harmless under TCG: a loaded host makes the boot-time timer check print
"..MP-BIOS bug: 8254 timer not connected to IO-APIC", so the markers of real trouble that the kernel
prints in capitals ("BUG:", "Oops", "WARNING: CPU") are matched with their case.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

KLOG_PREFIX = "VHOST_IOMMU_KLOG "

STALLS = re.compile(
    r"(?i:soft lockup|hard lockup|rcu\S*\s.*(?:stall|self-detected)|hung_task|blocked for more than)"
)
"""The guest's CPU was held too long: the driver spins in __viommu_sync_req with interrupts off while it
waits for the device, so a slow back-end shows up as these."""

KERNEL_TROUBLE = re.compile(
    STALLS.pattern + r"|Oops|BUG:|(?i:general protection)|Call Trace|Kernel panic|WARNING: CPU"
)
"""Stalls and worse: what a healthy guest kernel never logs."""


def klog_message(line: str) -> str | None:
    """The kernel message a ``VHOST_IOMMU_KLOG`` console line reports; None for any other line."""
    start = line.find(KLOG_PREFIX)
    return None if start < 0 else line[start + len(KLOG_PREFIX) :]


def kernel_trouble(lines: Iterable[str]) -> list[str]:
    """The lines that show trouble (whole lines, as given)."""
    return [line for line in lines if KERNEL_TROUBLE.search(line)]
