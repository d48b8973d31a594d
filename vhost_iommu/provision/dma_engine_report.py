"""What the guest's ``dma-engine`` program (guest/dma-engine.c) printed, as typed results for tests.

The guest's ``dma-engine`` job (guest/init, ``vhost_iommu.dma=``) runs the program once per test; each run
prints ``DMAE_`` lines and ends with ``DMAE_RESULT test=NAME rc=0|1``:

- ``DMAE_ENGINE``: how the engine was reached (``bar=mmap|rw|sysfs``, ``irq=msix|poll``), MAGIC, VERSION;
- ``DMAE_OP``: one operation (``step`` names it) and the engine's registers when it ended, ``ns`` it took;
- ``DMAE_CHECK``: one expectation of the program on a step (``check=engine``, ``bytes`` or ``irq``),
  ``ok=0|1``;
- ``DMAE_ERROR``: a system call that failed (``op``, ``errno``, ``msg``); ``DMAE_OPEN`` (the VFIO group),
  ``DMAE_BUFFERS``, ``DMAE_COMMAND`` and ``DMAE_RELEASED`` say what the program set up.

The lines of one run are those up to its ``DMAE_RESULT``; a run with none (the program or the guest died)
has ``rc`` None. The register values are the engine's (docs/dma-engine.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from vhost_iommu.device.layout import FAULT_F_ADDRESS, Access, FaultReason
from vhost_iommu.endpoints.dma_engine import EngineError
from vhost_iommu.endpoints.dma_engine import StatusBit as EngineStatus
from vhost_iommu.provision.boot import parse_fields

LINE_PREFIX = "DMAE_"


@dataclass(frozen=True)
class EngineOp:
    """One operation the program ran (a ``DMAE_OP`` line)."""

    step: str
    op: str  # copy, fill, compare
    src: int
    dst: int
    length: int
    status: EngineStatus
    error: EngineError
    fault_reason: FaultReason
    fault_flags: int  # virtio-iommu fault flags: READ, WRITE (Access) and ADDRESS
    fault_address: int
    done_bytes: int
    mismatch_offset: int
    completed: int
    irq: str  # fired, missed (MSI-X on, no interrupt in time) or off (STATUS polled)
    ns: int

    @property
    def succeeded(self) -> bool:
        """DONE, all of it, with no fault, mismatch or error."""
        ended_badly = EngineStatus.FAULT | EngineStatus.MISMATCH | EngineStatus.ERROR
        finished = EngineStatus.DONE in self.status and not self.status & ended_badly
        return finished and self.done_bytes == self.length

    @property
    def fault_access(self) -> Access:
        return Access(self.fault_flags & (Access.READ | Access.WRITE | Access.EXEC))

    @property
    def fault_address_valid(self) -> bool:
        return bool(self.fault_flags & FAULT_F_ADDRESS)

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> EngineOp:
        def number(key: str) -> int:
            return int(fields[key], 0)

        return cls(
            step=fields["step"],
            op=fields["op"],
            src=number("src"),
            dst=number("dst"),
            length=number("length"),
            status=EngineStatus(number("status")),
            error=EngineError(number("error")),
            fault_reason=FaultReason(number("fault_reason")),
            fault_flags=number("fault_flags"),
            fault_address=number("fault_address"),
            done_bytes=number("done_bytes"),
            mismatch_offset=number("mismatch_offset"),
            completed=number("completed"),
            irq=fields["irq"],
            ns=number("ns"),
        )


@dataclass(frozen=True)
class EngineCheck:
    """One expectation the program checked (a ``DMAE_CHECK`` line)."""

    step: str
    check: str  # engine (the registers), bytes (the buffers) or irq (MSI-X vector 0 fired)
    ok: bool
    want: str
    first_wrong: int | None  # bytes: the first offset that did not hold what was wanted

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> EngineCheck:
        first_wrong = int(fields.get("first_wrong", "-1"), 0)
        return cls(
            step=fields["step"],
            check=fields["check"],
            ok=fields["ok"] == "1",
            want=fields.get("want", ""),
            first_wrong=None if first_wrong < 0 else first_wrong,
        )


@dataclass
class EngineTest:
    """One run of the program: one test (copy, uaf, readonly, busmaster, release, bypass)."""

    name: str
    rc: int | None = None  # None: no DMAE_RESULT line (the program or the guest died)
    # DMAE_ENGINE fields: how the engine was reached (release: through VFIO, then through sysfs)
    reached: list[dict[str, str]] = field(default_factory=list)
    ops: list[EngineOp] = field(default_factory=list)
    checks: list[EngineCheck] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)  # DMAE_ERROR fields
    lines: list[str] = field(default_factory=list)

    def op(self, step: str) -> EngineOp:
        """The operation of ``step`` (KeyError if the program never ran it)."""
        for op in self.ops:
            if op.step == step:
                return op
        raise KeyError(f"{self.name}: no operation {step!r} (ran: {', '.join(op.step for op in self.ops)})")

    @property
    def failed_checks(self) -> list[EngineCheck]:
        return [check for check in self.checks if not check.ok]

    @property
    def passed(self) -> bool:
        """The program ended with rc 0 and every check held (a DMAE_ERROR it recovered from, such as no
        MSI-X, does not count)."""
        return self.rc == 0 and not self.failed_checks


@dataclass(frozen=True)
class EngineReport:
    """Every run of the program in a guest's output, in order."""

    tests: tuple[EngineTest, ...]

    def __getitem__(self, name: str) -> EngineTest:
        """The last run of test ``name`` (KeyError if it never ran)."""
        for test in reversed(self.tests):
            if test.name == name:
                return test
        ran = [test.name for test in self.tests]
        raise KeyError(f"the guest ran no dma-engine test {name!r} (ran: {ran})")


def parse_dma_engine(lines: Iterable[str]) -> EngineReport:
    """The runs of ``dma-engine`` in console ``lines`` (other lines are skipped; kernel text may precede a
    ``DMAE_`` line on the same console line, as in :meth:`GuestRun.marker_lines`)."""
    tests: list[EngineTest] = []
    current: EngineTest | None = None
    for raw in lines:
        if LINE_PREFIX not in raw:
            continue
        line = raw[raw.index(LINE_PREFIX) :]
        kind = line.split(" ", 1)[0]
        fields = parse_fields(line)
        if current is None:
            current = EngineTest(name=fields.get("test", "unknown"))
            tests.append(current)
        if current.name == "unknown" and "test" in fields:
            current.name = fields["test"]  # a DMAE_OPEN or DMAE_ERROR, which name no test, came first
        current.lines.append(line)
        if kind == "DMAE_ENGINE":
            current.reached.append(fields)
        elif kind == "DMAE_OP":
            current.ops.append(EngineOp.from_fields(fields))
        elif kind == "DMAE_CHECK":
            current.checks.append(EngineCheck.from_fields(fields))
        elif kind == "DMAE_ERROR":
            current.errors.append(fields)
        elif kind == "DMAE_RESULT":
            current.rc = int(fields["rc"])
            current = None
    return EngineReport(tuple(tests))
