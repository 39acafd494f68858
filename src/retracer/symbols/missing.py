"""The build-ids jobs wait for: what a worker's failed attempt reported missing, kept per job until the job
is retraced, released by an import, or reports another list.

A ``retrace.failed`` that carries ``missing`` replaces the job's rows with its list (an empty list clears
them: that attempt lacked nothing that failed it); one without it (an attempt that ended before symbols were
judged, or an older worker) leaves them as they were. A job that reaches the success state waits for
nothing, so its rows go. `retracer symbols missing` and the status page list them, the most-waited-for
build-id first, counting only jobs still waiting: in the queue (mostly for their retry time) or held.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, delete, func, select, union_all
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from retracer.store import bulk
from retracer.store.models import Job, MissingSymbol
from retracer.workflow import load_spec

#: The event that reports missing symbols, and its data field (events.py validates it).
REPORTED_BY = "retrace.failed"
FIELD = "missing"

#: How many job ids each listed build-id names (its count is always whole).
JOBS_PER_BUILD_ID = 100
#: How many build-ids a listing may ask for.
MAX_LIMIT = 10000
#: Build-ids whose jobs one statement fetches.
_PER_QUERY = 50

_TABLE = cast(Table, MissingSymbol.__table__)


def replace(conn: Connection, per_job: Mapping[int, Sequence[Mapping[str, Any]]], now: datetime) -> None:
    """Make each job's rows the given entries (``{"build_id", "module"}``; none: the job waits for nothing),
    in the caller's transaction: one DELETE and one multi-row INSERT whatever the number of jobs."""
    conn.execute(delete(_TABLE).where(bulk.among(conn.dialect, _TABLE.c.job_id, list(per_job))))
    rows = []
    for job_id, entries in per_job.items():
        seen: set[str] = set()
        for entry in entries:
            build_id = str(entry["build_id"]).lower()
            if build_id in seen:  # unique per (job, build-id): a repeated entry says nothing more
                continue
            seen.add(build_id)
            module = entry.get("module")
            rows.append({"job_id": job_id, "build_id": build_id,
                         "module": module if isinstance(module, str) else None, "recorded_at": now})
    bulk.insert_rows(conn, _TABLE, rows)


def waiting_states() -> tuple[str, ...]:
    """The states of a job still waiting for its symbols: queued (for a retry) or held."""
    roles = load_spec().roles
    return (roles.queue, roles.held)


def window_start(session: Session, recent: int) -> int | None:
    """The row id after which the ``recent`` newest reports lie, or None when there are no more than that:
    a listing ``after_id`` it reads an index range of at most ``recent`` rows."""
    older = session.scalar(select(MissingSymbol.id).order_by(MissingSymbol.id.desc()).offset(recent).limit(1))
    return None if older is None else int(older)


def listing(session: Session, limit: int = 50, jobs_per_build_id: int = JOBS_PER_BUILD_ID,
            after_id: int | None = None) -> list[dict[str, Any]]:
    """The build-ids jobs still wait for, the most-waited-for first (then by build-id): each with its module
    (one of the paths workers reported for it), how many jobs wait (``waiting``), which (``jobs``: the ids of
    the first ``jobs_per_build_id`` to report it, in that order), and since when (``since``: the first report).

    An aggregate over the missing_symbol rows of waiting jobs (by the job's state index and missing_symbol's
    job_id index), then one statement per 50 listed build-ids for their first jobs, each part stopping at its
    bound: a build-id every job lacks costs no more to list than one a single job lacks. With ``after_id``
    (see window_start) only the reports after that row count, read in one range of the primary key and
    summed here: what a page that must stay fast shows."""
    limit = max(0, min(int(limit), MAX_LIMIT))
    if limit == 0:
        return []
    states = waiting_states()
    if after_id is not None:
        return _window_listing(session, limit, jobs_per_build_id, after_id, states)
    waiting = func.count().label("waiting")
    top = session.execute(
        select(MissingSymbol.build_id, func.max(MissingSymbol.module), waiting, func.min(MissingSymbol.recorded_at))
        .join(Job, Job.id == MissingSymbol.job_id)
        .where(Job.state.in_(states))
        .group_by(MissingSymbol.build_id)
        .order_by(waiting.desc(), MissingSymbol.build_id)
        .limit(limit)).all()
    if not top:
        return []
    build_ids = [row[0] for row in top]
    found: dict[str, list[tuple[int, int]]] = {b: [] for b in build_ids}
    for first in range(0, len(build_ids), _PER_QUERY):
        # One limited subquery per build-id: each stops after its first jobs (the build_id index, in
        # report order), where numbering every waiting job of a build-id all jobs lack would read them all.
        parts = [select(MissingSymbol.id, MissingSymbol.build_id, MissingSymbol.job_id)
                 .join(Job, Job.id == MissingSymbol.job_id)
                 .where(MissingSymbol.build_id == build_id, Job.state.in_(states))
                 .order_by(MissingSymbol.id).limit(jobs_per_build_id).subquery()
                 for build_id in build_ids[first:first + _PER_QUERY]]
        query = union_all(*[select(part.c.id, part.c.build_id, part.c.job_id) for part in parts]) \
            if len(parts) > 1 else select(parts[0].c.id, parts[0].c.build_id, parts[0].c.job_id)
        for row_id, build_id, job_id in session.execute(query):
            found[build_id].append((int(row_id), int(job_id)))
    jobs = {b: [job_id for _, job_id in sorted(rows)] for b, rows in found.items()}
    return [{"build_id": build_id, "module": module, "waiting": int(count), "jobs": jobs[build_id],
             "since": since} for build_id, module, count, since in top]


def _window_listing(session: Session, limit: int, jobs_per_build_id: int, after_id: int,
                    states: tuple[str, ...]) -> list[dict[str, Any]]:
    """listing() over the reports after ``after_id`` (at most window_start's count of rows, oldest first)."""
    rows = session.execute(
        select(MissingSymbol.build_id, MissingSymbol.module, MissingSymbol.job_id, MissingSymbol.recorded_at)
        .join(Job, Job.id == MissingSymbol.job_id)
        .where(MissingSymbol.id > after_id, Job.state.in_(states))
        .order_by(MissingSymbol.id))
    found: dict[str, dict[str, Any]] = {}
    for build_id, module, job_id, at in rows:
        entry = found.setdefault(build_id, {"build_id": build_id, "module": module, "waiting": 0, "jobs": [],
                                            "since": at})
        entry["waiting"] += 1
        entry["module"] = max(entry["module"] or "", module or "") or None
        entry["since"] = min(entry["since"], at)
        if len(entry["jobs"]) < jobs_per_build_id:
            entry["jobs"].append(int(job_id))
    ranked = sorted(found.values(), key=lambda e: (-e["waiting"], e["build_id"]))
    return ranked[:limit]


def of_job(session: Session, job_id: int) -> list[dict[str, Any]]:
    """The build-ids one job waits for, with their modules, by build-id."""
    rows = session.execute(select(MissingSymbol.build_id, MissingSymbol.module, MissingSymbol.recorded_at)
                           .where(MissingSymbol.job_id == job_id).order_by(MissingSymbol.build_id))
    return [{"build_id": b, "module": m, "recorded_at": at} for b, m, at in rows]
