"""Progress reporting for long provisioning steps: one status line per phase, with elapsed time.

Long-running tools write their own output to a log file; the user sees a single live line per phase
(rich), a tick when it finishes, and the log's tail when it fails.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from vhost_iommu.provision.errors import ProvisionError

# Status goes to stderr so that a script's stdout carries only its result (a path), for `$(...)` use.
console = Console(stderr=True, highlight=False)

_POLL_SECONDS = 0.5
_TAIL_LINES = 40


def log_tail(log: Path, lines: int = _TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file ('' when it does not exist)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _last_line(log: Path) -> str:
    try:
        with log.open("rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - 512))
            chunk = handle.read().decode(errors="replace")
    except OSError:
        return ""
    stripped = [line for line in chunk.splitlines() if line.strip()]
    return stripped[-1][:80] if stripped else ""


@contextmanager
def phase(title: str) -> Iterator[None]:
    """Show ``title`` while the block runs, then a tick (or a cross) with the time it took."""
    started = time.monotonic()
    try:
        with console.status(title):
            yield
    except BaseException:
        console.print(f"[red]x[/red] {title} [dim](failed after {time.monotonic() - started:.1f} s)[/dim]")
        raise
    console.print(f"[green]ok[/green] {title} [dim]({time.monotonic() - started:.1f} s)[/dim]")


def run_logged(
    argv: Sequence[str | Path],
    *,
    title: str,
    log: Path,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    stdin_text: str | None = None,
) -> None:
    """Run ``argv``, output appended to ``log``, with a live status line; on failure raise with the tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [str(part) for part in argv]
    started = time.monotonic()
    with log.open("a") as sink:
        sink.write(f"\n$ {' '.join(command)}\n")
        sink.flush()
        try:
            process = subprocess.Popen(
                command,
                cwd=cwd,
                env=dict(env) if env is not None else None,
                stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                text=True,
            )
        except OSError as error:
            raise ProvisionError(f"{title}: cannot run {command[0]}: {error}") from error
        if stdin_text is not None and process.stdin is not None:
            process.stdin.write(stdin_text)
            process.stdin.close()
        with console.status(title) as status:
            while True:
                try:
                    returncode = process.wait(timeout=_POLL_SECONDS)
                    break
                except subprocess.TimeoutExpired:
                    elapsed = time.monotonic() - started
                    status.update(f"{title} [dim]{elapsed:5.0f} s  {escape(_last_line(log))}[/dim]")
                except BaseException:
                    process.kill()
                    process.wait()
                    raise
    elapsed = time.monotonic() - started
    if returncode != 0:
        console.print(f"[red]x[/red] {title} [dim](exit {returncode} after {elapsed:.1f} s)[/dim]")
        raise ProvisionError(
            f"{title} failed (exit status {returncode}); full log: {log}\n--- last lines ---\n{log_tail(log)}"
        )
    console.print(f"[green]ok[/green] {title} [dim]({elapsed:.1f} s)[/dim]")
