"""The Kubernetes manifests: each overlay rendered by kustomize, validated, checked.

``kubectl kustomize`` renders deploy/k8s/overlays/{cpu,gpu,tpu}; every core and
apps resource is validated offline against the Kubernetes JSON schemas bundled
with kubernetes-validate (strict: unknown fields fail); the monitoring CRDs,
which have no bundled schema, are checked field by field. Then the behaviour:
the serve flags, volumes, probes, ports and accelerators fit together.
"""

from __future__ import annotations

import copy
import posixpath
import re
import shutil
import subprocess
from functools import cache
from typing import Any

import pytest
import yaml

from secateur.server.main import exposure_problem
from tests.deploy import DEPLOY, parse_serve_args

K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu", "tpu")
# The oldest Kubernetes the manifests target (native gRPC probes are GA since
# 1.27) and the newest schema kubernetes-validate bundles at its pinned version.
K8S_VERSIONS = ("1.30.0", "1.37.0")
SCHEMA_GROUPS = ("v1", "apps/v1")
CRDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.googleapis.com/v1", "PodMonitoring"),
}
ACCELERATORS = ("nvidia.com/gpu", "google.com/tpu")


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (needed for `kubectl kustomize`)")
    proc = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def one(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    containers = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["secateur"]
    return containers[0]


def pod_spec(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def expanded_args(docs: tuple[dict[str, Any], ...]) -> list[str]:
    """command[2:] + args with $(VAR) expanded from the env the way the kubelet does."""
    c = container(docs)
    configmaps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["configMapKeyRef"]
            assert ref["name"] in configmaps, f"env {e['name']}: no ConfigMap {ref['name']}"
            env[e["name"]] = configmaps[ref["name"]][ref["key"]]

    def expand(arg: str) -> str:
        def sub(m: re.Match[str]) -> str:
            assert m.group(1) in env, f"{arg}: $({m.group(1)}) is not in the container's env"
            return env[m.group(1)]

        return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, arg)

    assert c["command"][:2] == ["secateur", "serve"]
    return [expand(a) for a in [*c["command"][2:], *c.get("args", [])]]


def mount_of(docs: tuple[dict[str, Any], ...], path: str) -> tuple[dict, dict]:
    """The volumeMount holding ``path`` and its volume."""
    c = container(docs)
    mounts = [
        m
        for m in c["volumeMounts"]
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mounts, f"{path} is on no volume"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    return mount, volumes[mount["name"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_resources_validate_against_the_kubernetes_schemas(overlay: str) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    docs = render(overlay)
    checked = set()
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            continue
        assert doc["apiVersion"] in SCHEMA_GROUPS, f"unexpected {doc['apiVersion']} {doc['kind']}"
        for version in K8S_VERSIONS:
            kv.validate(doc, version, strict=True)
        checked.add(doc["kind"])
    assert checked == {
        "ServiceAccount",
        "ConfigMap",
        "Secret",
        "Service",
        "PersistentVolumeClaim",
        "Deployment",
    }


def test_the_schema_validation_catches_a_mistake() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    bad = copy.deepcopy(one(render("cpu"), "Deployment"))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_monitoring_crds_scrape_the_metrics_port(overlay: str) -> None:
    docs = render(overlay)
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service_ports = {p["name"]: p for p in one(docs, "Service")["spec"]["ports"]}
    container_ports = {p["name"]: p for p in container(docs)["ports"]}
    for api_version, kind in CRDS:
        doc = one(docs, kind)
        assert doc["apiVersion"] == api_version
        assert doc["metadata"]["name"]
        selector = doc["spec"]["selector"]["matchLabels"]
        endpoints = doc["spec"]["endpoints"]
        assert endpoints and all(e["port"] == "metrics" for e in endpoints)
        assert all(e.get("path", "/metrics") == "/metrics" for e in endpoints)
        if kind == "ServiceMonitor":  # selects Services, port names a Service port
            service_labels = one(docs, "Service")["metadata"]["labels"]
            assert selector.items() <= service_labels.items()
            assert "metrics" in service_ports
        else:  # PodMonitoring selects pods, port names a container port
            assert selector.items() <= pod_labels.items()
            assert "metrics" in container_ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_server_per_state_dir(overlay: str) -> None:
    docs = render(overlay)
    spec = one(docs, "Deployment")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    assert one(docs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_flags_match_the_volumes(overlay: str) -> None:
    docs = render(overlay)
    ns = parse_serve_args(expanded_args(docs))
    assert ns.host == "0.0.0.0"
    # --state-dir is the PersistentVolumeClaim's mount.
    mount, volume = mount_of(docs, ns.state_dir)
    assert mount["mountPath"] == ns.state_dir and not mount.get("readOnly")
    pvc = one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    assert volume["persistentVolumeClaim"]["claimName"] == pvc
    # --auth-token-file is a key of the mounted Secret: authenticated, never opted out.
    assert ns.auth_token_file and not ns.allow_unauthenticated
    assert exposure_problem(ns) is None
    mount, volume = mount_of(docs, ns.auth_token_file)
    secret = one(docs, "Secret")
    assert mount.get("readOnly") is True
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    key = posixpath.relpath(ns.auth_token_file, mount["mountPath"])
    assert key in secret.get("data", {}) | secret.get("stringData", {})
    # The allow-list comes from the ConfigMap and is never empty.
    assert ns.allowed_uri_prefix and all(ns.allowed_uri_prefix)
    configmap = one(docs, "ConfigMap")["data"]
    assert set(ns.allowed_uri_prefix) == set(configmap.values())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_the_drain(overlay: str) -> None:
    """NOT_SERVING for --shutdown-grace-seconds, then 10 s for in-flight calls, before SIGKILL."""
    from secateur.server.service import ServerOptions

    docs = render(overlay)
    ns = parse_serve_args(expanded_args(docs))
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    rpc_grace = ServerOptions(state_dir="/").grace_s
    assert ns.shutdown_grace_seconds > 0
    assert ns.shutdown_grace_seconds + rpc_grace + 10 <= pod["terminationGracePeriodSeconds"]


def test_placeholder_tokens_hold_no_token() -> None:
    """The shipped Secret has no usable token: the server refuses to start until one is set."""
    text = (K8S / "base" / "auth-tokens.placeholder").read_text()
    assert [line for line in text.splitlines() if line.strip() and not line.startswith("#")] == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grpc_probes_and_ports(overlay: str) -> None:
    docs = render(overlay)
    ns = parse_serve_args(expanded_args(docs))
    c = container(docs)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert set(c[probe]) & {"grpc", "httpGet", "exec", "tcpSocket"} == {"grpc"}, probe
        assert c[probe]["grpc"]["port"] == ns.port == 50051
        assert c[probe]["grpc"].get("service", "") in ("", "secateur.v1.PruningService")
    assert c["readinessProbe"]["grpc"]["service"] == "secateur.v1.PruningService"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert (
        ports
        == {"grpc": ns.port, "metrics": ns.metrics_port}
        == {
            "grpc": 50051,
            "metrics": 9464,
        }
    )
    service = one(docs, "Service")
    assert service["spec"]["selector"].items() <= (
        one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"].items()
    )
    for p in service["spec"]["ports"]:
        target = p["targetPort"]
        target_port = ports[target] if isinstance(target, str) else target
        assert p["port"] == target_port == ports[p["name"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_runs_locked_down(overlay: str) -> None:
    docs = render(overlay)
    pod = pod_spec(docs)
    c = container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mount, volume = mount_of(docs, "/tmp")
    assert mount["mountPath"] == "/tmp" and "emptyDir" in volume
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["HOME"] == "/tmp"
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    assert "memory" in c["resources"]["requests"] and "memory" in c["resources"]["limits"]


def _accelerators(docs: tuple[dict[str, Any], ...]) -> dict[str, tuple[str, str]]:
    res = container(docs)["resources"]
    return {
        name: (res.get("requests", {}).get(name), res["limits"].get(name))
        for name in ACCELERATORS
        if name in res.get("requests", {}) or name in res["limits"]
    }


def test_cpu_overlay_asks_for_no_accelerator() -> None:
    docs = render("cpu")
    assert _accelerators(docs) == {}
    assert not pod_spec(docs).get("nodeSelector")
    assert re.fullmatch(r"secateur:[\w.]+", container(docs)["image"])


def test_gpu_overlay_requests_an_nvidia_gpu() -> None:
    docs = render("gpu")
    assert _accelerators(docs) == {"nvidia.com/gpu": ("1", "1")}
    pod = pod_spec(docs)
    assert pod["nodeSelector"]["cloud.google.com/gke-accelerator"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert container(docs)["image"].endswith("-gpu")


def test_tpu_overlay_requests_tpu_chips_on_a_tpu_node_pool() -> None:
    docs = render("tpu")
    acc = _accelerators(docs)
    assert list(acc) == ["google.com/tpu"]
    requests, limits = acc["google.com/tpu"]
    assert requests == limits and int(limits) >= 1
    selector = pod_spec(docs)["nodeSelector"]
    assert selector["cloud.google.com/gke-tpu-accelerator"]
    topology = selector["cloud.google.com/gke-tpu-topology"]
    assert re.fullmatch(r"\d+(x\d+)+", topology)
    assert {"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec(
        docs
    )["tolerations"]
    # The image of the Dockerfile's `tpu` target.
    assert container(docs)["image"].endswith("-tpu")


def test_manifests_pass_yamllint() -> None:
    yamllint = pytest.importorskip("yamllint.cli")
    config = (
        "{extends: default, rules: {line-length: {max: 100}, document-start: disable, "
        "truthy: {check-keys: false}}}"
    )
    files = [str(p) for p in sorted(K8S.rglob("*.yaml"))]
    files.append(str(DEPLOY / "docker-compose.yml"))
    with pytest.raises(SystemExit) as exit_:
        yamllint.run(["--strict", "-d", config, *files])
    assert exit_.value.code == 0, "yamllint found problems (see the captured output)"
