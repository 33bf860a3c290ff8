"""`secateur plan` and `secateur prune` on SavedModels without Keras metadata (graph import).

Keras 3 ``model.export()`` and ``tf.saved_model.save()`` directories, the
SavedModels TF Serving deployments hold: the plan shrinks the model, the
published version's ``serving_default`` has the original's keys and shapes,
and a prune that removes only dead channels reproduces the original
SavedModel's outputs. Only the unsupported-op exit code runs in the default suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from secateur.cli.outcome import EXIT_BAD_INPUT, EXIT_OK
from secateur.pruner.modelio import read_serving_signature
from tests import exported_models as em


def _secateur(*args: Any) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "secateur.cli", *map(str, args)],
        capture_output=True, text=True, env=env, timeout=1200,
    )  # fmt: skip


def _plan_and_prune(model: Any, how: str, tmp_path: Path) -> None:
    dead = em.kill_channels(model)
    assert dead > 0
    original = em.export(model, str(tmp_path / "original"), how)
    proc = _secateur("plan", original, "--ratio", 0.5, "--json")
    assert proc.returncode == EXIT_OK, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["params_after"] < plan["params_before"]

    out = tmp_path / "served"
    proc = _secateur(
        "prune", original, out, "--ratio", em.DEAD_RATIO, "--criterion", "bn_scale",
        "--epochs", 0, "--measure-steps", 1, "--batch-size", 4,
    )  # fmt: skip
    assert proc.returncode == EXIT_OK, proc.stderr
    version = str(out / "1")
    assert read_serving_signature(version) == read_serving_signature(original)
    x = em.images()
    em.assert_same(em.served(original, x), em.served(version, x))


# Slow: the same import, prune and publish run in the default suite through the
# service (test_exported_savedmodels_service.py, a job subprocess running the same
# PruneJob); here two CLI processes add only the transport.
@pytest.mark.slow
@pytest.mark.parametrize("how", em.EXPORTS)
def test_cli_exportedSmallCnn_plansAndPrunesExactly_signatureKept(how, tmp_path) -> None:
    _plan_and_prune(em.small_cnn(), how, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("how", em.EXPORTS)
@pytest.mark.parametrize("name", em.APPLICATIONS)
def test_cli_exportedApplication_plansAndPrunesExactly_signatureKept(name, how, tmp_path) -> None:
    _plan_and_prune(em.application(name), how, tmp_path)


def test_cli_unsupportedOp_exit2_namesTheOp(tmp_path) -> None:
    path = em.unsupported_op_savedmodel(str(tmp_path / "scan"))
    proc = _secateur("plan", path, "--ratio", 0.3)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
    assert "Cumsum" in proc.stderr and "Traceback" not in proc.stderr
    proc = _secateur("prune", path, tmp_path / "out", "--ratio", 0.3)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
    assert "Cumsum" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
