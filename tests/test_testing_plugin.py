"""The driver-testing plugin (vhost_iommu.testing) without a guest: its strict conformance check fails a
test whose driver broke a statement unless the test allows it, and the shell framing of guest commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vhost_iommu.testing import GuestShell

pytest_plugins = ["pytester"]

# A stand-in for the `driver` fixture: the plugin only asks the control channel for reports.
INNER = """
import pytest
from vhost_iommu.testing import DriverLab


class FakeControl:
    def call(self, command, **arguments):
        if command == "connections":
            return [{"connection": 1}]
        assert command == "conformance" and arguments == {"connection": 1}
        return {"enabled": True, "total": 3, "counts": {"map-overlap": 2, "head-reserved": 1},
                "first": {"map-overlap": "MAP of 0x0-0xfff over a mapping of domain 1"}}


@pytest.fixture
def driver():
    return DriverLab(lab=None, guest=None, control=FakeControl())


def test_strict(driver):
    pass


@pytest.mark.allow_violations("map-overlap")
def test_allows_one(driver):
    pass


@pytest.mark.allow_violations("map-overlap", "head-reserved")
def test_allows_both(driver):
    pass


@pytest.mark.allow_violations()
def test_allows_all(driver):
    pass


def test_without_the_fixture():
    pass


def test_failing_on_its_own(driver):
    assert False, "the test's own failure"


@pytest.mark.allow_violations("no-such-statement")
def test_misspelt(driver):
    pass
"""


def test_strict_mode_fails_tests_whose_driver_broke_statements(pytester: pytest.Pytester) -> None:
    # Loaded from a conftest.py, as docs/toolkit.md says: its marker is then known when tests are collected.
    pytester.makeconftest('pytest_plugins = ["vhost_iommu.testing"]')
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:asyncio", "-rA")
    result.assert_outcomes(passed=3, failed=4)
    output = result.stdout.str()
    assert re.search(r"FAILED test_inner.py::test_strict - Failed: the driver broke", output)
    assert "map-overlap x2 (MAP of 0x0-0xfff over a mapping of domain 1)" in output
    assert re.search(r"FAILED test_inner.py::test_allows_one - Failed: the driver broke", output)
    assert "the test's own failure" in output
    assert "unknown statement(s) ['no-such-statement']" in output
    assert "PASSED test_inner.py::test_allows_both" in output
    assert "PASSED test_inner.py::test_allows_all" in output
    assert "Unknown pytest.mark" not in output


class FakeSession:
    """What GuestShell needs of a GuestSession: send, expect and the console lines."""

    def __init__(self, output: list[str], rc: int) -> None:
        self.sent: list[str] = []
        self.output = output
        self.rc = rc
        self.queue: list[str] = []
        self.run = type("Run", (), {"lines": []})()

    def send(self, line: str) -> None:
        self.sent.append(line)
        number = re.search(r"BEGIN id=(\d+)", line)
        assert number is not None
        # The console echoes the typed line first (after the prompt), then the shell's output.
        self.queue += [f"/ # {line.splitlines()[0]}", "> " + line.splitlines()[1]]
        self.queue += [f"VHOST_IOMMU_CMD_BEGIN id={number[1]}", *self.output]
        self.queue += [f"VHOST_IOMMU_CMD_END id={number[1]} rc={self.rc}", "/ # "]

    def expect(self, pattern: str, timeout: float) -> re.Match[str]:
        while self.queue:
            line = self.queue.pop(0)
            self.run.lines.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no line matches {pattern}")


def test_guest_commands_are_framed_by_markers() -> None:
    session = FakeSession(["one", "two"], rc=3)
    shell = GuestShell(session)  # type: ignore[arg-type]
    result = shell.run("ls; false")
    assert result.rc == 3 and result.lines == ["one", "two"]
    assert "{ ls; false\n} 2>&1" in session.sent[0]
    with pytest.raises(AssertionError, match="failed \\(rc=3\\)"):
        shell.check("ls")
    assert "id=2" in session.sent[1]
    with pytest.raises(ValueError):
        shell.run("two\nlines")


def test_plugin_docstring_example_names_real_fixtures() -> None:
    import vhost_iommu.testing as testing

    assert "driver" in testing.__all__ and "driver_lab_config" in testing.__all__
    assert Path(testing.__file__).name == "testing.py"
