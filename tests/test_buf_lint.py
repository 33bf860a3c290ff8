"""The contract passes buf's STANDARD lint rules with zero violations.

buf comes from npm (`make system-deps` installs @bufbuild/buf into .tools/);
where neither it nor npm is there the test skips and says why.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO_ROOT = os.path.join(ROOT, "proto")
LOCAL_BUF = os.path.join(ROOT, ".tools", "node_modules", ".bin", "buf")


def buf_command() -> str:
    """The buf executable: .tools/ (make system-deps) or PATH; skip without one."""
    if os.access(LOCAL_BUF, os.X_OK):
        return LOCAL_BUF
    found = shutil.which("buf")
    if found:
        return found
    if shutil.which("npm") is None:
        pytest.skip("buf is not installed and npm is missing: cannot install @bufbuild/buf")
    pytest.skip("buf is not installed: run `make system-deps` (npm install @bufbuild/buf)")


def test_bufLint_contractHasNoViolations() -> None:
    proc = subprocess.run(
        [buf_command(), "lint", "--error-format", "text"],
        cwd=PROTO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_bufLint_seesOurFile_andWouldCatchAnUnprefixedEnum(tmp_path) -> None:
    """The config lints secateur/v1 (not only the vendored google/rpc it ignores)."""
    buf = buf_command()
    listed = subprocess.run(
        [buf, "ls-files"], cwd=PROTO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert "secateur/v1/pruning.proto" in listed.stdout.split(), listed.stdout + listed.stderr
    shutil.copytree(PROTO_ROOT, tmp_path / "proto", ignore=shutil.ignore_patterns("*.py*"))
    proto = tmp_path / "proto" / "secateur" / "v1" / "pruning.proto"
    proto.write_text(proto.read_text().replace("SCOPE_GLOBAL = 1;", "GLOBAL = 1;"))
    proc = subprocess.run(
        [buf, "lint", "--error-format", "text"],
        cwd=tmp_path / "proto",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and 'should be prefixed with "SCOPE_"' in proc.stdout, proc.stdout
