"""Carries out a plan against the Kubernetes API: create and patch Jobs, delete an expired fit.

No decisions here beyond treating "already there" and "already gone" as done, which is what makes
a repeated plan (after a restart, from a stale view) harmless.
"""

from __future__ import annotations

from kubernetes.client import ApiClient, BatchV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from .children import GROUP, VERSION
from .planner import Plan

PLURAL = "consensusfits"


class Kube:
    def __init__(self, api: ApiClient):
        self._batch = BatchV1Api(api)
        self._custom = CustomObjectsApi(api)

    def apply(self, namespace: str, name: str, plan: Plan) -> None:
        """Everything in `plan` except its status and events (kopf writes those)."""
        for manifest in plan.create:
            self._ignoring(409, self._batch.create_namespaced_job, namespace, manifest)
        for job, patch in plan.patch_jobs:
            self._ignoring(404, self._batch.patch_namespaced_job, job, namespace, patch,
                           _content_type="application/merge-patch+json")
        if plan.delete_fit:
            # The Jobs follow through their owner references; results in the object store stay.
            self._ignoring(404, self._custom.delete_namespaced_custom_object,
                           GROUP, VERSION, namespace, PLURAL, name)

    @staticmethod
    def _ignoring(status: int, call, *args, **kwargs) -> None:
        try:
            call(*args, **kwargs)
        except ApiException as error:
            if error.status != status:
                raise
