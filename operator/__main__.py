"""`python -m consensusfit.operator` (or `consensusfit-operator`): run the operator.

Serves Prometheus metrics on CONSENSUSFIT_METRICS_PORT (/metrics), kopf's liveness probe on
CONSENSUSFIT_LIVENESS_ENDPOINT (/healthz) and readiness on CONSENSUSFIT_READINESS_PORT (/readyz).
Watches all namespaces, or only those listed in CONSENSUSFIT_WATCH_NAMESPACES (comma-separated).
With CONSENSUSFIT_LEADER_ELECTION=true, several replicas run and only the holder of the Lease
CONSENSUSFIT_LEASE_NAMESPACE/CONSENSUSFIT_LEASE_NAME reconciles (operator/leadership.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import kopf
import kubernetes
from prometheus_client import start_http_server

from . import __version__, leadership
from .config import Config
from .handlers import register
from .kube import COMPONENT
from .metrics import Metrics

READINESS_PATH = "/readyz"


def make_registry(config: Config, api: kubernetes.client.ApiClient, metrics: Metrics,
                  replica: leadership.Replica | None = None) -> kopf.OperatorRegistry:
    """The operator's handlers, and kopf's login through the kubernetes client's configuration
    (kopf's public `login_via_client`: the service account in a pod, else the kubeconfig)."""
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(kopf.login_via_client)
    return register(registry, config, api, metrics, replica)


def make_replica(config: Config, api: kubernetes.client.ApiClient, me: str) -> leadership.Replica:
    """This process's part: a candidate for the Lease with leader election, else the only writer."""
    if not config.leader_election:
        return leadership.Replica()
    timing = leadership.Timing(config.lease_seconds, config.renew_deadline_seconds, config.retry_seconds)
    return leadership.Replica(leadership.Elector(api, config.lease_namespace, config.lease_name, me, timing))


def serve_readiness(port: int, ready: Callable[[], bool], host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """GET /readyz: 200 while `ready()`, else 503; in a daemon thread, as the metrics server is."""

    class Readiness(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server protocol
            if self.path != READINESS_PATH:
                self.send_error(404)
                return
            now_ready = ready()
            answer = b"ready\n" if now_ready else b"not ready\n"
            self.send_response(200 if now_ready else 503)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *_: object) -> None:  # a probe every few seconds is not news
            pass

    server = ThreadingHTTPServer((host, port), Readiness)
    threading.Thread(target=server.serve_forever, name="readiness", daemon=True).start()
    return server


def main() -> None:
    config = Config.from_env()
    kubernetes.config.load_config()  # in-cluster service account, else the kubeconfig
    me = leadership.identity()
    api = kubernetes.client.ApiClient()
    api.user_agent = f"{COMPONENT}/{__version__} ({me})"  # audit logs tell the replicas apart
    metrics = Metrics()
    start_http_server(config.metrics_port, registry=metrics.registry)
    replica = make_replica(config, api, me)
    serve_readiness(config.readiness_port, replica.running.is_set)
    kopf.run(
        registry=make_registry(config, api, metrics, replica),
        # No kopf peering: its handlers only read; the one loop that writes is gated by the Lease.
        standalone=True,
        clusterwide=not config.namespaces,
        namespaces=config.namespaces,
        liveness_endpoint=config.liveness_endpoint,
    )


if __name__ == "__main__":
    main()
