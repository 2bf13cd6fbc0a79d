"""Uninstalling, as the README says: `helm uninstall`, then `kubectl delete crd` with fits still
there. Nothing may hold the fits once the operator is gone: no finalizer on them. This removes the
chart and the CRD, so it runs after every other end-to-end test (conftest.py orders it last).
"""

from __future__ import annotations

import json

import pytest
from e2e_support import GROUP, NAMESPACE, OPERATOR_NAMESPACE, PLURAL, RELEASE, render_fit, wait_for

pytestmark = pytest.mark.timeout(600)
CRD = f"{PLURAL}.{GROUP}"


def test_uninstalling_the_chart_then_deleting_the_crd_with_fits_present_completes(cluster, operator, bucket):
    def fits() -> list[dict]:
        return json.loads(cluster.kubectl("get", CRD, "-n", NAMESPACE, "-o", "json").stdout)["items"]

    # One fit that has started (its partition pod waits: no executor runs it), one suspended.
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=render_fit("left-running", bucket))
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=render_fit("left-suspended", bucket, suspend=True))
    wait_for(lambda: {f["metadata"]["name"]: (f.get("status") or {}).get("phase") for f in fits()}
             == {"left-running": "Partitioning", "left-suspended": "Pending"}, 120, "both fits to be seen by the operator")
    assert all(not f["metadata"].get("finalizers") for f in fits()), [f["metadata"] for f in fits()]

    cluster.helm("uninstall", RELEASE, "--namespace", OPERATOR_NAMESPACE, "--wait")
    operator.stop()  # the chart's Deployment is gone: so is the operator (here a local process)
    assert len(fits()) == 2  # Helm leaves the CRD, and so the fits

    deleted = cluster.kubectl("delete", "crd", CRD, "--wait=true", "--timeout=90s", check=False)
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    listed = cluster.kubectl("get", "crd", CRD, check=False)
    assert listed.returncode != 0 and "NotFound" in listed.stderr, listed.stdout + listed.stderr
