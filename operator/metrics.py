"""Prometheus metrics of the operator. Labels are bounded: namespace, fit, phase (the API requests:
verb, resource, code), never a shard or a pod.

Three kinds of series:
- histograms observed when something happens (a phase ends, a shard finishes, a pod starts),
  fed by what the planner reports as new in a pass;
- per-fit values (phase, retries, failed shards, convergence, EP's rounds) exported from the latest
  observed state, so they are right after an operator restart instead of starting again from zero
  (the retry counter is the planner's status.retries.total, which only grows: pods deleted after
  they failed still count);
- the operator's own health (consensusfit_operator_*): reconcile errors and durations, the loop's
  queue, and every Kubernetes API request it makes. No fit or namespace label: their namespace is
  the scrape target's, the operator's own.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .children import samples_shards
from .observe import JobView, PodView, parse_time
from .planner import Plan, TERMINAL_PHASES

_LONG = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
_SHORT = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
_FAST = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)  # an API request, a fit's pass
NO_ANSWER = "<error>"  # the code of a request that got no HTTP answer (as client-go labels it)


@dataclass(frozen=True)
class FitSnapshot:
    phase: str
    retries: int  # status.retries.total: shard pods started again, ever (a counter)
    failed_shards: int
    diagnostics: Mapping[str, Any]
    rounds: Mapping[str, Any] | None = None  # status.rounds of an EP fit


class _FitCollector(Collector):
    """Renders the per-fit snapshots at scrape time."""

    def __init__(self, fits: dict[tuple[str, str], FitSnapshot]):
        self._fits = fits

    def collect(self) -> Iterator:
        fits = dict(self._fits)  # a scrape runs in another thread than the reconcilers
        by_phase = GaugeMetricFamily("consensusfit_fits", "Fits by phase.", labels=["namespace", "phase"])
        counts: dict[tuple[str, str], int] = {}
        for (namespace, _), snapshot in fits.items():
            counts[namespace, snapshot.phase] = counts.get((namespace, snapshot.phase), 0) + 1
        for labels, count in sorted(counts.items()):
            by_phase.add_metric(list(labels), count)
        yield by_phase
        retries = CounterMetricFamily(
            "consensusfit_shard_retries", "Shard pods started again after a failure or disruption.",
            labels=["namespace", "fit"],
        )
        failures = CounterMetricFamily(
            "consensusfit_shard_failures", "Shards failed for good.", labels=["namespace", "fit"]
        )
        gauges = {
            "rhatMax": GaugeMetricFamily(
                "consensusfit_fit_rhat_max", "Largest split R-hat over the fit's shards.",
                labels=["namespace", "fit"]),
            "essBulkMin": GaugeMetricFamily(
                "consensusfit_fit_ess_bulk_min", "Smallest bulk ESS over the fit's shards.",
                labels=["namespace", "fit"]),
            "divergences": GaugeMetricFamily(
                "consensusfit_fit_divergences", "Divergent transitions summed over the fit's shards.",
                labels=["namespace", "fit"]),
        }
        for (namespace, name), snapshot in sorted(fits.items()):
            retries.add_metric([namespace, name], snapshot.retries)
            failures.add_metric([namespace, name], snapshot.failed_shards)
            for key, family in gauges.items():
                if key in snapshot.diagnostics:
                    family.add_metric([namespace, name], snapshot.diagnostics[key])
        yield retries
        yield failures
        yield from gauges.values()
        yield from _round_families(fits)


def _round_families(fits: Mapping[tuple[str, str], FitSnapshot]) -> Iterator:
    """EP's progress per fit (status.rounds): only fits that run rounds have these series."""
    labels = ["namespace", "fit"]
    completed = CounterMetricFamily(
        "consensusfit_ep_rounds_completed", "EP rounds whose update completed.", labels=labels)
    gauges = {
        "current": GaugeMetricFamily(
            "consensusfit_ep_round", "The EP round in progress (0 while the pilot runs).", labels=labels),
        "max": GaugeMetricFamily("consensusfit_ep_max_rounds", "spec.combine.maxRounds.", labels=labels),
        "meanChange": GaugeMetricFamily(
            "consensusfit_ep_mean_change", "How far the latest round moved q's means, in its SDs (largest).",
            labels=labels),
        "sdChange": GaugeMetricFamily(
            "consensusfit_ep_sd_change", "How far the latest round moved q's SDs, relative (largest).",
            labels=labels),
        "converged": GaugeMetricFamily(
            "consensusfit_ep_converged", "1 once EP converged, 0 before or when it stopped at maxRounds.",
            labels=labels),
    }
    for (namespace, name), snapshot in sorted(fits.items()):
        if snapshot.rounds is None:
            continue
        completed.add_metric([namespace, name], snapshot.rounds.get("completed", 0))
        for key, family in gauges.items():
            if snapshot.rounds.get(key) is not None:
                family.add_metric([namespace, name], float(snapshot.rounds[key]))
    yield completed
    yield from gauges.values()


class Metrics:
    """The operator's metrics in their own registry (served at /metrics by the entry point)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._fits: dict[tuple[str, str], FitSnapshot] = {}
        self.fit_duration = Histogram(
            "consensusfit_fit_duration_seconds", "From start to Succeeded or Failed.",
            ["namespace", "outcome"], buckets=_LONG, registry=self.registry)
        self.phase_duration = Histogram(
            "consensusfit_phase_duration_seconds", "Time spent in each phase.",
            ["namespace", "phase"], buckets=_LONG, registry=self.registry)
        self.shard_duration = Histogram(
            "consensusfit_shard_duration_seconds", "Wall time of a successful shard pod's sampling.",
            ["namespace", "fit"], buckets=_SHORT, registry=self.registry)
        self.queue_wait = Histogram(
            "consensusfit_queue_wait_seconds",
            "From a Job's creation to its pod running (a retried pod: from its own creation).",
            ["namespace", "fit"], buckets=_SHORT, registry=self.registry)
        self.registry.register(_FitCollector(self._fits))
        self.leader = Gauge(
            "consensusfit_operator_leader",
            "1 on the replica that reconciles (the Lease holder; the only one without leader election), else 0.",
            registry=self.registry)
        self.reconcile_errors = Counter(
            "consensusfit_operator_reconcile_errors",
            "Fit reconcile passes that raised (the fit is tried again in the next pass).",
            registry=self.registry)
        self.reconcile_duration = Histogram(
            "consensusfit_operator_reconcile_duration_seconds",
            "One fit's reconcile pass: read its children, plan, apply, write its status and events.",
            buckets=_FAST, registry=self.registry)
        self.queue_depth = Gauge(
            "consensusfit_operator_queue_depth",
            "Fits waiting for their pass: the fits the loop knew when its latest pass began.",
            registry=self.registry)
        self.pass_duration = Gauge(
            "consensusfit_operator_pass_duration_seconds",
            "How long the latest complete pass over every fit took.", registry=self.registry)
        self.resync = Gauge(
            "consensusfit_operator_resync_seconds",
            "The pause between two passes (operator.resyncSeconds).", registry=self.registry)
        self.api_duration = Histogram(
            "consensusfit_operator_api_request_duration_seconds",
            "Kubernetes API requests of the reconcile loop (kopf's watches not included).",
            ["verb", "resource"], buckets=_FAST, registry=self.registry)
        self.api_errors = Counter(
            "consensusfit_operator_api_errors",
            f"Kubernetes API requests answered with an HTTP error (code) or not at all ({NO_ANSWER}).",
            ["verb", "resource", "code"], registry=self.registry)

    @contextmanager
    def full_pass(self, fits: int) -> Iterator[None]:
        """Account a pass of the loop over `fits` fits: its queue at the start, its duration at the end."""
        self.queue_depth.set(fits)
        with self.pass_duration.time():
            yield

    def api_request(self, verb: str, resource: str, code: int | None, seconds: float) -> None:
        """Account one Kubernetes API request; `code` None: no HTTP answer (connection refused, timeout)."""
        self.api_duration.labels(verb, resource).observe(seconds)
        if code is None or code >= 400:
            self.api_errors.labels(verb, resource, NO_ANSWER if code is None else str(code)).inc()

    def record(
        self, namespace: str, name: str, plan: Plan, jobs: Mapping[str, JobView], pods: Sequence[PodView]
    ) -> None:
        """Account one reconcile pass of a fit."""
        state = plan.state
        for phase, seconds in plan.exited:
            self.phase_duration.labels(namespace, phase).observe(seconds)
        start, end = parse_time(state.get("startTime")), parse_time(state.get("completionTime"))
        if plan.exited and state["phase"] in TERMINAL_PHASES and start and end:
            self.fit_duration.labels(namespace, state["phase"]).observe((end - start).total_seconds())
        for pod in plan.finished:
            if samples_shards(pod.step) and pod.phase == "Succeeded" and pod.started and pod.finished:
                seconds = (pod.report or {}).get("seconds", (pod.finished - pod.started).total_seconds())
                self.shard_duration.labels(namespace, name).observe(seconds)
        first = _first_attempts(pods)
        for pod in plan.started:
            job = jobs.get(pod.step)
            since = job.created if pod.uid in first and job else pod.created
            if since is not None:
                self.queue_wait.labels(namespace, name).observe(max(0.0, (pod.started - since).total_seconds()))
        self._fits[namespace, name] = FitSnapshot(
            phase=state["phase"],
            retries=state.get("retries", {}).get("total", 0),
            failed_shards=state.get("shards", {}).get("failed", 0),
            diagnostics=state.get("diagnostics", {}),
            rounds=state.get("rounds"),
        )

    def forget(self, namespace: str, name: str) -> None:
        """A deleted fit leaves no series behind: cardinality follows the fits that exist."""
        self._fits.pop((namespace, name), None)
        for histogram in (self.shard_duration, self.queue_wait):
            try:
                histogram.remove(namespace, name)
            except KeyError:
                pass


def _first_attempts(pods: Sequence[PodView]) -> set[str]:
    """The uid of the earliest pod of every (step, shard): the ones that waited since the Job began."""
    earliest: dict[tuple[str, int | None], PodView] = {}
    for pod in pods:
        key = (pod.step, pod.index)
        if pod.created and (key not in earliest or pod.created < earliest[key].created):
            earliest[key] = pod
    return {pod.uid for pod in earliest.values()}
