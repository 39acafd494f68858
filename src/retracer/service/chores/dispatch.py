"""The dispatch chore: queued jobs handed to workers in the queue's order, within max_parallel and their
not-before times.

The order is priority, then age (job id): an admin's priority is sticky (automatic scoring never changes
it) but ranks by its value like any other, so a manual -5 goes after an automatic 0. A dispatched job stays queued
with ``dispatched_at`` set until a worker's ``retrace.started`` moves it on; an offer nobody takes
within ``dispatch_timeout_s`` is made again. Offers and RETRACING jobs together never exceed max_parallel:
on PostgreSQL the count-then-offer runs under a transaction-scoped advisory lock, on SQLite under
BEGIN IMMEDIATE, so several `serve` processes cannot both fill the same free slot.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from sqlalchemy import Select, and_, func, or_, select, text
from sqlalchemy.orm import Session

from retracer.config import Config
from retracer.events import WORK_REQUEST
from retracer.reports import DISPATCH_ORDER
from retracer.service.chores.registry import Chore, ChoreContext, Simple
from retracer.store.models import Job, Outbox, utcnow
from retracer.workflow import load_spec

ROLES = load_spec().roles

DISPATCH_LOCK_KEY = 0x7265_7472  # "retr": one advisory lock id for the dispatcher


def queue_query(now: datetime, dispatch_timeout: timedelta) -> Select[Job]:
    """PENDING jobs that may be offered now, in dispatch order."""
    return (
        select(Job)
        .where(Job.state == ROLES.queue)
        .where(or_(Job.not_before.is_(None), Job.not_before <= now))
        .where(or_(Job.dispatched_at.is_(None), Job.dispatched_at <= now - dispatch_timeout))
        .order_by(*DISPATCH_ORDER)
    )


def busy_slots(session: Session, now: datetime, dispatch_timeout: timedelta) -> int:
    return int(session.scalar(select(func.count()).select_from(Job).where(or_(
        Job.state == ROLES.working,
        and_(Job.state == ROLES.queue, Job.dispatched_at.is_not(None),
             Job.dispatched_at > now - dispatch_timeout)))) or 0)


def work_request(job: Job, now: datetime) -> dict[str, object]:
    """The body of a retrace.requested message: everything a worker needs, and nothing it must not see."""
    return {
        "id": f"request:{job.id}:{job.attempts}:{int(now.timestamp() * 1000)}",
        "type": WORK_REQUEST, "job": job.id, "occurred_at": now.isoformat(), "source": "retracer",
        "data": {"crash_id": job.crash_id, "package": job.package, "version": job.version,
                 "architecture": job.architecture, "release": job.release, "core": job.core,
                 "executable": job.executable, "build_ids": job.build_ids, "attempt": job.attempts + 1},
    }


def dispatch(session: Session, config: Config, now: datetime | None = None) -> list[Job]:
    """Offer as many ready jobs as free slots allow; each offer is an outbox row in this transaction."""
    now = now or utcnow()
    timeout = timedelta(seconds=config["service"]["dispatch_timeout_s"])
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": DISPATCH_LOCK_KEY})
    free = config["service"]["max_parallel"] - busy_slots(session, now, timeout)
    if free <= 0:
        return []
    jobs = list(session.scalars(queue_query(now, timeout).limit(free).with_for_update(skip_locked=True)))
    for job in jobs:
        job.dispatched_at = now
        body = work_request(job, now)
        session.add(Outbox(routing_key=WORK_REQUEST, message_id=str(body["id"]), body=json.dumps(body)))
    return jobs


def make(ctx: ChoreContext) -> Chore:
    def run() -> int:
        with ctx.factory() as session, session.begin():
            return len(dispatch(session, ctx.config))

    return Simple(run)


