from collections.abc import Iterator

import pytest

from vhost_iommu.provision.guest import DEFAULT_SUITE, NEWEST, SUITE_VARIABLE

# vhost_iommu.testing here too (test modules name it as well), so that its allow_violations marker is
# registered before any module that uses it is imported.
pytest_plugins = ["vhost_iommu.harness.pytest_plugin", "vhost_iommu.testing"]


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels() -> Iterator[None]:
    """Compile (or load from numba's cache) every kernel once, before any test: on a fresh tree a kernel
    compiled inside a back-end thread would stall that test's requests past the harness's timeouts."""
    from vhost_iommu.jit import warm_up

    warm_up()
    yield


#: The guest kernels CI covers: trixie's 6.12 and Debian's newest (7.x); scripts/test builds both.
GUEST_SUITES = (DEFAULT_SUITE, NEWEST)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test marked ``every_kernel`` runs once per guest kernel of GUEST_SUITES, grouped by kernel."""
    if metafunc.definition.get_closest_marker("every_kernel") is not None:
        metafunc.parametrize("guest_suite", GUEST_SUITES, indirect=True, scope="module")


@pytest.fixture(scope="module", autouse=True)
def guest_suite(request: pytest.FixtureRequest) -> Iterator[str]:
    """The Debian suite of the kernel every guest of this test boots (trixie unless the test is marked
    ``every_kernel``): set where everything that boots a guest looks (provision.guest.default_suite), so
    the labs, the keeper and the scripts the tests run all boot the same kernel."""
    suite: str = getattr(request, "param", DEFAULT_SUITE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SUITE_VARIABLE, suite)
        yield suite
