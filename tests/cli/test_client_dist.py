"""The secateur-client distribution: the client and the remote subcommands without TensorFlow.

Fast: the two pyprojects agree, and the command run from a tree laid out as
the client wheel (client/, cli/, proto/ only) submits to a server without
loading TensorFlow, Keras, NumPy, the pruner or the server. Slow: both wheels
built, the client wheel installed alone into a fresh virtual environment,
and a real job submitted through it to a real server.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from secateur.client.schema import DEFAULTS
from tests.client.fake_server import FakeServer
from tools.client_dist import HEAVY_DISTRIBUTIONS, build_wheels, fresh_venv, install, installed

ROOT = Path(__file__).resolve().parents[2]
FULL = tomllib.loads((ROOT / "pyproject.toml").read_text())
CLIENT = tomllib.loads((ROOT / "packaging" / "client" / "pyproject.toml").read_text())
HEAVY_MODULES = ("tensorflow", "keras", "tf_keras", "numpy", "secateur.server", "secateur.pruner")
REMOTE_COMMANDS = ("submit", "status", "watch", "cancel", "list")


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower()


def test_full_distribution_pins_the_client_and_shares_its_pins() -> None:
    client = CLIENT["project"]
    assert f"secateur-client=={client['version']}" in FULL["project"]["dependencies"]
    assert client["version"] == FULL["project"]["version"]
    full_pins = {_name(r): r for r in FULL["project"]["dependencies"]}
    for requirement in client["dependencies"]:
        assert full_pins[_name(requirement)] == requirement, "the two pyprojects disagree"
    # One owner per command and per package.
    assert "scripts" not in FULL["project"]
    assert client["scripts"] == {"secateur": "secateur.cli.main:main"}
    full_pkgs = set(FULL["tool"]["setuptools"]["packages"])
    client_pkgs = set(CLIENT["tool"]["setuptools"]["packages"])
    assert client_pkgs == {"secateur.client", "secateur.cli", "secateur.v1"}
    assert not full_pkgs & client_pkgs
    assert set(FULL["tool"]["mypy"]["packages"]) <= full_pkgs | client_pkgs


def test_client_defaults_table_is_the_library_defaults() -> None:
    """``--help`` shows the client's table; the service applies the pruner's."""
    from secateur.server.pipeline.convert import defaults

    assert defaults() == DEFAULTS, (
        f"secateur.client.schema.DEFAULTS is out of step with the library; make it {defaults()!r}"
    )


# Runs the command from a tree laid out as the client wheel: the editable
# install's finder (which maps the pruner and the server) is taken away first.
_LIGHT_RUNNER = """
import json, sys
editable = [f for f in sys.meta_path if getattr(f, "__module__", "").startswith("__editable")]
sys.meta_path[:] = [f for f in sys.meta_path if f not in editable]
sys.path[:] = [sys.argv[1]] + [p for p in sys.path if "__editable__" not in p]
from secateur.cli.main import main
try:
    code = main(sys.argv[3:])
except SystemExit as exit:
    code = exit.code
heavy = sorted(
    m for m in sys.modules if m.split(".")[0] in {heavy_top} or m.startswith({heavy_pkg})
)
where = sys.modules["secateur.cli"].__file__
json.dump({{"code": code, "heavy": heavy, "cli": where}}, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def light_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """secateur/{client,cli,v1} only, linked to this tree's folders."""
    tree = tmp_path_factory.mktemp("light")
    (tree / "secateur").mkdir()
    for name, folder in CLIENT["tool"]["setuptools"]["package-dir"].items():
        (tree / "secateur" / name.split(".")[1]).symlink_to(ROOT / "packaging" / "client" / folder)
    return tree


def _run_light(tree: Path, tmp_path: Path, *argv: str) -> tuple[dict, str, str]:
    runner = tmp_path / "runner.py"
    tops = tuple(m for m in HEAVY_MODULES if "." not in m)
    pkgs = tuple(m for m in HEAVY_MODULES if "." in m)
    runner.write_text(_LIGHT_RUNNER.format(heavy_top=set(tops), heavy_pkg=pkgs))
    result = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SECATEUR_SERVER")}
    proc = subprocess.run(
        [sys.executable, str(runner), str(tree), str(result), *argv],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.exists(), proc.stderr
    return json.loads(result.read_text()), proc.stdout, proc.stderr


def test_light_command_helps_and_submits_without_tensorflow(light_tree, tmp_path) -> None:
    got, out, _ = _run_light(light_tree, tmp_path, "--help")
    assert got["code"] == 0 and got["cli"].startswith(str(light_tree))
    commands = re.search(r"\{([a-z,]+)\}", out)
    assert commands and commands.group(1).split(",") == list(REMOTE_COMMANDS)
    got, out, _ = _run_light(light_tree, tmp_path, "submit", "--help")
    assert got["code"] == 0 and got["heavy"] == []
    assert "--ratio" in out and "(default: 0.3)" in out and "--server" in out
    spec = tmp_path / "spec.json"  # JSON spec files need no PyYAML
    spec.write_text(json.dumps({"ratio": 0.3, "max_accuracy_drop": 0.02}))
    with FakeServer() as server:
        got, out, err = _run_light(
            light_tree, tmp_path, "submit", "/m/model.keras", "/served", "--spec", str(spec),
            "--server", server.target, "--wait",
        )  # fmt: skip
        assert got["code"] == 0, err
        assert "published: /served/1" in out and got["heavy"] == []
        sent = server.service.job("jobs/job0001").spec
        assert sent.pruning.ratio == pytest.approx(0.3) and sent.max_accuracy_drop == 0.02
        # A refused request's field violations come through without grpc_status.
        got, _, err = _run_light(
            light_tree, tmp_path, "submit", "/m", "/o", "--ratio", "1.5", "--server", server.target
        )
        assert got["code"] == 2 and "spec.pruning.ratio" in err, err
    assert got["heavy"] == []


def test_light_command_names_the_full_distribution_for_in_process_commands(
    light_tree, tmp_path
) -> None:
    for command in ("prune", "serve", "plan"):
        got, _, err = _run_light(light_tree, tmp_path, command, "model.keras", "out")
        assert got["code"] == 2 and got["heavy"] == []
        assert f"`{command}` runs in this process" in err and "pip install secateur" in err


def _wheel_files(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return {n for n in zf.namelist() if ".dist-info/" not in n}


def _wheel_metadata(wheel: Path, name: str) -> str:
    with zipfile.ZipFile(wheel) as zf:
        return next(zf.read(n).decode() for n in zf.namelist() if n.endswith(".dist-info/" + name))


@pytest.mark.slow
def test_client_wheel_alone_submits_a_real_job_without_tensorflow(digits_data, tmp_path) -> None:
    from secateur.server.api.service import BackgroundServer, ServerOptions

    wheels = build_wheels(tmp_path / "wheels")
    client_files, full_files = _wheel_files(wheels.client), _wheel_files(wheels.full)
    assert not client_files & full_files
    assert {f.split("/")[1] for f in client_files} == {"cli", "client", "v1"}
    assert {f.split("/")[1] for f in full_files} == {"pruner", "server"}
    assert "Requires-Dist: secateur-client==0.1.0" in _wheel_metadata(wheels.full, "METADATA")
    assert "secateur = secateur.cli.main:main" in _wheel_metadata(wheels.client, "entry_points.txt")
    with zipfile.ZipFile(wheels.full) as zf:
        assert not any(n.endswith("entry_points.txt") for n in zf.namelist())  # one owner
    bin_dir = fresh_venv(tmp_path / "venv")
    install(bin_dir, str(wheels.client))
    assert not installed(bin_dir) & HEAVY_DISTRIBUTIONS
    assert "secateur-client" in installed(bin_dir)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SECATEUR_SERVER")}
    help_ = subprocess.run(
        [str(bin_dir / "secateur"), "submit", "--help"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert help_.returncode == 0 and "--max-accuracy-drop" in help_.stdout, help_.stderr

    out = tmp_path / "out"
    opts = ServerOptions(
        state_dir=str(tmp_path / "state"),
        port=0,
        allowed_prefixes=(str(digits_data.root), str(out)),
    )
    with BackgroundServer(opts) as server:
        job = subprocess.run(
            [str(bin_dir / "python"), "-X", "importtime", str(bin_dir / "secateur"), "submit",
             digits_data.model_path, str(out), "--ratio", "0.3", "--epochs", "0",
             "--eval-data", digits_data.eval_file, "--batch-size", "64", "--measure-steps", "1",
             "--server", server.target, "--wait"],
            capture_output=True, text=True, env=env, timeout=600,
        )  # fmt: skip
    assert job.returncode == 0, job.stderr[-3000:]
    assert f"published: {out}/1" in job.stdout
    assert (out / "1" / "saved_model.pb").exists()
    imported = {line.split("|")[-1].strip().split(".")[0] for line in job.stderr.splitlines()
                if line.startswith("import time:")}  # fmt: skip
    assert "grpc" in imported and not imported & {"tensorflow", "keras", "tf_keras", "numpy"}
