"""The one apply path: an event (from the bus, the inbox, a CLI command or the service itself) becomes a
transition, its history row, its mails, and a processed-event marker, all in the caller's transaction.

Exactly-once rests on the marker: an event id already in ``processed_event`` changes nothing. A malformed
or refused event is kept in ``rejected`` with its reason, in the same transaction, and never raises.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any, cast

from sqlalchemy import Table, func, select, text
from sqlalchemy.orm import Session

from retracer import addresses
from retracer import events as ev
from retracer.apply.verdicts import digest, is_stale, kept_body, note_duplicate
from retracer.config import Config
from retracer.errors import InvalidEvent, JobNotFound, RetracerError, TransitionRefused
from retracer.logs import LINES
from retracer.mail.rows import mail_rows
from retracer.store import bulk
from retracer.store.models import (
    History,
    Job,
    JobRecord,
    Mail,
    ProcessedEvent,
    Rejected,
    SpuriousPattern,
    utcnow,
)
from retracer.symbols import missing as missing_symbols
from retracer.worker.submission import READ, check_core
from retracer.workflow import Change, FailurePolicy, TriggerContext, Workflow, load
from retracer.workflow.effects import EFFECTS

log = logging.getLogger("retracer.apply")


@dataclass(frozen=True)
class Outcome:
    """What became of one event: applied, duplicate (already applied) or rejected (with the reason)."""

    status: str
    event_id: str | None
    event_type: str | None
    job_id: int | None
    trigger: str | None = None
    source: str | None = None
    dest: str | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class _Batch:
    """What one apply_batch call carries from event to event."""

    jobs: dict[int, Job]
    now: datetime
    load_policy: Callable[[], FailurePolicy]
    created: set[int] = field(default_factory=set)
    touched: set[int] = field(default_factory=set)
    new_ids: list[int] = field(default_factory=list)
    created_or_applied: list[int] = field(default_factory=list)
    markers: dict[int, dict[str, Any]] = field(default_factory=dict)
    given: Sequence[int | None] | None = None
    history: list[tuple[dict[str, Any], Job, list[dict[str, Any]]]] = field(default_factory=list)
    #: Signatures accepted in this batch (its jobs are written at its end, so a query would not see them).
    signatures: dict[str, int] = field(default_factory=dict)
    #: Per job, the build-ids it now waits for (replacing those recorded before; empty: none).
    missing: dict[int, list[dict[str, Any]]] = field(default_factory=dict)


class Applier:
    """Applies events and admin triggers through the workflow machine."""

    def __init__(self, config: Config, workflow: Workflow | None = None) -> None:
        self.config = config
        self.workflow = workflow or load()
        self.admins: list[str] = list(config["mail"]["admins"])
        self.creator_domains: list[str] = list(config["mail"]["creator_domains"])
        self.offers_required = bool(config["service"]["start_requires_offer"])

    def policy(self, session: Session) -> FailurePolicy:
        """The failure policy now: the configuration's, with the admins' patterns read from the database."""
        return current_policy(session, self.config)

    # -- events -------------------------------------------------------------------------------------

    def apply_batch(self, session: Session, bodies: Sequence[str | bytes | dict[str, Any]],
                    unseen: bool = False, job_ids: Sequence[int | None] | None = None,
                    minted: bool = False) -> list[Outcome]:
        """Apply events in order inside the caller's transaction; one outcome per body.

        ``unseen``: skip the lookup of processed markers; an event applied before then fails the marker
        insert (its primary key), and the caller applies the batch again without ``unseen``.
        ``job_ids``: per body, the id a crash.submitted among them gets, drawn by the caller (parallel.py
        routes a new job's later events by it); without it the ids are drawn here.
        ``minted``: the service made these events itself (events.RESERVED ids are theirs to use).

        An event whose id was applied or rejected before is a duplicate if it says the same (a redelivery, a
        publisher's retry); if it says something else, the id was reused and the event is rejected for it.

        The batch costs a handful of statements whatever its size: one SELECT for the processed markers
        (none when ``unseen``), one SELECT ... FOR UPDATE for the jobs it names (as plain rows, outside the
        session), and one multi-row write per table at the end (_finish). Autoflush is off: a per-event
        SELECT would flush the previous event's writes.
        """
        parsed: list[ev.Event | InvalidEvent] = []
        for body in bodies:
            try:
                parsed.append(ev.parse(body, minted=minted))
            except InvalidEvent as exc:
                parsed.append(exc)
        valid = [p for p in parsed if isinstance(p, ev.Event)]
        dialect = session.get_bind().dialect
        seen: dict[str, str | None] = dict(session.execute(
            select(ProcessedEvent.event_id, ProcessedEvent.digest).where(
                bulk.among(dialect, ProcessedEvent.event_id, [e.id for e in valid]))).all()
        ) if valid and not unseen else {}
        wanted = {e.job for e in valid if e.job is not None}
        # Locked in id order: the batch owns its jobs until commit, and two writers cannot deadlock on them.
        jobs = {row.id: _job_from_row(row) for row in session.connection().execute(
            select(_JOB_TABLE).where(bulk.among(dialect, _JOB_TABLE.c.id, wanted)).order_by(_JOB_TABLE.c.id)
            .with_for_update())} if wanted else {}
        # Read once per batch, and only if one of its transitions asks (the patterns are a query).
        batch = _Batch(jobs=jobs, now=utcnow(), load_policy=cache(lambda: self.policy(session)), given=job_ids)
        submits = 0 if job_ids else sum(1 for e in valid if e.type == "crash.submitted" and e.id not in seen)
        batch.new_ids = reserve_ids(session, "job", submits) if submits else []
        outcomes: list[Outcome] = []
        with session.no_autoflush:
            for body, item in zip(bodies, parsed, strict=True):
                if isinstance(item, InvalidEvent):
                    outcomes.append(self.reject(session, body, None, str(item), logged=False, minted=minted))
                    continue
                said = digest(item)
                if item.id not in seen:
                    seen[item.id] = said
                    outcomes.append(self._apply(session, item, body, batch, len(outcomes), said, minted))
                elif seen[item.id] in (None, said):
                    outcomes.append(Outcome("duplicate", item.id, item.type, item.job))
                else:
                    outcomes.append(self.reject(
                        session, body, item, f"event id {item.id!r} was already used for an event with other "
                        f"content; this one was not applied: publish it under a new id", logged=False, mark=False,
                        minted=minted))
        self._finish(session, batch)
        # Logged once the batch's writes went through: a first try that fails (a duplicate's marker) and is
        # applied again must not report its rejections twice.
        for outcome in outcomes:
            if outcome.status == "rejected":
                _log_rejected(outcome)
            elif outcome.status == "stale":
                log.info("stale", extra={"event_id": outcome.event_id, "event_type": outcome.event_type,
                                         "job": outcome.job_id, "reason": outcome.reason})
        if batch.created_or_applied and log.isEnabledFor(logging.INFO):
            log.info("applied", extra={LINES: [
                {"event_id": o.event_id, "event_type": o.event_type, "job": o.job_id, "trigger": o.trigger,
                 "from": o.source, "to": o.dest} for o in (outcomes[i] for i in batch.created_or_applied)]})
        return outcomes

    def _apply(self, session: Session, event: ev.Event, body: Any, batch: _Batch, index: int,
               said: str, minted: bool) -> Outcome:
        ctx = TriggerContext(data=dict(event.data), by=f"event:{event.source}", event_id=event.id,
                             load_policy=batch.load_policy, offers_required=self.offers_required)
        new = event.type == "crash.submitted"
        if new and self.creator_domains and not addresses.in_domains(event.data["creator"], self.creator_domains):
            return self.reject(session, body, event, (
                f"creator {event.data['creator']} is not at a domain this site mails ([mail] creator_domains: "
                f"{', '.join(self.creator_domains)}); fix the submitter, or add the domain and replay the event"),
                logged=False, said=said, minted=minted)
        if new:
            core = check_core(event.data["core"])
            if core.refused is not None:
                return self.reject(session, body, event, f"{core.refused}; the crash was not submitted",
                                   logged=False, said=said, minted=minted)
            if core.status == READ:
                ctx.data["build_ids"] = list(core.build_ids)
            ctx.notes["core_check"] = core.status
        try:
            if new:
                job = _new_job()
                change = self.workflow.create(job, ctx)
            else:
                job = batch.jobs.get(event.job or 0) or self._job(session, event.job)
                if (stale := is_stale(event, job)) is not None:
                    batch.markers[index] = {"event_id": event.id, "job_id": job.id, "outcome": "stale",
                                            "at": batch.now, "digest": said}
                    return Outcome("stale", event.id, event.type, job.id, reason=stale)
                trigger = self._trigger_for(event.type, job)
                note_duplicate(session, job, ctx, batch.signatures)
                change = self.workflow.fire(job, trigger, ctx)
        except RetracerError as exc:
            return self.reject(session, body, event, str(exc), logged=False, said=said, minted=minted)
        if new:
            # Its id is reserved now, so later events of this batch find it without a flush.
            given = batch.given[index] if batch.given else None
            job.id = given or (batch.new_ids.pop(0) if batch.new_ids else reserve_ids(session, "job", 1)[0])
            batch.created.add(job.id)
        else:
            batch.touched.add(job.id)
        batch.jobs[job.id] = job
        self._record(session, job, change, ctx, batch)
        if event.type == missing_symbols.REPORTED_BY and missing_symbols.FIELD in event.data:
            batch.missing[job.id] = event.data[missing_symbols.FIELD]
        batch.created_or_applied.append(index)
        batch.markers[index] = {"event_id": event.id, "job_id": job.id, "outcome": "applied", "at": batch.now,
                                "digest": said}
        return Outcome("applied", event.id, event.type, job.id, change.trigger, change.source, change.dest)

    def _trigger_for(self, event_type: str, job: Job) -> str:
        triggers = self.workflow.triggers_for_event(event_type)
        for trigger in triggers:
            if self.workflow.candidates(trigger, job.state):
                return trigger
        raise TransitionRefused(job.id, job.state, triggers[0] if triggers else event_type,
                                f"event {event_type} does not apply to a job in state {job.state}",
                                self.workflow.allowed_from(job.state))

    def reject(self, session: Session, body: Any, event: ev.Event | None, reason: str,
               logged: bool = True, mark: bool = True, said: str | None = None, minted: bool = False) -> Outcome:
        """Keep ``body`` in `rejected` with ``reason`` (and its marker, if it has an id and ``mark``);
        ``logged``: say so in the log now (apply_batch logs its rejections after its writes); ``minted``: the
        service made the event (a replay may use its reserved id again)."""
        known = event.to_dict() if event is not None else ev.peek(body)
        session.add(Rejected(event_id=ev.storable(known.get("id")), event_type=ev.storable(known.get("type")),
                             job_id=known.get("job"), reason=ev.storable(reason), minted=minted,
                             **kept_body(body)))
        if event is not None and mark:
            # A redelivered copy of a rejected event is a duplicate, not a second rejection.
            session.add(ProcessedEvent(event_id=event.id, job_id=event.job, outcome="rejected",
                                       digest=said or digest(event)))
        outcome = Outcome("rejected", known.get("id"), known.get("type"), known.get("job"), reason=reason)
        if logged:
            _log_rejected(outcome)
        return outcome

    # -- admin and service triggers -----------------------------------------------------------------

    def fire(self, session: Session, job_id: int, trigger: str, by: str, reason: str | None = None,
             data: dict[str, Any] | None = None, event_id: str | None = None,
             policy: FailurePolicy | None = None, mail: bool = True) -> Change:
        """Fire a trigger on a job for an admin or the service itself; raises TransitionRefused.

        ``mail=False`` (an admin's --no-mail) queues none of the mails the transition would send, and says so,
        with who suppressed them and whom they were for, in the history's reason.
        """
        job = self._job(session, job_id, lock=True)
        load_policy = cache(lambda: policy or self.policy(session))
        ctx = TriggerContext(data=dict(data or {}), by=by, reason=reason, event_id=event_id, load_policy=load_policy)
        batch = _Batch(jobs={job.id: job}, now=utcnow(), load_policy=load_policy, touched={job.id})
        note_duplicate(session, job, ctx, batch.signatures)
        change = self.workflow.fire(job, trigger, ctx)
        try:
            self._record(session, job, change, ctx, batch, mail=mail)
        except KeyError as exc:
            raise RetracerError(f"trigger {trigger!r} needs data field {exc.args[0]!r}") from None
        if event_id is not None:
            batch.markers[0] = {"event_id": event_id, "job_id": job.id, "outcome": "applied", "at": batch.now}
        self._finish(session, batch)
        return change

    # -- shared --------------------------------------------------------------------------------------

    def _job(self, session: Session, job_id: int | None, lock: bool = False) -> Job:
        stmt = select(Job).where(Job.id == job_id)
        if lock:
            stmt = stmt.with_for_update()
        job = session.scalars(stmt).one_or_none()
        if job is None:
            raise JobNotFound(job_id)
        return job

    def _record(self, session: Session, job: Job, change: Change, ctx: TriggerContext, batch: _Batch,
                mail: bool = True) -> None:
        """The transition's consequences: effects on the job now; history and mail rows at the batch's end."""
        effect_reason = EFFECTS[change.effect](job, change, ctx, batch.now)
        if change.dest == self.workflow.roles.success:
            batch.missing[job.id] = []  # a job that is done waits for nothing
        if not change.record:
            return
        reason = ctx.reason or effect_reason
        history = {"from_state": change.source, "to_state": change.dest, "trigger": change.trigger,
                   "event_id": ctx.event_id, "actor": ctx.by, "reason": reason, "at": batch.now}
        mails = mail_rows(self.workflow, job, change, batch.now, ctx.by, reason, self.config) if change.moved else []
        if mails and not mail:
            # Suppressed mail leaves a trace: whoever wonders why nobody was told finds who decided it.
            told = ", ".join(m["recipient"] for m in mails)
            history["reason"] = "; ".join(filter(None, [reason, f"mail to {told} suppressed by {ctx.by}"]))
            mails = []
        batch.history.append((history, job, mails))

    def _finish(self, session: Session, batch: _Batch) -> None:
        """Write what the batch's transitions recorded: one multi-row statement per table, whatever the batch
        size (bulk.py: COPY on PostgreSQL).

        The ORM would write each changed job with its own UPDATE and each history row with its own
        INSERT ... RETURNING; here job and history ids are reserved up front, so nothing needs RETURNING.
        The batch's jobs are never in the session (an admin's job, loaded by ``fire``, is expunged once
        written): the ORM has nothing to write a second time, and a later read loads the rows as written.
        """
        conn = session.connection()
        created = [batch.jobs[i] for i in sorted(batch.created)]
        if created:
            bulk.insert_rows(conn, _JOB_TABLE, [bulk.complete(_JOB_TABLE, _job_values(j, "id", "version_id"))
                                                for j in created])
        touched = [batch.jobs[i] for i in sorted(batch.touched - batch.created)]
        if touched:
            bulk.update_rows(conn, _JOB_TABLE, [_job_values(j, "id") for j in touched], counter="version_id")
            for job in touched:  # written: the ORM must not write them again (an admin's job is in the session)
                if isinstance(job, Job) and job in session:
                    session.expunge(job)
        session.flush()  # rejected events and their markers, added the ORM way (rare)
        if batch.history:
            ids = reserve_ids(session, "history", len(batch.history))
            rows, mails = [], []
            for (values, job, wanted), history_id in zip(batch.history, ids, strict=True):
                rows.append({**values, "id": history_id, "job_id": job.id})
                for mail in wanted:
                    mail["context"]["job"] = job.id
                    mails.append({**mail, "job_id": job.id, "history_id": history_id})
            bulk.insert_rows(conn, _HISTORY_TABLE, rows)
            bulk.insert_rows(conn, _MAIL_TABLE, mails)
        bulk.insert_rows(conn, _MARKER_TABLE, list(batch.markers.values()))
        if batch.missing:
            missing_symbols.replace(conn, batch.missing, batch.now)


def _log_rejected(outcome: Outcome) -> None:
    log.warning("rejected", extra={"event_id": outcome.event_id, "event_type": outcome.event_type,
                                   "job": outcome.job_id, "reason": outcome.reason})


def _job_values(job: Job, *extra: str) -> dict[str, Any]:
    # The instance's own dict: an instrumented attribute read costs ~10x more, 25 columns a job.
    values = job.__dict__
    return {c: values.get(c) for c in (*extra, *_JOB_COLUMNS)}


def _job_from_row(row: Any) -> Job:
    """``row``'s job for the batch: a JobRecord, which the effects, guards and machine use as they use a Job
    (they read and assign columns only), typed as one for them."""
    return cast(Job, JobRecord(row._mapping))


def _new_job() -> Job:
    return cast(Job, JobRecord())


_JOB_TABLE = cast(Table, Job.__table__)
_HISTORY_TABLE = cast(Table, History.__table__)
_MAIL_TABLE = cast(Table, Mail.__table__)
_MARKER_TABLE = cast(Table, ProcessedEvent.__table__)
_JOB_COLUMNS = tuple(c.name for c in _JOB_TABLE.columns if c.name not in ("id", "version_id"))


def reserve_ids(session: Session, table: str, count: int) -> list[int]:
    """``count`` unused ids of ``table`` (job or history). PostgreSQL draws them from the sequence in one round
    trip; on SQLite the transaction holds the database's write lock (BEGIN IMMEDIATE), so the ids after the
    largest, including those already reserved in this transaction, are free."""
    if session.get_bind().dialect.name == "postgresql":
        # ``table`` is one of two names this module passes, never input.
        drawn = session.scalars(text(f"SELECT nextval(pg_get_serial_sequence('{table}', 'id')) "  # noqa: S608
                                     "FROM generate_series(1, :n)"), {"n": count})
        return sorted(drawn)
    key = f"retracer.reserved.{table}"
    column = _JOB_TABLE.c.id if table == "job" else _HISTORY_TABLE.c.id
    top = max(session.connection().scalar(select(func.max(column))) or 0, session.info.get(key, 0))
    session.info[key] = top + count
    return list(range(top + 1, top + 1 + count))


def current_policy(session: Session, config: Config) -> FailurePolicy:
    """The failure policy of ``config``'s [policy] section, with the admins' spurious-failure patterns after the
    built-in ones. A stored pattern the matcher cannot use (one added before such patterns were refused) is
    skipped by the policy, logged once, and shown by `retracer spurious list`: it never fails a batch."""
    extra = session.scalars(select(SpuriousPattern.pattern).order_by(SpuriousPattern.id)).all()
    return FailurePolicy.from_config(config["policy"], extra)
