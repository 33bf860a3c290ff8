"""The Kubernetes manifests: each overlay rendered by kustomize, validated, checked.

``kubectl kustomize`` renders deploy/k8s/overlays/{cpu,gpu,tpu}; every core and
apps resource is validated offline against the Kubernetes JSON schemas bundled
with kubernetes-validate (strict: unknown fields fail); the monitoring and KEDA
CRDs, which have no bundled schema, are checked field by field. Then the
behaviour: the API replicas' serve flags and the workers' worker flags (parsed
by their own parsers), volumes, probes, ports, the Secret they share with
KEDA, and the accelerators fit together. The KEDA query runs against the real
jobs table of a PostgreSQL server (tests/server/pg_fixture.py).
"""

from __future__ import annotations

import copy
import ipaddress
import math
import posixpath
import re
import shutil
import subprocess
from functools import cache
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from secateur.server.main import exposure_problem, plaintext_token_problem
from tests.deploy import DEPLOY, parse_serve_args, parse_worker_args
from tests.server.pg_fixture import pg_server_fixture, pg_url_fixture  # noqa: F401

K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu", "tpu")
API, WORKER = "secateur", "secateur-worker"
# The oldest Kubernetes the manifests target (native gRPC probes are GA since
# 1.27) and the newest schema kubernetes-validate bundles at its pinned version.
K8S_VERSIONS = ("1.30.0", "1.37.0")
SCHEMA_GROUPS = ("v1", "apps/v1", "networking.k8s.io/v1")
CRDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.googleapis.com/v1", "PodMonitoring"),
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
}
ACCELERATORS = ("nvidia.com/gpu", "google.com/tpu")
Docs = tuple[dict[str, Any], ...]


@cache
def render(overlay: str) -> Docs:
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


def one(docs: Docs, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def pod_labels(docs: Docs, name: str) -> dict[str, str]:
    return dict(one(docs, "Deployment", name)["spec"]["template"]["metadata"]["labels"])


def pod_spec(docs: Docs, name: str = API) -> dict[str, Any]:
    return one(docs, "Deployment", name)["spec"]["template"]["spec"]


def container(docs: Docs, name: str = API) -> dict[str, Any]:
    containers = pod_spec(docs, name)["containers"]
    assert len(containers) == 1, [c["name"] for c in containers]
    return containers[0]


def container_env(docs: Docs, name: str = API) -> dict[str, str]:
    """The container's env as the kubelet resolves it from ConfigMaps, Secrets, the pod."""
    by_kind = {
        kind: {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}
        for kind in ("ConfigMap", "Secret")
    }
    env: dict[str, str] = {}
    for e in container(docs, name).get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
            continue
        source = e["valueFrom"]
        if "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "metadata.name", e
            env[e["name"]] = f"{name}-pod"
            continue
        kind, ref = (
            ("ConfigMap", source["configMapKeyRef"])
            if "configMapKeyRef" in source
            else ("Secret", source["secretKeyRef"])
        )
        assert ref["name"] in by_kind[kind], f"env {e['name']}: no {kind} {ref['name']}"
        held = by_kind[kind][ref["name"]]
        data = held.get("data", {}) | held.get("stringData", {})
        assert ref["key"] in data, f"env {e['name']}: {kind} {ref['name']} has no {ref['key']}"
        value = data[ref["key"]]
        env[e["name"]] = _b64(value) if kind == "Secret" and "data" in held else value
    return env


def _b64(value: str) -> str:
    import base64

    return base64.b64decode(value).decode()


def expanded_args(docs: Docs, name: str = API) -> list[str]:
    """command[2:] + args with $(VAR) expanded from the env the way the kubelet does."""
    c = container(docs, name)
    env = container_env(docs, name)

    def expand(arg: str) -> str:
        def sub(m: re.Match[str]) -> str:
            assert m.group(1) in env, f"{arg}: $({m.group(1)}) is not in the container's env"
            return env[m.group(1)]

        return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, arg)

    expected = ["secateur", "serve" if name == API else "worker"]
    assert c["command"][:2] == expected
    return [expand(a) for a in [*c["command"][2:], *c.get("args", [])]]


def mount_of(docs: Docs, path: str, name: str = API) -> tuple[dict, dict]:
    """The volumeMount holding ``path`` and its volume."""
    mounts = [
        m
        for m in container(docs, name)["volumeMounts"]
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mounts, f"{path} is on no volume"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volumes = {v["name"]: v for v in pod_spec(docs, name)["volumes"]}
    return mount, volumes[mount["name"]]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector (matchLabels and In/NotIn/Exists matchExpressions) on ``labels``."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


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
        "Deployment",
        "NetworkPolicy",
    }
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"} == {API, WORKER}


def test_the_schema_validation_catches_a_mistake() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    bad = copy.deepcopy(one(render("cpu"), "Deployment", API))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_monitoring_crds_scrape_the_replicas_and_the_workers(overlay: str) -> None:
    docs = render(overlay)
    pods = {n: pod_labels(docs, n) for n in (API, WORKER)}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for api_version, kind in sorted(CRDS):
        if not api_version.startswith("monitoring."):
            continue
        doc = one(docs, kind)
        assert doc["apiVersion"] == api_version
        selector = doc["spec"]["selector"]
        endpoints = doc["spec"]["endpoints"]
        assert endpoints and all(e["port"] == "metrics" for e in endpoints)
        assert all(e.get("path", "/metrics") == "/metrics" for e in endpoints)
        if kind == "ServiceMonitor":  # selects Services, port names a Service port
            chosen = {n for n, s in services.items() if selects(selector, s["metadata"]["labels"])}
            assert chosen == {API, WORKER}
            for name in chosen:
                ports = {p["name"]: p for p in services[name]["spec"]["ports"]}
                assert ports["metrics"]["targetPort"] == "metrics"
                # The job is named by this label's value: "secateur" for both, as the rules expect.
                assert services[name]["metadata"]["labels"][doc["spec"]["jobLabel"]] == "secateur"
        else:  # PodMonitoring selects pods, port names a container port
            assert all(selects(selector, labels) for labels in pods.values())
        for name in (API, WORKER):
            assert "metrics" in {p["name"] for p in container(docs, name)["ports"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_replicas_are_stateless_and_run_no_jobs(overlay: str) -> None:
    docs = render(overlay)
    spec = one(docs, "Deployment", API)["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    ns = parse_serve_args(expanded_args(docs))
    assert ns.max_concurrent_jobs == 0
    assert urlsplit(container_env(docs)["SECATEUR_STORE_URL"]).scheme == "postgresql"
    # The state dir is scratch: an emptyDir, not a volume that outlives the pod.
    mount, volume = mount_of(docs, ns.state_dir)
    assert mount["mountPath"] == ns.state_dir and "emptyDir" in volume


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_replicas_workers_and_keda_share_one_store_secret(overlay: str) -> None:
    docs = render(overlay)
    serve = parse_serve_args(expanded_args(docs, API))
    work = parse_worker_args(expanded_args(docs, WORKER))
    secret = one(docs, "Secret", serve_store_secret(docs))
    # The URL (password included) is in the Secret, read by the processes from
    # $SECATEUR_STORE_URL: never on a command line (issue 18, item 9).
    assert serve.store is None and work.store is None
    assert not serve.store_url_file and not work.store_url_file
    for name in (API, WORKER):
        ref = container_env(docs, name).get("SECATEUR_STORE_URL")
        assert ref == _b64(secret["data"]["url"]), name
        args = container(docs, name)["args"]
        assert not any(a.startswith("--store") or "SECATEUR_STORE_URL" in a for a in args)
    auth = one(docs, "TriggerAuthentication")
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref == {"parameter": "connection", "name": secret["metadata"]["name"], "key": "url"}
    (trigger,) = one(docs, "ScaledObject")["spec"]["triggers"]
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]


def serve_store_secret(docs: Docs) -> str:
    (env,) = [e for e in container(docs, API)["env"] if e["name"] == "SECATEUR_STORE_URL"]
    return str(env["valueFrom"]["secretKeyRef"]["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_flags_match_the_volumes(overlay: str) -> None:
    docs = render(overlay)
    ns = parse_serve_args(expanded_args(docs))
    assert ns.host == "0.0.0.0"
    # --auth-token-file is a key of the mounted Secret: authenticated, never opted out.
    assert ns.auth_token_file and not ns.allow_unauthenticated
    assert exposure_problem(ns) is None
    # Tokens without --tls-cert: only with the explicit, commented opt-in (TLS ends in front).
    assert plaintext_token_problem(ns) is None and (ns.allow_plaintext_tokens or ns.tls_cert)
    mount, volume = mount_of(docs, ns.auth_token_file)
    secret = one(docs, "Secret", volume["secret"]["secretName"])
    assert mount.get("readOnly") is True
    key = posixpath.relpath(ns.auth_token_file, mount["mountPath"])
    assert key in secret.get("data", {}) | secret.get("stringData", {})
    # The allow-list comes from the ConfigMap and is never empty; the replicas and
    # the workers share no disk, so it names buckets, not local folders.
    assert ns.allowed_uri_prefix and all(ns.allowed_uri_prefix)
    configmap = one(docs, "ConfigMap")["data"]
    assert set(ns.allowed_uri_prefix) == set(configmap.values())
    assert all(p.startswith("gs://") for p in ns.allowed_uri_prefix)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_flags(overlay: str) -> None:
    docs = render(overlay)
    serve = parse_serve_args(expanded_args(docs, API))
    ns = parse_worker_args(expanded_args(docs, WORKER))
    assert set(ns.allowed_uri_prefix) == set(serve.allowed_uri_prefix)
    assert ns.max_concurrent_jobs >= 1
    # Renewed every third of the lease; SIGTERM hands the jobs back well within the grace.
    assert (
        10
        <= ns.lease_seconds
        <= one(docs, "Deployment", WORKER)["spec"]["template"]["spec"][
            "terminationGracePeriodSeconds"
        ]
    )
    assert ns.worker_id == f"{WORKER}-pod"  # the pod's name, from the downward API
    mount, volume = mount_of(docs, ns.state_dir, WORKER)
    assert mount["mountPath"] == ns.state_dir and "emptyDir" in volume
    # /metrics listens where Prometheus reaches it: the pod IP, the `metrics` port.
    ports = {p["name"]: p["containerPort"] for p in container(docs, WORKER)["ports"]}
    assert ports == {"metrics": ns.metrics_port}
    assert ns.metrics_host == "0.0.0.0"
    # No replicas field: KEDA's HPA owns the count and an apply must not reset it.
    assert "replicas" not in one(docs, "Deployment", WORKER)["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_scales_the_workers_to_zero_on_the_jobs_table(overlay: str) -> None:
    docs = render(overlay)
    scaled = one(docs, "ScaledObject")
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert (target.get("apiVersion", "apps/v1"), target.get("kind", "Deployment")) == (
        "apps/v1",
        "Deployment",
    )
    assert target["name"] == WORKER
    assert spec["minReplicaCount"] == 0 < spec["maxReplicaCount"]
    assert spec["cooldownPeriod"] > 0 and spec["pollingInterval"] > 0
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "postgresql"
    metadata = trigger["metadata"]
    # The postgresql scaler's metadata keys (keda.sh/docs/latest/scalers/postgresql);
    # the connection comes from the TriggerAuthentication, not the metadata.
    assert set(metadata) <= {"query", "targetQueryValue", "activationTargetQueryValue"}
    assert all(isinstance(v, str) for v in metadata.values())  # KEDA metadata is string-valued
    # One job per worker pod: the target is the workers' --max-concurrent-jobs.
    work = parse_worker_args(expanded_args(docs, WORKER))
    assert float(metadata["targetQueryValue"]) == work.max_concurrent_jobs
    assert float(metadata.get("activationTargetQueryValue", "0")) == 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_scales_workers_down_one_pod_at_a_time(overlay: str) -> None:
    # docs/scaling_workers.md: the HPA KEDA drives removes at most one pod per
    # period, after a stabilization window, so a dip does not stop busy workers.
    spec = one(render(overlay), "ScaledObject")["spec"]
    down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= spec["pollingInterval"] * 4
    (policy,) = down["policies"]
    assert (policy["type"], policy["value"]) == ("Pods", 1) and policy["periodSeconds"] > 0


def keda_query() -> str:
    (trigger,) = one(render("cpu"), "ScaledObject")["spec"]["triggers"]
    return str(trigger["metadata"]["query"])


def test_keda_query_counts_the_jobs_that_need_a_worker(pg_url: str) -> None:
    """On the real schema: QUEUED and RUNNING jobs (a worker holds them), nothing finished."""
    import psycopg

    from secateur.server.jobstore.postgres import PostgresJobStore
    from secateur.server.jobstore.records import JobRecord, JobState, now_ns

    store = PostgresJobStore(pg_url, pool_size=2)
    try:
        for i in range(5):
            store.insert(JobRecord(id=f"j{i}", spec=b"", state=JobState.QUEUED, create_ns=now_ns()))
        with psycopg.connect(pg_url) as conn:
            assert conn.execute(keda_query()).fetchone() == (5,)
        assert store.claim("w1", lease_s=60, max_attempts=3) is not None
        assert store.claim("w2", lease_s=60, max_attempts=3) is not None
        done = store.get("j4")
        assert done is not None
        store.save(done.evolve(state=JobState.SUCCEEDED))
        cancelled = store.request_cancel("j3")
        assert cancelled is not None and cancelled.state is JobState.CANCELLED
        counts = store.counts()
        assert (counts[JobState.QUEUED], counts[JobState.RUNNING]) == (1, 2)
        with psycopg.connect(pg_url) as conn:
            assert conn.execute(keda_query()).fetchone() == (3,)
    finally:
        store.close()


def test_the_store_url_placeholder_is_a_postgresql_url_to_replace() -> None:
    url = _b64(one(render("cpu"), "Secret", serve_store_secret(render("cpu")))["data"]["url"])
    parts = urlsplit(url)
    assert parts.scheme == "postgresql" and parts.hostname and parts.port and parts.path != "/"
    assert "REPLACE-ME" in url


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_the_drain(overlay: str) -> None:
    """NOT_SERVING for --shutdown-grace-seconds, then 10 s for in-flight calls, before SIGKILL."""
    from secateur.server.api.service import ServerOptions

    docs = render(overlay)
    ns = parse_serve_args(expanded_args(docs))
    rpc_grace = ServerOptions(state_dir="/").grace_s
    assert ns.shutdown_grace_seconds > 0
    assert (
        ns.shutdown_grace_seconds + rpc_grace + 10
        <= pod_spec(docs)["terminationGracePeriodSeconds"]
    )


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
    service = one(docs, "Service", API)
    selector = {"matchLabels": service["spec"]["selector"]}
    # Only the API pods: a worker behind the Service would refuse every call.
    assert selects(selector, pod_labels(docs, API))
    assert not selects(selector, pod_labels(docs, WORKER))
    for p in service["spec"]["ports"]:
        target = p["targetPort"]
        target_port = ports[target] if isinstance(target, str) else target
        assert p["port"] == target_port == ports[p["name"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("name", [API, WORKER])
def test_runs_locked_down(overlay: str, name: str) -> None:
    docs = render(overlay)
    pod = pod_spec(docs, name)
    c = container(docs, name)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mount, volume = mount_of(docs, "/tmp", name)
    assert mount["mountPath"] == "/tmp" and "emptyDir" in volume
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["HOME"] == "/tmp"
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    assert "memory" in c["resources"]["requests"] and "memory" in c["resources"]["limits"]


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("name", [API, WORKER])
def test_pods_that_read_model_files_are_sandboxed(overlay: str, name: str) -> None:
    """gVisor, a read-only root with only emptyDirs writable, no token, no capability."""
    docs = render(overlay)
    pod, c = pod_spec(docs, name), container(docs, name)
    assert pod["runtimeClassName"] == "gvisor"
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = [m for m in c["volumeMounts"] if not m.get("readOnly")]
    assert all("emptyDir" in volumes[m["name"]] for m in writable), writable
    env = {e["name"]: e.get("value") for e in c["env"]}
    # Keras' and keras-hub's caches (HOME/.keras, HOME/.cache) and the state dir land on them.
    for path in (env["HOME"] + "/.keras", env["MPLCONFIGDIR"], "/var/lib/secateur"):
        mount, volume = mount_of(docs, path, name)
        assert "emptyDir" in volume and not mount.get("readOnly"), path


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_replicas_and_workers_trust_keras_hub_alone(overlay: str) -> None:
    """The image installs keras-hub (test_dockerfile.py); both trust it, nothing else."""
    docs = render(overlay)
    assert parse_serve_args(expanded_args(docs, API)).trust_package == ["keras_hub"]
    assert parse_worker_args(expanded_args(docs, WORKER)).trust_package == ["keras_hub"]


def _policies(docs: Docs, name: str, kind: str) -> list[dict[str, Any]]:
    """The specs of the NetworkPolicies of type ``kind`` that select ``name``'s pods."""
    labels = pod_labels(docs, name)
    specs = [
        d["spec"]
        for d in docs
        if d["kind"] == "NetworkPolicy"
        and kind in d["spec"]["policyTypes"]
        and selects(d["spec"]["podSelector"], labels)
    ]
    assert specs, f"no {kind} NetworkPolicy selects {name}: everything would be allowed"
    return specs


def _port(docs: Docs, name: str, port: int | str) -> int:
    if isinstance(port, int):
        return port
    return {p["name"]: p["containerPort"] for p in container(docs, name)["ports"]}[port]


def _reaches(docs: Docs, name: str, ip: str, port: int, protocol: str = "TCP") -> bool:
    """Whether a NetworkPolicy lets ``name``'s pods open ``ip:port`` (IP peers only)."""
    address = ipaddress.ip_address(ip)
    for spec in _policies(docs, name, "Egress"):
        for rule in spec.get("egress", []):
            assert rule.get("ports"), f"an egress rule of {name} allows every port: {rule}"
            if not any(
                (p.get("protocol", "TCP"), _port(docs, name, p["port"])) == (protocol, port)
                for p in rule["ports"]
            ):
                continue
            for peer in rule.get("to") or [{"ipBlock": {"cidr": "0.0.0.0/0"}}]:
                block = peer.get("ipBlock")
                if block and _in_block(address, block):
                    return True
    return False


def _in_block(address: Any, block: dict[str, Any]) -> bool:
    nets = [ipaddress.ip_network(c) for c in block.get("except", [])]
    return address in ipaddress.ip_network(block["cidr"]) and not any(address in n for n in nets)


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("name", [API, WORKER])
def test_network_policy_lets_the_pods_reach_only_the_store_storage_and_dns(
    overlay: str, name: str
) -> None:
    docs = render(overlay)
    store = urlsplit(container_env(docs)["SECATEUR_STORE_URL"])
    assert store.hostname and store.port
    reachable = [
        (store.hostname, store.port),  # the job store
        ("142.250.72.27", 443),  # storage.googleapis.com
        ("199.36.153.8", 443),  # private.googleapis.com (Private Google Access)
        ("169.254.169.254", 80),  # Workload Identity's token (GKE Dataplane V2)
        ("169.254.169.252", 988),  # ... and on Calico clusters
    ]
    unreachable = [
        (store.hostname, 22),
        ("10.0.0.3", store.port),  # another database of the VPC
        ("10.4.0.1", 443),  # the Kubernetes API's ClusterIP, any in-cluster HTTPS
        ("172.16.0.2", 443),  # a private control plane
        ("142.250.72.27", 80),  # plain HTTP out
        ("93.184.216.34", 22),
        ("169.254.169.254", 443),
    ]
    assert [a for a in reachable if not _reaches(docs, name, *a)] == []
    assert [a for a in unreachable if _reaches(docs, name, *a)] == []
    assert not _reaches(docs, name, "8.8.8.8", 53, "UDP")  # DNS: the cluster's only
    # The one rule naming pods: port 53 of kube-dns in kube-system.
    selector_rules = [
        r
        for spec in _policies(docs, name, "Egress")
        for r in spec["egress"]
        if any("podSelector" in p or "namespaceSelector" in p for p in r.get("to", []))
    ]
    assert len(selector_rules) == 1
    (dns,) = selector_rules
    assert {(p["protocol"], p["port"]) for p in dns["ports"]} == {("UDP", 53), ("TCP", 53)}
    peers = [p for p in dns["to"] if "podSelector" in p]
    assert peers == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_opens_only_the_served_ports(overlay: str) -> None:
    docs = render(overlay)
    serve = parse_serve_args(expanded_args(docs, API))
    work = parse_worker_args(expanded_args(docs, WORKER))

    def opened(name: str) -> set[int]:
        rules = [r for spec in _policies(docs, name, "Ingress") for r in spec.get("ingress", [])]
        assert all(r.get("ports") for r in rules), rules
        return {_port(docs, name, p["port"]) for r in rules for p in r["ports"]}

    assert opened(API) == {serve.port, serve.metrics_port}
    assert opened(WORKER) == {work.metrics_port}


def _accelerators(docs: Docs, name: str) -> dict[str, tuple[str, str]]:
    res = container(docs, name)["resources"]
    return {
        acc: (res.get("requests", {}).get(acc), res["limits"].get(acc))
        for acc in ACCELERATORS
        if acc in res.get("requests", {}) or acc in res["limits"]
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_replicas_stay_on_cpu_nodes_with_the_default_image(overlay: str) -> None:
    docs = render(overlay)
    assert _accelerators(docs, API) == {}
    assert not pod_spec(docs, API).get("nodeSelector")
    assert re.fullmatch(r"secateur:\d+\.\d+\.\d+", container(docs, API)["image"])


def test_cpu_overlay_asks_for_no_accelerator() -> None:
    docs = render("cpu")
    assert _accelerators(docs, WORKER) == {}
    assert not pod_spec(docs, WORKER).get("nodeSelector")
    assert container(docs, WORKER)["image"] == container(docs, API)["image"]


def test_gpu_overlay_puts_workers_on_nvidia_gpus() -> None:
    docs = render("gpu")
    assert _accelerators(docs, WORKER) == {"nvidia.com/gpu": ("1", "1")}
    pod = pod_spec(docs, WORKER)
    assert pod["nodeSelector"]["cloud.google.com/gke-accelerator"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert container(docs, WORKER)["image"].endswith("-gpu")


def test_tpu_overlay_puts_workers_on_a_tpu_node_pool() -> None:
    docs = render("tpu")
    acc = _accelerators(docs, WORKER)
    assert list(acc) == ["google.com/tpu"]
    requests, limits = acc["google.com/tpu"]
    assert requests == limits and int(limits) >= 1
    pod = pod_spec(docs, WORKER)
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"]
    assert re.fullmatch(r"\d+(x\d+)+", pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"])
    assert {"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    # The image of the Dockerfile's `tpu` target.
    assert container(docs, WORKER)["image"].endswith("-tpu")


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


def test_multihost_tpu_example_runs_one_prune_per_host_of_the_slice() -> None:
    """deploy/k8s/examples/multihost-tpu: a JobSet whose pods form one v5e 2x4 slice,
    each told its hosts and index the way pruner/cluster.py reads them."""
    from secateur.cli.local import build_request
    from secateur.cli.parser import build_parser
    from secateur.pruner.cluster import read_member

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (needed for `kubectl kustomize`)")
    proc = subprocess.run(
        [kubectl, "kustomize", str(K8S / "examples" / "multihost-tpu")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    (jobset,) = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert (jobset["apiVersion"], jobset["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    (rjob,) = jobset["spec"]["replicatedJobs"]
    job = rjob["template"]["spec"]
    hosts = job["parallelism"]
    assert job["completions"] == hosts >= 2 and job["completionMode"] == "Indexed"
    kv = pytest.importorskip("kubernetes_validate")
    as_job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x"}, "spec": job}
    for version in K8S_VERSIONS:
        kv.validate(as_job, version, strict=True)

    pod = job["template"]["spec"]
    topology = pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"]
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"].startswith("tpu-")
    (box,) = pod["containers"]
    chips = int(box["resources"]["limits"]["google.com/tpu"])
    assert box["resources"]["requests"]["google.com/tpu"] == str(chips)
    assert chips * hosts == math.prod(int(n) for n in topology.split("x"))  # the whole slice
    assert box["image"].endswith("-tpu")

    env = {e["name"]: e for e in box["env"]}
    index = env["TPU_WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert index == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    # The JobSet's pod hostnames through its headless Service, in index order.
    name, subdomain = jobset["metadata"]["name"], jobset["spec"]["network"]["subdomain"]
    assert jobset["spec"]["network"]["enableDNSHostnames"] is True
    names = env["TPU_WORKER_HOSTNAMES"]["value"].split(",")
    assert names == [f"{name}-{rjob['name']}-0-{i}.{subdomain}" for i in range(hosts)]
    for i in range(hosts):
        member = read_member({"TPU_WORKER_HOSTNAMES": ",".join(names), "TPU_WORKER_ID": str(i)})
        assert member is not None and member.members == hosts and member.is_chief == (i == 0)

    assert box["command"] == ["secateur", "prune"]
    args = build_parser().parse_args(["prune", *box["args"]])
    request = build_request(args)  # the same conversion and checks a job gets
    assert request.train_data and request.eval_data and request.max_accuracy_drop is not None
