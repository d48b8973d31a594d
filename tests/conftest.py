from collections.abc import Iterator

import pytest

pytest_plugins = ["vhost_iommu.harness.pytest_plugin"]


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels() -> Iterator[None]:
    """Compile (or load from numba's cache) every kernel once, before any test: on a fresh tree a kernel
    compiled inside a back-end thread would stall that test's requests past the harness's timeouts."""
    from vhost_iommu.jit import warm_up

    warm_up()
    yield
