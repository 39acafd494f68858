"""Attempts are part of the protocol: a worker may start only a job it was offered, and an event from an attempt
that is no longer the job's current one changes nothing and is recorded as stale, not as an error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from retracer import config as cfg
from retracer import store
from retracer.apply.applier import Applier, Outcome
from retracer.service.chores.dispatch import dispatch
from retracer.store.models import Job, ProcessedEvent, Rejected
from retracer.testing.factories import crash_data, event
from tests.conftest import make_config


@pytest.fixture
def offers(tmp_path: Path, db_url: str) -> Any:
    """The shipped default: [service] start_requires_offer = true."""
    config = make_config(tmp_path / "data", db_url, RETRACER__SERVICE__START_REQUIRES_OFFER="true")
    engine = store.make_engine(config.database_url)
    yield config, store.session_factory(engine)
    engine.dispose()


def apply(config: cfg.Config, factory: sessionmaker[Session], *bodies: Any) -> list[Outcome]:
    with store.transaction(factory) as session:
        return Applier(config).apply_batch(session, list(bodies))


def job_of(factory: sessionmaker[Session], job_id: int) -> Job:
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def offer(config: cfg.Config, factory: sessionmaker[Session]) -> list[int]:
    with store.transaction(factory) as session:
        return [j.id for j in dispatch(session, config)]


def new_job(config: cfg.Config, factory: sessionmaker[Session]) -> int:
    (outcome,) = apply(config, factory, event("crash.submitted", **crash_data()))
    assert outcome.job_id is not None
    return outcome.job_id


def test_a_job_nobody_offered_cannot_be_started(offers: Any) -> None:
    """retrace.started for a PENDING job the dispatcher has not offered is rejected, saying why; once offered,
    it is applied (so starting jobs cannot bypass max_parallel)."""
    config, factory = offers
    job = new_job(config, factory)
    (refused,) = apply(config, factory, event("retrace.started", job, worker="w", attempt=1))
    assert refused.status == "rejected"
    assert "guard was_offered not met: A worker may start only a job the dispatcher offered it" in (
        refused.reason or "")
    assert offer(config, factory) == [job]
    (started,) = apply(config, factory, event("retrace.started", job, worker="w", attempt=1))
    assert started.status == "applied" and job_of(factory, job).state == "RETRACING"


def test_max_parallel_holds(offers: Any, tmp_path: Path, db_url: str) -> None:
    """With max_parallel 1, a worker that starts a second job on its own is refused."""
    config = make_config(tmp_path / "data", db_url, RETRACER__SERVICE__START_REQUIRES_OFFER="true",
                         RETRACER__SERVICE__MAX_PARALLEL="1")
    _, factory = offers
    first, second = new_job(config, factory), new_job(config, factory)
    assert offer(config, factory) == [first]
    outcomes = apply(config, factory, event("retrace.started", first, worker="a", attempt=1),
                     event("retrace.started", second, worker="b", attempt=1))
    assert [o.status for o in outcomes] == ["applied", "rejected"]


def test_an_event_from_an_earlier_attempt_is_stale(offers: Any) -> None:
    """After attempt 1 failed and attempt 2 started, attempt 1's late heartbeat, failure and start change
    nothing: each is "stale" (marked, so a redelivery is a duplicate), and none is listed as rejected."""
    config, factory = offers
    job = new_job(config, factory)
    offer(config, factory)
    apply(config, factory, event("retrace.started", job, worker="old", attempt=1))
    (failed,) = apply(config, factory, event("retrace.failed", job, worker="old", attempt=1, error="disk full",
                                             transient=True))
    assert failed.status == "applied" and job_of(factory, job).attempts == 1
    with store.transaction(factory) as session:  # the backoff is not what this test is about
        session.get(Job, job).not_before = None  # type: ignore[union-attr]
    offer(config, factory)
    apply(config, factory, event("retrace.started", job, worker="new", attempt=2))
    before = job_of(factory, job)
    late = [event("retrace.heartbeat", job, worker="old", attempt=1),
            event("retrace.failed", job, worker="old", attempt=1, error="gdb crashed", transient=False),
            event("retrace.started", job, worker="old", attempt=1)]
    outcomes = apply(config, factory, *late)
    assert [o.status for o in outcomes] == ["stale"] * 3
    assert outcomes[1].reason == f"attempt 1 of job {job} is not its current attempt (2): this event changes nothing"
    after = job_of(factory, job)
    assert (after.state, after.worker, after.attempts, after.last_error, after.version_id) == (
        "RETRACING", "new", 1, before.last_error, before.version_id)
    with factory() as session:
        assert session.scalars(select(Rejected)).all() == []
        marks = session.scalars(select(ProcessedEvent.outcome).where(
            ProcessedEvent.event_id.in_([e["id"] for e in late]))).all()
    assert marks == ["stale"] * 3
    assert [o.status for o in apply(config, factory, late[0])] == ["duplicate"]
    (current,) = apply(config, factory, event("retrace.heartbeat", job, worker="new", attempt=2))
    assert current.status == "applied"


def test_events_without_an_attempt_are_applied_as_before(offers: Any) -> None:
    """The attempt is optional in the contract: a worker that does not send it is not judged by it."""
    config, factory = offers
    job = new_job(config, factory)
    offer(config, factory)
    outcomes = apply(config, factory, event("retrace.started", job, worker="w"),
                     event("retrace.heartbeat", job, worker="w"))
    assert [o.status for o in outcomes] == ["applied", "applied"]


def test_a_redelivered_request_started_again_is_not_an_error(offers: Any) -> None:
    """A worker died holding a request; the broker gave it to another worker, which starts the same attempt:
    the second start is stale (no error listed), and the attempt goes on with the second worker."""
    config, factory = offers
    job = new_job(config, factory)
    offer(config, factory)
    apply(config, factory, event("retrace.started", job, worker="dead", attempt=1))
    (again,) = apply(config, factory, event("retrace.started", job, worker="next", attempt=1))
    assert again.status == "stale" and "was already started (by dead)" in (again.reason or "")
    (beat,) = apply(config, factory, event("retrace.heartbeat", job, worker="next", attempt=1))
    assert beat.status == "applied" and job_of(factory, job).worker == "next"
    with factory() as session:
        assert session.scalars(select(Rejected)).all() == []
