"""The kernels' interpreted twins (jit/interpreted.py: what serves while a cold start compiles) answer as
the compiled kernels do: the same requests on two devices, one through each, give the same statuses,
mappings, history and DMA bytes; and the compiled kernels then take over the twins' arrays as they are."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest

from vhost_iommu.device import IommuDevice
from vhost_iommu.device.dma import DmaPort
from vhost_iommu.device.layout import (
    MAP_F_READ,
    MAP_F_WRITE,
    encode_attach,
    encode_detach,
    encode_map,
    encode_unmap,
)
from vhost_iommu.jit import interpreted, tables, warm_up
from vhost_iommu.memory import FlatRegions

PAGE = 0x1000
RAM_PAGES = 64
ENDPOINT = 0x20


@pytest.fixture(autouse=True)
def compiled_afterwards() -> Iterator[None]:
    warm_up()  # the compiled side must not compile inside a measurement of the other
    yield
    interpreted.set_interpreting(False)


def device() -> IommuDevice:
    new = IommuDevice()
    new.set_features(new.device_features())
    return new


def requests(seed: int, count: int) -> list[bytes]:
    """A driver's mix: attaches, maps of runs of pages (some overlapping), unmaps (some splitting),
    detaches; over three domains."""
    draw = random.Random(seed)
    mix = []
    for _ in range(count):
        domain = draw.randint(1, 3)
        page = draw.randint(0, 4000)
        pages = draw.randint(1, 40)
        start, last = page * PAGE, (page + pages) * PAGE - 1
        kind = draw.random()
        if kind < 0.05:
            mix.append(encode_attach(domain, ENDPOINT + draw.randint(0, 2)))
        elif kind < 0.65:
            mix.append(encode_map(domain, start, last, draw.randint(0, RAM_PAGES) * PAGE, MAP_F_READ))
        elif kind < 0.97:
            mix.append(encode_unmap(domain, start, last + draw.randint(0, 1) * PAGE * 3))
        else:
            mix.append(encode_detach(domain, ENDPOINT + draw.randint(0, 2)))
    return mix


def serve(mix: list[bytes], *, twins: bool) -> tuple[list[tuple[bytes, int]], IommuDevice]:
    interpreted.set_interpreting(twins)
    served = device()
    answers = [served.handle_request(request, 4) for request in mix]
    interpreted.set_interpreting(False)
    return answers, served


def mappings(served: IommuDevice) -> list[list[tuple[int, int, int, int]]]:
    return [[tuple(mapping) for mapping in served.store.mappings(domain)] for domain in (1, 2, 3)]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_requests_get_the_compiled_kernels_answers(seed: int) -> None:
    mix = requests(seed, 600)
    twin_answers, twin_device = serve(mix, twins=True)
    compiled_answers, compiled_device = serve(mix, twins=False)
    assert twin_answers == compiled_answers
    assert mappings(twin_device) == mappings(compiled_device)
    assert twin_device.request_counts == compiled_device.request_counts
    twin_history = [replace(record, ticks=0) for record in twin_device.history.records()]
    compiled_history = [replace(record, ticks=0) for record in compiled_device.history.records()]
    assert twin_history == compiled_history and twin_history
    assert isinstance(twin_device.store, tables.MappingTable)
    twin_device.store.verify()  # the compiled verifier finds every tree, list and counter consistent


def test_the_compiled_kernels_go_on_from_the_twins_tables() -> None:
    mix = requests(4, 400)
    _first, handed_over = serve(mix[:200], twins=True)
    rest = [handed_over.handle_request(request, 4) for request in mix[200:]]  # compiled from here
    reference_answers, reference = serve(mix, twins=False)
    assert rest == reference_answers[200:]
    assert mappings(handed_over) == mappings(reference)
    assert [replace(r, ticks=0) for r in handed_over.history.records()] == [
        replace(r, ticks=0) for r in reference.history.records()
    ]


def ram_device(twins: bool) -> tuple[IommuDevice, DmaPort, FlatRegions, np.ndarray]:
    interpreted.set_interpreting(twins)
    served = device()
    assert served.handle_request(encode_attach(1, ENDPOINT), 4)[0][0] == 0
    ram = np.zeros(RAM_PAGES * PAGE, np.uint8)
    # Scattered: IOVA page n -> guest page (7 * n) % RAM_PAGES, two runs with a hole between them.
    for page in [*range(0, 12), *range(14, 20)]:
        phys = (7 * page) % RAM_PAGES * PAGE
        request = encode_map(1, page * PAGE, page * PAGE + PAGE - 1, phys, MAP_F_READ | MAP_F_WRITE)
        assert served.handle_request(request, 4)[0][0] == 0
    memory = FlatRegions(
        np.zeros(1, np.uint64),
        np.full(1, ram.size - 1, np.uint64),
        np.full(1, ram.ctypes.data, np.uint64),
        (ram,),
    )
    return served, DmaPort(served, ENDPOINT), memory, ram


@pytest.mark.parametrize("twins", [True, False], ids=["interpreted", "compiled"])
def test_dma_through_the_twins_moves_the_same_bytes_and_faults_alike(twins: bool) -> None:
    _served, port, memory, ram = ram_device(twins)
    payload = np.random.default_rng(5).integers(0, 256, 4 * PAGE, np.uint8)
    assert port.write(memory, 100, payload).ok
    assert port.copy(memory, 100, 6 * PAGE + 9, 4 * PAGE).ok
    out = np.zeros(4 * PAGE, np.uint8)
    assert port.read(memory, 6 * PAGE + 9, out).ok and bytes(out) == bytes(payload)
    assert port.fill(memory, 15 * PAGE, PAGE, 0xA5).ok
    compared = port.compare(memory, 100, 6 * PAGE + 9, 4 * PAGE)
    assert compared.ok and compared.mismatch_offset is None
    faulted = port.fill(memory, 10 * PAGE, 4 * PAGE, 0x5A)  # runs into the hole at pages 12-13
    assert faulted.done_bytes == 2 * PAGE and faulted.fault is not None
    assert faulted.fault.address == 12 * PAGE
    expected = ram_after_the_same_dma()
    assert bytes(ram) == expected


def ram_after_the_same_dma() -> bytes:
    """The RAM the compiled kernels leave after the sequence of the test above."""
    interpreted.set_interpreting(False)
    _served, port, memory, ram = ram_device(False)
    payload = np.random.default_rng(5).integers(0, 256, 4 * PAGE, np.uint8)
    port.write(memory, 100, payload)
    port.copy(memory, 100, 6 * PAGE + 9, 4 * PAGE)
    port.fill(memory, 15 * PAGE, PAGE, 0xA5)
    port.fill(memory, 10 * PAGE, 4 * PAGE, 0x5A)
    return bytes(ram)
