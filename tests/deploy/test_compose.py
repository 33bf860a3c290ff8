"""deploy/docker-compose.yml: PostgreSQL, two API replicas, two workers,
Prometheus and Grafana on one network.

Validated against the Compose Specification's schema, parsed with PyYAML and
checked against the Dockerfile (target, ENTRYPOINT, state dir) and the parsers
of ``secateur serve`` and ``secateur worker``. The Prometheus and Grafana files it
mounts belong to deploy/prometheus and deploy/grafana; only their paths are
checked here. ``docker compose config`` runs too where the compose plugin is
installed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import (
    DEPLOY,
    DOCKERFILE,
    ROOT,
    effective,
    exec_form,
    parse_serve_args,
    parse_worker_args,
    read_stages,
)

COMPOSE = DEPLOY / "docker-compose.yml"
SPEC: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
SERVICES: dict[str, Any] = SPEC["services"]
REPLICAS = ("secateur", "secateur-2")
WORKERS = ("worker-1", "worker-2")
# The local (bind-mounted) paths, relative to deploy/, that compose may mount.
LOCAL_MOUNTS = {
    "prometheus": {
        "./prometheus/prometheus.yml": "/etc/prometheus/prometheus.yml",
        "./prometheus/rules/": "/etc/prometheus/rules/",
    },
    "grafana": {
        "./grafana/provisioning/": "/etc/grafana/provisioning/",
        "./grafana/dashboards/": "/var/lib/grafana/dashboards/",
    },
}


def _volumes(service: str) -> list[tuple[str, str, str]]:
    """(source, target, mode) of a service's short-syntax volumes."""
    out = []
    for v in SERVICES[service].get("volumes", []):
        assert isinstance(v, str), f"{service}: use the short volume syntax: {v}"
        src, target, *mode = v.split(":")
        out.append((src, target, mode[0] if mode else "rw"))
    return out


def _ports(service: str) -> dict[int, str]:
    """container port -> the host address:port it is published on."""
    out = {}
    for p in SERVICES[service].get("ports", []):
        assert isinstance(p, str), p
        host, _, container = p.rpartition(":")
        out[int(container)] = host
    return out


def _argv(service: str) -> list[str]:
    """What a secateur container runs: its ENTRYPOINT (the image's unless overridden)
    + compose's command, without the leading ``secateur serve``/``secateur worker``."""
    svc = SERVICES[service]
    if "entrypoint" in svc:
        argv = svc["entrypoint"]
    else:
        entry = effective(read_stages(), svc["build"]["target"], "ENTRYPOINT")
        assert entry is not None
        argv = exec_form(entry.value)
    assert argv[:2] == ["secateur", "worker" if service in WORKERS else "serve"]
    command = svc.get("command", [])
    assert isinstance(command, list), "command in list form: no shell splitting surprises"
    return [*argv[2:], *command]


def _server_argv(service: str = "secateur") -> list[str]:
    return _argv(service)


def test_services() -> None:
    assert set(SERVICES) == {"postgres", *REPLICAS, *WORKERS, "prometheus", "grafana"}
    assert SERVICES["postgres"]["image"].startswith("postgres:")
    assert SERVICES["prometheus"]["image"].startswith("prom/prometheus:")
    assert SERVICES["grafana"]["image"].startswith("grafana/grafana:")
    for name, svc in SERVICES.items():
        if "image" in svc and "build" not in svc:
            tag = svc["image"].rpartition(":")[2]
            assert tag and tag != "latest" and "/" not in tag, f"{name}: pin the image tag"
    assert set(SERVICES["prometheus"]["depends_on"]) >= {*REPLICAS, *WORKERS}
    assert "prometheus" in SERVICES["grafana"]["depends_on"]
    # The replicas and workers start once PostgreSQL answers.
    assert SERVICES["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    for name in (*REPLICAS, *WORKERS):
        assert SERVICES[name]["depends_on"]["postgres"]["condition"] == "service_healthy"


@pytest.mark.parametrize("service", [*REPLICAS, *WORKERS])
def test_server_is_built_from_the_dockerfile(service: str) -> None:
    build = SERVICES[service]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    assert build["target"] in {s.name for s in read_stages()}
    assert SERVICES[service]["image"] == SERVICES["secateur"]["image"]


@pytest.mark.parametrize("service", REPLICAS)
def test_server_command_uses_serve_flags(service: str) -> None:
    ns = parse_serve_args(_server_argv(service))
    assert ns.host == "0.0.0.0"
    assert {ns.port, ns.metrics_port} == {50051, 9464}
    # Each replica on its own loopback host ports.
    host_ports = {host.rpartition(":")[2] for host in _ports(service).values()}
    assert set(_ports(service)) == {ns.port, ns.metrics_port} and len(host_ports) == 2
    # API only, on the shared database; the models folder is a named volume and
    # allow-listed (it replaces the default allow-list, the state dir's models/).
    assert ns.max_concurrent_jobs == 0
    assert ns.store is None and _store_url(service) == _postgres_url()
    named = {target.rstrip("/"): src for src, target, _ in _volumes(service)}
    assert ns.allowed_uri_prefix
    for prefix in ns.allowed_uri_prefix:
        if prefix.startswith("/"):
            assert named[prefix] in SPEC["volumes"], f"{prefix} is not on a named volume"


@pytest.mark.parametrize("service", [*REPLICAS, *WORKERS])
def test_replicas_and_workers_trust_the_same_packages(service: str) -> None:
    """The replicas plan, the workers prune: a model one accepts, the other must too."""
    parse = parse_worker_args if service in WORKERS else parse_serve_args
    assert parse(_argv(service)).trust_package == ["keras_hub"]


def test_replicas_publish_distinct_host_ports() -> None:
    published = [h for name in REPLICAS for h in _ports(name).values()]
    assert len(published) == len(set(published)) == 4
    assert all(h.startswith("127.0.0.1:") for h in published)


def _store_url(service: str) -> str:
    """$SECATEUR_STORE_URL of a service: how it finds the store, password included."""
    return str(SERVICES[service]["environment"]["SECATEUR_STORE_URL"])


def _postgres_url() -> str:
    env = SERVICES["postgres"]["environment"]
    user, password, db = env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"]
    return f"postgresql://{user}:{password}@postgres:5432/{db}"


@pytest.mark.parametrize("service", WORKERS)
def test_workers_claim_from_the_same_database(service: str) -> None:
    ns = parse_worker_args(_argv(service))
    serve = parse_serve_args(_server_argv())
    assert _store_url(service) == _store_url("secateur") == _postgres_url()
    assert ns.store is None and serve.store is None  # never on a command line
    assert ns.allowed_uri_prefix == serve.allowed_uri_prefix
    assert ns.max_concurrent_jobs >= 1 and ns.lease_seconds >= 1
    # Prometheus scrapes the worker on the compose network (no published port).
    assert (ns.metrics_host, ns.metrics_port) == ("0.0.0.0", 9464)
    assert "ports" not in SERVICES[service]
    named = {target.rstrip("/"): src for src, target, _ in _volumes(service)}
    for prefix in ns.allowed_uri_prefix:
        assert named[prefix] in SPEC["volumes"], f"{prefix} is not on a named volume"
    # The image's HEALTHCHECK asks gRPC health, which a worker does not serve.
    assert "9464/metrics" in " ".join(SERVICES[service]["healthcheck"]["test"])


def test_prometheus_scrapes_every_replica_and_worker() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "secateur"]
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{name}:9464" for name in (*REPLICAS, *WORKERS)}


@pytest.mark.parametrize("service", REPLICAS)
def test_server_authentication_isChosen_unauthenticatedOnlyOnLoopbackPorts(service: str) -> None:
    """The server starts (the exposure check passes); without auth it is published on 127.0.0.1."""
    from secateur.server.main import exposure_problem

    ns = parse_serve_args(_server_argv(service))
    assert exposure_problem(ns) is None
    if ns.allow_unauthenticated and not (ns.auth_token_file or ns.tls_client_ca):
        hosts = _ports(service).values()
        assert hosts and all(h.startswith("127.0.0.1:") for h in hosts), hosts


def test_named_volumes_are_declared_and_local_mounts_are_the_documented_ones() -> None:
    for name in SERVICES:
        for src, target, mode in _volumes(name):
            if src.startswith(("./", "../", "/")):
                assert LOCAL_MOUNTS.get(name, {}).get(src) == target, f"{name}: {src}:{target}"
                assert mode == "ro", f"{name}: mount {src} read-only"
            else:
                assert src in SPEC["volumes"], f"{name}: volume {src} is not declared"
    for name, mounts in LOCAL_MOUNTS.items():
        mounted = {src: target for src, target, _ in _volumes(name)}
        assert mounted.items() >= mounts.items(), name
    # The files themselves live beside this file (written with deploy/prometheus
    # and deploy/grafana); they must stay inside deploy/.
    for mounts in LOCAL_MOUNTS.values():
        for src in mounts:
            assert DEPLOY in (DEPLOY / src).resolve().parents


def test_prometheus_reads_the_mounted_config() -> None:
    command = SERVICES["prometheus"]["command"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in command
    assert _ports("prometheus") == {9090: "127.0.0.1:9090"}
    assert _ports("grafana") == {3000: "127.0.0.1:3000"}


def test_one_network() -> None:
    assert len(SPEC["networks"]) == 1
    (network,) = SPEC["networks"]
    for name, svc in SERVICES.items():
        assert svc["networks"] == [network], name


def test_matches_the_compose_specification() -> None:
    """The Compose Specification's JSON schema, as vendored by check-jsonschema (offline)."""
    pytest.importorskip("check_jsonschema")
    check = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    proc = subprocess.run(
        [*check, str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_docker_compose_config() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not installed")
    probe = subprocess.run(
        [docker, "compose", "version"], capture_output=True, text=True, timeout=30
    )
    if probe.returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    # `config` only reads and resolves the file; the bind-mounted sources may be
    # written by other parts of deploy/ and need not exist for it.
    proc = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "--quiet", "--no-path-resolution"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(DEPLOY),
    )
    assert proc.returncode == 0, proc.stderr
