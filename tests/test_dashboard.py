"""The Grafana dashboard: well-formed, and every query returns data from a real Prometheus."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import yaml

from tests.helpers import feed, free_port, make_ticks, running_daemon

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "dashboards" / "streamd.json"
RULES = ROOT / "deploy" / "prometheus" / "streamd-rules.yml"
DATASOURCE = "${datasource}"
INSTANCE_FILTER = 'instance=~"$instance"'
WORKER_FILTER = 'worker=~"$worker'  # "$worker" or "$worker|" (process metrics of non-workers)
# Metrics exported with a worker label that the $worker variable must filter.
WORKER_LABELLED = {
    "streamd_ticks_processed_total",
    "streamd_ingest_batches_total",
    "streamd_worker_busy_seconds_total",
    "streamd_worker_batches_total",
    "streamd_worker_restarts_total",
    "streamd_worker_up",
    "streamd_worker_keys",
    "streamd_worker_state_bytes",
    "streamd_worker_backlog_ticks",
    "streamd_process_cpu_seconds_total",
    "streamd_process_resident_memory_bytes",
    "streamd_process_open_fds",
}
_SELECTOR = re.compile(r"\b(up|streamd_[a-z0-9_]+)(\{[^}]*\})?")
_RANGE_FUNCTION = re.compile(r"\b(rate|irate|increase|deriv|delta|[a-z]+_over_time)\((.*?)\[([^\]]+)\]\)")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*\w+\s*\)\s*$")


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))


def data_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in walk_panels(dashboard["panels"]) if panel["type"] != "row"]


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """``(panel title, expr)`` for every target of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in data_panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def variable_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """``(variable, selector)``: the series each ``label_values(selector, label)`` variable reads."""
    found = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = _LABEL_VALUES.match(text)
        assert match is not None, f"variable {variable['name']}: unsupported query {text!r}"
        found.append((f"${variable['name']}", match.group(1)))
    return found


def _replace_variable(expr: str, name: str, value: str) -> str:
    expr = expr.replace("${" + name + "}", value)
    return re.sub(rf"\${name}\b", lambda _match: value, expr)


def concrete(expr: str, instance: str) -> str:
    """Substitute Grafana's variables the way Grafana would for one instance and all workers."""
    replacements = {
        "instance": instance,
        "worker": ".*",
        "__rate_interval": "15s",
        "__interval": "5s",
        "__range": "1m",
    }
    for name, value in replacements.items():
        expr = _replace_variable(expr, name, value)
    assert "$" not in expr, f"unsubstituted variable in {expr!r}"
    return expr


class TestDashboardStructure:
    def test_identity(self) -> None:
        """uid streamd, a recent schema, and the three template variables."""
        dashboard = load_dashboard()
        assert dashboard["uid"] == "streamd"
        assert dashboard["schemaVersion"] >= 39
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        assert variables["instance"]["query"]["query"] == "label_values(streamd_build_info, instance)"
        worker = variables["worker"]
        assert worker["query"]["query"] == 'label_values(streamd_worker_up{instance=~"$instance"}, worker)'
        assert worker["multi"] and worker["includeAll"]

    def test_panel_ids_are_unique(self) -> None:
        """Grafana identifies panels (links, alerts, rendering) by id, rows included."""
        ids = [panel["id"] for panel in walk_panels(load_dashboard()["panels"])]
        assert len(ids) == len(set(ids))

    def test_every_panel_has_a_query(self) -> None:
        """No panel is decoration: each has at least one target with an expression."""
        for panel in data_panels(load_dashboard()):
            exprs = [target.get("expr") for target in panel.get("targets", [])]
            assert any(exprs), f"panel {panel['title']!r} has no expr"

    def test_every_query_uses_the_datasource_variable(self) -> None:
        """Panels and targets use ${datasource}, so the dashboard works against any Prometheus."""
        for panel in data_panels(load_dashboard()):
            assert panel["datasource"]["uid"] == DATASOURCE, panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == DATASOURCE, panel["title"]

    def test_every_selector_filters_instance_and_worker(self) -> None:
        """Each series selector narrows to $instance, and to $worker where the metric has a worker label."""
        for title, expr in panel_queries(load_dashboard()):
            for match in _SELECTOR.finditer(expr):
                metric, labels = match.group(1), match.group(2) or ""
                assert INSTANCE_FILTER in labels, f"{title!r}: {metric} without {INSTANCE_FILTER}: {expr}"
                base = re.sub(r"_(bucket|sum|count)$", "", metric)
                if base in WORKER_LABELLED:
                    assert WORKER_FILTER in labels, f"{title!r}: {metric} without a $worker filter: {expr}"

    def test_rates_use_grafana_intervals(self) -> None:
        """Range windows follow the scrape interval ($__rate_interval) or the time picker ($__range)."""
        for title, expr in panel_queries(load_dashboard()):
            for match in _RANGE_FUNCTION.finditer(expr):
                assert match.group(3) in ("$__rate_interval", "$__range"), f"{title!r}: {match.group(0)}"

    def test_substitution(self) -> None:
        """Both $name and ${name} forms are replaced, and longer names are not clobbered."""
        expr = 'rate(x{instance=~"$instance", worker=~"${worker}"}[$__rate_interval]) / $__range'
        assert concrete(expr, "127.0.0.1:9") == 'rate(x{instance=~"127.0.0.1:9", worker=~".*"}[15s]) / 1m'


def recording_rule_queries() -> list[tuple[str, str]]:
    rules = yaml.safe_load(RULES.read_text())
    return [
        (f"rule {rule['record']}", rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
        if "record" in rule
    ]


class Prometheus:
    """A real Prometheus server scraping one target every second, with our rules loaded."""

    def __init__(self, tmp_path: Path, target: str) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus not found: .ci/run should have installed it (Debian package 'prometheus')")
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "streamd", "static_configs": [{"targets": [target]}]}],
        }
        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp_path / "prometheus.log"
        self.url = f"http://127.0.0.1:{free_port()}"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address={self.url.removeprefix('http://')}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; raises AssertionError with Prometheus's message if it is rejected."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            body = json.load(exc)
        if body.get("status") != "success":
            msg = f"{body.get('errorType')}: {body.get('error')}"
            raise AssertionError(msg)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited ({self.proc.returncode}):\n{self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        pytest.fail(f"prometheus not ready after {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@contextlib.contextmanager
def running_prometheus(tmp_path: Path, target: str) -> Iterator[Prometheus]:
    prometheus = Prometheus(tmp_path, target)
    try:
        prometheus.wait_ready()
        yield prometheus
    finally:
        prometheus.stop()


def failing_queries(prometheus: Prometheus, queries: list[tuple[str, str]], instance: str) -> list[str]:
    """Every query that errors or returns no series, with the reason."""
    failures = []
    for where, expr in queries:
        query = concrete(expr, instance)
        try:
            if not prometheus.query(query):
                failures.append(f"{where}: no series: {query}")
        except AssertionError as exc:
            failures.append(f"{where}: {exc}: {query}")
    return failures


def traffic(round_number: int) -> list[bytes]:
    """Good ticks plus input that lands in every drop counter: malformed, bad tick, late tick."""
    now = time.time_ns()
    ticks = make_ticks(200, keys=20, seed=round_number, start_ns=now - 1_000_000_000)
    return [
        msgpack.packb(ticks),
        b"\xc1",  # not msgpack: streamd_ingest_messages_dropped_total{reason="malformed"}
        msgpack.packb({"k": "bad", "t": now, "p": "x"}),  # streamd_ticks_dropped_total{reason="bad_price"}
        msgpack.packb([{"k": "late", "t": now, "p": 1.0}, {"k": "late", "t": now - 10_000_000_000, "p": 1.0}]),
    ]


@pytest.mark.timeout(240)
def test_every_dashboard_and_rule_query_returns_series(tmp_path: Path) -> None:
    """Proof: against a real daemon scraped by a real Prometheus, no dashboard or recording-rule query is empty."""
    dashboard = load_dashboard()
    queries = panel_queries(dashboard) + variable_queries(dashboard) + recording_rule_queries()
    (tmp_path / "daemon").mkdir()
    (tmp_path / "prometheus").mkdir()
    with (
        running_daemon(tmp_path / "daemon", workers=2) as daemon,
        running_prometheus(tmp_path / "prometheus", daemon.metrics_address) as prometheus,
    ):
        instance = re.escape(daemon.metrics_address).replace("\\", "\\\\")
        failures: list[str] = []
        deadline = time.monotonic() + 60
        round_number = 0
        # Keep feeding so rates over the 15s window are non-zero; stop as soon as every query has
        # data, having seen at least ten scrapes (rates need two samples, rules need evaluations).
        while time.monotonic() < deadline:
            feed(daemon.ingest, traffic(round_number))
            round_number += 1
            time.sleep(1)
            if daemon.proc.poll() is not None:
                pytest.fail(f"daemon exited ({daemon.proc.returncode}):\n{daemon.log()[-3000:]}")
            scrapes = prometheus.query('count_over_time(up{job="streamd"}[1m]) >= 10 and up{job="streamd"} == 1')
            if not scrapes:
                continue
            failures = failing_queries(prometheus, queries, instance)
            if not failures:
                break
        else:
            if not failures:
                failures = ["Prometheus never scraped the daemon ten times in a row"]
    assert not failures, "queries without data:\n" + "\n".join(failures)
