"""What admins are shown: the status overview, job lists, one job in full, rejected events.

The one query layer for everything that displays the service: the CLI uses it, and so will a web page or a
metrics exporter, so they all say the same thing. Each function reads in the caller's session and returns
plain data (dicts and lists, JSON-ready but for datetimes); nothing here changes a job.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, or_, select
from sqlalchemy.orm import Session

from retracer.errors import JobNotFound
from retracer.store.models import History, Job, Rejected, utcnow
from retracer.workflow import load_spec

#: A job's fields as `retracer jobs --json` and `retracer show --json` give them.
JOB_FIELDS = ("id", "state", "crash_id", "creator", "package", "version", "architecture", "release", "core",
              "executable", "build_ids", "priority", "manual_priority", "attempts", "not_before",
              "dispatched_at", "last_heartbeat", "worker", "upload_leaf", "upload_log", "hold_reason",
              "last_error", "failure_pattern", "created_at", "started_at", "finished_at", "signature",
              "address_signature", "duplicate_of", "core_check")


def job_dict(job: Job) -> dict[str, Any]:
    """One job's fields."""
    return {name: getattr(job, name) for name in JOB_FIELDS}


def history_dict(h: History) -> dict[str, Any]:
    """One recorded transition."""
    return {"from": h.from_state, "to": h.to_state, "trigger": h.trigger, "by": h.actor,
            "event_id": h.event_id, "reason": h.reason, "at": h.at}


def history_of(session: Session, job_id: int) -> list[History]:
    """A job's recorded transitions, oldest first."""
    return list(session.scalars(select(History).where(History.job_id == job_id).order_by(History.id)))


def jobs(session: Session, state: str | None = None, limit: int = 100,
         duplicates_of: int | None = None) -> list[dict[str, Any]]:
    """Jobs newest first: all, in one state, or the duplicates of one job."""
    stmt = select(Job).order_by(Job.id.desc()).limit(limit)
    if state:
        stmt = stmt.where(Job.state == state)
    if duplicates_of is not None:
        stmt = stmt.where(Job.duplicate_of == duplicates_of)
    return [job_dict(j) for j in session.scalars(stmt)]


def job_detail(session: Session, job_id: int) -> dict[str, Any]:
    """One job's fields with its history; JobNotFound if there is none."""
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(job_id)
    data = job_dict(job)
    data["history"] = [history_dict(h) for h in history_of(session, job_id)]
    return data


#: The dispatch order: priority (an admin's or the submitted one), then age. An admin's priority is sticky
#: (nothing automatic changes it), not a trump card: a manual -5 goes after an automatic 0.
DISPATCH_ORDER = (Job.priority.desc(), Job.id)


def queue(session: Session, now: datetime | None = None, limit: int = 50) -> list[Job]:
    """The jobs in the queue that may be offered now, in the order they will be dispatched."""
    return list(session.scalars(_ready(now or utcnow()).order_by(*DISPATCH_ORDER).limit(limit)))


def waiting(session: Session, now: datetime | None = None, limit: int = 50) -> list[Job]:
    """The jobs in the queue that wait for their retry time, the soonest first."""
    return list(session.scalars(_waiting(now or utcnow()).order_by(Job.not_before, Job.id).limit(limit)))


def _ready(now: datetime) -> Select[Job]:
    return select(Job).where(Job.state == load_spec().roles.queue,
                             or_(Job.not_before.is_(None), Job.not_before <= now))


def _waiting(now: datetime) -> Select[Job]:
    return select(Job).where(Job.state == load_spec().roles.queue, Job.not_before > now)


def _count(session: Session, stmt: Select[Job]) -> int:
    return int(session.scalar(select(func.count()).select_from(stmt.subquery())) or 0)


def status(session: Session, now: datetime | None = None, queue_limit: int = 20,
           failures_limit: int = 10) -> dict[str, Any]:
    """Counts per state, jobs being retraced, the queue in dispatch order (with how many it has in all), the
    jobs waiting for their retry time, recent failures, jobs on hold."""
    now = now or utcnow()
    spec = load_spec()
    roles = spec.roles
    counts = {s: 0 for s in spec.states}
    counts.update({s: n for s, n in session.execute(select(Job.state, func.count()).group_by(Job.state))})
    retracing = session.scalars(select(Job).where(Job.state == roles.working).order_by(Job.started_at))
    ready = queue(session, now, queue_limit)
    later = waiting(session, now, queue_limit)
    failures = session.execute(
        select(History, Job.package).join(Job, Job.id == History.job_id)
        .where(History.trigger.in_(roles.failures))
        .order_by(History.id.desc()).limit(failures_limit)).all()
    held = session.scalars(select(Job).where(Job.state == roles.held).order_by(Job.id))
    return {
        "counts": counts,
        "retracing": [{"id": j.id, "package": j.package, "worker": j.worker,
                       "elapsed_s": int((now - j.started_at).total_seconds()) if j.started_at else None,
                       "last_heartbeat": j.last_heartbeat} for j in retracing],
        "queue": [{"id": j.id, "package": j.package, "priority": j.priority, "manual": j.manual_priority,
                   "offered": j.dispatched_at is not None} for j in ready],
        "queue_total": len(ready) if len(ready) < queue_limit else _count(session, _ready(now)),
        "waiting": [{"id": j.id, "package": j.package, "priority": j.priority, "manual": j.manual_priority,
                     "not_before": j.not_before, "attempts": j.attempts} for j in later],
        "waiting_total": len(later) if len(later) < queue_limit else _count(session, _waiting(now)),
        "recent_failures": [{"job": h.job_id, "package": p, "trigger": h.trigger, "to": h.to_state,
                             "reason": h.reason, "at": h.at} for h, p in failures],
        "on_hold": [{"id": j.id, "package": j.package, "reason": j.hold_reason} for j in held],
    }


def rejected_dict(r: Rejected) -> dict[str, Any]:
    """One rejected event."""
    return {"id": r.id, "event_id": r.event_id, "type": r.event_type, "job": r.job_id, "reason": r.reason,
            "at": r.at, "replayed_at": r.replayed_at, "body": r.body, "body_bytes": r.body_bytes,
            "body_sha256": r.body_sha256, "truncated": r.truncated}


def rejected(session: Session, include_replayed: bool = False) -> list[dict[str, Any]]:
    """Events that could not be applied, oldest first; without ``include_replayed``, those not replayed yet."""
    stmt = select(Rejected).order_by(Rejected.id)
    if not include_replayed:
        stmt = stmt.where(Rejected.replayed_at.is_(None))
    return [rejected_dict(r) for r in session.scalars(stmt)]


def missing_symbols(session: Session, limit: int = 50) -> list[dict[str, Any]]:
    """Build-ids workers could not find symbols for, the most-waited-for first: each with its module, how
    many jobs miss it and which (placeholder until the missing-symbols work lands)."""
    return []
