from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vhost_iommu.provision.arch import ARCH_VARIABLE, ARCHES, ARM64, X86_64
from vhost_iommu.provision.guest import DEFAULT_SUITE, NEWEST, SUITE_VARIABLE, GuestImage, ensure_guest
from vhost_iommu.provision.qemu_build import ensure_qemu

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


@dataclass(frozen=True)
class GuestKind:
    """One guest CI boots: an architecture and the Debian suite of its kernel."""

    arch: str
    suite: str
    id: str


#: The x86 guest kernels CI covers: trixie's 6.12 and Debian's newest (7.x); scripts/test builds both.
GUEST_SUITES = (DEFAULT_SUITE, NEWEST)
X86_GUESTS = tuple(GuestKind(X86_64.name, suite, suite) for suite in GUEST_SUITES)
#: The Arm64 guest (trixie's 6.12 on QEMU's virt machine) of the tests marked ``every_arch``.
ARM64_GUEST = GuestKind(ARM64.name, DEFAULT_SUITE, ARM64.name)
DEFAULT_GUEST = X86_GUESTS[0]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test marked ``every_kernel`` runs once per x86 guest kernel of GUEST_SUITES, one marked
    ``every_arch`` on the Arm64 guest as well, one marked ``arm64_only`` on the Arm64 guest alone; grouped
    by guest (module scope: one guest's tests together)."""
    kinds = [DEFAULT_GUEST]
    if metafunc.definition.get_closest_marker("every_kernel") is not None:
        kinds = list(X86_GUESTS)
    if metafunc.definition.get_closest_marker("every_arch") is not None:
        kinds.append(ARM64_GUEST)
    if metafunc.definition.get_closest_marker("arm64_only") is not None:
        kinds = [ARM64_GUEST]
    if kinds != [DEFAULT_GUEST]:
        metafunc.parametrize(
            "guest_kind", kinds, ids=[kind.id for kind in kinds], indirect=True, scope="module"
        )


@pytest.fixture(scope="module", autouse=True)
def guest_kind(request: pytest.FixtureRequest) -> Iterator[GuestKind]:
    """The guest every test here boots (x86 trixie unless the test is marked ``every_kernel`` or
    ``every_arch``): set where everything that boots a guest looks ($VHOST_IOMMU_GUEST_SUITE and
    $VHOST_IOMMU_GUEST_ARCH: provision.guest, provision.qemu_build, the lab's default topology), so the
    labs, the keeper and the scripts the tests run all boot the same guest."""
    kind: GuestKind = getattr(request, "param", DEFAULT_GUEST)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SUITE_VARIABLE, kind.suite)
        patch.setenv(ARCH_VARIABLE, kind.arch)
        yield kind


@pytest.fixture(scope="module")
def guest_suite(guest_kind: GuestKind) -> str:
    """The Debian suite of this module's guest kernel."""
    return guest_kind.suite


@pytest.fixture(scope="module")
def guest_arch(guest_kind: GuestKind) -> str:
    """The architecture of this module's guest ("x86_64" or "arm64")."""
    return guest_kind.arch


@pytest.fixture(scope="module")
def qemu(guest_kind: GuestKind) -> Path:
    """The QEMU for this module's guest (built into the cache on first use)."""
    return ensure_qemu(ARCHES[guest_kind.arch])


@pytest.fixture(scope="module")
def guest_image(guest_kind: GuestKind) -> GuestImage:
    """This module's guest kernel and initramfs (built into the cache on first use)."""
    return ensure_guest(suite=guest_kind.suite, arch=ARCHES[guest_kind.arch])
