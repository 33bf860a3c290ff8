"""No library, server or CLI code restores a SavedModel (which runs its saved functions).

``tf.saved_model.load`` and ``tf_keras.models.load_model`` (and their aliases)
recreate every trackable object of a SavedModel and run its saved initializer
functions, so a user's model file could execute graph ops in the service.
Models are read as data instead (``secateur.pruner.savedmodel``). Only tests
may call these, on files the test itself wrote. Read from the source (the
AST), so a docstring naming them is fine and a call hidden in a function is not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("pruner", "server", "cli", "client")
# Attribute chains (their last parts) that restore a SavedModel and run its functions.
FORBIDDEN_CALLS = (
    ("saved_model", "load"),
    ("saved_model", "load_v2"),
    ("saved_model", "loader", "load"),
    ("load_partial",),
    ("tf_keras", "models", "load_model"),
    ("tf_keras", "saving", "load_model"),
    ("keras", "models", "load_model"),  # tf.keras.models.load_model
    ("TFSMLayer",),
)
# Modules whose `load`/`load_model` must not be imported by name.
FORBIDDEN_FROM = {"saved_model": {"load", "load_v2"}, "tf_keras": {"load_model"}}


def _chain(node: ast.AST) -> tuple[str, ...]:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return tuple(reversed(parts))


def _offences(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            chain = _chain(node.func)
            for bad in FORBIDDEN_CALLS:
                if chain[-len(bad) :] == bad and not _keras3_saving(chain):
                    found.append(f"{path}:{node.lineno} calls {'.'.join(chain)}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            for part, names in FORBIDDEN_FROM.items():
                if part in node.module.split("."):
                    bad_names = names & {a.name for a in node.names}
                    found += [
                        f"{path}:{node.lineno} imports {n} from {node.module}" for n in bad_names
                    ]
    return found


def _keras3_saving(chain: tuple[str, ...]) -> bool:
    """Keras 3's ``keras.models.load_model`` (not under tf/tf_keras): .keras archives, safe."""
    return chain[:1] == ("keras",) and len(chain) == 3


def _sources() -> list[Path]:
    return sorted(p for pkg in CHECKED for p in (ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_source_neverRestoresASavedModel(path: Path) -> None:
    assert _offences(path) == []


def test_offences_findTheCallsThisTestIsAbout(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import tensorflow as tf\nimport tf_keras\n"
        "from tensorflow.saved_model import load\n"
        "def f(p):\n    tf.saved_model.load(p)\n    tf_keras.models.load_model(p)\n"
        "    tf.keras.models.load_model(p)\n"
        "    return 'tf.saved_model.load(p) in a string is fine'\n"
    )
    assert len(_offences(bad)) == 4
