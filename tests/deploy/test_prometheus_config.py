"""deploy/prometheus: promtool accepts the config and rules, the rules' unit tests pass,
and every metric the rules use is one the server exports (server/metrics.py)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from secateur.server.metrics import ServerMetrics

from ..server.prometheus_fixture import promtool_binary

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES = PROMETHEUS_DIR / "rules" / "secateur.yml"
RULES_TEST = PROMETHEUS_DIR / "tests" / "secateur_test.yml"

# Series Prometheus makes itself for every target.
SYNTHETIC_METRICS = frozenset(
    {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added"}
)
_PROMQL_WORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"offset", "bool", "inf", "nan", "atan2"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels left out).

    Enough for the expressions of this repository: strings, label matchers,
    ranges and grouping clauses are removed, then every identifier that is
    not called like a function and is not a keyword is a metric name.
    """
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub("", text)
    names: set[str] = set()
    for match in _IDENT.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _PROMQL_WORDS:
            continue
        names.add(name)
    return names


def exported_metric_names() -> set[str]:
    """Every series name a :class:`ServerMetrics` can export.

    From the registry's metric families: a counter ``x`` is exported as
    ``x_total`` (and ``x_created``), a histogram ``x`` as ``x_bucket``,
    ``x_count``, ``x_sum``, a gauge under its own name.
    """
    names: set[str] = set()
    for family in ServerMetrics().registry.collect():
        if family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        elif family.type == "histogram":
            names |= {f"{family.name}_{s}" for s in ("bucket", "count", "sum", "created")}
        elif family.type == "summary":
            names |= {family.name, f"{family.name}_count", f"{family.name}_sum"}
        else:
            names.add(family.name)
        names |= {sample.name for sample in family.samples}
    return names


def load_rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
    return groups


def recorded_names() -> set[str]:
    return {rule["record"] for g in load_rule_groups() for rule in g["rules"] if "record" in rule}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool_binary(), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_promtool_checkConfig_findsTheRuleFiles() -> None:
    result = promtool("check", "config", str(CONFIG.relative_to(REPO)))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # rule_files: [rules/*.yml] resolves beside the config and finds the rules.
    assert "rules/secateur.yml" in output, output
    assert re.search(r"SUCCESS: [1-9]\d* rule files found", output), output


def test_promtool_checkRules() -> None:
    result = promtool("check", "rules", str(RULES.relative_to(REPO)))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unitTestsOfTheAlerts() -> None:
    result = promtool("test", "rules", str(RULES_TEST.relative_to(REPO)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


def test_ruleGlob_matchesOnlyRuleFiles() -> None:
    # The unit tests live outside rules/: the glob would load them as rule groups.
    config = yaml.safe_load(CONFIG.read_text())
    assert config["rule_files"] == ["rules/*.yml"]
    matched = sorted((CONFIG.parent).glob("rules/*.yml"))
    assert matched == [RULES]
    for path in matched:
        assert set(yaml.safe_load(path.read_text())) == {"groups"}


def test_scrapeConfig_targetsTheComposeService() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    secateur = jobs["secateur"]
    assert secateur.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in secateur["static_configs"] for t in sc["targets"]]
    # The compose file's API replicas and workers (tests/deploy/test_compose.py
    # checks each of them serves /metrics there).
    assert targets == ["secateur:9464", "secateur-2:9464", "worker-1:9464", "worker-2:9464"]
    assert "kubernetes_sd_configs" in CONFIG.read_text()  # the commented example


def test_kubernetesExample_isAValidScrapeConfig(tmp_path: Path) -> None:
    # Uncomment the kubernetes_sd_configs example in place of the static job.
    text = CONFIG.read_text()
    start = text.index("  # - job_name: secateur")
    block = text[start : text.index("\n\n", start)]
    example = "\n".join(line.replace("  # ", "  ", 1) for line in block.splitlines())
    config = yaml.safe_load(text)
    config["rule_files"] = [str(CONFIG.parent / p) for p in config["rule_files"]]
    config["scrape_configs"] = yaml.safe_load(example)
    assert config["scrape_configs"][0]["job_name"] == "secateur"
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = promtool("check", "config", str(path))
    output = result.stdout + result.stderr
    if "field kubernetes_sd_configs not found" in output:
        pytest.skip("this promtool is built without Kubernetes discovery (Debian's package)")
    assert result.returncode == 0, output


def test_everyAlert_hasSeverityAndAnnotations() -> None:
    alerts = [r for g in load_rule_groups() for r in g["rules"] if "alert" in r]
    names = {a["alert"] for a in alerts}
    assert names >= {
        "SecateurDown",
        "SecateurJobFailureRateHigh",
        "SecateurQueueDepthHigh",
        "SecateurJobsStuck",
        "SecateurGrpcServerErrorsHigh",
    }
    for alert in alerts:
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}, alert["alert"]
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]


def test_everyAlert_isExercisedByTheUnitTests() -> None:
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    fired = {
        case["alertname"]
        for t in tests
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    silent = {
        case["alertname"]
        for t in tests
        for case in t.get("alert_rule_test", [])
        if not case.get("exp_alerts")
    }
    alerts = {r["alert"] for g in load_rule_groups() for r in g["rules"] if "alert" in r}
    assert alerts <= fired, f"alerts never shown firing: {sorted(alerts - fired)}"
    assert alerts <= silent, f"alerts never shown silent: {sorted(alerts - silent)}"


def test_promqlMetricNames_parsesTheUsualShapes() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, stage) (rate(x_bucket{stage=~"A|B"}[5m])))'
        " / on (job) group_left ignoring(z) y offset 6h > bool 0.2"
        ' unless absent(up{job="secateur"}) and rec:ord:ed'
    )
    assert promql_metric_names(expr) == {"x_bucket", "y", "up", "rec:ord:ed"}


@pytest.mark.parametrize(
    "name",
    [
        "secateur_jobs_completed_total",
        "secateur_stage_duration_seconds_bucket",
        "grpc_server_handling_seconds_count",
        "secateur_params",
    ],
)
def test_exportedMetricNames_includeSuffixedSeries(name: str) -> None:
    assert name in exported_metric_names()


def test_rules_useOnlyMetricsTheServerExports() -> None:
    exported = exported_metric_names() | SYNTHETIC_METRICS
    recorded = recorded_names()
    unknown: dict[str, set[str]] = {}
    for group in load_rule_groups():
        for rule in group["rules"]:
            name = rule.get("record") or rule.get("alert")
            for metric in promql_metric_names(rule["expr"]):
                if metric not in exported and metric not in recorded:
                    unknown.setdefault(name, set()).add(metric)
    assert not unknown, f"rules use metrics server/metrics.py does not export: {unknown}"


def test_recordingRules_followTheNamingConvention() -> None:
    for name in recorded_names():
        assert re.fullmatch(r"secateur:[a-z0-9_]+:[a-z0-9_]+", name), name
