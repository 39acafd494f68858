"""The admin's rescue of a job whose upload was refused: its kept upload processed again, under the spool's
lock, and the rescue trigger fired (or the failed-again one, with the new upload log).

The kept upload is in failed/, or in incoming/ when the admin moved it back by hand (the manual way, which
`serve` leaves to an admin): a rescue takes it from either."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from retracer.apply.applier import Applier
from retracer.config import Config
from retracer.errors import JobNotFound, TransitionRefused, UploadRejected
from retracer.store.models import Job
from retracer.uploads import spool
from retracer.uploads.files import ACCEPTED, FAILED, INCOMING, lexists_in
from retracer.uploads.intake import Admin, fire_for_admin, spool_lock
from retracer.workflow import Change


@dataclass(frozen=True)
class Rescue:
    """What a rescue did (or, in a dry run, would do)."""

    job_id: int
    leaf: str
    upload: spool.UploadResult
    change: Change
    dry_run: bool
    mail: bool = True

    @property
    def succeeded(self) -> bool:
        return self.upload.accepted

    def to_dict(self) -> dict[str, Any]:
        return {"job": self.job_id, "leaf": self.leaf, "accepted": self.upload.accepted,
                "from": self.change.source, "to": self.change.dest, "trigger": self.change.trigger,
                "upload_log": None if self.upload.accepted else self.upload.upload_log,
                "stored_at": str(self.upload.stored_at) if self.upload.stored_at else None,
                "moved_to": str(self.upload.moved_to) if self.upload.moved_to else None, "dry_run": self.dry_run,
                "mail": self.mail}


def rescue(config: Config, factory: sessionmaker[Session], job_id: int, by: str, reason: str | None,
           dry_run: bool = False, mail: bool = True) -> Rescue:
    """Reprocess a FAILEDTOUPLOAD job's kept upload: FULLYBUILT if accepted, else FAILEDTOUPLOAD with the new log.

    The dry run runs every check on the upload where it lies (failed/ or incoming/) and fires the trigger in a
    transaction that is rolled back: nothing moves, nothing is stored, no state changes and no mail is queued.
    ``mail=False`` queues no mail for the transition and records that in the job's history.
    """
    applier = Applier(config)
    with factory() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFound(job_id)
        roles = applier.workflow.roles
        if not applier.workflow.candidates(roles.rescue, job.state):
            raise TransitionRefused(job.id, job.state, roles.rescue,
                                    f"only a {roles.rescuable} job has an upload to rescue",
                                    applier.workflow.allowed_from(job.state))
        leaf = job.upload_leaf
        expected = spool.ExpectedJob(job.id, job.crash_id, list(job.build_ids or []), job.state)
    if not leaf:
        raise UploadRejected(f"job {job_id} has no upload leaf recorded, so there is no kept upload to rescue; "
                             f"use `retracer retry {job_id}` to retrace it again")
    limits = spool.Limits.from_config(config)
    with spool_lock(config):
        kept = _kept_in(config, job_id, leaf)
        if dry_run:
            result = spool.process(config.spool_dir, leaf, expected, limits, config.results_dir, dry_run=True,
                                   source=kept)
        else:
            if kept == FAILED:
                spool.restore_failed(config.spool_dir, leaf)
            result = spool.process(config.spool_dir, leaf, expected, limits, config.results_dir, move=False)
        trigger = roles.rescue if result.accepted else roles.rescue_failed
        with factory() as session:
            session.begin()
            try:
                change = fire_for_admin(session, applier, job_id, trigger, result, Admin(by, reason, mail))
                if change is None:  # only an upload's own event can be a duplicate; a rescue always fires
                    raise UploadRejected(f"job {job_id}: the rescue of upload {leaf} fired nothing; run it again")
            except BaseException:
                session.rollback()
                if not dry_run and kept == FAILED:  # put the upload back where the admin found it
                    spool.file_away(config.spool_dir, replace(result, accepted=False))
                raise
            if dry_run:
                session.rollback()
            else:
                session.commit()
        if not dry_run:
            result = spool.file_away(config.spool_dir, result)
    return Rescue(job_id, leaf, result, change, dry_run, mail)


def _kept_in(config: Config, job_id: int, leaf: str) -> spool.Source:
    """Where the job's upload waits for its rescue: failed/, or incoming/ if an admin moved it back by hand."""
    root = config.spool_dir
    if lexists_in(root, FAILED, leaf):
        return "failed"
    if lexists_in(root, INCOMING, leaf):
        return "incoming"
    filed = root / ACCEPTED / leaf
    elsewhere = (f"it is in {filed}: move it back to {root / FAILED} and rescue again"
                 if lexists_in(root, ACCEPTED, leaf) else f"retrace the crash again with `retracer retry {job_id}`")
    raise UploadRejected(f"job {job_id}'s upload {leaf} is neither kept in {root / FAILED} nor waiting in "
                         f"{root / INCOMING}: nothing to rescue; {elsewhere}")
