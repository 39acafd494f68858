"""Every transition in states/workflow.toml, allowed and refused, through the real apply path on both databases.

The cases are generated from ``load().transitions`` and ``load().states``: a transition added to the file gets
a test that fails until it has a recipe below, and every (trigger, state) pair the file does not allow is
checked to be refused with the job left exactly as it was.

Jobs reach each source state the way production jobs do: events through ``Applier.apply_batch`` and admin or
service triggers through ``Applier.fire``, each in its own committed transaction.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import Table, func, select, update
from sqlalchemy.exc import StatementError
from sqlalchemy.orm import Session, sessionmaker

from retracer import config as cfg
from retracer import store
from retracer.apply.applier import Applier, Outcome
from retracer.config import Config
from retracer.errors import StateWriteRefused, TransitionRefused
from retracer.events import TYPES
from retracer.reports import history_of
from retracer.service import Service
from retracer.service.chores.dispatch import dispatch
from retracer.store import bulk
from retracer.store.models import History, Job, JobRecord, Mail, ProcessedEvent, Rejected, utcnow
from retracer.testing.factories import crash_data, event
from retracer.testing.logcapture import captured_logs
from retracer.workflow import TransitionSpec, load, machine_writes

WF = load()
STATES = list(WF.states)
TRIGGERS = list(dict.fromkeys(t.trigger for t in WF.transitions))
EVENT_OF = {t.trigger: t.event for t in WF.transitions if t.event}


def allowed(trigger: str, state: str) -> bool:
    """Whether the workflow file lets ``trigger`` fire from ``state`` (read from the file, not the machine)."""
    return any(t.trigger == trigger and state in t.source for t in WF.transitions)


def needs_job(trigger: str) -> bool:
    """Whether the trigger's bus event names an existing job (crash.submitted does not)."""
    return trigger in EVENT_OF and TYPES[EVENT_OF[trigger]][0]


# -- the world: a database and the apply path --------------------------------------------------------------


class World:
    """A database driven only through the real apply path, one committed transaction per call."""

    WORKER = "worker-7"
    SOURCE = "builder-1"
    ADMIN = "admin:celso"
    SERVICE = "service:watchdog"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.engine = store.make_engine(config.database_url)
        self.factory: sessionmaker[Session] = store.session_factory(self.engine)
        self.applier = Applier(config)

    def close(self) -> None:
        self.engine.dispose()

    def apply(self, *bodies: Any) -> list[Outcome]:
        with store.transaction(self.factory) as session:
            return self.applier.apply_batch(session, list(bodies))

    def applied(self, body: dict[str, Any]) -> Outcome:
        (outcome,) = self.apply(body)
        assert outcome.status == "applied", outcome
        return outcome

    def fire(self, job_id: int, trigger: str, by: str = ADMIN, **kwargs: Any) -> None:
        with store.transaction(self.factory) as session:
            self.applier.fire(session, job_id, trigger, by=by, **kwargs)

    def ev(self, etype: str, job_id: int | None, **data: Any) -> dict[str, Any]:
        return event(etype, job_id, source=self.SOURCE, **data)

    def submit(self, **overrides: Any) -> int:
        outcome = self.applied(self.ev("crash.submitted", None, **crash_data(**overrides)))
        assert outcome.job_id is not None
        return outcome.job_id

    def drive(self, state: str) -> int:
        """A new job brought to ``state`` the way production jobs get there."""
        job_id = self.submit()
        if state == "PENDING":
            return job_id
        if state == "ON_HOLD":
            self.fire(job_id, "hold", reason="waiting for the debug symbols to be published")
            return job_id
        self.applied(self.ev("retrace.started", job_id, worker=self.WORKER))
        if state == "RETRACING":
            return job_id
        if state == "FAILEDTOUPLOAD":
            self.applied(self.ev("upload.failed", job_id, leaf="upload-1",
                                 upload_log="Rejected: signature check failed\nmore detail"))
            return job_id
        if state == "FULLYBUILT":
            self.applied(self.ev("upload.accepted", job_id, leaf="upload-1"))
            return job_id
        raise AssertionError(f"no route to {state}: teach World.drive the way jobs reach it")

    def job(self, job_id: int) -> Job:
        with self.factory() as session:
            job = session.get(Job, job_id)
            assert job is not None
            session.expunge(job)
            return job

    def history(self, job_id: int) -> list[History]:
        with self.factory() as session:
            rows = history_of(session, job_id)
            session.expunge_all()
            return rows

    def count(self, model: type[Any], **where: Any) -> int:
        with self.factory() as session:
            stmt = select(func.count()).select_from(model).filter_by(**where)
            return int(session.scalar(stmt) or 0)


@pytest.fixture
def world(config: Config) -> Any:
    w = World(config)
    yield w
    w.close()


@pytest.fixture
def make_world(tmp_path: Path, db_url: str) -> Any:
    """A World whose configuration has extra environment overrides."""
    made: list[World] = []

    def make(**overrides: str) -> World:
        env = {"RETRACER__SERVICE__DATA_DIR": str(tmp_path / "data"), "RETRACER__DATABASE__URL": db_url,
               "RETRACER__MAIL__ADMINS": "celso@example.com,foo.bar@example.com",
               "RETRACER__SERVICE__START_REQUIRES_OFFER": "false", **overrides}
        w = World(cfg.load(environ=env))
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


# -- recipes: how to fire each transition and what it must do -----------------------------------------------

Check = Callable[[Job, Job, datetime, datetime], None]


def no_check(after: Job, before: Job, t0: datetime, t1: datetime) -> None:
    """Nothing beyond the state and the history row."""


@dataclass(frozen=True)
class Recipe:
    """How to make one transition of the file fire, and what it must leave behind."""

    data: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    history_reason: Callable[[Job], str | None] = lambda job: None
    check: Check = no_check


def _submitted(after: Job, before: Job, t0: datetime, t1: datetime) -> None:
    assert (after.crash_id, after.package, after.priority, after.attempts) == ("crash-x1", "cdrkit", 7, 0)
    assert after.build_ids == ["deadbeefcafe"] and after.manual_priority is False
    assert t0 <= after.created_at <= t1


def _started(after: Job, before: Job, t0: datetime, t1: datetime) -> None:
    assert after.worker == "worker-9"
    assert after.started_at is not None and t0 <= after.started_at <= t1
    assert after.last_heartbeat is not None and t0 <= after.last_heartbeat <= t1


def _heartbeat(after: Job, before: Job, t0: datetime, t1: datetime) -> None:
    assert after.last_heartbeat is not None and t0 <= after.last_heartbeat <= t1
    assert after.worker == World.WORKER and after.attempts == before.attempts


def _uploaded(after: Job, before: Job, t0: datetime, t1: datetime) -> None:
    assert after.upload_leaf == "upload-2" and after.upload_log is None
    assert after.finished_at is not None and t0 <= after.finished_at <= t1


def _upload_failed(after: Job, before: Job, t0: datetime, t1: datetime) -> None:
    assert after.upload_leaf == "upload-2"
    assert after.upload_log == "Rejected: unknown build-id\nsecond line"
    assert after.finished_at is not None and t0 <= after.finished_at <= t1


def _retried_later(after: Job, before: Job, t0: datetime, t1: datetime) -> None:
    backoff = timedelta(seconds=300)  # policy.backoff_base_s for the first retry
    assert after.attempts == before.attempts + 1 == 1
    assert after.not_before is not None and t0 + backoff <= after.not_before <= t1 + backoff
    # The worker of the failed attempt is kept for the mail and `show`; the heartbeat is not.
    assert after.worker == before.worker and after.last_heartbeat is None and after.hold_reason is None


def _held_permanent(after: Job, before: Job, t0: datetime, t1: datetime) -> None:
    assert after.attempts == 1
    assert after.hold_reason == "permanent failure on attempt 1; last error: Segmentation fault in gdb"
    assert after.last_error == "Segmentation fault in gdb\nbacktrace follows"


def _held_exhausted(after: Job, before: Job, t0: datetime, t1: datetime) -> None:
    assert after.attempts == 1
    assert after.hold_reason == "retries exhausted after 1 of 1 attempts; last error: no heartbeat for 600 s"


def _rescue_failed(after: Job, before: Job, t0: datetime, t1: datetime) -> None:
    assert after.upload_log == "Rejected again: checksum mismatch"


def _retried_now(after: Job, before: Job, t0: datetime, t1: datetime) -> None:
    assert after.attempts == 0 and after.not_before is None
    assert after.hold_reason is None and after.upload_log is None and after.worker is None
    # Nothing of the earlier tries survives: a new start counts its times from itself.
    assert (after.upload_leaf, after.last_error, after.failure_pattern) == (None, None, None)
    assert (after.started_at, after.finished_at, after.last_heartbeat, after.dispatched_at) == (None,) * 4
    assert (after.crash_id, after.priority) == (before.crash_id, before.priority)


def _held(after: Job, before: Job, t0: datetime, t1: datetime) -> None:
    assert after.hold_reason == "disk full on the retracer host"


def _released(after: Job, before: Job, t0: datetime, t1: datetime) -> None:
    assert after.hold_reason is None and after.not_before is None


def _unblocked(after: Job, before: Job, t0: datetime, t1: datetime) -> None:
    assert (after.attempts, after.not_before, after.hold_reason, after.worker) == (0, None, None, None)
    assert (after.crash_id, after.priority) == (before.crash_id, before.priority)


def _reprioritized(after: Job, before: Job, t0: datetime, t1: datetime) -> None:
    assert (after.priority, after.manual_priority) == (50, True)
    assert after.attempts == before.attempts and after.hold_reason == before.hold_reason


#: (trigger, dest as written in the file) -> recipe.
RECIPES: dict[tuple[str, str], Recipe] = {
    ("submit", "PENDING"): Recipe(
        data=crash_data(crash_id="crash-x1", priority=7, build_ids=["deadbeefcafe"]), check=_submitted),
    ("start", "RETRACING"): Recipe(data={"worker": "worker-9"}, check=_started),
    ("heartbeat", "="): Recipe(data={"worker": World.WORKER}, check=_heartbeat),
    ("upload_accepted", "FULLYBUILT"): Recipe(data={"leaf": "upload-2"}, check=_uploaded),
    ("upload_failed", "FAILEDTOUPLOAD"): Recipe(
        data={"leaf": "upload-2", "upload_log": "Rejected: unknown build-id\nsecond line"},
        history_reason=lambda job: "upload failed: Rejected: unknown build-id", check=_upload_failed),
    ("retrace_failed", "PENDING"): Recipe(
        data={"error": "apt: Temporary failure resolving archive", "transient": True},
        history_reason=lambda job: "attempt 1 failed: apt: Temporary failure resolving archive",
        check=_retried_later),
    ("retrace_failed", "ON_HOLD"): Recipe(
        data={"error": "Segmentation fault in gdb\nbacktrace follows", "transient": False},
        history_reason=lambda job: job.hold_reason, check=_held_permanent),
    ("heartbeat_lost", "PENDING"): Recipe(
        data={"error": "no heartbeat for 600 s"},
        history_reason=lambda job: "attempt 1 failed: no heartbeat for 600 s", check=_retried_later),
    ("heartbeat_lost", "ON_HOLD"): Recipe(
        data={"error": "no heartbeat for 600 s"}, env={"RETRACER__POLICY__MAX_ATTEMPTS": "1"},
        history_reason=lambda job: job.hold_reason, check=_held_exhausted),
    ("rescue", "FULLYBUILT"): Recipe(
        data={"leaf": "upload-2"}, reason="re-signed the upload by hand",
        history_reason=lambda job: "re-signed the upload by hand", check=_uploaded),
    ("rescue_failed", "="): Recipe(
        data={"upload_log": "Rejected again: checksum mismatch"}, reason="reprocessed the upload",
        history_reason=lambda job: "reprocessed the upload", check=_rescue_failed),
    ("retry", "PENDING"): Recipe(
        reason="mirror fixed", history_reason=lambda job: "mirror fixed", check=_retried_now),
    ("hold", "ON_HOLD"): Recipe(
        reason="disk full on the retracer host", history_reason=lambda job: "disk full on the retracer host",
        check=_held),
    ("release", "PENDING"): Recipe(
        reason="symbols are published", history_reason=lambda job: "symbols are published", check=_released),
    ("symbols_arrived", "PENDING"): Recipe(
        reason="symbols imported for build-id 0123456789abcdef",
        history_reason=lambda job: "symbols imported for build-id 0123456789abcdef", check=_unblocked),
    ("reprioritize", "="): Recipe(
        data={"priority": 50}, reason="security bug", history_reason=lambda job: "security bug",
        check=_reprioritized),
}


def _allowed_cases() -> list[Any]:
    cases = []
    for index, spec in enumerate(WF.transitions):
        for source in spec.source or (None,):
            dest = spec.dest_from(source) if source else spec.dest
            cases.append(pytest.param(index, source, id=f"{spec.trigger}:{source or 'new'}->{dest}"))
    return cases


def _refused_cases(by_event: bool) -> list[Any]:
    cases = []
    for trigger in TRIGGERS:
        if by_event and not needs_job(trigger):
            continue
        for state in STATES:
            if not allowed(trigger, state):
                cases.append(pytest.param(trigger, state, id=f"{trigger}@{state}"))
    return cases


def _recipe(spec: TransitionSpec) -> Recipe:
    recipe = RECIPES.get((spec.trigger, spec.dest))
    if recipe is None:
        pytest.fail(f"no recipe for {spec.trigger} -> {spec.dest} in states/workflow.toml: add one to RECIPES")
    return recipe


class TestEveryAllowedTransition:
    @pytest.mark.parametrize(("index", "source"), _allowed_cases())
    def test_transition(self, make_world: Callable[..., World], index: int, source: str | None) -> None:
        """Firing the transition from its source reaches its destination, records history and has its effects."""
        spec = WF.transitions[index]
        recipe = _recipe(spec)
        w = make_world(**recipe.env)
        event_id = None
        if source is None:  # the creating transition: a crash.submitted event
            before_history: list[History] = []
            before = Job()
            t0 = utcnow()
            body = w.ev(spec.event or "crash.submitted", None, **recipe.data)
            (outcome,) = w.apply(body)
            t1 = utcnow()
            assert outcome.status == "applied", outcome
            assert outcome.job_id is not None
            job_id, event_id = outcome.job_id, body["id"]
        else:
            job_id = w.drive(source)
            before, before_history = w.job(job_id), w.history(job_id)
            assert before.state == source
            t0 = utcnow()
            if spec.event:
                body = w.ev(spec.event, job_id, **recipe.data)
                (outcome,) = w.apply(body)
                assert (outcome.status, outcome.trigger, outcome.source) == ("applied", spec.trigger, source), outcome
                event_id = body["id"]
            else:
                w.fire(job_id, spec.trigger, by=w.ADMIN if spec.admin else w.SERVICE, reason=recipe.reason,
                       data=recipe.data)
            t1 = utcnow()
        after = w.job(job_id)
        dest = spec.dest_from(source) if source else spec.dest
        assert after.state == dest
        if source is not None:
            assert after.version_id == before.version_id + 1
        new_rows = w.history(job_id)[len(before_history):]
        if not spec.record:
            assert new_rows == []
        else:
            (row,) = new_rows
            expected_by = f"event:{w.SOURCE}" if spec.event else (w.ADMIN if spec.admin else w.SERVICE)
            assert (row.from_state, row.to_state, row.trigger) == (source, dest, spec.trigger)
            assert (row.actor, row.event_id) == (expected_by, event_id)
            assert row.reason == recipe.history_reason(after)
            assert t0 <= row.at <= t1
        recipe.check(after, before, t0, t1)
        if event_id is not None:
            assert w.count(ProcessedEvent, event_id=event_id, outcome="applied") == 1


def _snapshot(w: World, job_id: int) -> tuple[Any, ...]:
    job = w.job(job_id)
    rows = [(h.id, h.from_state, h.to_state, h.trigger) for h in w.history(job_id)]
    return job.state, job.version_id, job.attempts, job.hold_reason, job.upload_log, job.priority, rows


class TestEveryRefusedPair:
    @pytest.mark.parametrize(("trigger", "state"), _refused_cases(by_event=False))
    def test_fire_is_refused(self, world: World, trigger: str, state: str) -> None:
        """A trigger the file does not allow from the state raises TransitionRefused and changes nothing."""
        job_id = world.drive(state)
        before = _snapshot(world, job_id)
        recipe = next((r for (t, _), r in RECIPES.items() if t == trigger), Recipe())
        with world.factory() as session, session.begin():
            with pytest.raises(TransitionRefused) as refused:
                world.applier.fire(session, job_id, trigger, by=world.ADMIN, reason="because",
                                   data=dict(recipe.data))
            job = session.get(Job, job_id)
            assert job is not None and job.state == state and not session.dirty
        err = refused.value
        assert (err.job_id, err.state, err.trigger) == (job_id, state, trigger)
        assert str(err).startswith(f"job {job_id} is {state}: {trigger!r} refused")
        assert err.allowed == WF.allowed_from(state)
        assert _snapshot(world, job_id) == before

    @pytest.mark.parametrize(("trigger", "state"), _refused_cases(by_event=True))
    def test_event_is_rejected(self, world: World, trigger: str, state: str) -> None:
        """An event the file does not allow from the state is rejected, kept as a Rejected row, job unchanged."""
        job_id = world.drive(state)
        before = _snapshot(world, job_id)
        recipe = next(r for (t, _), r in RECIPES.items() if t == trigger)
        body = world.ev(EVENT_OF[trigger], job_id, **recipe.data)
        (outcome,) = world.apply(body)
        assert outcome.status == "rejected"
        assert outcome.reason is not None
        assert outcome.reason.startswith(f"job {job_id} is {state}: {trigger!r} refused"), outcome.reason
        assert _snapshot(world, job_id) == before
        with world.factory() as session:
            (row,) = session.scalars(select(Rejected).where(Rejected.event_id == body["id"]))
            assert (row.job_id, row.event_type, row.reason) == (job_id, EVENT_OF[trigger], outcome.reason)
        assert world.count(ProcessedEvent, event_id=body["id"], outcome="rejected") == 1


class TestGuards:
    def test_upload_failed_needs_an_upload_log(self, world: World) -> None:
        """upload_failed without an upload log, or with a blank one, is refused and the job stays RETRACING."""
        job_id = world.drive("RETRACING")
        before = _snapshot(world, job_id)
        for data in ({"leaf": "upload-1"}, {"leaf": "upload-1", "upload_log": ""},
                     {"leaf": "upload-1", "upload_log": " \n\t "}, {"leaf": "upload-1", "upload_log": None}):
            with pytest.raises(TransitionRefused, match=r"'upload_failed' refused \(guard has_upload_log not met"), \
                    store.transaction(world.factory) as session:
                world.applier.fire(session, job_id, "upload_failed", by=world.SERVICE, data=data)
        assert _snapshot(world, job_id) == before

    def test_upload_failed_event_without_log_is_rejected(self, world: World) -> None:
        """On the bus, an upload.failed with a blank upload log is rejected naming data.upload_log."""
        job_id = world.drive("RETRACING")
        before = _snapshot(world, job_id)
        body = {**world.ev("retrace.heartbeat", job_id, worker="w"), "type": "upload.failed",
                "data": {"leaf": "upload-1", "upload_log": "   "}}
        (outcome,) = world.apply(body)
        assert outcome.status == "rejected" and "data.upload_log must be a non-empty string" in str(outcome.reason)
        assert _snapshot(world, job_id) == before

    def test_transient_failures_back_off(self, world: World) -> None:
        """Transient failures with attempts left go back to PENDING, not before now + the growing backoff."""
        job_id = world.drive("RETRACING")
        for attempt, backoff_s in ((1, 300), (2, 600)):
            t0 = utcnow()
            (outcome,) = world.apply(world.ev("retrace.failed", job_id, error="boom", transient=True))
            t1 = utcnow()
            assert (outcome.status, outcome.dest) == ("applied", "PENDING")
            job = world.job(job_id)
            assert job.attempts == attempt and job.not_before is not None
            assert t0 + timedelta(seconds=backoff_s) <= job.not_before <= t1 + timedelta(seconds=backoff_s)
            world.applied(world.ev("retrace.started", job_id, worker="w"))

    def test_transient_by_pattern(self, world: World) -> None:
        """An error matching a configured transient pattern is retried even without the worker's hint."""
        job_id = world.drive("RETRACING")
        (outcome,) = world.apply(world.ev("retrace.failed", job_id, error="E: Connection timed out [IP: 1.2.3.4]"))
        assert outcome.dest == "PENDING"
        job = world.job(job_id)
        assert job.failure_pattern == "Connection (timed out|refused|reset)" and job.attempts == 1

    def test_permanent_failure_holds(self, world: World) -> None:
        """A non-transient failure goes ON_HOLD at once with a hold reason naming the attempt and the error."""
        job_id = world.drive("RETRACING")
        (outcome,) = world.apply(world.ev("retrace.failed", job_id, error="gdb: internal error\ntrace"))
        assert outcome.dest == "ON_HOLD"
        job = world.job(job_id)
        assert job.hold_reason == "permanent failure on attempt 1; last error: gdb: internal error"

    def test_transient_at_the_cap_holds(self, world: World) -> None:
        """The third transient failure (max_attempts 3) goes ON_HOLD with a reason naming the attempts."""
        job_id = world.drive("RETRACING")
        dests = []
        for _ in range(3):
            (outcome,) = world.apply(world.ev("retrace.failed", job_id, error="mirror down", transient=True))
            dests.append(outcome.dest)
            if outcome.dest == "PENDING":
                world.applied(world.ev("retrace.started", job_id, worker="w"))
        assert dests == ["PENDING", "PENDING", "ON_HOLD"]
        job = world.job(job_id)
        assert job.attempts == 3
        assert job.hold_reason == "retries exhausted after 3 of 3 attempts; last error: mirror down"
        assert world.history(job_id)[-1].reason == job.hold_reason

    def test_hold_needs_a_reason(self, world: World) -> None:
        """hold without a reason (none, empty or blank) is refused and the job is unchanged."""
        job_id = world.drive("PENDING")
        before = _snapshot(world, job_id)
        for reason in (None, "", "  \n"):
            with pytest.raises(TransitionRefused, match=r"'hold' refused \(guard has_reason not met"), \
                    store.transaction(world.factory) as session:
                world.applier.fire(session, job_id, "hold", by=world.ADMIN, reason=reason)
        assert _snapshot(world, job_id) == before


class TestRetry:
    def test_retry_clears_the_failed_try(self, world: World) -> None:
        """retry of a job held after a failure leaves none of that try behind: no last error, pattern,
        worker, start or heartbeat; the next start is the job's start."""
        job_id = world.drive("RETRACING")
        world.applied(world.ev("retrace.failed", job_id, error="gdb: internal error\nmore", transient=False))
        held = world.job(job_id)
        assert held.last_error and held.started_at is not None and held.worker == World.WORKER
        world.fire(job_id, "retry", reason="mirror fixed")
        job = world.job(job_id)
        assert (job.last_error, job.failure_pattern, job.worker, job.started_at, job.last_heartbeat) == (None,) * 5
        t0 = utcnow()
        world.applied(world.ev("retrace.started", job_id, worker="worker-8"))
        started = world.job(job_id).started_at
        assert started is not None and started >= t0

    def test_final_mail_duration_counts_from_the_new_start(self, world: World) -> None:
        """After a retry, the FULLYBUILT mail's duration is that of the try that succeeded, not one counted
        from the first try's start."""
        job_id = world.drive("FAILEDTOUPLOAD")
        long_ago = utcnow() - timedelta(days=2)
        with store.transaction(world.factory) as session:  # the first try started two days ago
            session.execute(update(Job).where(Job.id == job_id).values(started_at=long_ago))
        world.fire(job_id, "retry", reason="uploader fixed")
        assert world.job(job_id).upload_leaf is None
        world.applied(world.ev("retrace.started", job_id, worker="worker-8"))
        world.applied(world.ev("upload.accepted", job_id, leaf="upload-2"))
        with world.factory() as session:
            contexts = [m.context for m in session.scalars(
                select(Mail).where(Mail.job_id == job_id, Mail.state == WF.roles.success))]
        assert contexts and all(0 <= c["duration_s"] < 60 for c in contexts), contexts


class TestDispatchOrder:
    def test_priority_then_age_manual_or_not(self, world: World) -> None:
        """The dispatcher offers by priority, then age: an admin's priority is kept as set but ranks by its
        value, so a manual -5 goes after an automatic 0 and a manual 3 before an automatic 2."""
        low, plain, high, two = (world.submit(crash_id=c) for c in ("low", "plain", "high", "two"))
        world.fire(low, "reprioritize", data={"priority": -5}, reason="can wait")
        world.fire(high, "reprioritize", data={"priority": 3}, reason="security")
        with store.transaction(world.factory) as session:
            session.execute(update(Job).where(Job.id == two).values(priority=2))
        with store.transaction(world.factory) as session:
            offered = [j.id for j in dispatch(session, world.config)]
        assert offered == [high, two, plain, low]
        assert (world.job(low).priority, world.job(low).manual_priority) == (-5, True)


class TestExactlyOnce:
    def test_same_event_twice(self, world: World) -> None:
        """An event applied twice (redelivery) gives one history row and a "duplicate" outcome."""
        job_id = world.drive("PENDING")
        body = world.ev("retrace.started", job_id, worker="w")
        (first,) = world.apply(body)
        (second,) = world.apply(body)
        assert (first.status, second.status) == ("applied", "duplicate")
        assert second.event_id == body["id"]
        assert [h.event_id for h in world.history(job_id)].count(body["id"]) == 1
        assert world.job(job_id).version_id == 2

    def test_same_event_twice_in_one_batch(self, world: World) -> None:
        """A batch carrying the same event twice applies it once."""
        job_id = world.drive("PENDING")
        body = world.ev("retrace.started", job_id, worker="w")
        outcomes = world.apply(body, dict(body))
        assert [o.status for o in outcomes] == ["applied", "duplicate"]
        assert len(world.history(job_id)) == 2

    def test_same_submit_twice(self, world: World) -> None:
        """A redelivered crash.submitted creates one job, not two."""
        body = world.ev("crash.submitted", None, **crash_data())
        outcomes = world.apply(body) + world.apply(body)
        assert [o.status for o in outcomes] == ["applied", "duplicate"]
        assert world.count(Job) == 1

    def test_rejected_event_redelivered(self, world: World) -> None:
        """A refused event delivered again is a duplicate: one Rejected row, not two."""
        job_id = world.drive("PENDING")
        body = world.ev("retrace.heartbeat", job_id, worker="w")
        assert [o.status for o in world.apply(body) + world.apply(body)] == ["rejected", "duplicate"]
        assert world.count(Rejected, event_id=body["id"]) == 1


class TestFreshDeliveries:
    """Service.apply(fresh=True): a first delivery skips the marker lookup; an event applied before must
    still take effect once (its marker's key fails the first try and the batch is applied with the lookup)."""

    def service(self, world: World) -> Service:
        return Service(world.config, world.factory)

    def test_fresh_batch_applies(self, world: World) -> None:
        job_id = world.drive("PENDING")
        body = world.ev("retrace.started", job_id, worker="w")
        assert [o.status for o in self.service(world).apply([json.dumps(body)], fresh=True)] == ["applied"]
        assert world.job(job_id).state == "RETRACING"

    def test_fresh_batch_with_an_applied_event(self, world: World) -> None:
        """A publisher's duplicate (not flagged redelivered) is still a duplicate: one history row, one bump."""
        job_id = world.drive("PENDING")
        started = world.ev("retrace.started", job_id, worker="w")
        world.apply(started)
        version = world.job(job_id).version_id
        beat = world.ev("retrace.heartbeat", job_id, worker="w")
        outcomes = self.service(world).apply([json.dumps(started), json.dumps(beat)], fresh=True)
        assert [o.status for o in outcomes] == ["duplicate", "applied"]
        assert [h.event_id for h in world.history(job_id)].count(started["id"]) == 1
        assert world.job(job_id).version_id == version + 1

    def test_rejections_logged_once(self, world: World) -> None:
        """The first try fails on the duplicate's marker and the batch is applied again: the refused event
        in it is kept and logged once."""
        job_id = world.drive("PENDING")
        started = world.ev("retrace.started", job_id, worker="w")
        world.apply(started)
        refused = world.ev("upload.accepted", world.drive("PENDING"), leaf="up-1")
        with captured_logs(logging.WARNING) as records:
            outcomes = self.service(world).apply([json.dumps(started), json.dumps(refused)], fresh=True)
        assert [o.status for o in outcomes] == ["duplicate", "rejected"]
        assert [getattr(r, "event_id", None) for r in records if r.getMessage() == "rejected"] == [refused["id"]]
        assert world.count(Rejected, event_id=refused["id"]) == 1

    def test_fresh_submit_applied_before(self, world: World) -> None:
        body = json.dumps(world.ev("crash.submitted", None, **crash_data()))
        service = self.service(world)
        outcomes = service.apply([body], fresh=True) + service.apply([body], fresh=True)
        assert [o.status for o in outcomes] == ["applied", "duplicate"]
        assert world.count(Job) == 1


class TestBulkWrites:
    """bulk.py writes the batch's rows (COPY on PostgreSQL, executemany on SQLite)."""

    def test_update_twice_in_one_transaction(self, world: World) -> None:
        """The staging table is emptied after each use: a second update in the same transaction does not
        write the first one's rows again (the version counter moves once per write)."""
        a, b = world.submit(), world.submit()
        table = cast(Table, Job.__table__)
        with store.transaction(world.factory) as session:
            conn = session.connection()
            bulk.update_rows(conn, table, [{"id": a, "worker": "first"}], counter="version_id")
            bulk.update_rows(conn, table, [{"id": b, "worker": "second"}], counter="version_id")
        assert (world.job(a).worker, world.job(a).version_id) == ("first", 2)
        assert (world.job(b).worker, world.job(b).version_id) == ("second", 2)

    def test_a_naive_datetime_is_refused(self, world: World) -> None:
        """The column type's check holds on the COPY path as in an INSERT: a time without a zone is refused."""
        job_id = world.submit()
        with pytest.raises((ValueError, StatementError), match="naive datetime"), \
                store.transaction(world.factory) as session:
            bulk.update_rows(session.connection(), cast(Table, Job.__table__),
                             [{"id": job_id, "started_at": datetime(2026, 1, 1)}])
        assert world.job(job_id).started_at is None

    def test_insert_fills_defaults_and_json(self, world: World) -> None:
        job_id = world.submit()
        with store.transaction(world.factory) as session:
            history_id = session.scalar(select(func.max(History.id)))
            bulk.insert_rows(session.connection(), cast(Table, Mail.__table__), [
                {"job_id": job_id, "history_id": history_id, "state": "PENDING", "recipient": "x@example.com",
                 "rationale": "Creator", "context": {"job": job_id, "tabs\tand\nlines": "a\tb\nc\\d"}}])
        with world.factory() as session:
            mail = session.scalars(select(Mail).where(Mail.recipient == "x@example.com")).one()
        assert (mail.status, mail.attempts) == ("pending", 0)
        assert mail.created_at is not None and mail.created_at.tzinfo is not None
        assert mail.context == {"job": job_id, "tabs\tand\nlines": "a\tb\nc\\d"}


class TestStateColumn:
    def test_direct_write_refused(self, world: World) -> None:
        """Assigning job.state outside the machine raises StateWriteRefused and the row keeps its state."""
        job_id = world.drive("PENDING")
        with world.factory() as session, session.begin():
            job = session.get(Job, job_id)
            assert job is not None
            with pytest.raises(StateWriteRefused, match=re.escape(f"job {job_id}: state is written only by")):
                job.state = "FULLYBUILT"
            assert job.state == "PENDING"
        assert world.job(job_id).state == "PENDING"

    def test_direct_write_on_a_new_job_refused(self) -> None:
        """Even a job not yet saved cannot be given a state except by the machine."""
        with pytest.raises(StateWriteRefused):
            Job(state="PENDING")

    def test_a_batch_jobs_state_is_the_machines_alone_too(self) -> None:
        """The batch path's plain JobRecord keeps the rule: only the machine assigns its state."""
        assert JobRecord().state is None
        job = JobRecord({"id": 7, "state": "PENDING"})
        with pytest.raises(StateWriteRefused, match=re.escape("job 7: state is written only by")):
            job.state = "FULLYBUILT"
        assert job.state == "PENDING" and job.worker is None  # type: ignore[attr-defined]
        with machine_writes():
            job.state = "RETRACING"
        assert job.state == "RETRACING"

    def test_unknown_job(self, world: World) -> None:
        """An event for a job that does not exist is rejected naming the job."""
        (outcome,) = world.apply(world.ev("retrace.started", 424242, worker="w"))
        assert outcome.status == "rejected" and outcome.reason == (
            "job 424242 does not exist (list jobs with `retracer jobs`)")
