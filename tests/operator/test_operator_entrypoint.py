"""`python -m consensusfit.operator` builds its registry with the kopf that is installed, its
place among the replicas from the config, and serves /readyz.

The e2e test (tests/e2e) found that the entry point called `kopf.SmartOperatorRegistry`, which kopf
does not export: the operator died at start. This checks the registry without starting kopf.
"""

import threading
import urllib.error
import urllib.request

import pytest
from kubernetes.client import ApiClient

from consensusfit.operator.__main__ import make_registry, make_replica, serve_readiness
from consensusfit.operator.config import Config
from consensusfit.operator.leadership import Timing
from consensusfit.operator.metrics import Metrics


def test_the_entry_point_registry_logs_in_through_the_kubernetes_client_and_has_the_handlers():
    registry = make_registry(Config(), ApiClient(), Metrics())
    activities = {h.fn.__name__: h.activity.value for h in registry._activities.get_all_handlers()}
    assert activities["login_via_client"] == "authentication"
    assert activities["start_reconciling"] == "startup"
    # No timers or daemons: they would put a finalizer on every fit.
    assert not registry._spawning.get_all_handlers()
    indexes = {h.id for h in registry._indexing.get_all_handlers()}
    assert {"fit_jobs", "fit_pods"} <= {i.split("/")[-1] for i in indexes}


def test_the_replica_contends_for_the_configured_lease_only_with_leader_election():
    assert make_replica(Config(), ApiClient(), "pod-a_1").elector is None
    config = Config(leader_election=True, lease_name="cfit", lease_namespace="ops", lease_seconds=30,
                    renew_deadline_seconds=20, retry_seconds=4)
    elector = make_replica(config, ApiClient(), "pod-a_1").elector
    assert (elector.namespace, elector.name, elector.me) == ("ops", "cfit", "pod-a_1")
    assert elector.timing == Timing(30, 20, 4)
    assert not elector.leading()  # nothing acquired yet


def test_readyz_answers_503_until_ready_then_200_and_nothing_else():
    ready = threading.Event()
    server = serve_readiness(0, ready.is_set, host="127.0.0.1")
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/readyz", timeout=10)
        assert refused.value.code == 503
        ready.set()
        assert urllib.request.urlopen(f"{url}/readyz", timeout=10).status == 200
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{url}/healthz", timeout=10)
        assert missing.value.code == 404
    finally:
        server.shutdown()
