"""`python -m consensusfit.operator` (or `consensusfit-operator`): run the operator.

Serves Prometheus metrics on CONSENSUSFIT_METRICS_PORT (/metrics) and kopf's liveness probe on
CONSENSUSFIT_LIVENESS_ENDPOINT (/healthz). Watches all namespaces, or only those listed in
CONSENSUSFIT_WATCH_NAMESPACES (comma-separated).
"""

from __future__ import annotations

import kopf
import kubernetes
from prometheus_client import start_http_server

from .config import Config
from .handlers import register
from .metrics import Metrics


def make_registry(config: Config, api: kubernetes.client.ApiClient, metrics: Metrics) -> kopf.OperatorRegistry:
    """The operator's handlers, and kopf's login through the kubernetes client's configuration
    (kopf's public `login_via_client`: the service account in a pod, else the kubeconfig)."""
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(kopf.login_via_client)
    return register(registry, config, api, metrics)


def main() -> None:
    config = Config.from_env()
    kubernetes.config.load_config()  # in-cluster service account, else the kubeconfig
    metrics = Metrics()
    start_http_server(config.metrics_port, registry=metrics.registry)
    registry = make_registry(config, kubernetes.client.ApiClient(), metrics)
    kopf.run(
        registry=registry,
        standalone=True,  # one replica (Recreate): no peering resources needed
        clusterwide=not config.namespaces,
        namespaces=config.namespaces,
        liveness_endpoint=config.liveness_endpoint,
    )


if __name__ == "__main__":
    main()
