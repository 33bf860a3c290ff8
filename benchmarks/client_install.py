"""What a CI stage pays to install the client: secateur-client's wheel size and install time.

Builds both wheels from this tree (tools/client_dist.py), creates a fresh
virtual environment and installs the client wheel alone, downloading its
requirements from the package index as a fresh CI runner does (--no-cache-dir;
a second install into another environment shows the figure with pip's cache
warm). Then times ``secateur submit --help`` there and checks that neither
TensorFlow nor the full distribution was installed.

Usage: python benchmarks/client_install.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/

from tools.client_dist import HEAVY_DISTRIBUTIONS, build_wheels, fresh_venv, install, installed


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def _tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _help_seconds(bin_dir: Path, runs: int = 3) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(
            [str(bin_dir / "secateur"), "submit", "--help"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="secateur-client-bench-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        wheels = build_wheels(root / "wheels")
        print(f"both wheels built in {time.perf_counter() - start:.1f} s")
        print(f"secateur-client wheel: {_mib(wheels.client.stat().st_size)} ({wheels.client.name})")
        print(f"secateur wheel:        {_mib(wheels.full.stat().st_size)} ({wheels.full.name})")
        for label, extra in (("cold, --no-cache-dir", ("--no-cache-dir",)), ("pip cache warm", ())):
            bin_dir = fresh_venv(root / f"venv-{len(extra)}")
            seconds = install(bin_dir, *extra, str(wheels.client))
            dists = installed(bin_dir)
            if dists & HEAVY_DISTRIBUTIONS:
                print(f"error: the client install brought {sorted(dists & HEAVY_DISTRIBUTIONS)}")
                return 1
            site = next((bin_dir.parent / "lib").glob("python*/site-packages"))
            print(
                f"client install ({label}): {seconds:.1f} s, {len(dists)} distributions, "
                f"{_mib(_tree_size(site))} on disk (pip and setuptools included)"
            )
        print(f"secateur submit --help in it: {_help_seconds(bin_dir):.2f} s (best of 3)")
        print("TensorFlow, Keras, NumPy and the full secateur: not installed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
