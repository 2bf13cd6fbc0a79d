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


def main() -> None:
    config = Config.from_env()
    kubernetes.config.load_config()  # in-cluster service account, else the kubeconfig
    metrics = Metrics()
    start_http_server(config.metrics_port, registry=metrics.registry)
    # The smart registry brings kopf's own login through the kubernetes client's configuration.
    registry = register(kopf.SmartOperatorRegistry(), config, kubernetes.client.ApiClient(), metrics)
    kopf.run(
        registry=registry,
        standalone=True,  # one replica (Recreate): no peering resources needed
        clusterwide=not config.namespaces,
        namespaces=config.namespaces,
        liveness_endpoint=config.liveness_endpoint,
    )


if __name__ == "__main__":
    main()
