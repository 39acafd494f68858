"""What admins are shown: the status overview, job lists, one job in full, rejected events.

The one query layer for everything that displays the service: the CLI uses it, and so will a web page or a
metrics exporter, so they all say the same thing. Each function reads in the caller's session and returns
plain data (dicts and lists, JSON-ready but for datetimes); nothing here changes a job.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, or_, select
from sqlalchemy.orm import Session

from retracer.errors import JobNotFound
from retracer.store.models import History, Job, Rejected, utcnow
from retracer.symbols import missing
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
         duplicates_of: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
    """Jobs newest first: all, in one state, or the duplicates of one job; ``offset`` skips the newest."""
    stmt = select(Job).order_by(Job.id.desc()).limit(limit).offset(offset)
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
           failures_limit: int = 10, held_limit: int = 50) -> dict[str, Any]:
    """Counts per state, jobs being retraced, the queue in dispatch order (with how many it has in all), the
    jobs waiting for their retry time, recent failures, the first jobs on hold (with how many in all)."""
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
    # Bounded: loading all of 10,000 held jobs made the report take 0.8 s (bench/web.py, 1,000,000 jobs).
    held = list(session.scalars(select(Job).where(Job.state == roles.held).order_by(Job.id).limit(held_limit)))
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
        "on_hold_total": counts[roles.held],
    }


def rejected_dict(r: Rejected) -> dict[str, Any]:
    """One rejected event."""
    return {"id": r.id, "event_id": r.event_id, "type": r.event_type, "job": r.job_id, "reason": r.reason,
            "at": r.at, "replayed_at": r.replayed_at, "body": r.body, "body_bytes": r.body_bytes,
            "body_sha256": r.body_sha256, "truncated": r.truncated}


def rejected(session: Session, include_replayed: bool = False, limit: int | None = None,
             offset: int = 0) -> list[dict[str, Any]]:
    """Events that could not be applied, oldest first; without ``include_replayed``, those not replayed yet;
    ``limit`` and ``offset`` take one page of them."""
    stmt = select(Rejected).order_by(Rejected.id).limit(limit).offset(offset)
    if not include_replayed:
        stmt = stmt.where(Rejected.replayed_at.is_(None))
    return [rejected_dict(r) for r in session.scalars(stmt)]


def missing_symbols(session: Session, limit: int = 50) -> list[dict[str, Any]]:
    """Build-ids workers could not find symbols for, the most-waited-for first: each with its module, how
    many jobs miss it and which, counting only jobs still waiting (queued or held):
    ``{"build_id", "module", "waiting": count, "jobs": [ids, at most 100], "since": first reported}``."""
    return missing.listing(session, limit)


def count_jobs(session: Session, state: str | None = None) -> int:
    """How many jobs there are, or how many in one state (the total of what `jobs` pages through)."""
    stmt = select(func.count()).select_from(Job)
    if state:
        stmt = stmt.where(Job.state == state)
    return int(session.scalar(stmt) or 0)


def count_rejected(session: Session, include_replayed: bool = False) -> int:
    """How many rejected events `rejected` pages through."""
    stmt = select(func.count()).select_from(Rejected)
    if not include_replayed:
        stmt = stmt.where(Rejected.replayed_at.is_(None))
    return int(session.scalar(stmt) or 0)


def to_json(value: Any, indent: int | None = 2) -> str:
    """A report as JSON text, the one encoding every consumer uses (`--json`, the web API): datetimes in ISO
    8601 with their offset (``2024-05-01T12:00:00+00:00``), everything else as json gives it."""
    return json.dumps(value, indent=indent, default=_json_default, sort_keys=False)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot print {type(value).__name__} as JSON")


# -- the status page's views (retracer.web.pages): each bounded, whatever the number of jobs ---------------

#: Failed jobs the failure groups are counted over, newest first: a group-by over every failed job of a
#: large instance would cost a scan per page view; the page says when the groups cover only these.
GROUP_SCAN = 1000
#: Missing-symbol reports the status page's table is counted over, newest first (the page says when there
#: are more; `retracer symbols missing` counts them all): with 100,000 jobs waiting for symbols the whole
#: aggregate cost 150-250 ms a view.
MISSING_SCAN = 2_000
#: Jobs counted per state on the status page: past this many the page says "10000+" (an exact count of a
#: million finished jobs costs a scan of them on every view; `retracer status` counts them all).
COUNT_CAP = 10_000


def failing_states() -> tuple[str, ...]:
    """The states a failed job waits in for a human: held, and upload refused."""
    roles = load_spec().roles
    return (roles.held, roles.rescuable)


def capped_counts(session: Session, cap: int = COUNT_CAP) -> dict[str, tuple[int, bool]]:
    """Jobs per state, each counted up to ``cap``: (count, whether it reached the cap). One index range
    per state, so the cost does not grow with the jobs beyond the cap."""
    counts: dict[str, tuple[int, bool]] = {}
    for state in load_spec().states:
        some = select(Job.state).where(Job.state == state).limit(cap).subquery()
        n = int(session.scalar(select(func.count()).select_from(some)) or 0)
        counts[state] = (n, n >= cap)
    return counts


def failure_groups(session: Session, limit: int = 20, scan: int = GROUP_SCAN) -> dict[str, Any]:
    """The most recent ``scan`` jobs in a failing state grouped by crash signature and by matched failure
    pattern, the largest groups first: for each grouping (``signature``, ``failure_pattern``) a list of
    {key (None: no signature / no pattern), count, latest job}, at most ``limit``, and whether groups were
    left out; ``scanned`` says over how many jobs, ``capped`` whether older ones were left out."""
    rows = session.execute(select(Job.id, Job.signature, Job.failure_pattern)
                           .where(Job.state.in_(failing_states())).order_by(Job.id.desc()).limit(scan)).all()
    result: dict[str, Any] = {"scanned": len(rows), "capped": len(rows) >= scan}
    for index, by in ((1, "signature"), (2, "failure_pattern")):
        groups: dict[str | None, list[int]] = {}
        for row in rows:  # newest first: a group's first job is its latest
            key: str | None = row.signature if index == 1 else row.failure_pattern
            if key in groups:
                groups[key][0] += 1
            else:
                groups[key] = [1, row[0]]
        ranked = sorted(groups.items(), key=lambda item: (-item[1][0], item[0] is None, item[0] or ""))
        result[by] = {"groups": [{"key": k, "count": n, "latest": latest} for k, (n, latest) in ranked[:limit]],
                      "more_groups": len(ranked) > limit}
    return result


def dispatch_order(session: Session, now: datetime, skip: int, take: int) -> list[Job]:
    """The ready jobs from position ``skip`` on, ``take`` of them, in dispatch order (as queue() gives them).

    Walked one priority level at a time, highest first, each level in id order along the dispatch index
    (state, priority, id): sorting a large queue by (priority DESC, id) as one query reads every job in it,
    this reads about as many as it returns (plus ``skip``), and priority levels are few."""
    queue_state = load_spec().roles.queue
    ready = or_(Job.not_before.is_(None), Job.not_before <= now)
    found: list[Job] = []
    level = session.scalar(select(func.max(Job.priority)).where(Job.state == queue_state))
    while level is not None and len(found) < skip + take:
        found += session.scalars(select(Job).where(Job.state == queue_state, Job.priority == level, ready)
                                 .order_by(Job.id).limit(skip + take - len(found)))
        level = session.scalar(select(func.max(Job.priority))
                               .where(Job.state == queue_state, Job.priority < level))
    return found[skip:]


def queue_page(session: Session, page: int, size: int, now: datetime | None = None,
               total: int | None = None, cap: int = COUNT_CAP) -> dict[str, Any]:
    """One page (1-based) of the queue in dispatch order, with the queue's length (``total`` when the caller
    knows it, else counted up to ``cap``) and how many follow."""
    now = now or utcnow()
    offset = (page - 1) * size
    rows = dispatch_order(session, now, offset, size)
    capped = False
    if total is None:
        if 0 < len(rows) < size:
            total = offset + len(rows)
        else:
            total = int(session.scalar(select(func.count()).select_from(
                _ready(now).with_only_columns(Job.id).limit(cap).subquery())) or 0)
            capped = total >= cap
    return {"jobs": [{"id": j.id, "package": j.package, "version": j.version, "crash_id": j.crash_id,
                      "priority": j.priority, "manual": j.manual_priority, "created_at": j.created_at,
                      "offered_at": j.dispatched_at, "attempts": j.attempts} for j in rows],
            "page": page, "size": size, "total": total, "capped": capped, "first": offset + 1 if rows else 0,
            "more": max(0, total - offset - len(rows))}


def waiting_page(session: Session, limit: int, now: datetime | None = None) -> tuple[list[Job], int]:
    """The queued jobs waiting for their retry time, the soonest first, at most ``limit``, and how many there
    are in all (counted in the same pass: both need every queued job's retry time, which no index holds)."""
    rows = session.execute(_waiting(now or utcnow()).add_columns(func.count().over())
                           .order_by(Job.not_before, Job.id).limit(limit)).all()
    return [row[0] for row in rows], int(rows[0][1]) if rows else 0


def held_jobs(session: Session, limit: int, total: int | None = None) -> dict[str, Any]:
    """Jobs on hold, the longest held first, at most ``limit``, with how many there are in all (``total``
    when the caller counted them already)."""
    held = load_spec().roles.held
    rows = list(session.scalars(select(Job).where(Job.state == held).order_by(Job.id).limit(limit)))
    if total is None:
        total = len(rows) if len(rows) < limit else _count(session, select(Job).where(Job.state == held))
    return {"jobs": rows, "total": total, "more": max(0, total - len(rows))}


def latest_history(session: Session, job_ids: list[int]) -> dict[int, History]:
    """Each job's latest recorded transition (for the jobs that have one)."""
    if not job_ids:
        return {}
    newest = (select(func.max(History.id)).where(History.job_id.in_(job_ids))
              .group_by(History.job_id).scalar_subquery())
    return {h.job_id: h for h in session.scalars(select(History).where(History.id.in_(newest)))}


def mails_of(session: Session, job_id: int, limit: int = 200) -> list[dict[str, Any]]:
    """The mails made for a job, oldest first: recipient, why, state, delivery status and attempts."""
    from retracer.store.models import Mail  # here: the rest of this module has no business with mail rows

    rows = session.scalars(select(Mail).where(Mail.job_id == job_id).order_by(Mail.id).limit(limit))
    return [{"id": m.id, "recipient": m.recipient, "rationale": m.rationale, "state": m.state,
             "status": m.status, "attempts": m.attempts, "last_error": m.last_error,
             "created_at": m.created_at, "sent_at": m.sent_at, "next_attempt_at": m.next_attempt_at,
             "digest_of": m.digest_of} for m in rows]


def rejected_page(session: Session, page: int, size: int, include_replayed: bool = False) -> dict[str, Any]:
    """One page (1-based) of rejected events, newest first, with how many there are in all."""
    stmt = select(Rejected)
    if not include_replayed:
        stmt = stmt.where(Rejected.replayed_at.is_(None))
    offset = (page - 1) * size
    rows = [rejected_dict(r) for r in session.scalars(stmt.order_by(Rejected.id.desc()).offset(offset).limit(size))]
    total = (offset + len(rows) if 0 < len(rows) < size
             else int(session.scalar(select(func.count()).select_from(stmt.subquery())) or 0))
    return {"events": rows, "page": page, "size": size, "total": total, "first": offset + 1 if rows else 0,
            "more": max(0, total - offset - len(rows))}


def overview(session: Session, page_size: int, queue_page_no: int = 1, now: datetime | None = None) -> dict[str, Any]:
    """What the status page shows, each part bounded by ``page_size``: jobs per state (counted up to
    COUNT_CAP), jobs being retraced (with worker, start and last heartbeat), one page of the queue, the jobs
    waiting for their retry time, recent failures, failures grouped by signature and by matched pattern,
    jobs on hold, missing symbols. status()'s parts, none of which grows with the number of jobs."""
    now = now or utcnow()
    roles = load_spec().roles
    counts = capped_counts(session)
    # Oldest job first, along the primary key: ordering by start time would sort every job being retraced.
    retracing = list(session.scalars(select(Job).where(Job.state == roles.working)
                                     .order_by(Job.id).limit(page_size)))
    later, waiting_total = waiting_page(session, page_size, now)
    pending, pending_capped = counts[roles.queue]
    held, held_capped = counts[roles.held]
    queued = queue_page(session, queue_page_no, page_size, now,
                        total=None if pending_capped else max(0, pending - waiting_total))
    failures = session.execute(
        select(History, Job.package).join(Job, Job.id == History.job_id)
        .where(History.trigger.in_(roles.failures))
        .order_by(History.id.desc()).limit(page_size)).all()
    missing_after = missing.window_start(session, MISSING_SCAN)
    return {
        "now": now, "counts": {s: n for s, (n, _) in counts.items()},
        "capped": {s for s, (_, c) in counts.items() if c},
        "total": sum(n for n, _ in counts.values()),
        "retracing": retracing, "retracing_more": max(0, counts[roles.working][0] - len(retracing)),
        "queue": queued,
        "waiting": later,
        "waiting_total": waiting_total,
        "recent_failures": [{"job": h.job_id, "package": p, "trigger": h.trigger, "from": h.from_state,
                             "to": h.to_state, "reason": h.reason, "at": h.at, "by": h.actor}
                            for h, p in failures],
        "groups": failure_groups(session, page_size),
        "on_hold": {**held_jobs(session, page_size, held), "capped": held_capped},
        "missing_symbols": missing.listing(session, page_size, after_id=missing_after),
        "missing_capped": missing_after is not None, "missing_scan": MISSING_SCAN,
    }


def count_duplicates(session: Session, job_id: int) -> int:
    """How many jobs are recorded as duplicates of ``job_id``."""
    return int(session.scalar(select(func.count()).select_from(Job).where(Job.duplicate_of == job_id)) or 0)
