"""The serve command's request-path options: --request-path, --poll-us and --kick-thread reach the
back-end of every connection, and the combinations that mean nothing are refused with one line."""

from __future__ import annotations

import argparse

import pytest

from vhost_iommu import cli
from vhost_iommu.jit import requests as kernel
from vhost_iommu.virtio_iommu import VirtioIommuBackend


def backend_for(*arguments: str) -> VirtioIommuBackend:
    parser = argparse.ArgumentParser()
    cli.configure_serve(parser)
    backend = cli.make_backend_factory(parser.parse_args(["--socket-path=/tmp/unused", *arguments]))()
    assert isinstance(backend, VirtioIommuBackend)
    return backend


def test_the_defaults_are_the_compiled_path_from_the_kick_thread_without_polling() -> None:
    backend = backend_for()
    assert backend.request_path == "compiled" and backend.kick_thread
    assert backend._compiled is not None
    assert backend._compiled.params[kernel.R_POLL_TICKS] == 0


def test_each_option_reaches_the_back_end() -> None:
    assert backend_for("--request-path=python").request_path == "python"
    assert backend_for("--kick-thread").kick_thread
    assert not backend_for("--no-kick-thread").kick_thread
    assert not backend_for("--request-path=python").kick_thread  # the thread runs the compiled kernel
    polling = backend_for("--poll-us=50")._compiled
    assert polling is not None and polling.params[kernel.R_POLL_TICKS] > 0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--request-path=python", "--kick-thread"], "apply to --request-path=compiled"),
        (["--request-path=python", "--poll-us=5"], "apply to --request-path=compiled"),
        (["--backend=echo", "--kick-thread"], "not to --backend=echo"),
    ],
)
def test_meaningless_combinations_are_one_line_errors(
    arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--socket-path=/tmp/vhost-iommu-never-created", *arguments]) != 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and message in captured.err


@pytest.mark.parametrize("value", ["-1", "10001", "nan", "soon"])
def test_a_poll_window_out_of_range_is_refused(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--socket-path=/tmp/vhost-iommu-never-created", f"--poll-us={value}"])
    assert exited.value.code != 0
    assert "not a number of microseconds" in capsys.readouterr().err
