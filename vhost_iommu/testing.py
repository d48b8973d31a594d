"""A pytest plugin for driver tests: a Linux guest under QEMU against vhost-iommu, in a few lines a test.

Load it with ``pytest_plugins = ["vhost_iommu.testing"]`` (in a ``conftest.py`` or a test module). Then::

    def test_vfio_binds(driver: DriverLab) -> None:
        result = driver.guest.run("echo 0000:00:04.0 > /sys/bus/pci/devices/0000:00:04.0/driver/unbind")
        assert result.rc == 0
        assert driver.control.call("endpoints")[0]["domain"] is not None
        driver.control.call("fault", endpoint=0x20, address=0xDEAD000)
        driver.guest.wait_until("dmesg | grep -q 'fault from EP 32'")

Fixtures:

* ``driver_lab_config``: the :class:`~vhost_iommu.lab.LabConfig` the guest boots with. The default boots
  the guest's ``shell`` job with the conformance checker on. Override it in a module or ``conftest.py``
  (another topology, endpoints, kernel arguments); keep ``job="shell"`` for ``driver.guest.run``.
* ``driver``: a booted guest at its shell prompt, as a :class:`DriverLab`: ``driver.guest`` runs commands
  and reads their output, ``driver.control`` is a :class:`~vhost_iommu.control.ControlClient` on the
  back-end's control channel (docs/control.md), ``driver.lab`` the :class:`~vhost_iommu.lab.Lab`.

Strict conformance: after a test that used ``driver`` passes, the plugin asks the back-end which
driver-normative statements of the spec the guest's driver broke (:mod:`vhost_iommu.conformance`) and
fails the test if any was, naming each statement and its first occurrence. A test that breaks rules on
purpose, or runs a driver known to, says which ones with ``@pytest.mark.allow_violations("map-overlap")``
(``@pytest.mark.allow_violations()`` with no names allows all).

Everything the fixture starts (QEMU, the back-end's thread, sockets, files) is stopped when the test ends.
"""

from __future__ import annotations

import itertools
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from vhost_iommu.conformance import STATEMENTS
from vhost_iommu.control import ControlClient
from vhost_iommu.lab import TESTDEV, Lab, LabConfig
from vhost_iommu.provision.boot import GuestSession

__all__ = ["CommandResult", "DriverLab", "GuestShell", "driver", "driver_lab_config"]

BOOT_TIMEOUT = 240.0
COMMAND_TIMEOUT = 60.0
_SHELL_READY = "VHOST_IOMMU_SHELL"
_MARK = "VHOST_IOMMU_CMD"


@dataclass(frozen=True)
class CommandResult:
    """What one command printed on the guest's console (stdout and stderr) and its exit status."""

    command: str
    rc: int
    lines: list[str]

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


class GuestShell:
    """Runs commands on the guest's console shell (the ``shell`` job of guest/init).

    Each command is framed by two marker lines the shell prints, ``VHOST_IOMMU_CMD_BEGIN id=N`` and
    ``VHOST_IOMMU_CMD_END id=N rc=S``; what comes between is the command's output. The console echoes
    the typed line too, but there the markers follow the prompt and the ``$?`` is not expanded, so
    neither anchored pattern matches it. Kernel messages stay off the console (guest/init lowers the
    console log level), so they do not interleave; ``dmesg`` reads them.
    """

    def __init__(self, session: GuestSession) -> None:
        self.session = session
        self._ids = itertools.count(1)

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT) -> CommandResult:
        """Run ``command`` (one line of sh) and wait for it; GuestTimeout if it does not finish in time."""
        if "\n" in command or "\r" in command:
            raise ValueError("one command line at a time (join several with ';')")
        number = next(self._ids)
        # `{ ...; }` keeps the command's own `;`s and redirections inside the frame.
        self.session.send(
            f"echo {_MARK}_BEGIN id={number}; {{ {command}\n}} 2>&1; echo {_MARK}_END id={number} rc=$?"
        )
        self.session.expect(rf"^{_MARK}_BEGIN id={number}$", timeout)
        first = len(self.session.run.lines)
        end = self.session.expect(rf"^{_MARK}_END id={number} rc=(\d+)$", timeout)
        lines = self.session.run.lines[first:-1]
        return CommandResult(command, int(end[1]), lines)

    def check(self, command: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run ``command``; its output, or AssertionError with the output if it failed."""
        result = self.run(command, timeout)
        assert result.rc == 0, f"guest command {command!r} failed (rc={result.rc}):\n{result.output}"
        return result.output

    def wait_until(self, condition: str, timeout: float = COMMAND_TIMEOUT) -> None:
        """Wait until the guest shell ``condition`` succeeds (a fault line in ``dmesg``, an interrupt
        count that moved): it is tried again every 20 ms in the guest; GuestTimeout after ``timeout``."""
        # Polled: a guest shell cannot block on a kernel log line (busybox dmesg has no --follow) or on a
        # counter in /proc.
        self.check(f"until {condition}; do usleep 20000; done", timeout)

    @property
    def log(self) -> list[str]:
        """Every console line so far, the boot included."""
        return self.session.run.lines


@dataclass
class DriverLab:
    """A booted guest and the back-end it talks to, for one test."""

    lab: Lab
    guest: GuestShell
    control: ControlClient

    def bind_vfio(self, device: str = TESTDEV) -> None:
        """Bind the guest's PCI function ``device`` to vfio-pci (binding is what makes Linux configure its
        endpoint's IOMMU: PROBE, then ATTACH) and check that it took."""
        self.guest.check(f"echo vfio-pci > /sys/bus/pci/devices/{device}/driver_override")
        self.guest.check(f"echo {device} > /sys/bus/pci/drivers_probe")
        assert self.guest.check(f"basename $(readlink /sys/bus/pci/devices/{device}/driver)") == "vfio-pci"

    def violations(self) -> dict[str, dict[str, Any]]:
        """Per connection still served: the conformance report (docs/toolkit.md)."""
        reports = {}
        for connection in self.control.call("connections"):
            number = connection["connection"]
            reports[str(number)] = self.control.call("conformance", connection=number)
        return reports


@pytest.fixture
def driver_lab_config() -> LabConfig:
    return LabConfig(job="shell", conformance=True)


@pytest.fixture
def driver(driver_lab_config: LabConfig) -> Iterator[DriverLab]:
    with Lab(driver_lab_config) as lab:
        lab.guest.expect(_SHELL_READY, BOOT_TIMEOUT)
        if lab.control_path is None:
            raise RuntimeError(
                "driver_lab_config has control off: the driver fixture needs the control channel"
            )
        with ControlClient(str(lab.control_path)) as control:
            yield DriverLab(lab, GuestShell(lab.guest), control)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "allow_violations(*statements): driver-normative statements (vhost_iommu.conformance.STATEMENTS) "
        "the driver may break in this test; none named: all",
    )


def _allowed(item: pytest.Item) -> set[str] | None:
    """The statements this test allows (None: all)."""
    allowed: set[str] = set()
    for marker in item.iter_markers("allow_violations"):
        if not marker.args:
            return None
        unknown = [name for name in marker.args if name not in STATEMENTS]
        if unknown:
            raise pytest.UsageError(
                f"allow_violations: unknown statement(s) {unknown}; see {sorted(STATEMENTS)}"
            )
        allowed.update(marker.args)
    return allowed


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    # After the test body passed (an exception from it propagates through the `yield` unchanged): a
    # failure raised here is the test's failure, not a teardown error.
    result = yield
    funcargs: dict[str, Any] = getattr(item, "funcargs", {})
    lab = funcargs.get("driver")
    if not isinstance(lab, DriverLab):
        return result
    allowed = _allowed(item)
    if allowed is None:
        return result
    broken = []
    for connection, report in lab.violations().items():
        for statement, count in report["counts"].items():
            if statement not in allowed:
                text = STATEMENTS[statement].text
                first = report["first"].get(statement, "")
                broken.append(f"connection {connection}: {statement} x{count} ({first})\n    spec: {text}")
    if broken:
        pytest.fail(
            "the driver broke driver-normative statements of the virtio-iommu spec:\n  "
            + "\n  ".join(broken)
            + "\n(allow them with @pytest.mark.allow_violations(...) if intended)",
            pytrace=False,
        )
    return result
