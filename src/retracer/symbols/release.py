"""Jobs an import unblocks: a job that waits for its retry time or is held because its last attempt lacked
symbols goes back to the queue, ready now, once the index has every build-id it lacked.

The rule, in full:

- A build-id a job lacked is *covered* when the index holds a debug-info file for it (kind ``debuginfo``)
  imported at or after the attempt reported it missing. An executable alone does not cover it: the index does
  not record whether an executable carries debug information, and packaged ones are stripped. A file that was
  already indexed when the attempt failed does not cover it either: the worker had it within reach and still
  lacked it (it does not ask this index, say), so sending the job back would only fail again, and every
  import would do so anew.
- A job is released when every build-id it lacked is covered and it is still waiting: in the queue with a
  retry time still to come, or held by the workflow itself (its hold followed a failed attempt or a lost
  worker, not an admin's hold: an admin's reasons are the admin's to lift).
- A covered build-id is no longer waited for: its rows go, released job or not, so `retracer symbols
  missing` never lists what the index has; a job that still lacks another build-id stays as it is.

The release fires the workflow's ``symbols_arrived`` role through the machine and records it in the job's
history under the import's actor (prefixed ``import:`` if it is not already), with a reason naming the
build-ids. It queues no mail: the queue's state notifies nobody (states/workflow.toml).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Collection
from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from retracer.store import bulk
from retracer.store.models import MAX_ACTOR, History, Job, MissingSymbol, SymbolArchive, SymbolFile, utcnow
from retracer.workflow import TriggerContext, Workflow, load
from retracer.workflow.effects import EFFECTS

log = logging.getLogger("retracer.symbols")

#: The kinds of indexed file that give a missing build-id its symbols.
COVERING_KINDS = ("debuginfo",)

#: What a release's actor begins with in the job's history.
IMPORT = "import:"

#: At most this many build-ids are named in the query that finds what an import covers.
MAX_NAMED_IDS = 10_000

#: How many build-ids a released job's history reason names (the rest are counted).
NAMED_IN_REASON = 5


def release_unblocked(session: Session, actor: str, now: datetime | None = None,
                      build_ids: Collection[str] | None = None) -> list[int]:
    """Send back to the queue every job held or waiting only for build-ids the index now has; their ids, in
    order. Runs in the caller's transaction (an import's, after its rows are flushed); changes nothing if the
    workflow file names no ``symbols_arrived`` role. ``build_ids``: only the missing build-ids among these
    are looked at (an import passes what it brought: a whole scan of the missing list per archive would make
    a large import slow while many jobs wait)."""
    workflow = load()
    trigger = workflow.roles.symbols_arrived
    # The history says the import did it, and for whom: "import:admin:celso" for an admin's import.
    actor = actor if actor.startswith(IMPORT) else f"{IMPORT}{actor}"
    now = now or utcnow()
    if build_ids is not None and not build_ids:
        return []
    covered = _covered(session, build_ids)
    if not covered:
        return []
    by_job: dict[int, list[str]] = defaultdict(list)
    for _, job_id, build_id in covered:
        by_job[job_id].append(build_id)
    released: list[int] = []
    if trigger is not None:
        for job_id in _releasable(session, workflow, by_job, now):
            if _release(session, workflow, trigger, job_id, sorted(by_job[job_id]), actor, now):
                released.append(job_id)
    dialect = session.get_bind().dialect
    ids = [row_id for row_id, _, _ in covered]
    for start in range(0, len(ids), 1000):
        session.execute(delete(MissingSymbol).where(bulk.among(dialect, MissingSymbol.id, ids[start:start + 1000])),
                        execution_options={"synchronize_session": False})
    if released:
        log.info("jobs released by an import", extra={"jobs": released, "actor": actor})
    return released


def _covered(session: Session, build_ids: Collection[str] | None) -> list[tuple[int, int, str]]:
    """(row id, job id, build-id) of every missing build-id (among ``build_ids``, if given) the index has
    gained since it was reported."""
    gained = (select(SymbolFile.id).join(SymbolArchive, SymbolArchive.id == SymbolFile.archive_id)
              .where(SymbolFile.build_id == MissingSymbol.build_id, SymbolFile.kind.in_(COVERING_KINDS),
                     SymbolArchive.imported_at >= MissingSymbol.recorded_at))
    stmt = select(MissingSymbol.id, MissingSymbol.job_id, MissingSymbol.build_id).where(gained.exists())
    # Past SQLite's bound-parameter limit a whole scan is the simpler (and still correct) query.
    if build_ids is not None and len(build_ids) <= MAX_NAMED_IDS:
        stmt = stmt.where(bulk.among(session.get_bind().dialect, MissingSymbol.build_id, sorted(set(build_ids))))
    rows = session.execute(stmt.order_by(MissingSymbol.job_id, MissingSymbol.id))
    return [(int(i), int(j), str(b)) for i, j, b in rows]


def _releasable(session: Session, workflow: Workflow, by_job: dict[int, list[str]], now: datetime) -> list[int]:
    """The jobs among ``by_job`` whose every missing build-id is covered and which still wait."""
    roles = workflow.roles
    dialect = session.get_bind().dialect
    candidates = list(by_job)
    totals = dict(session.execute(select(MissingSymbol.job_id, func.count()).where(
        bulk.among(dialect, MissingSymbol.job_id, candidates)).group_by(MissingSymbol.job_id)).all())
    whole = [j for j in candidates if totals.get(j) == len(by_job[j])]
    if not whole:
        return []
    states = dict(session.execute(select(Job.id, Job.state).where(
        bulk.among(dialect, Job.id, whole), (Job.state == roles.held)
        | ((Job.state == roles.queue) & (Job.not_before > now)))).all())
    held = [j for j, state in states.items() if state == roles.held]
    by_admin = _held_by_admin(session, workflow, held)
    return sorted(j for j in states if j not in by_admin)


def _held_by_admin(session: Session, workflow: Workflow, held: list[int]) -> set[int]:
    """The jobs among ``held`` whose latest move into the held state was an admin's trigger."""
    if not held:
        return set()
    held_state = workflow.roles.held
    admin = {t.trigger for t in workflow.transitions if t.admin}
    latest = (select(func.max(History.id)).where(
        bulk.among(session.get_bind().dialect, History.job_id, held), History.to_state == held_state,
        (History.from_state.is_(None)) | (History.from_state != held_state)).group_by(History.job_id))
    rows = session.execute(select(History.job_id, History.trigger).where(History.id.in_(latest)))
    return {int(job_id) for job_id, trigger in rows if trigger in admin}


def _release(session: Session, workflow: Workflow, trigger: str, job_id: int, build_ids: list[str], actor: str,
             now: datetime) -> bool:
    """Fire the release on one job, locked and checked again (a worker may have taken it meanwhile)."""
    job = session.scalars(select(Job).where(Job.id == job_id).with_for_update()).one_or_none()
    if job is None or not workflow.candidates(trigger, job.state):
        return False
    roles = workflow.roles
    if job.state == roles.queue and (job.not_before is None or job.not_before <= now):
        return False
    named = ", ".join(build_ids[:NAMED_IN_REASON])
    more = f" and {len(build_ids) - NAMED_IN_REASON} more" if len(build_ids) > NAMED_IN_REASON else ""
    reason = (f"the symbols its last attempt lacked were imported (build-id{'s' if len(build_ids) > 1 else ''} "
              f"{named}{more}); retried now with its attempts reset")
    ctx = TriggerContext(by=actor[:MAX_ACTOR], reason=reason)
    change = workflow.fire(job, trigger, ctx)
    EFFECTS[change.effect](job, change, ctx, now)
    if change.record:
        session.add(History(job_id=job.id, from_state=change.source, to_state=change.dest, trigger=change.trigger,
                            event_id=None, actor=ctx.by, reason=reason, at=now))
    session.flush()
    return True
