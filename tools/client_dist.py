"""Build the two wheels and install the client alone into a fresh virtual environment.

``secateur-client`` (packaging/client/pyproject.toml: client/, cli/, proto/)
and ``secateur`` (pyproject.toml: pruner/, server/; it depends on the client)
are built from a clean copy of the folders they map, as the Dockerfile's
builder does, so a stale ``build/`` here cannot leak files into them. Used by
tests/cli/test_client_dist.py and benchmarks/client_install.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the two pyprojects build from (the Dockerfile's builder copies the same).
SOURCES = ("pyproject.toml", "README.md", "packaging", "pruner", "server", "client", "cli", "proto")
_CLUTTER = shutil.ignore_patterns("__pycache__", "node_modules", "build", "*.egg-info")
# The full distribution and its heavy requirements: none may reach a client install.
HEAVY_DISTRIBUTIONS = frozenset({"tensorflow", "tf-keras", "keras", "numpy", "secateur"})


@dataclass(frozen=True)
class Wheels:
    full: Path
    client: Path


def _only(paths: list[Path]) -> Path:
    if len(paths) != 1:
        raise RuntimeError(f"expected one wheel. Received: {paths}")
    return paths[0]


def build_wheels(dest: Path) -> Wheels:
    """Both wheels in ``dest`` (``pip wheel --no-deps``, this interpreter's setuptools)."""
    src = dest / "src"
    src.mkdir(parents=True)
    for rel in SOURCES:
        if (ROOT / rel).is_dir():
            shutil.copytree(ROOT / rel, src / rel, ignore=_CLUTTER)
        else:
            shutil.copy2(ROOT / rel, src / rel)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(dest), str(src), str(src / "packaging" / "client")],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return Wheels(
        full=_only(sorted(dest.glob("secateur-*.whl"))),
        client=_only(sorted(dest.glob("secateur_client-*.whl"))),
    )


def fresh_venv(path: Path) -> Path:
    """A new virtual environment (nothing of this one's packages); its bin/ folder."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300)
    return path / "bin"


def install(bin_dir: Path, *requirements: str) -> float:
    """``pip install`` into the environment of ``bin_dir``; the seconds it took."""
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    start = time.perf_counter()
    subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "--quiet", *requirements],
        check=True, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return time.perf_counter() - start


def installed(bin_dir: Path) -> set[str]:
    """The distributions installed in the environment of ``bin_dir`` (lower case)."""
    import json

    out = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "list", "--format=json"],
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return {d["name"].lower().replace("_", "-") for d in json.loads(out.stdout)}
