"""A real Prometheus server for tests: scrape a /metrics endpoint, query the HTTP API.

Use :func:`run_prometheus` as a context manager, or the ``prometheus``
fixture (a factory) from a test module::

    from tests.server.prometheus_fixture import prometheus_fixture  # noqa: F401

    def test_x(prometheus):
        prom = prometheus(["127.0.0.1:9123"])
        samples = prom.wait_for('up{instance="127.0.0.1:9123"}', lambda s: s[0].value == 1)

The binary is ``$PROMETHEUS_BIN``, else ``prometheus`` on PATH, else
``/usr/bin/prometheus``; when none exists the test is skipped (CI installs
Debian's ``prometheus`` package).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest

__all__ = [
    "PrometheusServer",
    "Sample",
    "prometheus_binary",
    "prometheus_fixture",
    "promtool_binary",
    "run_prometheus",
]

SCRAPE_JOB = "secateur-test"


class Sample(NamedTuple):
    """One series of an instant query: its labels (``__name__`` included) and value."""

    labels: dict[str, str]
    value: float


def _binary(env: str, name: str) -> str | None:
    candidates = [os.environ.get(env), shutil.which(name), f"/usr/bin/{name}"]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def prometheus_binary() -> str:
    """Path of the prometheus binary, or skip the test with the reason."""
    path = _binary("PROMETHEUS_BIN", "prometheus")
    if path is None:
        pytest.skip(
            "prometheus binary not found (apt-get install prometheus, or set PROMETHEUS_BIN)"
        )
    return path


def promtool_binary() -> str:
    """Path of the promtool binary, or skip the test with the reason."""
    path = _binary("PROMTOOL_BIN", "promtool")
    if path is None:
        pytest.skip("promtool binary not found (apt-get install prometheus, or set PROMTOOL_BIN)")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


@dataclass
class PrometheusServer:
    """A running Prometheus process and its HTTP API."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    targets: tuple[str, ...]

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>`` and return ``data`` (AssertionError on an API error)."""
        query = urllib.parse.urlencode(params)
        status, body = _get(f"{self.url}/api/v1/{path}" + (f"?{query}" if query else ""))
        payload = json.loads(body)
        if status != 200 or payload.get("status") != "success":
            raise AssertionError(f"Prometheus API {path} {params}: {status} {payload}")
        return payload["data"]

    def query(self, promql: str) -> list[Sample]:
        """Instant query: the series (vector) or the single value (scalar) it returns."""
        data = self.api("query", query=promql)
        kind, result = data["resultType"], data["result"]
        if kind == "vector":
            return [Sample(dict(item["metric"]), float(item["value"][1])) for item in result]
        if kind == "scalar":
            return [Sample({}, float(result[1]))]
        raise AssertionError(f"unexpected result type {kind} for {promql!r}")

    def wait_for(
        self,
        promql: str,
        predicate: Callable[[list[Sample]], bool] | None = None,
        timeout: float = 20.0,
    ) -> list[Sample]:
        """Poll ``promql`` until it returns data (and ``predicate`` holds); return it."""
        deadline = time.monotonic() + timeout
        last: list[Sample] = []
        while True:
            last = self.query(promql)
            if last and (predicate is None or predicate(last)):
                return last
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no matching result for {promql!r} within {timeout:.0f}s; last: {last}\n"
                    f"targets: {self.target_health()}\nprometheus log:\n{self.log_tail()}"
                )
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited early:\n{self.log_tail()}")
            time.sleep(0.25)

    def target_health(self) -> list[tuple[str, str, str]]:
        """(scrapeUrl, health, lastError) of every active target."""
        data = self.api("targets")
        return [
            (t.get("scrapeUrl", ""), t.get("health", ""), t.get("lastError", ""))
            for t in data.get("activeTargets", [])
        ]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _write_config(path: Path, targets: Sequence[str], interval: str, job: str) -> None:
    # JSON is valid YAML; no yaml writer needed.
    config = {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "evaluation_interval": interval,
        },
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
    }
    path.write_text(json.dumps(config, indent=2))


@contextmanager
def run_prometheus(
    targets: Sequence[str],
    workdir: Path,
    *,
    scrape_interval: str = "1s",
    job: str = SCRAPE_JOB,
    ready_timeout: float = 30.0,
    config_data: Mapping[str, Any] | None = None,
) -> Iterator[PrometheusServer]:
    """Run Prometheus on a free 127.0.0.1 port scraping ``targets`` ("host:port").

    Config, TSDB and log live under ``workdir``. ``config_data`` replaces the
    generated config (e.g. deploy/prometheus's, rules included). Yields once
    ``/-/ready`` answers 200; the process is always terminated on exit.
    """
    binary = prometheus_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    if config_data is None:
        _write_config(config, targets, scrape_interval, job)
    else:
        config.write_text(json.dumps(config_data, indent=2))  # JSON is YAML
    last_log = ""
    for attempt in range(3):  # the free port may be taken before Prometheus binds it
        port = _free_port()
        log_path = workdir / f"prometheus-{attempt}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / f'tsdb-{attempt}'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        server = PrometheusServer(f"http://127.0.0.1:{port}", process, log_path, tuple(targets))
        try:
            deadline = time.monotonic() + ready_timeout
            ready = False
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    status, _ = _get(f"{server.url}/-/ready", timeout=1.0)
                    if status == 200:
                        ready = True
                        break
                except OSError:
                    pass
                time.sleep(0.1)
            if not ready:
                last_log = server.log_tail()
                if process.poll() is not None and "address already in use" in last_log:
                    continue
                raise RuntimeError(f"prometheus did not become ready:\n{last_log}")
            yield server
            return
        finally:
            server.stop()
    raise RuntimeError(f"prometheus could not bind a port:\n{last_log}")


@pytest.fixture(name="prometheus", scope="module")
def prometheus_fixture(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[Sequence[str]], PrometheusServer]]:
    """Factory: ``prometheus(["127.0.0.1:PORT"])`` starts a real Prometheus.

    Module scoped, so module-scoped fixtures can share one server (its first
    scrape takes about 5 s: Prometheus applies new targets on a 5 s tick).
    Every server started is terminated at the end of the module.
    """
    prometheus_binary()
    with ExitStack() as stack:

        def start(targets: Sequence[str]) -> PrometheusServer:
            workdir = tmp_path_factory.mktemp("prometheus")
            return stack.enter_context(run_prometheus(targets, workdir))

        yield start
