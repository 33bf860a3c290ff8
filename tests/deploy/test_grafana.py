"""deploy/grafana: the dashboard's structure and provisioning, then every panel query
against a real Prometheus (deploy/prometheus's config and rules) scraping a real server
that ran a job."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from secateur.server.api.service import BackgroundServer, ServerOptions
from secateur.server.metrics import ServerMetrics
from secateur.v1 import pruning_pb2 as pb
from secateur.v1 import pruning_pb2_grpc as pbg

from ..server.prometheus_fixture import (
    PrometheusServer,
    Sample,
    prometheus_binary,
    run_prometheus,
)
from .test_prometheus_config import (
    CONFIG,
    SYNTHETIC_METRICS,
    exported_metric_names,
    promql_metric_names,
    recorded_names,
)

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "secateur.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "secateur.yml"
DATASOURCE_UID = "prometheus"
PANEL_TYPES = frozenset({"timeseries", "stat", "bargauge"})
# The live test's whole run fits in this window, so rates over it see the job.
WINDOW = "10m"
GRAFANA_VARIABLES = {
    "$__rate_interval": WINDOW,
    "$__range": WINDOW,
    "$__interval": "15s",
}


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def panel_targets() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every query of the dashboard."""
    return [(p, t) for p in load_dashboard()["panels"] for t in p.get("targets", [])]


def substitute(expr: str) -> str:
    """The expression as Grafana sends it, with its interval variables filled in."""
    for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable left in {expr!r}"
    return expr


# ---------------------------------------------------------------------- structure


def test_dashboard_isAProvisionableDashboard() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "secateur" and dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    assert dashboard.get("id") is None  # provisioning assigns it
    assert dashboard["panels"], "no panels"


def test_panels_haveUniqueIdsAndValidGridPositions() -> None:
    panels = load_dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        x, y, w, h = (grid[k] for k in ("x", "y", "w", "h"))
        assert all(isinstance(v, int) for v in (x, y, w, h)), panel["title"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 24, panel["title"]
        for cx in range(x, x + w):
            for cy in range(y, y + h):
                other = cells.setdefault((cx, cy), panel["title"])
                assert other == panel["title"], f"{panel['title']!r} overlaps {other!r}"


def test_panels_queryThePrometheusDatasource() -> None:
    for panel in load_dashboard()["panels"]:
        title = panel["title"]
        assert panel["type"] in PANEL_TYPES, title
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, title
        targets = panel["targets"]
        assert targets and all(t.get("expr", "").strip() for t in targets), title
        assert len({t["refId"] for t in targets}) == len(targets), title
        for target in targets:
            assert target.get("datasource", panel["datasource"])["uid"] == DATASOURCE_UID, title


def test_panelQueries_useOnlyExportedMetrics() -> None:
    known = exported_metric_names() | SYNTHETIC_METRICS | recorded_names()
    unknown = {
        panel["title"]: sorted(promql_metric_names(target["expr"]) - known)
        for panel, target in panel_targets()
        if promql_metric_names(target["expr"]) - known
    }
    assert not unknown, f"panels use metrics server/metrics.py does not export: {unknown}"


def test_panelQueries_takeTheirWindowsFromGrafana() -> None:
    for panel, target in panel_targets():
        for window in re.findall(r"\[([^\]]*)\]", target["expr"]):
            assert window in ("$__rate_interval", "$__range"), (panel["title"], window)
        if re.search(r"\b(?:rate|irate)\(", target["expr"]):
            assert "[$__rate_interval]" in target["expr"], panel["title"]


def test_dashboard_coversTheServiceMetrics() -> None:
    used = set().union(*(promql_metric_names(t["expr"]) for _, t in panel_targets()))
    assert used >= {
        "secateur_jobs_completed_total",
        "secateur_jobs_submitted_total",
        "secateur_jobs_queued",
        "secateur_jobs_running",
        "secateur_stage_duration_seconds_bucket",
        "secateur_peak_memory_bytes",
        "secateur_train_step_seconds",
        "secateur_params",
        "secateur_params_saved_ratio",
        "secateur_accuracy",
        "grpc_server_started_total",
        "grpc_server_handled_total",
        "grpc_server_handling_seconds_bucket",
    }


def test_provisioning_pointsAtTheDatasourceAndDashboards() -> None:
    datasources = yaml.safe_load(DATASOURCES.read_text())
    assert datasources["apiVersion"] == 1
    (source,) = datasources["datasources"]
    assert source["uid"] == DATASOURCE_UID and source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    # deploy/grafana/dashboards/ is what gets mounted there.
    assert sorted(p.name for p in DASHBOARD.parent.glob("*.json")) == ["secateur.json"]


# ---------------------------------------------------------------------- live


@dataclass
class Live:
    prom: PrometheusServer
    server: BackgroundServer


def _deploy_config(target: str) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml aimed at ``target``, scraping every second."""
    config: dict[str, Any] = yaml.safe_load(CONFIG.read_text())
    config["global"].update(
        {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    )
    config["rule_files"] = [str(CONFIG.parent / pattern) for pattern in config["rule_files"]]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "secateur"]
    job["static_configs"] = [{"targets": [target]}]
    config["scrape_configs"] = [job]
    return config


@pytest.fixture(scope="module")
def deploy_prometheus(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Any]:
    """Factory: a real Prometheus running deploy/prometheus's config (rules included)."""
    prometheus_binary()
    with ExitStack() as stack:

        def start(target: str) -> PrometheusServer:
            workdir = tmp_path_factory.mktemp("deploy-prometheus")
            return stack.enter_context(
                run_prometheus([target], workdir, config_data=_deploy_config(target))
            )

        yield start


@pytest.fixture(scope="module")
def live(
    digits_data: Any, tmp_path_factory: pytest.TempPathFactory, deploy_prometheus: Any
) -> Iterator[Live]:
    """A server scraped by deploy/prometheus's Prometheus; one job succeeds, one call fails.

    Prometheus scrapes before the job starts, so rates and increases see it.
    """
    state = tmp_path_factory.mktemp("state")
    out = tmp_path_factory.mktemp("out")
    opts = ServerOptions(
        state_dir=str(state),
        port=0,
        metrics_port=0,
        allowed_prefixes=(str(digits_data.root), str(out)),
    )
    with BackgroundServer(opts) as server:
        prom = deploy_prometheus(f"127.0.0.1:{server.metrics_port}")
        prom.wait_for('up{job="secateur"}', lambda s: s[0].value == 1, timeout=30)
        prom.wait_for("secateur_jobs_submitted_total")
        with grpc.insecure_channel(server.target) as channel:
            stub = pbg.PruningServiceStub(channel)
            spec = pb.JobSpec(
                model_uri=digits_data.model_path,
                output_uri=str(out),
                pruning=pb.PruningSpec(ratio=0.5),
                training=pb.TrainingSpec(
                    epochs=0, eval_data=digits_data.eval_file, measure_steps=1
                ),
            )
            job = stub.CreateJob(pb.CreateJobRequest(spec=spec))
            final = list(stub.WatchJob(pb.WatchJobRequest(name=job.name), timeout=240))[-1]
            assert final.state == pb.Job.STATE_SUCCEEDED, final.error
            with pytest.raises(grpc.RpcError) as missing:
                stub.GetJob(pb.GetJobRequest(name="jobs/missing"))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        prom.wait_for(
            'secateur_jobs_completed_total{outcome="succeeded"}', lambda s: s[0].value == 1
        )
        prom.wait_for(
            'grpc_server_handled_total{grpc_method="GetJob",grpc_code="NOT_FOUND"}',
            lambda s: s[0].value == 1,
        )
        time.sleep(2)  # a couple more scrapes and rule evaluations after the last change
        yield Live(prom, server)


def _lazily_created_series() -> set[str]:
    """Exported names with no series in a fresh server's registry (labels made on first use).

    A series' first sample is invisible to rate() and increase(): over such a
    histogram, one job's observations give NaN quantiles.
    """
    metrics = ServerMetrics()
    metrics.init_service(pb.DESCRIPTOR.services_by_name["PruningService"])
    present = {s.name for family in metrics.registry.collect() for s in family.samples}
    return exported_metric_names() - present


def _finite(samples: list[Sample]) -> bool:
    return any(not math.isnan(s.value) for s in samples)


_WINDOWED = re.compile(r"\b(?:rate|irate|increase)\(\s*(\w+(?:\{[^{}]*\})?)\s*\[[^\]]*\]\s*\)")


def cumulative(expr: str) -> str:
    """``expr`` with ``rate(x[w])``/``increase(x[w])`` replaced by ``x`` (totals since start)."""
    return _WINDOWED.sub(r"\1", expr)


def test_cumulative_dropsTheWindow() -> None:
    expr = 'histogram_quantile(0.5, sum by (le) (rate(x_bucket{a="b"}[5m]))) + increase(y[1h])'
    assert cumulative(expr) == 'histogram_quantile(0.5, sum by (le) (x_bucket{a="b"})) + y'


def test_everyPanelQuery_returnsDataFromARealServer(live: Live) -> None:
    lazy = _lazily_created_series()
    failures: list[str] = []
    for panel, target in panel_targets():
        expr = substitute(target["expr"])
        windowed = bool(re.search(r"\b(?:rate|irate|increase)\(", expr))
        # NaN is an answer only for a quantile over a histogram made on first use.
        nan_ok = "histogram_quantile" in expr and bool(promql_metric_names(expr) & lazy)
        try:
            samples = live.prom.wait_for(
                expr,
                (lambda s: True) if nan_ok else _finite,
                timeout=30 if windowed else 10,
            )
            if nan_ok:
                # The quantile itself is NaN after one job; over the totals it is not.
                live.prom.wait_for(cumulative(expr), _finite, timeout=10)
        except AssertionError as exc:
            failures.append(f"panel {panel['id']} {panel['title']!r} [{target['refId']}]: {exc}")
            continue
        legend_labels = re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", ""))
        for label in legend_labels:
            if not all(label in s.labels for s in samples):
                failures.append(
                    f"panel {panel['id']} {panel['title']!r} [{target['refId']}]: legend "
                    f"{{{{{label}}}}} not a label of {expr!r}: {samples[:3]}"
                )
    assert not failures, "\n".join(failures)


def test_dashboard_showsTheJobAndTheFailedCall(live: Live) -> None:
    # Spot checks that the panels show what happened, not just something.
    exprs = {panel["title"]: substitute(t["expr"]) for panel, t in panel_targets()}
    outcomes = {
        s.labels["outcome"]: s.value for s in live.prom.query(exprs["Jobs by outcome (time range)"])
    }
    assert outcomes["succeeded"] == pytest.approx(1, rel=0.5) and outcomes["failed"] == 0
    errors = live.prom.query(exprs["gRPC errors by code (non-OK)"])
    assert {(s.labels["grpc_method"], s.labels["grpc_code"]) for s in errors} == {
        ("GetJob", "NOT_FOUND")
    }
    assert live.prom.query(exprs["gRPC server error ratio"])[0].value == 0
    variants = {
        s.labels["variant"]: s.value
        for s in live.prom.query(exprs["Parameters: original vs pruned"])
    }
    assert variants["pruned"] < variants["original"]
    assert 0 < live.prom.query(exprs["Params saved (last job)"])[0].value < 1


def test_recordingRules_produceSeries(live: Live) -> None:
    missing = []
    for name in sorted(recorded_names()):
        try:
            live.prom.wait_for(name, timeout=15)
        except AssertionError:
            missing.append(name)
    assert not missing, f"recording rules without a series: {missing}"


def test_rules_evaluateWithoutErrorsAndNoAlertIsActive(live: Live) -> None:
    groups = live.prom.api("rules")["groups"]
    assert {g["name"] for g in groups} == {"secateur.rules", "secateur.alerts"}
    unhealthy = [
        (r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] != "ok"
    ]
    assert not unhealthy, unhealthy
    assert live.prom.api("alerts")["alerts"] == []
