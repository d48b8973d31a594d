"""Translated DMA in-process: page translations per second and DMA throughput, translated against bypass.

A device (default topology) with endpoint 0x20 attached to a domain of 4 KiB mappings (see ``build``),
and endpoint 0x21 attached to a bypass domain, whose DMA reaches guest-physical addresses directly, over
64 MiB of memfd guest RAM. Measured on one
thread (one core), in rounds; each figure is the median, min and max over the rounds:

  translate      page translations per second of the compiled translation kernel (``jit/dma.translate``,
                 one call per 1 MiB range: 256 pages over 256 scattered mappings, guard taken per call)
  copy N         DmaPort.copy of N bytes (4 KiB, 64 KiB, 1 MiB): translated (source and destination
                 through 4 KiB mappings onto the pages the bypass copy uses, a chunk of a page at a time,
                 the guard per chunk), bypassed (the same chunks and checks with the identity function),
                 what translation adds to the bypass copy's time, and translated onto pages scattered
                 over the guest's RAM in random order (the memory locality of a guest's scattered buffers)

The targets of issue 11: >= 10 M page translations/s on one core, and translation adds <= 10% to a
64 KiB transfer over 4 KiB pages.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vhost_iommu.device import IommuDevice
from vhost_iommu.device.dma import DmaPort
from vhost_iommu.device.layout import (
    ATTACH_F_BYPASS,
    MAP_F_READ,
    MAP_F_WRITE,
    TAIL_SIZE,
    Access,
    Status,
    encode_attach,
    encode_map,
)
from vhost_iommu.harness.guest_ram import GuestRam
from vhost_iommu.jit import dma as kernel
from vhost_iommu.jit import warm_up
from vhost_iommu.memory import FlatRegions

PAGE = 4096
TRANSLATED_EP = 0x20
BYPASS_EP = 0x21
MAX_TRANSFER = 1 << 20
SRC_IOVA = 0x1000_0000
DST_IOVA = 0x2000_0000
SCATTERED_SRC = 0x3000_0000
SCATTERED_DST = 0x4000_0000
SIZES = (4 << 10, 64 << 10, 1 << 20)


@dataclass(frozen=True, slots=True)
class Spread:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))

    def format(self, scale: float = 1.0, digits: int = 2) -> str:
        return (
            f"{self.median / scale:.{digits}f} ({self.low / scale:.{digits}f}-{self.high / scale:.{digits}f})"
        )


def _send(device: IommuDevice, request: bytes) -> None:
    response, _used = device.handle_request(request, TAIL_SIZE)
    assert response[0] == Status.OK, response


def build(ram: GuestRam, seed: int) -> tuple[IommuDevice, int, int]:
    """The device, and the guest-physical addresses of the bypass endpoint's source and destination.

    The translated endpoint's SRC_IOVA and DST_IOVA ranges are 4 KiB mappings onto those same pages, in
    order (the bytes moved and the memory touched are the bypass copy's: the difference is translation);
    its SCATTERED_SRC and SCATTERED_DST ranges map onto pages of the whole RAM in random order."""
    device = IommuDevice()
    device.set_features(device.device_features())
    _send(device, encode_attach(1, TRANSLATED_EP))
    _send(device, encode_attach(2, BYPASS_EP, ATTACH_F_BYPASS))
    bypass_src, bypass_dst = ram.alloc(MAX_TRANSFER, PAGE), ram.alloc(MAX_TRANSFER, PAGE)
    pages = MAX_TRANSFER // PAGE
    scattered = np.random.default_rng(seed).permutation(ram.size // PAGE)[: 2 * pages] * PAGE
    targets = [
        (SRC_IOVA, [bypass_src + i * PAGE for i in range(pages)]),
        (DST_IOVA, [bypass_dst + i * PAGE for i in range(pages)]),
        (SCATTERED_SRC, [int(gpa) for gpa in scattered[:pages]]),
        (SCATTERED_DST, [int(gpa) for gpa in scattered[pages:]]),
    ]
    for base, gpas in targets:
        for page, gpa in enumerate(gpas):
            iova = base + page * PAGE
            _send(device, encode_map(1, iova, iova + PAGE - 1, gpa, MAP_F_READ | MAP_F_WRITE))
    return device, bypass_src, bypass_dst


def timed(*runs: Callable[[], int], seconds: float) -> list[float]:
    """Units per second of this thread's CPU time of each of ``runs`` (each returns the units it did):
    one core's rate, whatever else the machine runs. The runs take turns in short slices for about
    ``seconds`` in all, so that a change in the machine's load hits each alike."""
    done = [0] * len(runs)
    spent = [0.0] * len(runs)
    while sum(spent) < seconds:
        for index, run in enumerate(runs):
            began = time.thread_time()
            for _ in range(8):
                done[index] += run()
            spent[index] += time.thread_time() - began
    return [units / elapsed for units, elapsed in zip(done, spent, strict=True)]


def translations_per_second(port: DmaPort, seconds: float) -> float:
    pages = MAX_TRANSFER // PAGE
    phys = np.empty(pages, np.uint64)
    lengths = np.empty(pages, np.uint64)
    out = np.zeros(kernel.OUT_WORDS, np.uint64)
    arguments = (
        port.device.translation_guard.words,
        *port._state(),  # the same arguments DmaPort.translate passes
        np.uint64(SCATTERED_SRC),  # one segment per page
        np.uint64(MAX_TRANSFER),
        int(Access.READ),
        phys,
        lengths,
        out,
        np.zeros(kernel.C_WORDS, np.uint64),
    )

    def run() -> int:
        count = kernel.translate(*arguments)
        assert count == pages, count
        return pages

    [rate] = timed(run, seconds=seconds)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7, help="rounds per figure (median, min, max shown)")
    parser.add_argument("--seconds", type=float, default=0.2, help="time per figure per round")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.rounds < 1 or args.seconds <= 0:
        parser.error("--rounds must be at least 1 and --seconds positive")

    began = time.perf_counter()
    warm_up()
    print(f"warm_up() (kernels compiled or loaded from numba's cache): {time.perf_counter() - began:.2f} s")
    with GuestRam(64 << 20) as ram:
        device, bypass_src, bypass_dst = build(ram, args.seed)
        guest_memory = ram.guest_memory()
        memory: FlatRegions = guest_memory.flat_tables()
        translated = DmaPort(device, TRANSLATED_EP)
        bypassed = DmaPort(device, BYPASS_EP)

        def copy(port: DmaPort, src: int, dst: int, size: int) -> Callable[[], int]:
            def run() -> int:
                result = port.copy(memory, src, dst, size)
                assert result.ok and result.done_bytes == size, result
                return size

            return run

        translate_rates: list[float] = []
        kinds = ("translated", "bypass", "scattered")
        rates: dict[tuple[int, str], list[float]] = {(size, kind): [] for size in SIZES for kind in kinds}
        added: dict[int, list[float]] = {size: [] for size in SIZES}
        for _round in range(args.rounds):
            translate_rates.append(translations_per_second(translated, args.seconds))
            for size in SIZES:
                with_translation, with_bypass, scattered = timed(
                    copy(translated, SRC_IOVA, DST_IOVA, size),
                    copy(bypassed, bypass_src, bypass_dst, size),
                    copy(translated, SCATTERED_SRC, SCATTERED_DST, size),
                    seconds=3 * args.seconds,
                )
                rates[size, "translated"].append(with_translation)
                rates[size, "bypass"].append(with_bypass)
                rates[size, "scattered"].append(scattered)
                added[size].append(100.0 * (with_bypass / with_translation - 1.0))
        guest_memory.close()

    load = os.getloadavg()[0]
    print(
        f"translated DMA on one thread, per second of its CPU time, {args.rounds} rounds of "
        f"{args.seconds} s: median (min-max); load average {load:.1f}"
    )
    print(
        f"  page translations/s (translate kernel, 1 MiB over 4 KiB mappings): "
        f"{Spread.of(translate_rates).format(1e6)} M"
    )
    print("  copies, GB/s: translated through 4 KiB mappings onto the bypass copy's pages, bypass, what")
    print("  translation adds to the bypass copy's time, and translated onto pages scattered over the RAM")
    columns = ("transfer", "translated", "bypass", "adds %", "scattered pages")
    print("  " + "  ".join(f"{column:>18}" for column in columns))
    for size in SIZES:
        label = f"{size >> 10} KiB" if size < 1 << 20 else f"{size >> 20} MiB"
        cells = (
            label,
            Spread.of(rates[size, "translated"]).format(1e9),
            Spread.of(rates[size, "bypass"]).format(1e9),
            Spread.of(added[size]).format(1, 1),
            Spread.of(rates[size, "scattered"]).format(1e9),
        )
        print("  " + "  ".join(f"{cell:>18}" for cell in cells))


if __name__ == "__main__":
    main()
