"""Carries out a plan against the Kubernetes API: create, patch and delete Jobs, write the fit's
status, post its Events, delete an expired fit; and reads the one thing the watches do not show,
the Job controller's FailedCreate events.

No decisions here beyond treating "already there" and "already gone" as done, which is what makes
a repeated plan (after a restart, from a stale view) harmless.

Every request goes through one client that reports it (verb, resource, HTTP code, seconds) to the
metrics: the calls below are measured without a line of their own.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from kubernetes.client import ApiClient, BatchV1Api, CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from .children import GROUP, KIND, VERSION
from .conditions import timestamp
from .labels import STEP
from .observe import FAILED_CREATE, JobView
from .planner import Event, Plan, Refusal

PLURAL = "consensusfits"
COMPONENT = "consensusfit-operator"  # the source of the Events it posts
_EVENT_MESSAGE_LIMIT = 1024  # the API server's limit on an Event's message

log = logging.getLogger(__name__)

# Told of every request: verb, resource, HTTP code (None: no answer came), seconds.
RequestReport = Callable[[str, str, int | None, float], None]
_VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def request_info(method: str, path: str) -> tuple[str, str]:
    """The verb and resource of a request to `path` (below the server's address) as the API server
    names them in its audit log and apiserver_request_total: `list` for a GET of a collection, a
    subresource after a slash (consensusfits/status). No names or namespaces: a bounded set."""
    parts = urlsplit(path).path.strip("/").split("/")
    rest = parts[2:] if parts[0] == "api" else parts[3:]  # after /api/v1 or /apis/<group>/<version>
    if rest[0] == "namespaces" and len(rest) > 2:
        rest = rest[2:]  # a namespaced resource: [resource, name, subresource]
    verb = "list" if method == "GET" and len(rest) == 1 else _VERBS.get(method, method.lower())
    return verb, "/".join(rest[:1] + rest[2:3])


class _ReportingClient(ApiClient):
    """A client with `api`'s configuration and headers that reports every request it makes, answered
    or not (every generated API method ends in call_api; errors are raised only after it returns)."""

    def __init__(self, api: ApiClient, report: RequestReport):
        super().__init__(api.configuration, cookie=api.cookie)
        self.default_headers = dict(api.default_headers)
        self._report = report

    def call_api(self, method, url, *args, **kwargs):
        verb, resource = request_info(method, url.removeprefix(self.configuration.host))
        start, code = time.monotonic(), None
        try:
            response = super().call_api(method, url, *args, **kwargs)
            code = response.status
            return response
        finally:
            self._report(verb, resource, code, time.monotonic() - start)


class Kube:
    def __init__(self, api: ApiClient, report: RequestReport):
        client = _ReportingClient(api, report)
        self._batch = BatchV1Api(client)
        self._core = CoreV1Api(client)
        self._custom = CustomObjectsApi(client)

    def apply(self, namespace: str, name: str, plan: Plan) -> dict[str, Refusal]:
        """Everything in `plan` except its status and events; returns the Job creates the API
        server refused (by step), for the next plan to act on."""
        refused = {}
        for manifest in plan.create:
            try:
                self._ignoring(409, self._batch.create_namespaced_job, namespace, manifest)
            except ApiException as error:
                if not 400 <= error.status < 500 or error.status == 429:  # unavailable, throttled: retried
                    raise
                step = manifest["metadata"]["labels"][STEP]
                refused[step] = Refusal(error.status, _message(error))
        for job, patch in plan.patch_jobs:
            self._ignoring(404, self._batch.patch_namespaced_job, job, namespace, patch,
                           _content_type="application/merge-patch+json")
        for job in plan.delete_jobs:
            # Background: the garbage collector deletes the pods (the API's default for a Job orphans them).
            self._ignoring(404, self._batch.delete_namespaced_job, job, namespace, propagation_policy="Background")
        if plan.delete_fit:
            # The Jobs follow through their owner references; results in the object store stay.
            self._ignoring(404, self._custom.delete_namespaced_custom_object,
                           GROUP, VERSION, namespace, PLURAL, name)
        return refused

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> dict | None:
        """Merge-patch the fit's status subresource; the fit as stored after it (None: it is gone)."""
        try:
            return self._custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, {"status": status},
                _content_type="application/merge-patch+json")
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def post_events(self, fit: Mapping[str, Any], events: Sequence[Event]) -> None:
        """Events about the fit, as `kubectl describe` shows them; one that cannot be posted is logged."""
        metadata = fit["metadata"]
        now = timestamp(datetime.now(UTC))
        for event in events:
            body = {
                "metadata": {"name": f"{metadata['name']}.{uuid.uuid4().hex[:16]}", "namespace": metadata["namespace"]},
                "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": metadata["name"],
                                   "namespace": metadata["namespace"], "uid": metadata["uid"]},
                "type": event.type, "reason": event.reason, "message": event.message[:_EVENT_MESSAGE_LIMIT],
                "source": {"component": COMPONENT}, "reportingComponent": COMPONENT,
                "firstTimestamp": now, "lastTimestamp": now, "count": 1,
            }
            try:
                self._core.create_namespaced_event(metadata["namespace"], body)
            except ApiException as error:
                log.warning("could not post event %s about %s: %s", event.reason, metadata["name"], error.reason)

    def failed_creates(self, namespace: str, jobs: Sequence[JobView]) -> dict[str, str]:
        """The latest FailedCreate message of each of these Jobs that has one (by uid: a Job of the
        same name before it is another Job)."""
        found: dict[str, tuple[str, str]] = {}
        for job in jobs:
            selector = f"involvedObject.kind=Job,involvedObject.uid={job.uid},reason={FAILED_CREATE}"
            for item in self._core.list_namespaced_event(namespace, field_selector=selector).items:
                # The selector is the server's filter; checked again for servers that ignore it.
                ref = item.involved_object
                if ref.kind == "Job" and ref.uid == job.uid and item.reason == FAILED_CREATE:
                    when = timestamp(item.last_timestamp or item.event_time or datetime.min.replace(tzinfo=UTC))
                    if job.name not in found or when >= found[job.name][0]:
                        found[job.name] = (when, item.message or "")
        return {job: message for job, (_, message) in found.items()}

    @staticmethod
    def _ignoring(status: int, call, *args, **kwargs) -> None:
        try:
            call(*args, **kwargs)
        except ApiException as error:
            if error.status != status:
                raise


def _message(error: ApiException) -> str:
    """The API server's own message (its Status object's), else the HTTP reason."""
    try:
        return json.loads(error.body)["message"]
    except (TypeError, ValueError, KeyError):
        return error.reason or str(error.status)
