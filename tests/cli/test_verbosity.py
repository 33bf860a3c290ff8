"""In-process commands show Secateur's own lines; TensorFlow's and the libraries' only with -v.

Fast: the routing itself (warnings and a library's logger dropped, Secateur's
warnings kept; all shown with -v). Slow: ``secateur prune`` on a tf.keras
SavedModel (reading it saves an HDF5 copy, which tf_keras warns about) prints
none of TensorFlow's start-up lines or the libraries' warnings, and with -v
prints them.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from secateur.cli.verbosity import logging_restored, route_output

# What reached `secateur prune`'s output before: absl's preamble, the C++
# start-up lines, tf_keras's HDF5 UserWarning, the tensorflow logger's warning.
LIBRARY_LINES = (
    "absl::InitializeLog",
    "oneDNN",
    "cpu_feature_guard",
    "cudart_stub",
    "cuInit",
    "saving your model as an HDF5 file",
    "UserWarning",
    "Compiled the loaded model",
)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    with logging_restored():
        yield


def _emit() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("You are saving your model as an HDF5 file via `model.save()`.", stacklevel=1)
    logging.getLogger("h5py").warning("a library's warning")
    logging.getLogger("secateur.pruner.modelio").warning("a note of Secateur's")
    logging.getLogger("secateur.pruner.modelio").info("Secateur's detail")


def test_quiet_keeps_only_secateur_warnings(restore_logging, capsys, monkeypatch) -> None:
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    route_output(0)
    _emit()
    assert capsys.readouterr().err == "a note of Secateur's\n"
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"  # before TensorFlow starts


def test_verbose_shows_library_lines_with_their_logger(restore_logging, capsys, monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    route_output(0)
    route_output(1)  # once per process: a second call only changes what passes
    _emit()
    err = capsys.readouterr().err
    assert "py.warnings: " in err and "saving your model as an HDF5 file" in err
    assert "h5py: a library's warning\n" in err
    assert "a note of Secateur's\nSecateur's detail\n" in err
    assert len(logging.getLogger().handlers) == len(set(logging.getLogger().handlers))


def test_logging_restored_undoes_the_routing() -> None:
    """main() runs commands inside it: a test's or a notebook's logging stays theirs."""
    root = logging.getLogger()
    before = (root.handlers[:], root.level, warnings.showwarning)
    with logging_restored():
        route_output(1)
        assert root.handlers != before[0] and warnings.showwarning is not before[2]
    assert (root.handlers, root.level, warnings.showwarning) == before


_TINY_TF_KERAS = """
import sys
import tf_keras as k
i = k.Input((8, 8, 3))
x = k.layers.Conv2D(8, 3)(i)
x = k.layers.BatchNormalization()(x)
x = k.layers.ReLU()(x)
x = k.layers.Conv2D(8, 3)(x)
x = k.layers.GlobalAveragePooling2D()(x)
k.Model(i, k.layers.Dense(2)(x)).save(sys.argv[1], save_format="tf")
"""


PRUNES = (((), "quiet"), (("-v",), "verbose"))


def _prune(model: Path, out: Path, flags: tuple[str, ...], env: dict[str, str]) -> Any:
    """``secateur prune`` on ``model``, started (the two runs share the CPUs)."""
    return subprocess.Popen(
        [sys.executable, "-m", "secateur.cli", "prune", str(model), str(out),
         "--ratio", "0.5", "--epochs", "0", "--measure-steps", "1", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


@pytest.mark.slow
def test_prune_prints_no_library_lines_unless_verbose(tmp_path: Path) -> None:
    model = tmp_path / "tiny_savedmodel"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    subprocess.run(
        [sys.executable, "-c", _TINY_TF_KERAS, str(model)],
        check=True, capture_output=True, env=env | {"TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=300,
    )  # fmt: skip
    runs = {flags: _prune(model, tmp_path / name, flags, env) for flags, name in PRUNES}
    (out, err), (_, verbose_err) = (p.communicate(timeout=900) for p in runs.values())
    assert runs[()].returncode == 0 and runs[("-v",)].returncode == 0, err + verbose_err
    assert "published:" in out
    leaked = [s for s in LIBRARY_LINES if s in out or s in err]
    assert not leaked, err
    assert "saving your model as an HDF5 file" in verbose_err, verbose_err
    assert any(s in verbose_err for s in ("absl::InitializeLog", "oneDNN", "cpu_feature_guard"))
