"""Leader election's pure rules (operator/leadership.py), as client-go's leaderelection has them.

The Elector's reads and resourceVersion-checked writes against a real API server, two candidates
racing for one Lease, are tested in tests/e2e/test_e2e_leadership.py (kmock assigns no
resourceVersion, so it cannot refuse a stale write).
"""

from __future__ import annotations

import pytest

from consensusfit.operator.config import Config
from consensusfit.operator.leadership import Record, Replica, Seen, Step, Timing, decide, leading, observe

TIMING = Timing(lease_seconds=15, renew_deadline_seconds=10, retry_seconds=2)


def lease(holder: str, renewed: str = "t0", lease_seconds: float = 15, transitions: int = 0) -> Record:
    return Record(holder, lease_seconds, renewed, "t0", transitions, "1")


def test_a_missing_lease_is_created_and_a_released_one_is_taken_at_once():
    assert decide(None, "b", now=0.0) is Step.CREATE
    released = Seen(lease("", lease_seconds=1), since=100.0)
    assert decide(released, "b", now=100.0) is Step.TAKE


def test_the_holder_renews_its_own_lease():
    assert decide(Seen(lease("a"), since=0.0), "a", now=14.0) is Step.RENEW


def test_a_candidate_stands_by_while_anothers_lease_changed_within_its_duration():
    seen = Seen(lease("a"), since=100.0)
    assert decide(seen, "b", now=100.0) is Step.STAND_BY
    assert decide(seen, "b", now=114.9) is Step.STAND_BY


def test_an_expired_lease_is_taken_and_expiry_counts_from_when_the_change_was_seen():
    seen = Seen(lease("a"), since=100.0)
    assert decide(seen, "b", now=115.0) is Step.TAKE
    # The Lease's own duration counts, not the candidate's: a holder may have written a shorter one.
    assert decide(Seen(lease("a", lease_seconds=5), since=100.0), "b", now=105.0) is Step.TAKE


def test_a_renewal_seen_resets_the_expiry_and_an_unchanged_lease_keeps_it():
    first = observe(None, lease("a", renewed="t1"), now=100.0)
    again = observe(first, lease("a", renewed="t1"), now=110.0)
    assert again.since == 100.0  # nothing changed: still expires at 115
    assert decide(again, "b", now=115.0) is Step.TAKE
    renewed = observe(again, lease("a", renewed="t2"), now=112.0)
    assert renewed.since == 112.0
    assert decide(renewed, "b", now=115.0) is Step.STAND_BY
    taken = observe(renewed, lease("c", renewed="t2", transitions=1), now=113.0)
    assert taken.since == 113.0


def test_the_holder_steps_down_at_the_renew_deadline_before_anyone_may_take_over():
    assert leading(renewed=100.0, now=109.9, timing=TIMING)
    assert not leading(renewed=100.0, now=110.0, timing=TIMING)
    assert not leading(renewed=None, now=0.0, timing=TIMING)
    # A follower that saw that last renewal no earlier than it was sent takes over only at 115.
    assert decide(Seen(lease("a"), since=100.0), "b", now=110.0) is Step.STAND_BY


def test_a_released_lease_says_so_and_is_free_to_anyone():
    released = Seen(lease("", lease_seconds=1, transitions=3), since=50.0)
    assert decide(released, "a", now=50.0) is Step.TAKE
    assert decide(released, "b", now=50.0) is Step.TAKE


def test_without_an_elector_the_replica_always_leads_and_is_not_ready_before_its_loop_ran():
    assert Replica().leading()
    assert not Replica().running.is_set()


@pytest.mark.parametrize("retry, deadline, duration", [(2, 10, 10), (10, 10, 15), (0, 5, 15), (3, 2, 15)])
def test_timings_that_would_let_two_replicas_write_are_refused(retry, deadline, duration):
    with pytest.raises(ValueError, match="leader election needs"):
        Timing(lease_seconds=duration, renew_deadline_seconds=deadline, retry_seconds=retry)


def test_the_election_settings_come_from_the_environment_with_client_gos_defaults():
    assert not Config().leader_election
    assert (Config().lease_seconds, Config().renew_deadline_seconds, Config().retry_seconds) == (15, 10, 2)
    config = Config.from_env({"CONSENSUSFIT_LEADER_ELECTION": "true", "CONSENSUSFIT_LEASE_NAME": "cfit",
                              "CONSENSUSFIT_LEASE_NAMESPACE": "ops", "CONSENSUSFIT_LEASE_SECONDS": "30",
                              "CONSENSUSFIT_RENEW_DEADLINE_SECONDS": "20", "CONSENSUSFIT_RETRY_SECONDS": "4",
                              "CONSENSUSFIT_READINESS_PORT": "9000"})
    assert config.leader_election and (config.lease_name, config.lease_namespace) == ("cfit", "ops")
    assert (config.lease_seconds, config.renew_deadline_seconds, config.retry_seconds) == (30, 20, 4)
    assert config.readiness_port == 9000
