"""A short run of every fuzz target (the long campaigns are ``scripts/fuzz``), and the engine's own checks:
that it does report a crash, a hang, an fd leak and a failed invariant, and replays saved inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any

import pytest

from vhost_iommu.device.layout import RequestType
from vhost_iommu.endpoints.dma_engine import EngineError, StatusBit
from vhost_iommu.fuzz import TARGETS, Choices, FuzzFailure, FuzzTarget, Hang, fuzz, replay
from vhost_iommu.fuzz.codec import seed_cases
from vhost_iommu.fuzz.engine import fd_is_open
from vhost_iommu.fuzz.server import SETUP_MESSAGE_KINDS
from vhost_iommu.fuzz.vfio_server import STEP_KINDS
from vhost_iommu.protocol import FrontendRequest
from vhost_iommu.vfio_user import COMMAND_SPECS

REPO = Path(__file__).resolve().parent.parent

# Executions per target in the suite after its seeds (which reach each message type, request type or kind of
# damage the target knows, read from the code's own tables): mutated inputs, about a second's worth.
SMOKE_RUNS = {
    "codec": 1500,
    "memory": 400,
    "chains": 500,
    "requests": 300,
    "backend": 300,
    "server": 30,
    "snapshot": 400,
    "vfio-codec": 1000,
    "vfio-server": 30,
    "blk": 300,
}


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_target_smoke(name: str, tmp_path: Path, fd_leak_check: None) -> None:
    target = TARGETS[name]()
    runs = len(target.seeds()) + SMOKE_RUNS[name]
    report = fuzz(target, runs=runs, seed=1, artifact_dir=str(tmp_path), leak_every=64)
    assert report.executions == runs
    assert not report.findings, [f"{f.kind}: {f.message}" for f in report.findings]
    assert report.fds_after == report.fds_before
    assert report.features > 0  # the target did something observable


def _seed_features(target: FuzzTarget) -> set[Hashable]:
    """Every outcome feature of the target's seeds (each run once, without the driver)."""
    target.warm_up()
    target.setup()
    try:
        return {feature for seed in target.seeds() for feature in target.run(Choices(seed)) or ()}
    finally:
        target.teardown()


def test_codec_seeds_send_every_message_of_the_codecs_tables() -> None:
    """So a short run checks each message with the fds the codec's table gives it (SET_DEVICE_STATE_FD's
    fd went unchecked by a copy of that table written before it existed)."""
    features = _seed_features(TARGETS["codec"]())
    sent = {(stream, code) for kind, stream, code, _fds in _tuples(features, "message")}
    assert {(stream.name, code) for stream, code in seed_cases()} <= sent
    assert ("FRONTEND_REQUESTS", int(FrontendRequest.SET_DEVICE_STATE_FD), 1) in {
        feature[1:] for feature in _tuples(features, "message")
    }


def test_vfio_codec_seeds_send_every_command_of_the_codecs_table() -> None:
    """So a short run decodes each command the vfio-user codec's table has, with its fds, and checks it
    exactly (a valid stream read the kernel's way)."""
    features = _seed_features(TARGETS["vfio-codec"]())
    assert {command.name for command in COMMAND_SPECS} <= {
        feature[1] for feature in _tuples(features, "request")
    }
    assert "exact" in features
    assert ("request", "DMA_MAP", 1, False) in features or ("request", "DMA_MAP", 1, True) in features


def test_requests_seeds_send_every_request_type() -> None:
    requests = _seed_features(TARGETS["requests"]())
    assert {int(kind) for kind in RequestType} <= {feature[1] for feature in _tuples(requests, "hostile")}


def test_backend_seeds_serve_every_request_type_both_ways() -> None:
    features = _seed_features(TARGETS["backend"]())
    assert {kind.name for kind in RequestType} <= {feature[1] for feature in _tuples(features, "requests")}


def test_server_seeds_send_every_setup_message_and_request_type(fd_leak_check: None) -> None:
    features = _seed_features(TARGETS["server"]())
    assert {kind.name for kind in RequestType} <= {feature[1] for feature in _tuples(features, "kick")}
    assert len({feature[1] for feature in _tuples(features, "setup")}) == SETUP_MESSAGE_KINDS  # one code each


def test_vfio_server_seeds_take_every_step_and_run_the_engine_through_the_iommu(fd_leak_check: None) -> None:
    """So a short run reaches each kind of step, and the engine's DMA really goes through the paired
    guest's IOMMU: a COPY and a FILL done, a FILL of a read-only range faulted and reported to the guest."""
    features = _seed_features(TARGETS["vfio-server"]())
    assert set(STEP_KINDS) <= {feature[1] for feature in _tuples(features, "step")}
    engine = {feature[1:] for feature in _tuples(features, "engine")}
    assert (StatusBit.DONE, EngineError.NONE) in engine
    assert (StatusBit.DONE | StatusBit.FAULT, EngineError.NONE) in engine
    assert _tuples(features, "fault")


def _tuples(features: Iterable[Hashable], kind: str) -> list[tuple[Any, ...]]:
    return [feature for feature in features if isinstance(feature, tuple) and feature[0] == kind]


def test_choices_are_deterministic_and_never_run_out() -> None:
    first, second = Choices(b"\x01\x02"), Choices(b"\x01\x02")
    values = [first.bits(64) for _ in range(100)]
    assert values == [second.bits(64) for _ in range(100)]
    assert len(set(values)) > 50  # past its end the input goes on with varied bytes, not zeros
    assert all(0 <= Choices(bytes([n])).below(7) < 7 for n in range(256))
    assert Choices(b"").between(3, 3) == 3


class _Crashes(FuzzTarget):
    name = "crashes"

    def run(self, choices: Choices) -> Iterable[Hashable]:
        if choices.byte() == 7:
            raise KeyError("boom")
        return ()


class _Spins(FuzzTarget):
    name = "spins"

    def run(self, choices: Choices) -> Iterable[Hashable]:
        while True:
            pass


class _LeaksFds(FuzzTarget):
    name = "leaks"

    def __init__(self) -> None:
        self.leaked: list[int] = []

    def run(self, choices: Choices) -> Iterable[Hashable]:
        if choices.byte() == 3:
            self.leaked.append(os.eventfd(0))
        return ()

    def check_leaks(self) -> str | None:
        return f"{len(self.leaked)} eventfds" if self.leaked else None


class _Breaks(FuzzTarget):
    name = "breaks"

    def run(self, choices: Choices) -> Iterable[Hashable]:
        raise FuzzFailure("invariant")


def test_engine_reports_a_crash_and_saves_its_input(tmp_path: Path) -> None:
    report = fuzz(_Crashes(), runs=100_000, seed=3, artifact_dir=str(tmp_path))
    (finding,) = report.findings
    assert finding.kind == "crash" and "KeyError" in finding.message
    assert finding.path is not None and Path(finding.path).read_bytes() == finding.data
    with pytest.raises(KeyError):
        replay(_Crashes(), finding.data)


def test_engine_reports_a_hang_within_its_time_bound() -> None:
    report = fuzz(_Spins(), runs=5, timeout=0.2)
    (finding,) = report.findings
    assert finding.kind == "hang"
    assert report.max_execution_seconds < 5


_WATCHDOG_SCRIPT = """
from numba import njit
from vhost_iommu.fuzz import FuzzTarget, fuzz

@njit
def spin(stop):
    # Compiled code that never returns to the interpreter (for stop=0: x never reaches 0 modulo a
    # prime): no signal handler can run until it does.
    x = 1
    while x != stop:
        x = (x * 3) % 1000003
    return x

class Stuck(FuzzTarget):
    name = "stuck"
    def setup(self):
        spin(3)  # compile outside the time bound
    def run(self, choices):
        spin(0)

fuzz(Stuck(), runs=1, timeout=0.01, watchdog_grace=0.3, artifact_dir=ARTIFACTS)
"""


def test_watchdog_ends_an_execution_no_signal_can_interrupt(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-c", _WATCHDOG_SCRIPT.replace("ARTIFACTS", repr(str(tmp_path)))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    assert "Timeout" in run.stderr and " in run" in run.stderr  # faulthandler's report: where it hung
    assert (tmp_path / "stuck-current.bin").read_bytes() == b""  # the input (the first seed) is kept


def test_engine_finds_the_input_that_leaks() -> None:
    target = _LeaksFds()
    try:
        report = fuzz(target, runs=10_000, seed=5, leak_every=16)
        leaks = [finding for finding in report.findings if finding.kind == "leak"]
        assert leaks and leaks[0].data[:1] == b"\x03"
    finally:
        for fd in target.leaked:
            os.close(fd)


class _MapsLeak(FuzzTarget):
    """Leaves something behind that only the expensive check sees (as a mapping the server keeps)."""

    name = "maps-leak"

    def run(self, choices: Choices) -> Iterable[Hashable]:
        return ()

    def check_leaks(self) -> str | None:
        return "1 mapping left"


def test_engine_checks_leaks_at_the_end_of_a_run_shorter_than_the_leak_window() -> None:
    report = fuzz(_MapsLeak(), runs=5, leak_every=64)
    assert [(finding.kind, finding.message) for finding in report.findings] == [("leak", "1 mapping left")]


def test_engine_reports_a_broken_invariant_as_a_failure() -> None:
    report = fuzz(_Breaks(), runs=10)
    assert [finding.kind for finding in report.findings] == ["failure"]


def test_hang_is_an_exception_targets_let_through() -> None:
    assert issubclass(Hang, Exception) and not issubclass(Hang, FuzzFailure)


def test_script_runs_a_target_and_lists_them(tmp_path: Path) -> None:
    # The script picks its interpreter itself (the project's virtualenv, or $PYTHON): this one here.
    env = {**os.environ, "PYTHON": sys.executable}
    script = str(REPO / "scripts/fuzz")
    listed = subprocess.run([script, "list"], capture_output=True, text=True, check=True, env=env)
    assert set(TARGETS) <= {line.split()[0] for line in listed.stdout.splitlines()}
    run = subprocess.run(
        [script, "codec", "--runs", "200", "--seed", "1", "--artifacts", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "codec: 200 executions" in run.stdout and "no findings" in run.stdout


def test_fd_is_open() -> None:
    fd = os.eventfd(0)
    assert fd_is_open(fd)
    os.close(fd)
    assert not fd_is_open(fd)
