"""Two operator replicas with leader election on the real control plane (the chart's default).

The session's operator is one replica; this test starts a second from the same installation (the
chart's ServiceAccount and environment), so the two contend for the chart's Lease as two pods of
the Deployment would. Not a pair for every test: each test that SIGKILLs the operator would then
have to say which replica, and a second process doubles the watch load of the 2,000-shard test on
a small machine; election is exercised by the session operator anyway (it holds the Lease, and a
restarted one waits for the old Lease to expire before it reconciles).

Also here: the Elector's resourceVersion-checked writes against the real API server, where a
stale write is refused with 409 (kmock accepts any write).
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime

import pytest
from e2e_support import NAMESPACE, Operator, render_fit, wait_for
from test_e2e_operator import Api, apply, wait_phase, wait_succeeded

from consensusfit.operator.leadership import Elector, Timing

pytestmark = pytest.mark.timeout(900)
WRITES = ("create", "update", "patch", "delete")


def _leases(cluster):
    from kubernetes import client, config

    return client.CoordinationV1Api(config.new_client_from_config(config_file=str(cluster.kubeconfig)))


def _received(event: dict) -> datetime:
    return datetime.fromisoformat(event["requestReceivedTimestamp"].replace("Z", "+00:00"))


def test_the_follower_takes_over_when_the_leader_dies_mid_fit_and_no_job_is_created_twice(
        cluster, installation, operator, executor, bucket, tmp_path):
    env = installation.env
    assert env["CONSENSUSFIT_LEADER_ELECTION"] == "true"  # the chart's default
    leases, api, name = _leases(cluster), Api(cluster), "handover"

    def holder() -> str:
        return leases.read_namespaced_lease(env["CONSENSUSFIT_LEASE_NAME"],
                                            env["CONSENSUSFIT_LEASE_NAMESPACE"]).spec.holder_identity or ""

    # The session's operator leads (alone, it takes the Lease within a lease duration at most).
    wait_for(lambda: operator.holds(holder()), 120, "the session operator to hold the Lease")
    follower = Operator(cluster, installation, tmp_path, name="follower", image=operator.image).start()
    try:
        wait_for(lambda: follower.ready() and operator.ready(), 120, "both replicas to be ready")
        assert operator.metric("consensusfit_operator_leader") == 1
        assert follower.metric("consensusfit_operator_leader") == 0
        assert operator.holds(holder())

        executor.fits.add(name)
        apply(cluster, render_fit(name, bucket, cleanupPolicy={"onSuccess": "Keep"}))  # its Jobs are counted
        wait_phase(api, name, ("Sampling",), 300, follower)
        leader = operator.hostname
        killed = datetime.now(UTC)
        operator.kill()  # SIGKILL: no release; the follower waits for the Lease to expire

        wait_for(lambda: follower.holds(holder()), 120, "the follower to take the Lease")
        wait_succeeded(api, name, 600, follower)
        assert follower.metric("consensusfit_operator_leader") == 1

        # Every Job once: no create that succeeded twice for a name, before or after the handover.
        jobs = {job.metadata.name for job in api.jobs(name)}
        assert len(jobs) == 5, jobs
        writes = [e for e in cluster.audit_events()
                  if e["user"]["username"] == operator.user and e["verb"] in WRITES]
        created = Counter(e["objectRef"]["name"] for e in writes
                          if e["objectRef"].get("resource") == "jobs" and e["responseStatus"]["code"] == 201
                          and e["objectRef"].get("name", "").startswith(f"{name}-"))
        assert set(created) == jobs and set(created.values()) == {1}, created
        # One writer at a time: the follower wrote nothing before the leader was killed, and
        # nothing until the leader's last write (the audit log does not record Lease requests).
        by_leader = [e for e in writes if f"({leader}_" in e.get("userAgent", "")]
        by_follower = [e for e in writes if follower.made(e)]
        assert by_leader and by_follower
        first = min(map(_received, by_follower))
        assert killed < first and max(map(_received, by_leader)) < first, json.dumps(
            [(e["verb"], e["objectRef"], e["requestReceivedTimestamp"]) for e in by_follower[:5]])
    finally:
        # Leave a session operator behind for the other tests: started again, it is a follower
        # until the follower stops, which releases the Lease as a rolling update's old pod does.
        if not operator.alive():
            operator.start()
        wait_for(operator.ready, 120, "the restarted session operator to be ready")
        follower.stop()
    assert not follower.holds(holder()), "the stopped follower did not release the Lease"
    wait_for(lambda: operator.holds(holder()), 60, "the session operator to take the released Lease")
    cluster.kubectl("delete", "consensusfit", name, "-n", NAMESPACE, "--wait=false")
    executor.fits.discard(name)


def test_a_stale_holder_is_refused_by_the_api_server_and_steps_down(cluster):
    """Optimistic concurrency on the real API server: a holder whose Lease was taken over while it
    was paused (its clock still within the renew deadline) writes with the old resourceVersion, is
    refused with 409, reads the Lease again and stands by; a released Lease is taken at once."""
    from kubernetes import config

    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    timing, clocks = Timing(), {"a": 0.0, "b": 0.0}
    a = Elector(api, "default", "e2e-stale-holder", "a", timing, clock=lambda: clocks["a"])
    b = Elector(api, "default", "e2e-stale-holder", "b", timing, clock=lambda: clocks["b"])
    leases = _leases(cluster)

    def lease():
        return leases.read_namespaced_lease("e2e-stale-holder", "default").spec

    assert a.attempt() and lease().holder_identity == "a"
    assert not b.attempt()  # fresh: b stands by
    clocks["b"] = timing.lease_seconds  # a has not renewed for a lease duration, as b sees it
    assert b.attempt() and lease().holder_identity == "b" and lease().lease_transitions == 1
    clocks["a"] = timing.renew_deadline_seconds / 2  # a, paused, still thinks it leads
    assert a.leading()
    assert not a.attempt()  # its renewal carries the old resourceVersion: 409, and it stands by
    assert not a.leading() and lease().holder_identity == "b"

    b.release()
    assert not b.leading() and lease().holder_identity == ""
    clocks["a"] += timing.retry_seconds
    assert a.attempt() and lease().holder_identity == "a" and lease().lease_transitions == 2
