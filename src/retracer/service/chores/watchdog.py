"""The heartbeat watchdog: a job whose worker stopped sending heartbeats is a transient failure of its attempt
(back to the queue after a backoff, or held when no attempt is left), so none stays with a worker forever."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from retracer.config import Config
from retracer.events import RESERVED
from retracer.service.chores.registry import Chore, ChoreContext, Simple, isolated
from retracer.store.models import Job, utcnow
from retracer.workflow import load_spec


def stale_jobs(session: Session, config: Config, now: datetime | None = None) -> list[Job]:
    """Jobs with a worker whose last heartbeat is older than the timeout."""
    now = now or utcnow()
    limit = now - timedelta(seconds=config["service"]["heartbeat_timeout_s"])
    return list(session.scalars(
        select(Job).where(Job.state == load_spec().roles.working, Job.last_heartbeat < limit)
        .order_by(Job.id).limit(500).with_for_update(skip_locked=True)))


def watch(ctx: ChoreContext) -> int:
    """Fire the watchdog's trigger on every job whose heartbeats stopped; returns how many.

    Each job's firing is its own savepoint: one that fails (its data, a bug) is logged and left for the next
    round, and every other stale job still moves.
    """
    n = 0
    trigger = ctx.applier.workflow.roles.watchdog
    with ctx.factory() as session, session.begin():
        policy = None
        for job in stale_jobs(session, ctx.config):
            policy = policy or ctx.applier.policy(session)
            silent = round((utcnow() - job.last_heartbeat).total_seconds(), 1) if job.last_heartbeat else None
            error = f"no heartbeat from worker {job.worker or '?'} for {silent}s " \
                    f"(timeout {ctx.config['service']['heartbeat_timeout_s']}s)"
            job_id, version = job.id, job.version_id
            with isolated(session, "watchdog", job_id):
                # The version makes the id unique per stale episode, so two services cannot both fire it;
                # the reserved prefix keeps publishers from claiming it first.
                ctx.applier.fire(session, job_id, trigger, by="service:watchdog",
                                 data={"error": error, "transient": True},
                                 event_id=f"{RESERVED}watchdog:{job_id}:{version}", policy=policy)
                n += 1
    return n


def make(ctx: ChoreContext) -> Chore:
    return Simple(lambda: watch(ctx))


