"""Leader election over a coordination.k8s.io/v1 Lease: of several operator replicas, only the
Lease's holder reconciles; the others keep their watches and indexes warm and take over when the
holder stops renewing.

The semantics are client-go's leaderelection (what controller-runtime operators use):
- a candidate takes a Lease that is free (no holder, as a released one is) or expired: unchanged for
  the Lease's own leaseDurationSeconds since this candidate last saw it change. Expiry is measured
  on the candidate's clock from when it saw the change, never from the renewTime written by
  another machine's clock, so clock skew between nodes does not matter;
- the holder renews every retry period, and stops leading at once when it has not renewed for the
  renew deadline (shorter than the lease duration: it has stopped writing before anyone else may
  start);
- every write carries the resourceVersion last read: a 409 means another candidate wrote first,
  and this one has not acquired (optimistic concurrency; no two holders ever);
- on shutdown the holder releases the Lease (no holder, a 1 s duration), so a rolling update hands
  over at once instead of after a lease duration.

`decide`, `leading` and `observe` are the pure rules; `Elector` reads and writes the Lease with them.
Leadership is checked once per reconcile pass (operator/handlers.py): a pass that began just
before the renew deadline may finish after it, which the gap to the lease duration (5 s by
default) leaves room for.
"""

from __future__ import annotations

import enum
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from kubernetes.client import ApiClient, CoordinationV1Api, V1Lease
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

_RELEASED_SECONDS = 1  # the lease duration a released Lease says (client-go's): free to take at once


@dataclass(frozen=True)
class Timing:
    """client-go's three durations (seconds), with its defaults."""

    lease_seconds: float = 15.0  # how long a candidate waits, from the last change it saw, to take over
    renew_deadline_seconds: float = 10.0  # how long the holder keeps leading without renewing
    retry_seconds: float = 2.0  # how often every candidate tries to acquire or renew

    def __post_init__(self) -> None:
        # client-go's rules: the holder stops writing before anyone may take over, and tries to
        # renew more than once before it stops.
        if not 0 < self.retry_seconds < self.renew_deadline_seconds < self.lease_seconds:
            raise ValueError(f"leader election needs 0 < retry ({self.retry_seconds} s) < renew deadline "
                             f"({self.renew_deadline_seconds} s) < lease duration ({self.lease_seconds} s)")


@dataclass(frozen=True)
class Record:
    """What a Lease says: who holds it, for how long, and which write of it this is."""

    holder: str  # "" once released
    lease_seconds: float
    renewed: str  # renewTime as written: compared only for change, never with this machine's clock
    acquired: str  # acquireTime: when the holder took it
    transitions: int
    resource_version: str  # "" for a Lease not yet created


@dataclass(frozen=True)
class Seen:
    """A Lease as this candidate last read it, and when (its monotonic clock) it last changed."""

    record: Record
    since: float


class Step(enum.Enum):
    CREATE = "create"  # no Lease yet: create it, holding it
    TAKE = "take"  # free or expired: write ourselves in as the holder
    RENEW = "renew"  # ours: write a new renewTime
    STAND_BY = "stand by"  # another candidate holds it and renews it


def decide(seen: Seen | None, me: str, now: float) -> Step:
    """What a candidate does with the Lease as it last saw it (None: there is none)."""
    if seen is None:
        return Step.CREATE
    if seen.record.holder == me:
        return Step.RENEW
    if not seen.record.holder or now >= seen.since + seen.record.lease_seconds:
        return Step.TAKE
    return Step.STAND_BY


def leading(renewed: float | None, now: float, timing: Timing) -> bool:
    """Whether a holder that last acquired or renewed at `renewed` may still write: only within the
    renew deadline, which ends before any other candidate can see the Lease expire."""
    return renewed is not None and now - renewed < timing.renew_deadline_seconds


def observe(previous: Seen | None, record: Record, now: float) -> Seen:
    """The Lease as read now: its change time stays the earlier one while nothing in it changed."""
    unchanged = previous is not None and (previous.record.holder, previous.record.renewed,
                                          previous.record.transitions) == (
        record.holder, record.renewed, record.transitions)
    return Seen(record, previous.since if unchanged else now)


def identity() -> str:
    """This replica's name in the Lease: its pod name (HOSTNAME) and a random suffix, so that a
    restarted pod of the same name is a new candidate (client-go's convention)."""
    return f"{os.environ.get('HOSTNAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def _micro_time(moment: datetime) -> str:
    """A Kubernetes MicroTime (RFC 3339 with microseconds)."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _record(lease: V1Lease) -> Record:
    spec = lease.spec
    return Record(
        holder=spec.holder_identity or "",
        lease_seconds=float(spec.lease_duration_seconds or 0),
        renewed=_micro_time(spec.renew_time) if spec.renew_time else "",
        acquired=_micro_time(spec.acquire_time) if spec.acquire_time else "",
        transitions=spec.lease_transitions or 0,
        resource_version=lease.metadata.resource_version or "",
    )


class Elector:
    """One candidate for one Lease. `attempt` (every retry period) acquires or renews; `leading`
    says whether this replica may write now; `release` hands the Lease back on shutdown.

    Blocking (the Kubernetes client): call it off the event loop. Every request times out within
    the retry period, so an unreachable API server cannot keep a stale holder leading: `leading`
    turns false at the renew deadline whatever the requests do.
    """

    def __init__(self, api: ApiClient, namespace: str, name: str, me: str, timing: Timing,
                 clock: Callable[[], float] = time.monotonic):
        self._leases = CoordinationV1Api(api)
        self.namespace, self.name, self.me, self.timing = namespace, name, me, timing
        self._clock = clock
        self._seen: Seen | None = None
        self._renewed: float | None = None  # when the latest acquire or renew was sent

    def leading(self) -> bool:
        return leading(self._renewed, self._clock(), self.timing)

    def attempt(self) -> bool:
        """One try at acquiring or renewing; whether this replica leads afterwards. API errors are
        logged: the next try comes a retry period later."""
        try:
            self._attempt()
        except ApiException as error:
            log.warning("lease %s/%s: %s %s", self.namespace, self.name, error.status, error.reason)
        except OSError as error:  # the API server unreachable (urllib3's errors are OSErrors)
            log.warning("lease %s/%s: %s", self.namespace, self.name, error)
        return self.leading()

    def release(self) -> None:
        """Give the Lease up, if held: the next candidate takes it at its next try."""
        if self._seen is None or self._seen.record.holder != self.me:
            return
        self._renewed = None  # stop writing first: leadership ends here whatever the write does
        moment = _micro_time(datetime.now(UTC))
        try:
            self._write(replace(self._seen.record, holder="", lease_seconds=_RELEASED_SECONDS,
                                renewed=moment, acquired=moment))
            log.info("released lease %s/%s", self.namespace, self.name)
        except (ApiException, OSError) as error:
            log.warning("could not release lease %s/%s (it expires instead): %s", self.namespace, self.name, error)

    def _attempt(self) -> None:
        now = self._clock()
        if self._seen is not None and self.leading():
            # The holder's fast path (client-go's): renew from the Lease it wrote last, without a
            # read; a 409 means the Lease changed since, and it is read again below.
            if self._try_write(Step.RENEW, now):
                return
        self._seen = self._read(now)
        step = decide(self._seen, self.me, now)
        if step is Step.STAND_BY:
            self._renewed = None
        elif not self._try_write(step, now):
            self._renewed = None

    def _read(self, now: float) -> Seen | None:
        try:
            lease = self._leases.read_namespaced_lease(self.name, self.namespace,
                                                       _request_timeout=self.timing.retry_seconds)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return observe(self._seen, _record(lease), now)

    def _try_write(self, step: Step, now: float) -> bool:
        """Write ourselves in as the holder; False if another candidate wrote first (409)."""
        previous = self._seen.record if self._seen else None
        moment = _micro_time(datetime.now(UTC))
        if step is Step.RENEW:
            record = replace(previous, renewed=moment, lease_seconds=self.timing.lease_seconds)
        else:
            record = Record(self.me, self.timing.lease_seconds, moment, moment,
                            previous.transitions + 1 if previous else 0,
                            previous.resource_version if previous else "")
        try:
            written = self._write(record)
        except ApiException as error:
            if error.status == 409:
                return False
            raise
        if step is not Step.RENEW:
            log.info("acquired lease %s/%s as %s", self.namespace, self.name, self.me)
        self._seen = Seen(_record(written), now)
        self._renewed = now
        return True

    def _write(self, record: Record) -> V1Lease:
        """Create the Lease (a record not yet created) or replace it, checked against the
        resourceVersion the record was read with (the API server answers 409 if it changed)."""
        metadata = {"name": self.name, "namespace": self.namespace}
        if record.resource_version:
            metadata["resourceVersion"] = record.resource_version
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": {
            "holderIdentity": record.holder, "leaseDurationSeconds": round(record.lease_seconds),
            "renewTime": record.renewed, "acquireTime": record.acquired, "leaseTransitions": record.transitions}}
        timeout = self.timing.retry_seconds
        if not record.resource_version:
            return self._leases.create_namespaced_lease(self.namespace, body, _request_timeout=timeout)
        return self._leases.replace_namespaced_lease(self.name, self.namespace, body, _request_timeout=timeout)


@dataclass(frozen=True)
class Replica:
    """This operator process among its replicas: the Lease it contends for (None: no leader
    election, it reconciles alone) and whether its loop is running (its readiness: a warm follower
    is as ready as the leader, since it can take over within one lease duration)."""

    elector: Elector | None = None
    running: threading.Event = field(default_factory=threading.Event)

    def leading(self) -> bool:
        return self.elector is None or self.elector.leading()
