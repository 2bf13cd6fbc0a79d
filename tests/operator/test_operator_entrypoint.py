"""`python -m consensusfit.operator` builds its registry with the kopf that is installed.

The e2e test (tests/e2e) found that the entry point called `kopf.SmartOperatorRegistry`, which kopf
does not export: the operator died at start. This checks the registry without starting kopf.
"""

from kubernetes.client import ApiClient

from consensusfit.operator.__main__ import make_registry
from consensusfit.operator.config import Config
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
