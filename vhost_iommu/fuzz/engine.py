"""The fuzzing engine: inputs as choices, a mutation driver, hang and leak checks, findings.

A target (:class:`FuzzTarget`) turns one byte string into one execution: it reads its decisions from a
:class:`Choices` (so random bytes, mutated bytes and a coverage-guided fuzzer's bytes all make valid,
structured executions) and raises when an invariant breaks. What a target lets through is its own
business: it catches exactly the errors the code under test documents, so any exception that leaves
``run`` is a finding.

The built-in driver (:func:`fuzz`) needs nothing but the standard library: random inputs, mutations of
inputs that produced outcomes not seen before (the "features" a target returns: a cheap stand-in for
coverage), a per-execution time bound (a signal raising :class:`Hang`, so a Python loop that never ends is
caught where it spins; SIGPROF, so CPU time, because a campaign at ``nice 19`` on a loaded machine can
be descheduled for seconds), and leak checks (the target's own after every execution, the expensive ones
every ``leak_every`` executions and at the end of the run, then a replay of that window to find the input
that leaked). A target's seeds (:class:`Script` writes them) run first. atheris, when installed, can
drive the same targets with coverage guidance (:func:`fuzz_atheris`).
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import hashlib
import importlib
import os
import random
import re
import signal
import struct
import tempfile
import time
import zlib
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import TypeVar

__all__ = [
    "INTERESTING_U64",
    "Choices",
    "Finding",
    "FuzzFailure",
    "FuzzReport",
    "FuzzTarget",
    "Hang",
    "Script",
    "fd_is_open",
    "fuzz",
    "open_fd_count",
    "replay",
    "shape",
    "struct_fields",
]

T = TypeVar("T")

#: Values that break arithmetic: zero, one, powers of two and their neighbours, the ends of each width.
INTERESTING_U64: tuple[int, ...] = tuple(
    sorted(
        {0, 1, 2, 3, 4, 7, 8, 15, 16, 0x7F, 0x80, 0xFF, 0x100, 0xFFF, 0x1000, 0x1001, 0xFFFF, 0x10000}
        | {(1 << bits) + delta for bits in (31, 32, 47, 48, 63) for delta in (-1, 0, 1)}
        | {(1 << 64) - delta for delta in (1, 2, 0x1000, 0x1001)}
    )
)


class FuzzFailure(AssertionError):
    """An invariant of the code under test broke (raised by a target)."""


class Hang(Exception):
    """One execution took longer than the per-execution time bound."""


class Choices:
    """Decisions read from a byte string, front to back.

    Past its end the input goes on with bytes from a PRNG seeded by the input itself: every input, however
    short, is a complete execution, the same one each time it is replayed, and a short input is not stuck
    with all-zero answers (which would always take the same side of every branch).
    """

    __slots__ = ("_data", "_position", "_seeded")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._position = 0
        self._seeded = False

    def _extend(self, count: int) -> None:
        rng = random.Random(zlib.crc32(self._data) if not self._seeded else self._data[-8:])
        self._seeded = True
        self._data += rng.randbytes(max(count, 1024))

    @property
    def remaining(self) -> int:
        return len(self._data) - self._position

    def take(self, count: int) -> bytes:
        """The next ``count`` bytes."""
        if self._position + count > len(self._data):
            self._extend(count)
        chunk = self._data[self._position : self._position + count]
        self._position += count
        return chunk

    def bits(self, count: int) -> int:
        """An unsigned integer of ``count`` bits."""
        value = int.from_bytes(self.take((count + 7) // 8), "little")
        return value & ((1 << count) - 1)

    def byte(self) -> int:
        if self._position >= len(self._data):
            self._extend(1)
        value = self._data[self._position]
        self._position += 1
        return value

    def below(self, bound: int) -> int:
        """An integer in ``[0, bound)`` (``bound`` > 0)."""
        if bound <= 256:
            return self.byte() % bound
        return self.bits(32 if bound <= 1 << 32 else 64) % bound

    def between(self, low: int, high: int) -> int:
        """An integer in ``[low, high]``."""
        return low + self.below(high - low + 1)

    def chance(self, per_256: int) -> bool:
        """True with probability ``per_256 / 256`` on random input."""
        return self.byte() < per_256

    def pick(self, options: Sequence[T]) -> T:
        return options[self.below(len(options))]

    def u64(self) -> int:
        """A 64-bit value, often an interesting one."""
        kind = self.byte() & 3
        if kind == 0:
            return self.pick(INTERESTING_U64)
        if kind == 1:
            return self.bits(16)
        return self.bits(64)

    def near(self, anchors: Sequence[int], spread: int = 64, bits: int = 64) -> int:
        """An unsigned ``bits``-bit value at or close to one of ``anchors`` (region ends, sizes), or
        anywhere."""
        if not anchors or self.byte() < 32:
            return self.bits(bits)
        delta = self.between(-spread, spread) if self.chance(160) else 0
        return (self.pick(anchors) + delta) % (1 << bits)


_FORMAT_ITEM = re.compile(r"(\d*)([A-Za-z?])")


def struct_fields(layout: struct.Struct) -> list[tuple[int, int, str]]:
    """(offset, size, code) of each field of a packed (``<`` or ``=``) ``layout``, in order: where a
    target bends the fields of a layout the code defines, rather than a copy of its offsets."""
    fields: list[tuple[int, int, str]] = []
    offset = 0
    for count, code in _FORMAT_ITEM.findall(layout.format[1:]):
        repeat = int(count) if count else 1
        if code in "sp":
            fields.append((offset, repeat, code))
            offset += repeat
            continue
        size = struct.calcsize("<" + code)
        for _ in range(repeat):
            fields.append((offset, size, code))
            offset += size
    if offset != layout.size or layout.format[:1] not in "<=":
        raise ValueError(f"{layout.format!r} is not a packed layout")
    return fields


class Script:
    """Writes the input that makes :class:`Choices` take given decisions, in the order a target takes them:
    seeds that reach each case of a target (each message type, each layout) whatever the random driver
    does. Past the script's end the decisions are the PRNG's, as for any input."""

    def __init__(self) -> None:
        self._data = bytearray()

    @property
    def data(self) -> bytes:
        return bytes(self._data)

    def byte(self, value: int) -> Script:
        self._data.append(value)
        return self

    def bits(self, count: int, value: int) -> Script:
        self._data += value.to_bytes((count + 7) // 8, "little")
        return self

    def below(self, bound: int, value: int) -> Script:
        if not 0 <= value < bound:
            raise ValueError(f"{value} is not below {bound}")
        if bound <= 256:
            return self.byte(value)
        return self.bits(32 if bound <= 1 << 32 else 64, value)

    def between(self, low: int, high: int, value: int) -> Script:
        return self.below(high - low + 1, value - low)

    def chance(self, per_256: int, value: bool) -> Script:
        if (value and per_256 <= 0) or (not value and per_256 >= 256):
            raise ValueError(f"chance({per_256}) is never {value}")
        return self.byte(0 if value else 255)

    def pick(self, options: Sequence[T], value: T) -> Script:
        return self.below(len(options), list(options).index(value))


class FuzzTarget:
    """One thing to fuzz. Subclasses set ``name``/``description`` and implement :meth:`run`."""

    name = "target"
    description = ""
    #: Longest input the built-in driver generates.
    max_input = 2048

    def warm_up(self) -> None:
        """Before the fd baseline is taken: acquire what the process keeps for good once it is first
        used (not a leak of the target's)."""

    def setup(self) -> None:
        """Before the first execution (create long-lived resources here)."""

    def teardown(self) -> None:
        """After the last execution: release every resource :meth:`setup` made."""

    def run(self, choices: Choices) -> Iterable[Hashable] | None:
        """One execution. Returns outcome features (what happened), which guide the built-in driver."""
        raise NotImplementedError

    def seeds(self) -> list[bytes]:
        """Inputs to start the corpus with."""
        return [b""]

    def check_leaks(self) -> str | None:
        """An expensive leak check run every ``leak_every`` executions; a description of the leak or None."""
        return None


@dataclass
class Finding:
    """A crash (an exception escaped the target), a hang, or a leak; ``path`` holds the input."""

    kind: str
    message: str
    data: bytes
    path: str | None = None


@dataclass
class FuzzReport:
    target: str
    executions: int = 0
    seconds: float = 0.0
    max_execution_seconds: float = 0.0
    corpus_size: int = 0
    features: int = 0
    findings: list[Finding] = field(default_factory=list)
    fds_before: int = 0
    fds_after: int = 0
    interrupted: bool = False

    @property
    def rate(self) -> float:
        return self.executions / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        state = "no findings" if not self.findings else f"{len(self.findings)} FINDING(S)"
        if self.interrupted:
            state += " (interrupted)"
        return (
            f"{self.target}: {self.executions} executions in {self.seconds:.1f} s ({self.rate:.0f}/s), "
            f"slowest {self.max_execution_seconds * 1000:.1f} ms, corpus {self.corpus_size}, "
            f"features {self.features}, fds {self.fds_before}->{self.fds_after}: {state}"
        )


# -- process-level leak probes -------------------------------------------------------------------------------


_NUMBERS = re.compile(r"0x[0-9a-fA-F]+|\d+")


def shape(text: str, limit: int = 80) -> str:
    """An error message with its numbers blanked: what kind of error, as an outcome feature."""
    return _NUMBERS.sub("N", text)[:limit]


def open_fd_count() -> int:
    """How many fds this process has open (the listing's own fd excluded)."""
    return len(os.listdir("/proc/self/fd")) - 1


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# -- the built-in driver -------------------------------------------------------------------------------------


#: A stall of the whole process (descheduled on a loaded machine, swapping) is not a hang of the code: the
#: wall-clock bound is this many times the CPU-time bound.
WALL_CLOCK_FACTOR = 20


class _TimeBound:
    """Raise Hang in the running code once it has used ``seconds`` of CPU time (SIGPROF: a loop that
    never ends is caught where it spins, however loaded the machine), or has waited ``seconds *
    WALL_CLOCK_FACTOR`` of wall-clock time (SIGALRM: a call that blocks forever)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._fired = False

    def _expired(self, signum: int, _frame: FrameType | None) -> None:
        # Both timers may expire together: the second must not raise into the handling of the first.
        if self._fired:
            return
        self._fired = True
        self.disarm()
        which = "CPU time" if signum == signal.SIGPROF else "wall-clock time"
        limit = self.seconds if signum == signal.SIGPROF else self.seconds * WALL_CLOCK_FACTOR
        raise Hang(f"one execution used more than {limit} s of {which}")

    def arm(self) -> None:
        self._fired = False
        signal.setitimer(signal.ITIMER_PROF, self.seconds)
        signal.setitimer(signal.ITIMER_REAL, self.seconds * WALL_CLOCK_FACTOR)

    @staticmethod
    def disarm() -> None:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.setitimer(signal.ITIMER_REAL, 0)

    @contextlib.contextmanager
    def installed(self) -> Iterator[_TimeBound]:
        previous = {
            signum: signal.signal(signum, self._expired) for signum in (signal.SIGPROF, signal.SIGALRM)
        }
        try:
            yield self
        finally:
            self.disarm()
            for signum, handler in previous.items():
                signal.signal(signum, handler)


class _Watchdog:
    """Ends the process if one execution outlives ``seconds``: compiled code that holds the GIL and never
    returns to the interpreter cannot be interrupted by a signal handler (nor by a Python thread), and would
    freeze a campaign silently. faulthandler's timer runs in C without the GIL: it prints every thread's
    traceback and exits. The input is in ``<artifacts>/TARGET-current.bin``.

    Re-arming costs about 0.1 ms, so it is re-armed at most once a second: a hang ends the process within
    ``seconds`` + 1 s, and never earlier than ``seconds`` after the execution began."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds + 1
        self._armed = 0.0

    def tick(self) -> None:
        now = time.monotonic()
        if now - self._armed > 1:
            faulthandler.dump_traceback_later(self._seconds, exit=True)
            self._armed = now

    @staticmethod
    def stop() -> None:
        faulthandler.cancel_dump_traceback_later()


def _mutate(rng: random.Random, data: bytes, corpus: Sequence[bytes], max_input: int) -> bytes:
    buffer = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 4, 8))):
        operation = rng.randrange(9)
        position = rng.randrange(len(buffer) + 1)
        if operation == 0 and buffer:  # flip a bit
            index = rng.randrange(len(buffer))
            buffer[index] ^= 1 << rng.randrange(8)
        elif operation == 1 and buffer:  # a random byte
            buffer[rng.randrange(len(buffer))] = rng.randrange(256)
        elif operation == 2 and buffer:  # an interesting byte
            buffer[rng.randrange(len(buffer))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF))
        elif operation == 3:  # insert random bytes
            buffer[position:position] = rng.randbytes(rng.randrange(1, 17))
        elif operation == 4 and buffer:  # delete a range
            del buffer[position : position + rng.randrange(1, 17)]
        elif operation == 5 and buffer:  # duplicate a range
            start = rng.randrange(len(buffer))
            buffer[position:position] = buffer[start : start + rng.randrange(1, 33)]
        elif operation == 6:  # an interesting 64-bit value, either endianness
            value = rng.choice(INTERESTING_U64)
            buffer[position : position + 8] = value.to_bytes(8, rng.choice(("little", "big")))
        elif operation == 7 and corpus:  # splice with another input
            other = rng.choice(corpus)
            cut = rng.randrange(len(other) + 1)
            buffer = buffer[:position] + bytearray(other[cut:])
        else:  # a random run
            buffer[position : position + 4] = rng.randbytes(4)
    return bytes(buffer[:max_input])


def _fresh(rng: random.Random, max_input: int) -> bytes:
    # Log-uniform lengths: short inputs explore the first decisions, long ones the deep sequences.
    length = min(max_input, int(2 ** rng.uniform(0, max_input.bit_length())))
    return rng.randbytes(length)


def _save(directory: str, target: str, kind: str, data: bytes) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{target}-{kind}-{hashlib.sha1(data).hexdigest()[:12]}.bin")
    with open(path, "wb") as file:
        file.write(data)
    return path


def _current_input_file(directory: str | None, target: str) -> int | None:
    if directory is None:
        return None
    os.makedirs(directory, exist_ok=True)
    return os.open(
        os.path.join(directory, f"{target}-current.bin"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
    )


def default_artifact_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "vhost-iommu-fuzz")


def fuzz(
    target: FuzzTarget,
    *,
    runs: int | None = None,
    seconds: float | None = None,
    seed: int | None = None,
    timeout: float = 2.0,
    leak_every: int = 256,
    artifact_dir: str | None = None,
    keep_going: bool = False,
    progress: Callable[[FuzzReport], None] | None = None,
    progress_every: float = 10.0,
    watchdog_grace: float = 5.0,
) -> FuzzReport:
    """Run ``target`` until ``runs`` executions or ``seconds`` elapsed (at least one of them), stopping at
    the first finding unless ``keep_going``. Findings are saved under ``artifact_dir`` when given."""
    if runs is None and seconds is None:
        raise ValueError("give runs, seconds or both")
    rng = random.Random(seed)
    report = FuzzReport(target.name)
    corpus: list[bytes] = list(target.seeds())
    seen: set[Hashable] = set()
    window: deque[bytes] = deque(maxlen=leak_every)
    target.warm_up()
    gc.collect()
    report.fds_before = open_fd_count()
    seed_count = len(corpus)
    # The input being run is written here first: a crash that kills the process (a segfault in compiled
    # code) leaves it behind for --reproduce.
    current = _current_input_file(artifact_dir, target.name)
    target.setup()

    def record(kind: str, message: str, data: bytes) -> None:
        path = _save(artifact_dir, target.name, kind, data) if artifact_dir is not None else None
        report.findings.append(Finding(kind, message, data, path))

    started = last_progress = time.perf_counter()
    watchdog = _Watchdog(timeout * WALL_CLOCK_FACTOR + watchdog_grace)
    deadline = started + seconds if seconds is not None else None
    try:
        with _TimeBound(timeout).installed() as bound:
            while runs is None or report.executions < runs:
                now = time.perf_counter()
                if deadline is not None and now >= deadline:
                    break
                if progress is not None and now - last_progress >= progress_every:
                    last_progress = now
                    report.seconds = now - started
                    report.corpus_size, report.features = len(corpus), len(seen)
                    progress(report)
                if report.executions < seed_count:
                    data = corpus[report.executions]
                elif not corpus or rng.random() < 0.3:
                    data = _fresh(rng, target.max_input)
                else:
                    data = _mutate(rng, rng.choice(corpus), corpus, target.max_input)
                window.append(data)
                if current is not None:
                    os.ftruncate(current, 0)
                    os.pwrite(current, data, 0)
                begun = time.perf_counter()
                watchdog.tick()
                bound.arm()
                try:
                    features = target.run(Choices(data))
                except Hang as exc:
                    bound.disarm()
                    record("hang", str(exc), data)
                    features = None
                except Exception as exc:
                    bound.disarm()
                    kind = "failure" if isinstance(exc, FuzzFailure) else "crash"
                    record(kind, f"{type(exc).__name__}: {exc}", data)
                    features = None
                else:
                    bound.disarm()
                elapsed = time.perf_counter() - begun
                report.max_execution_seconds = max(report.max_execution_seconds, elapsed)
                report.executions += 1
                if features is not None:
                    fresh = [feature for feature in features if feature not in seen]
                    if fresh:
                        seen.update(fresh)
                        if len(corpus) < 4096:
                            corpus.append(data)
                        else:
                            corpus[rng.randrange(len(corpus))] = data
                if report.executions % leak_every == 0:
                    leak = _check_window(target, window)
                    if leak is not None:
                        record("leak", leak[0], leak[1])
                if report.findings and not keep_going:
                    break
            if report.executions % leak_every and (keep_going or not report.findings):
                # The last window too, however short the run: a smoke run of a few executions sees a leak.
                leak = _check_window(target, window)
                if leak is not None:
                    record("leak", leak[0], leak[1])
    except KeyboardInterrupt:
        report.interrupted = True  # Ctrl-C (SIGINT) ends a campaign early, with its report
    finally:
        watchdog.stop()
        target.teardown()
        if current is not None:
            os.close(current)
        gc.collect()
        report.seconds = time.perf_counter() - started
        report.corpus_size, report.features = len(corpus), len(seen)
        report.fds_after = open_fd_count()
    if report.fds_after > report.fds_before:
        record("leak", f"{report.fds_after - report.fds_before} fds more open than before the run", b"")
    return report


def _check_window(target: FuzzTarget, window: deque[bytes]) -> tuple[str, bytes] | None:
    """Run the target's expensive leak check; on a leak, replay the window input by input to find one
    input that leaks on its own (a fresh run of it shows the same leak)."""
    leak = target.check_leaks()
    if leak is not None:
        gc.collect()  # garbage cycles may still hold what leaked; a full collection is too slow to run always
        leak = target.check_leaks()
    if leak is None:
        return None
    for data in window:
        try:
            target.run(Choices(data))
        except Exception:
            continue
        gc.collect()
        again = target.check_leaks()
        if again is not None:
            return again, data
    return leak, window[-1] if window else b""


def replay(target: FuzzTarget, data: bytes, *, timeout: float = 10.0) -> Iterable[Hashable] | None:
    """Run one input (a saved finding) once, with leak checks; the target's exception propagates."""
    target.warm_up()
    gc.collect()
    fds_before = open_fd_count()
    target.setup()
    try:
        with _TimeBound(timeout).installed() as bound:
            bound.arm()
            features = target.run(Choices(data))
            bound.disarm()
        gc.collect()
        leak = target.check_leaks()
        if leak is not None:
            raise FuzzFailure(f"leak: {leak}")
    finally:
        target.teardown()
    gc.collect()
    if open_fd_count() > fds_before:
        raise FuzzFailure(f"{open_fd_count() - fds_before} fds more open than before the input")
    return features


def fuzz_atheris(
    target: FuzzTarget, argv: list[str], *, leak_every: int = 256
) -> None:  # pragma: no cover - needs atheris and never returns
    """Drive ``target`` with atheris (libFuzzer's coverage guidance). ``argv`` holds libFuzzer options
    (``-runs=N``, ``-max_total_time=S``, ``-timeout=S``, a corpus directory). Never returns: libFuzzer
    exits the process, after writing a crash-* file for any finding."""
    atheris = importlib.import_module("atheris")  # an optional extra ("fuzz"), without type stubs

    executions = 0
    window: deque[bytes] = deque(maxlen=leak_every)
    target.setup()

    def one_input(data: bytes) -> None:
        nonlocal executions
        window.append(data)
        target.run(Choices(data))
        executions += 1
        if executions % leak_every == 0:
            leak = _check_window(target, window)
            if leak is not None:
                raise FuzzFailure(f"leak: {leak[0]}")

    atheris.instrument_all()
    atheris.Setup(argv, one_input)
    atheris.Fuzz()
