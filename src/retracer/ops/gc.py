"""Garbage collection: what an installation no longer needs, deleted by age ([gc] in the configuration).

Deleted, each kind by its own retention:

- jobs in the success state that is final, finished more than ``fullybuilt_days`` ago, with their history,
  their mail rows, their stored results (``<results>/<job>/``) and their accepted upload
  (``<spool>/accepted/<leaf>``); a job in any state that is not final is never touched;
- entries of ``<spool>/failed/`` last modified more than ``failed_upload_days`` ago, except the upload of a
  job still in the rescuable state (an admin may still rescue it, whatever its age);
- processed-event markers older than ``marker_days``;
- sent and stale mail rows, and outbox rows already sent, older than ``mail_days``;
- rejected events older than ``rejected_days``, replayed or not (one nobody replayed in that time is not
  going to be, and a publisher must not be able to fill the table for ever).

Rows go in batches of ``batch_size``, one short transaction each, so that `serve` applying events on the
same database never waits long for a lock. A job's files are removed before its rows: a run stopped in
between leaves rows that the next run finds and deletes again, never files no row points at any more.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, Select, and_, delete, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from retracer import store
from retracer.config import Config
from retracer.errors import ConfigError
from retracer.store.models import Audit, History, Job, Mail, Outbox, ProcessedEvent, Rejected, utcnow
from retracer.uploads.files import ACCEPTED, FAILED, open_dir
from retracer.uploads.intake import spool_lock
from retracer.workflow import load_spec

log = logging.getLogger("retracer.gc")

#: The chore's name in the audit table; an admin's run is recorded as admin:<name>.
SERVICE_ACTOR = "service:gc"
#: Mail statuses that are the end of a mail's life (sent, or found stale and never to be sent).
DONE_MAIL = ("sent", "stale")

#: Called after each batch with the kind of thing deleted (a Counts field) and how many went.
Progress = Callable[[str, int], None]


@dataclass
class Counts:
    """What a run deleted (or, dry, would delete)."""

    jobs: int = 0
    history: int = 0
    mails: int = 0
    outbox: int = 0
    markers: int = 0
    rejected: int = 0
    results_dirs: int = 0
    accepted_uploads: int = 0
    failed_uploads: int = 0
    dry_run: bool = False
    #: False when the run stopped at its batch budget with more to delete (the chore goes on next round).
    complete: bool = True

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self) if f.type in ("int", int))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["complete"]
        return out


KINDS = tuple(f.name for f in fields(Counts) if f.type in ("int", int))


@dataclass(frozen=True)
class Cutoffs:
    """The oldest time each kind is kept from."""

    jobs: datetime
    failed_uploads: datetime
    markers: datetime
    mails: datetime
    rejected: datetime

    @classmethod
    def of(cls, config: Config, now: datetime | None = None) -> Cutoffs:
        now = now or utcnow()
        gc = config["gc"]

        def days(key: str) -> datetime:
            return now - timedelta(days=gc[key])

        return cls(days("fullybuilt_days"), days("failed_upload_days"), days("marker_days"), days("mail_days"),
                   days("rejected_days"))


class _Budget:
    """How many more batches this run may delete (None: no limit)."""

    def __init__(self, batches: int | None) -> None:
        self.left = batches

    def spend(self) -> bool:
        if self.left is None:
            return True
        if self.left <= 0:
            return False
        self.left -= 1
        return True


def deletable_states() -> tuple[str, ...]:
    """The states whose jobs may be deleted: the success state, and only if the workflow makes it final (a
    final state cannot be left, so nothing can still happen to such a job)."""
    spec = load_spec()
    success = spec.roles.success
    return (success,) if spec.states[success].final else ()


def _old_job(cutoff: datetime) -> ColumnElement[bool]:
    return and_(Job.state.in_(deletable_states()), Job.finished_at < cutoff)


def collect(factory: sessionmaker[Session], config: Config, *, dry_run: bool = False, actor: str = SERVICE_ACTOR,
            reason: str | None = None, progress: Progress | None = None, now: datetime | None = None,
            max_batches: int | None = None, audit_always: bool = False) -> Counts:
    """Delete what the retention says (``dry_run``: only count it) and return the counts.

    ``max_batches`` bounds the work of one call (the chore's, so that a first run on a large database does
    not keep `serve` from applying events for long); the counts then say it is not complete. An audit row
    with the counts is written when something was deleted, or always with ``audit_always``.
    """
    cut = Cutoffs.of(config, now)
    batch = int(config["gc"]["batch_size"])
    budget = _Budget(max_batches)
    counts = Counts(dry_run=dry_run)
    tick: Progress = progress or (lambda kind, n: None)
    sweeps: list[Callable[[], bool]] = [
        lambda: _jobs(factory, config, cut.jobs, batch, counts, tick, budget),
        lambda: _failed_uploads(factory, config, cut.failed_uploads, counts, tick),
        lambda: _sweep_markers(factory, cut.markers, batch, counts, tick, budget),
        lambda: _sweep_mails(factory, cut, batch, counts, tick, budget),
        lambda: _sweep_outbox(factory, cut.mails, batch, counts, tick, budget),
        lambda: _sweep_rejected(factory, cut.rejected, batch, counts, tick, budget),
    ]
    for sweep in sweeps:
        if not sweep():
            counts.complete = False
            break
    if not dry_run and (counts.total or audit_always):
        with store.transaction(factory) as session:
            detail = {**counts.to_dict(), "complete": counts.complete}
            if reason is not None:
                detail["reason"] = reason
            session.add(Audit(actor=actor, action="gc", detail=json.dumps(detail)))
    log.info("gc", extra={"actor": actor, **counts.to_dict(), "complete": counts.complete})
    return counts


# -- jobs and their files ------------------------------------------------------------------------------------


def _jobs(factory: sessionmaker[Session], config: Config, cutoff: datetime, batch: int, counts: Counts,
          tick: Progress, budget: _Budget) -> bool:
    """Old final jobs, a batch at a time in id order (keyset: a job left behind is never selected forever)."""
    last = 0
    while True:
        with store.transaction(factory) as session:
            rows = session.execute(select(Job.id, Job.upload_leaf).where(_old_job(cutoff), Job.id > last)
                                   .order_by(Job.id).limit(batch)).all()
        if not rows:
            return True
        if not counts.dry_run and not budget.spend():
            return False
        last = rows[-1].id
        ids = [r.id for r in rows]
        counts.results_dirs += _remove_results(config.results_dir, ids, counts.dry_run)
        counts.accepted_uploads += _remove_accepted(config, [r.upload_leaf for r in rows if r.upload_leaf],
                                                    counts.dry_run)
        with store.transaction(factory) as session:
            if counts.dry_run:
                n_mails = _count(session, select(Mail.id).where(Mail.job_id.in_(ids)))
                n_history = _count(session, select(History.id).where(History.job_id.in_(ids)))
                n_jobs = len(ids)
            else:
                # Mails first: a mail's history row cascades to it, and the counts are to be exact.
                n_mails = _deleted(session, delete(Mail).where(Mail.job_id.in_(ids)))
                n_history = _deleted(session, delete(History).where(History.job_id.in_(ids)))
                n_jobs = _deleted(session, delete(Job).where(Job.id.in_(ids), _old_job(cutoff)))
        counts.mails += n_mails
        counts.history += n_history
        counts.jobs += n_jobs
        tick("jobs", n_jobs)
        if len(rows) < batch:
            return True


def _remove_results(results_dir: Path, ids: list[int], dry_run: bool) -> int:
    if not results_dir.is_dir():
        return 0
    root = os.open(results_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return sum(_remove_entry(root, str(job_id), dry_run, results_dir) for job_id in ids)
    finally:
        os.close(root)


def _remove_accepted(config: Config, leaves: list[str], dry_run: bool) -> int:
    if not leaves:
        return 0
    with _spool_dir(config, ACCEPTED, dry_run) as fd:
        if fd is None:
            return 0
        return sum(_remove_entry(fd, leaf, dry_run, config.spool_dir / ACCEPTED) for leaf in leaves)


@contextmanager
def _spool_dir(config: Config, sub: str, dry_run: bool) -> Iterator[int | None]:
    """A descriptor of the spool's ``sub`` directory (None if there is none), under the spool's lock unless dry
    (the lock file would be a change), so that no intake or rescue moves an upload while it is removed."""
    if not (config.spool_dir / sub).is_dir():
        yield None
        return
    with nullcontext() if dry_run else spool_lock(config), open_dir(config.spool_dir, sub) as fd:
        yield fd


def _remove_entry(dir_fd: int, name: str, dry_run: bool, where: Path) -> int:
    """Remove ``name`` (a tree, a file or a symlink, never followed) from the directory ``dir_fd``; 1 if it
    was there. A failure is logged, not raised: the rows still go, and the entry is left for an admin."""
    if "/" in name or name in ("", ".", ".."):
        return 0
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.warning("gc: cannot examine an entry", extra={"path": str(where / name), "error": exc.strerror})
        return 0
    if dry_run:
        return 1
    try:
        if stat.S_ISDIR(st.st_mode):
            # rmtree with dir_fd walks by descriptors and refuses a symlink swapped in after the lstat.
            shutil.rmtree(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.warning("gc: cannot remove an entry; remove it by hand",
                    extra={"path": str(where / name), "error": str(exc)[:300]})
        return 0
    return 1


def _failed_uploads(factory: sessionmaker[Session], config: Config, cutoff: datetime, counts: Counts,
                    tick: Progress) -> bool:
    with store.transaction(factory) as session:
        keep = set(session.scalars(select(Job.upload_leaf).where(Job.state == load_spec().roles.rescuable,
                                                                 Job.upload_leaf.is_not(None))))
    limit = cutoff.timestamp()
    try:
        with _spool_dir(config, FAILED, counts.dry_run) as fd:
            if fd is None:
                return True
            for name in sorted(os.listdir(fd)):
                if name in keep:
                    continue
                try:
                    old = os.lstat(name, dir_fd=fd).st_mtime < limit
                except OSError:
                    continue
                if old:
                    n = _remove_entry(fd, name, counts.dry_run, config.spool_dir / FAILED)
                    counts.failed_uploads += n
                    tick("failed_uploads", n)
    except ConfigError as exc:
        log.warning("gc: the spool's failed uploads are left alone", extra={"error": str(exc)[:300]})
    return True


# -- rows ----------------------------------------------------------------------------------------------------


def _sweep(factory: sessionmaker[Session], key: Any, where: ColumnElement[bool], kind: str, batch: int,
           counts: Counts, tick: Progress, budget: _Budget, count_where: ColumnElement[bool] | None = None) -> bool:
    """Delete the rows ``where`` selects, ``batch`` at a time, each batch its own transaction; dry: count them
    (``count_where`` if given: what a real run would still find once the jobs before it are gone)."""
    if counts.dry_run:
        with store.transaction(factory) as session:
            n = _count(session, select(key).where(count_where if count_where is not None else where))
        setattr(counts, kind, getattr(counts, kind) + n)
        tick(kind, n)
        return True
    table = key.class_
    while True:
        if not budget.spend():
            return False
        # No ORDER BY: the marker and rejected tables have no index on their time, and a scan without an
        # order stops at the first ``batch`` old rows, which lie at the start of an append-mostly table.
        chosen = select(key).where(where).limit(batch)
        with store.transaction(factory) as session:
            n = _deleted(session, delete(table).where(key.in_(chosen), where))
        setattr(counts, kind, getattr(counts, kind) + n)
        tick(kind, n)
        if n < batch:
            return True


def _sweep_markers(factory: sessionmaker[Session], cutoff: datetime, batch: int, counts: Counts, tick: Progress,
                   budget: _Budget) -> bool:
    return _sweep(factory, ProcessedEvent.event_id, ProcessedEvent.at < cutoff, "markers", batch, counts, tick,
                  budget)


def _sweep_mails(factory: sessionmaker[Session], cut: Cutoffs, batch: int, counts: Counts, tick: Progress,
                 budget: _Budget) -> bool:
    done = and_(Mail.status.in_(DONE_MAIL), func.coalesce(Mail.sent_at, Mail.created_at) < cut.mails)
    doomed = select(Job.id).where(_old_job(cut.jobs))
    not_counted = and_(done, or_(Mail.job_id.is_(None), Mail.job_id.not_in(doomed)))
    return _sweep(factory, Mail.id, done, "mails", batch, counts, tick, budget, count_where=not_counted)


def _sweep_outbox(factory: sessionmaker[Session], cutoff: datetime, batch: int, counts: Counts, tick: Progress,
                  budget: _Budget) -> bool:
    sent = and_(Outbox.sent_at.is_not(None), Outbox.sent_at < cutoff)
    return _sweep(factory, Outbox.id, sent, "outbox", batch, counts, tick, budget)


def _sweep_rejected(factory: sessionmaker[Session], cutoff: datetime, batch: int, counts: Counts, tick: Progress,
                    budget: _Budget) -> bool:
    return _sweep(factory, Rejected.id, Rejected.at < cutoff, "rejected", batch, counts, tick, budget)


def _count(session: Session, query: Select[Any]) -> int:
    return int(session.scalar(select(func.count()).select_from(query.subquery())) or 0)


def _deleted(session: Session, statement: Any) -> int:
    result = cast(CursorResult[Any], session.execute(statement, execution_options={"synchronize_session": False}))
    return int(result.rowcount)


__all__ = ["KINDS", "SERVICE_ACTOR", "Counts", "Cutoffs", "Progress", "collect", "deletable_states"]
