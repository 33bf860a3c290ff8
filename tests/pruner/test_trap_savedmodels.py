"""The issue's trap SavedModels: restoring them runs a WriteFile op; reading them as data must not.

Each trap holds a resource whose saved create/initialize functions write a
marker file. ``tf.saved_model.load`` of the test's own file proves the trap
works (so no test here passes vacuously); ``load_model`` and ``secateur plan``
must then leave no marker: (1) is refused, (2) and (3) load and prune with
the trap ignored and noted.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pytest

from secateur.cli.outcome import EXIT_BAD_INPUT, EXIT_OK
from secateur.pruner import PruneSpec, prune
from secateur.pruner.errors import UnsupportedModelError
from secateur.pruner.modelio import load_model
from tests import hostile_models

Trap = Callable[[str, str], str]
TRAPS: dict[str, Trap] = {
    "module_beside_empty_metadata": hostile_models.trap_module,
    "resource_on_model": lambda p, m: hostile_models.trap_tf_keras(p, m, on_layer=False),
    "resource_on_layer": lambda p, m: hostile_models.trap_tf_keras(p, m, on_layer=True),
}
KERAS_TRAPS = {"resource_on_model": "root.trap", "resource_on_layer": "layer 'c1'"}


@pytest.fixture(scope="module")
def traps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    """Each trap's directory and marker path; the trap is proven to fire on restore."""
    import tensorflow as tf

    root = tmp_path_factory.mktemp("traps")
    built = {}
    for name, build in TRAPS.items():
        path, marker = str(root / name), str(root / f"{name}.marker")
        build(path, marker)
        assert not os.path.exists(marker)
        tf.saved_model.load(path)  # the test's own file: the trap must work
        assert os.path.exists(marker), f"trap {name} did not fire on tf.saved_model.load"
        os.remove(marker)
        built[name] = (path, marker)
    return built


def test_loadModel_moduleBesideEmptyKerasMetadata_refusedWithoutRunningIt(traps) -> None:
    path, marker = traps["module_beside_empty_metadata"]
    with pytest.raises(UnsupportedModelError, match=r"serving_default|keras_metadata"):
        load_model(path)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("name", sorted(KERAS_TRAPS))
def test_loadModel_tfKerasModelWithTrap_loadsAndPrunes_trapIgnoredAndNoted(
    traps, name, caplog
) -> None:
    path, marker = traps[name]
    with caplog.at_level(logging.WARNING, logger="secateur.pruner.modelio"):
        model = load_model(path)
    assert not os.path.exists(marker)
    notes = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(notes) == 1 and "resource" in notes[0] and ".trap" in notes[0], notes
    assert KERAS_TRAPS[name] in notes[0]
    assert isinstance(model, keras.Model)
    result = prune(model, PruneSpec(ratio=0.5))
    assert result.plan.params_after < result.plan.params_before
    assert not os.path.exists(marker)


def test_loadModel_tfKerasModelWithTrap_sameOutputsAsTheSavedModel(traps) -> None:
    import tensorflow as tf

    path, marker = traps["resource_on_layer"]
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    ours = np.asarray(load_model(path)(x))
    served = tf.saved_model.load(path).signatures["serving_default"]  # the test's own file
    os.remove(marker)
    (reference,) = served(tf.constant(x)).values()
    np.testing.assert_allclose(ours, reference.numpy(), rtol=1e-6, atol=1e-6)


def _plan(path: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "secateur.cli", "plan", path, "--ratio", "0.5"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize("name", sorted(TRAPS))
def test_cliPlan_trapSavedModels_noMarker(traps, name) -> None:
    path, marker = traps[name]
    proc = _plan(path)
    assert not Path(marker).exists(), proc.stderr
    assert "Traceback" not in proc.stderr
    if name in KERAS_TRAPS:
        assert proc.returncode == EXIT_OK, proc.stderr
        assert "ignored a resource" in proc.stderr and ".trap" in proc.stderr
    else:
        assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
        assert "serving_default" in proc.stderr or "keras_metadata" in proc.stderr
