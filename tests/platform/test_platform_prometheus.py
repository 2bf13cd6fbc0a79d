"""Alert rules and dashboard against promtool and the operator's real metrics; a real Prometheus
server scraping the operator's /metrics while the real handlers drive a fit (against kmock).

Prometheus scrapes the way Prometheus Operator does from the chart's rendered ServiceMonitor: a
discovered target whose relabelling attaches namespace, service, pod, job and endpoint labels
(platform_support.service_monitor_scrape_config), not a static config."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import aiohttp
import pytest
import yaml
from platform_support import (ALERTS, ROOT, alert_rules, dashboard, dashboard_queries, endpoint_target,
                              exported_metric_names, find, promql_metric_names, render,
                              service_monitor_scrape_config, tool)
from prometheus_client import generate_latest, start_http_server

from consensusfit.operator.config import Config
from consensusfit.operator.metrics import Metrics
from consensusfit.operator.planner import plan

sys.path.insert(0, str(ROOT / "tests" / "operator"))
from cfit_support import T0, ep_fit, job, make_fit, pod, shard_report, update_report  # noqa: E402
from test_operator_kmock import FITS, PODS, WAIT, Cluster, declare_resources, operator  # noqa: E402

SCRAPE_JOB = "consensusfit-operator"  # the job label the ServiceMonitor's relabeling sets
OPERATOR_NAMESPACE = "consensusfit-system"  # the release's (the chart is rendered into it)
OPERATOR_POD = "consensusfit-7d9f8c6b5-x2x4z"  # a pod of the Deployment


def test_promtool_check_rules():
    out = subprocess.run([tool("promtool"), "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 11 rules found" in out.stdout


def test_promtool_unit_tests_fire_and_do_not_fire_every_alert():
    tests = Path(__file__).with_name("alerts_test.yaml")
    out = subprocess.run([tool("promtool"), "test", "rules", str(tests)], capture_output=True, text=True,
                         cwd=tests.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    # Every alert is unit-tested both ways: with series that fire it and series that do not.
    cases = yaml.safe_load(tests.read_text())["tests"]
    fired, silent = set(), set()
    for case in cases:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert fired == names
    # R-hat and divergence cases include a converged fit that must not fire: exp_alerts lists only
    # the bad one; the rest have explicit empty expectations.
    assert silent | {"ConsensusFitRhatHigh", "ConsensusFitDivergences", "ConsensusFitShardRetriesSpiking"} >= names


def test_promql_scanner():
    expr = ('histogram_quantile(0.9, sum by (le, phase) (rate(a_bucket{namespace=~"$namespace", x="y{z}"}'
            '[$__rate_interval]))) > on (phase) group_left b unless c offset 5m and bool 1e3')
    assert promql_metric_names(expr) == {"a_bucket", "b", "c"}


def test_alerts_and_dashboard_name_only_metrics_the_operator_exports():
    exported = exported_metric_names() | {"up"}
    assert {"consensusfit_fits", "consensusfit_shard_duration_seconds_bucket",
            "consensusfit_queue_wait_seconds_bucket", "consensusfit_fit_rhat_max",
            "consensusfit_shard_retries_total"} <= exported
    for rule in alert_rules():
        names = promql_metric_names(rule["expr"])
        assert names and names <= exported, (rule["alert"], names - exported)
    used = set()
    for title, expr in dashboard_queries(dashboard()):
        names = promql_metric_names(expr)
        assert names and names <= exported, (title, names - exported)
        used |= names
    # The panels the issue asks for: fits by phase, shard latency, queue wait, convergence per fit.
    assert {"consensusfit_fits", "consensusfit_shard_duration_seconds_bucket",
            "consensusfit_queue_wait_seconds_bucket", "consensusfit_fit_rhat_max",
            "consensusfit_fit_ess_bulk_min", "consensusfit_fit_divergences",
            "consensusfit_ep_round", "consensusfit_ep_mean_change", "consensusfit_ep_sd_change"} <= used
    # The operator's own health: failed passes, pass time against the resync, its queue, the API.
    assert {"consensusfit_operator_reconcile_errors_total", "consensusfit_operator_pass_duration_seconds",
            "consensusfit_operator_resync_seconds", "consensusfit_operator_queue_depth",
            "consensusfit_operator_reconcile_duration_seconds_bucket",
            "consensusfit_operator_api_request_duration_seconds_bucket",
            "consensusfit_operator_api_errors_total"} <= used


def test_dashboard_loads_as_a_grafana_dashboard():
    board = dashboard()
    assert board["uid"] == "consensusfit" and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert promql_metric_names(variables["namespace"]["definition"].removeprefix("label_values(")
                               .split(",")[0]) <= exported_metric_names()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
            assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


# --- a real Prometheus scraping the operator ---------------------------------------------------

def operator_scrape_config(folder: Path, address: str, *values: str) -> dict:
    """The scrape config Prometheus Operator makes of the chart's ServiceMonitor (rendered with
    `values`, scraping every second) for an operator pod serving its metrics at `address`."""
    objects = render("metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.interval=1s",
                     "metrics.serviceMonitor.scrapeTimeout=900ms", *values, namespace=OPERATOR_NAMESPACE)
    (monitor,), (service,), (deployment,) = (find(objects, kind) for kind in ("ServiceMonitor", "Service", "Deployment"))
    targets = folder / "targets.json"
    targets.write_text(json.dumps([endpoint_target(service, deployment, address, OPERATOR_POD)]))
    return service_monitor_scrape_config(monitor, targets)


class Prometheus:
    """`prometheus` on loopback with a 1 s rule evaluation interval, the alert rules, this scrape
    config, and its query API."""

    def __init__(self, binary: str, folder: Path, scrape_config: dict):
        self.folder = folder
        config = {
            "global": {"evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [scrape_config],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (folder / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.folder / "prometheus.log").read_text()[-2000:]
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as answer:
                    if answer.status == 200:
                        return
            time.sleep(0.1)
        raise AssertionError("prometheus did not become ready")

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as answer:
            body = json.load(answer)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def until(check, what: str, timeout: float = WAIT):
    """Poll (in a thread: the operator runs in this loop) until check() is truthy."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await asyncio.to_thread(check)
        if last:
            return last
        await asyncio.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def value(prometheus: Prometheus, expr: str) -> float | None:
    result = prometheus.query(expr)
    return float(result[0]["value"][1]) if len(result) == 1 else None


@pytest.mark.asyncio
@pytest.mark.timeout(600)
async def test_prometheus_scrapes_the_operator_through_a_fit(kmock, tmp_path):
    prometheus_binary = tool("prometheus")
    declare_resources(kmock)
    url = str(kmock.url).rstrip("/")
    metrics = Metrics()
    server, _ = start_http_server(0, addr="127.0.0.1", registry=metrics.registry)
    prometheus = Prometheus(prometheus_binary, tmp_path,
                            operator_scrape_config(tmp_path, f"127.0.0.1:{server.server_port}"))
    try:
        await asyncio.to_thread(prometheus.wait_ready)
        fit = make_fit()
        fit["metadata"]["resourceVersion"] = "1"
        async with aiohttp.ClientSession(base_url=url) as http, operator(url, metrics):
            cluster = Cluster(http)
            async with http.post(FITS, json=fit) as response:
                assert response.status < 300
            await until(lambda: value(prometheus, f'up{{job="{SCRAPE_JOB}"}}') == 1, "the operator's target up")

            partition = await cluster.job("fvc-partition")
            await cluster.run_pod(partition, report={"ok": True, "rows": 1549, "groups": 176})
            await cluster.finish_job(partition, succeeded=1)
            shards = await cluster.job("fvc-shards")
            await cluster.phase("Sampling")
            # Prometheus sees the fit sampling (the operator holds it there until the shards finish).
            await until(lambda: value(prometheus, 'consensusfit_fits{namespace="default", phase="Sampling"}') == 1,
                        "one fit Sampling in Prometheus")
            await cluster.run_pod(shards, index=0, report=shard_report(0, rhat=1.004, divergences=2, seconds=20))
            await cluster.run_pod(shards, index=1, exit_code=1,
                                  report={"ok": False, "reason": "Error", "message": "storage unreachable"})
            await cluster.run_pod(shards, index=1, attempt=1, report=shard_report(1, rhat=1.03, ess=350, seconds=40))
            fit_labels = '{namespace="default", fit="fvc"}'
            retries = f"consensusfit_shard_retries_total{fit_labels}"
            await until(lambda: value(prometheus, retries) == 1, "the retry scraped")
            # The failed pod goes (the pod garbage collector, a user): the counter stays where it was.
            async with http.delete(f"{PODS}/fvc-shards-1-0") as response:
                assert response.status < 300
            await cluster.run_pod(shards, index=2, report=shard_report(2, seconds=60))
            await cluster.finish_job(shards, succeeded=3)
            await cluster.combine()
            await cluster.phase("Succeeded")

            # What the operator exports now is what Prometheus stores after its next scrapes.
            await until(lambda: value(prometheus, 'consensusfit_fits{phase="Succeeded"}') == 1, "Succeeded scraped")
            await until(lambda: value(prometheus, "consensusfit_shard_duration_seconds_count") == 3,
                        "three shard durations scraped")
            assert value(prometheus, retries) == 1
            assert value(prometheus, f"resets({retries}[10m])") == 0  # increase() reads no reset
            assert value(prometheus, f"consensusfit_shard_failures_total{fit_labels}") == 0
            assert value(prometheus, f"consensusfit_fit_rhat_max{fit_labels}") == 1.03
            assert value(prometheus, f"consensusfit_fit_ess_bulk_min{fit_labels}") == 350
            assert value(prometheus, f"consensusfit_fit_divergences{fit_labels}") == 2
            assert value(prometheus, "consensusfit_shard_duration_seconds_sum") == 120
            assert value(prometheus, 'consensusfit_shard_duration_seconds_bucket{le="30.0"}') == 1
            assert value(prometheus, 'consensusfit_fits{phase="Sampling"}') in (None, 0)
            exported = generate_latest(metrics.registry).decode()
            queue_count = next(float(line.split()[-1]) for line in exported.splitlines()
                               if line.startswith("consensusfit_queue_wait_seconds_count"))
            # kmock sets no creationTimestamp on Jobs, so only the retried pod (timed from its own
            # creation) has a queue wait here; on a cluster every pod has one.
            assert queue_count >= 1
            assert value(prometheus, "consensusfit_queue_wait_seconds_count") == queue_count
            assert value(prometheus, 'sum(consensusfit_phase_duration_seconds_count{phase="Sampling"})') == 1
            assert value(prometheus, 'consensusfit_fit_duration_seconds_count{outcome="Succeeded"}') == 1

            # The alert rules, evaluated by this Prometheus on these series: R-hat and divergences
            # fire for the fit; nothing failed, nothing is stuck, the operator is up.
            def firing() -> dict[str, dict]:
                alerts = prometheus.api("alerts")["alerts"]
                return {a["labels"]["alertname"]: a for a in alerts if a["state"] == "firing"}
            alerts = await until(lambda: (f := firing()) and {"ConsensusFitRhatHigh", "ConsensusFitDivergences"} <= f.keys() and f,
                                 "R-hat and divergence alerts firing")
            assert alerts["ConsensusFitRhatHigh"]["labels"]["fit"] == "fvc"
            assert alerts["ConsensusFitRhatHigh"]["annotations"]["summary"] == "ConsensusFit default/fvc: shard R-hat 1.03"
            assert not {"ConsensusFitFailed", "ConsensusFitOperatorDown", "ConsensusFitStuck"} & alerts.keys()

            # An EP fit in its second round, as a reconcile pass records it: its round series too.
            ep_jobs = {s: job(s, "Complete", succeeded=3, fit="ep") for s in ("partition", "pilot", "round-1",
                                                                              "update-1")}
            ep_jobs["round-2"] = job("round-2", active=3, fit="ep")
            ep_pods = [pod("update-1", report=update_report(1, False, mean=0.25, sd=0.125))]
            ep_pass = plan(ep_fit(status={"phase": "Sampling"}), ep_jobs, ep_pods, T0, Config())
            metrics.record("default", "ep", ep_pass, ep_jobs, ep_pods)
            await until(lambda: value(prometheus, 'consensusfit_ep_round{fit="ep"}') == 2, "the EP round scraped")
            assert value(prometheus, 'consensusfit_ep_mean_change{fit="ep"}') == 0.25
            assert value(prometheus, 'consensusfit_ep_rounds_completed_total{fit="ep"}') == 1

            # Every dashboard query is valid PromQL for this Prometheus; the instant ones have data.
            for title, expr in dashboard_queries(dashboard()):
                concrete = expr.replace("$namespace", ".*").replace("$__rate_interval", "1m")
                result = prometheus.query(concrete)
                if "rate(" not in expr and "increase(" not in expr:
                    assert result, (title, concrete)
    finally:
        prometheus.stop()
        server.shutdown()
        server.server_close()


FIT_NAMESPACE = "ml"


@pytest.mark.asyncio
@pytest.mark.timeout(600)
@pytest.mark.parametrize("honor, seen", [(True, FIT_NAMESPACE), (False, OPERATOR_NAMESPACE)])
async def test_series_keep_the_fits_namespace_through_the_service_monitor(tmp_path, honor, seen):
    """With the chart's default honorLabels (true) a fit's series carry the fit's namespace, which the
    alerts' `by (namespace)` and the dashboard's namespace variable need. With false, the target's
    namespace label (the operator's) wins and the fit's moves to exported_namespace: every fit seems
    to live in the operator's namespace. Both are scraped here, so the test tells them apart."""
    binary = tool("prometheus")
    metrics = Metrics()
    refused = {"runner": {"compilationCache": {"hostPath": {"path": "/"}}}}  # Failed at once: policy
    for name, spec in (("bad", refused), ("fvc", {})):
        metrics.record(FIT_NAMESPACE, name, plan(make_fit(name, FIT_NAMESPACE, **spec), {}, [], T0, Config()), {}, [])
    metrics.reconcile_errors.inc()
    server, _ = start_http_server(0, addr="127.0.0.1", registry=metrics.registry)
    address = f"127.0.0.1:{server.server_port}"
    scrape = operator_scrape_config(tmp_path, address, f"metrics.serviceMonitor.honorLabels={str(honor).lower()}")
    prometheus = Prometheus(binary, tmp_path, scrape)
    try:
        await asyncio.to_thread(prometheus.wait_ready)
        await until(lambda: value(prometheus, f'up{{job="{SCRAPE_JOB}"}}') == 1, "the operator's target up")
        (target,) = prometheus.api("targets")["activeTargets"]
        assert target["labels"] == {"namespace": OPERATOR_NAMESPACE, "service": "consensusfit-metrics",
                                    "pod": OPERATOR_POD, "container": "operator", "job": SCRAPE_JOB,
                                    "endpoint": "metrics", "instance": address}
        await until(lambda: prometheus.query("consensusfit_fits"), "the fits scraped")

        # The dashboard's namespace variable: label_values(consensusfit_fits, namespace).
        assert prometheus.api("label/namespace/values", **{"match[]": "consensusfit_fits"}) == [seen]
        assert prometheus.api("label/exported_namespace/values") == ([] if honor else [FIT_NAMESPACE])
        # Its panels, with the fit's namespace chosen, show the fits only when their namespace is kept.
        for title, expr in dashboard_queries(dashboard()):
            if "consensusfit_fits{" in expr:
                assert bool(prometheus.query(expr.replace("$namespace", FIT_NAMESPACE))) == honor, title
        # The alert rules group by namespace: the failed fit's alert names the namespace seen.
        def failed() -> list[dict]:
            return [a for a in prometheus.api("alerts")["alerts"]
                    if a["labels"]["alertname"] == "ConsensusFitFailed" and a["state"] == "firing"]
        (alert,) = await until(failed, "ConsensusFitFailed firing")
        assert alert["labels"]["namespace"] == seen
        # The operator's own series export no namespace: theirs is the target's, either way.
        (errors,) = prometheus.query("consensusfit_operator_reconcile_errors_total")
        assert errors["metric"]["namespace"] == OPERATOR_NAMESPACE and errors["metric"]["pod"] == OPERATOR_POD
    finally:
        prometheus.stop()
        server.shutdown()
        server.server_close()
