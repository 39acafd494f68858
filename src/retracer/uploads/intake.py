"""Between the spool and the machine: uploads in incoming/ become transitions of their jobs.

Order matters for crash safety: an upload is checked and its result stored, then its transition is committed,
and only then is the directory filed away to accepted/ or failed/. A kill before the commit leaves the
upload in incoming/ to be processed again; a kill after it processes it again into the same event id
(``upload_event_id``), which the processed-event markers turn into a no-op.
One process works on the spool at a time (an flock on <spool>/.lock), so a rescue never races `serve`.

`serve` turns a worker's upload into an upload.accepted / upload.failed event. An upload for a job whose
upload was refused (the workflow's rescuable state) is an admin's business: only the rescue triggers move
that job, and they record who fired them. So `serve` leaves such an upload in incoming/, and an admin's
`retracer process-upload` (or `retracer rescue`) fires the rescue, under the admin's name. Every transition
an admin's `process-upload` makes is recorded under the admin's name, with the admin's reason.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from retracer import events as ev
from retracer.apply.applier import Applier, Outcome
from retracer.config import Config
from retracer.errors import InvalidEvent, TransitionRefused, UploadRejected
from retracer.store.models import Job, ProcessedEvent, utcnow
from retracer.uploads import spool
from retracer.uploads.files import ACCEPTED, FAILED, INCOMING, leaf_name_problem, lexists_in, open_lock
from retracer.workflow import Change, Workflow, load_spec

log = logging.getLogger("retracer.spool")

#: Longer leaves are shortened (with a hash of the whole name) in event ids, which are at most 200 characters.
MAX_LEAF_IN_ID = 120

#: Why this process last said it left each upload in incoming/ (said once, not on every round).
_told: dict[str, str] = {}


class Apply(Protocol):
    """Commits a batch of event bodies (Runner.apply); ``minted``: the service made them itself."""

    def __call__(self, bodies: Sequence[str | bytes], *, minted: bool) -> list[Outcome]: ...


@dataclass(frozen=True)
class Admin:
    """An admin processing uploads by hand: who (``admin:NAME``), why, and whether the mails go out."""

    by: str
    reason: str | None = None
    mail: bool = True


class _NotYet(Exception):
    """Raised from the job lookup for an upload whose job's retrace.started is still on its way: the upload
    waits in incoming/ for the next round."""


class _LeftForAdmin(Exception):
    """Raised from the job lookup so that `serve` stops before storing anything for a rescuable job."""

    def __init__(self, job: spool.ExpectedJob) -> None:
        super().__init__(job.job_id)
        self.job = job


@contextmanager
def spool_lock(config: Config, blocking: bool = True) -> Iterator[bool]:
    """Hold the spool's lock; yields False (without waiting) when not blocking and another process has it."""
    spool.ensure_layout(config.spool_dir)
    with open_lock(config.spool_dir) as fd:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


def expected_job(factory: sessionmaker[Session], job_id: int) -> spool.ExpectedJob | None:
    with factory() as session:
        job = session.get(Job, job_id)
        if job is None:
            return None
        return spool.ExpectedJob(job.id, job.crash_id, list(job.build_ids or []), job.state)


def _offer_in_flight(factory: sessionmaker[Session], job_id: int, config: Config) -> bool:
    """Whether ``job_id`` is queued with an offer younger than the dispatch timeout: its worker's
    retrace.started may not be applied yet (a fast retrace can upload before serve applies the event)."""
    with factory() as session:
        job = session.get(Job, job_id)
        if job is None or job.state != load_spec().roles.queue or job.dispatched_at is None:
            return False
        age = (utcnow() - job.dispatched_at).total_seconds()
        return age < float(config["service"]["dispatch_timeout_s"])


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def upload_event_id(result: spool.UploadResult) -> str:
    """The id of the event reporting ``result``: the same each time the same upload gets the same verdict.

    An acceptance is named by the upload's content alone, so a replay after a crash (the job done, the same
    bytes accepted again) is a duplicate. A refusal is named by its content and its upload log too: once the
    cause is fixed outside the upload (a limit raised, the results directory repaired), processing the same
    bytes again is a new attempt, not a duplicate of the refused one.
    """
    leaf = result.leaf if len(result.leaf) <= MAX_LEAF_IN_ID else f"{result.leaf[:80]}~{_sha(result.leaf)[:16]}"
    if result.accepted:
        return f"{ev.RESERVED}upload:{leaf}:{(result.digest or _sha(result.upload_log))[:24]}"
    verdict = _sha((result.digest or "") + "\0" + result.upload_log)
    return f"{ev.RESERVED}upload:{leaf}:{verdict[:24]}:refused"


def upload_event(result: spool.UploadResult) -> dict[str, Any]:
    """The event reporting a processed upload (see ``upload_event_id``)."""
    return ev.make(result.event_type, result.job_id, result.to_event_data(), source=f"{ev.RESERVED}spool",
                   event_id=upload_event_id(result), minted=True).to_dict()


def admin_trigger(workflow: Workflow, result: spool.UploadResult, state: str) -> str | None:
    """What an admin's processing of ``result`` fires on a job in ``state``: a rescue where the workflow has one
    (accepted, or refused again), else the trigger the upload's event fires; None if nothing applies."""
    roles = workflow.roles
    if workflow.candidates(roles.rescue, state):
        return roles.rescue if result.accepted else roles.rescue_failed
    return next((t for t in workflow.triggers_for_event(result.event_type) if workflow.candidates(t, state)), None)


def fire_for_admin(session: Session, applier: Applier, job_id: int, trigger: str, result: spool.UploadResult,
                   admin: Admin) -> Change | None:
    """Fire ``trigger`` for ``result`` in the caller's transaction, under the admin's name; None: the upload's
    event was applied before (a duplicate), nothing fired.

    A rescue's acceptance writes the upload's processed marker (if no earlier attempt left one), so that a
    `serve` replaying it after a crash finds a duplicate. A rescue refused again writes none: an admin who
    tries again is trying again, and is recorded again.
    """
    roles = applier.workflow.roles
    event_id = upload_event_id(result)
    seen = session.get(ProcessedEvent, event_id) is not None
    rescuing = trigger in (roles.rescue, roles.rescue_failed)
    if seen and not rescuing:
        return None
    marker = None if seen or trigger == roles.rescue_failed else event_id
    return applier.fire(session, job_id, trigger, by=admin.by, reason=admin.reason, data=result.to_event_data(),
                        event_id=marker, mail=admin.mail)


def process_incoming(config: Config, factory: sessionmaker[Session], apply: Apply, leaf: str | None = None,
                     dry_run: bool = False, admin: Admin | None = None
                     ) -> list[tuple[spool.UploadResult, Outcome | None]]:
    """Process complete uploads in incoming/ (all, or one ``leaf``); ``apply`` commits a batch of events.

    Used by the service's chore (no ``admin``) and by `retracer process-upload` (``admin``: who runs it). In a
    dry run every check runs and nothing is stored, moved or applied. Returns each upload's result and the
    outcome of its transition; an upload the service leaves for an admin is not among them (it did nothing).
    """
    done: list[tuple[spool.UploadResult, Outcome | None]] = []
    applier = Applier(config)
    workflow = applier.workflow
    with spool_lock(config, blocking=leaf is not None or dry_run) as locked:
        if not locked:
            return done
        limits = spool.Limits.from_config(config)
        leaves = spool.incoming_leaves(config.spool_dir) if leaf is None else [leaf]

        def lookup(job_id: int) -> spool.ExpectedJob | None:
            job = expected_job(factory, job_id)
            if admin is None and job is not None and workflow.candidates(workflow.roles.rescue, job.state):
                raise _LeftForAdmin(job)
            if admin is None and job is not None and _offer_in_flight(factory, job_id, config):
                raise _NotYet
            return job

        for name in leaves:
            try:
                result = spool.process(config.spool_dir, name, lookup, limits, config.results_dir, dry_run=dry_run,
                                       move=False)
            except _LeftForAdmin as waiting:
                _tell_left(config, name, waiting.job)
                continue
            except _NotYet:
                continue
            except OSError as exc:  # refusals are results; this is an upload the checks could not even refuse
                _stuck(config, name, f"it could not be processed ({exc})", "fix or remove it by hand", admin)
                continue
            if result.missing and admin is not None:
                result = _where_else(config, result)
            outcome = None
            if not dry_run and not result.missing:
                if result.job_id is not None:
                    try:
                        outcome = _settle(factory, applier, apply, result, admin)
                    except InvalidEvent as exc:
                        _stuck(config, name, f"its {result.event_type} event is not valid ({exc})",
                               "process it with `retracer process-upload --dry-run` to see why, then fix or "
                               "remove it by hand", admin)
                        continue
                result = _file_away(config, result, admin)
            done.append((result, outcome))
        if leaf is None:
            for gone in set(_told) - set(leaves):
                del _told[gone]
    return done


def _file_away(config: Config, result: spool.UploadResult, admin: Admin | None) -> spool.UploadResult:
    """File a processed upload away; one that cannot be moved stays in incoming/ and is said so once."""
    try:
        filed = spool.file_away(config.spool_dir, result)
    except (UploadRejected, OSError) as exc:
        _stuck(config, result.leaf, str(exc), "serve tries again at each round until it is moved or removed",
               admin)
        return result
    if admin is None and not filed.accepted and filed.job_id is None:
        # No event reports an upload that names no job: this line is its only record.
        log.warning("upload refused and filed away; it names no job, so no event reports it", extra={
            "leaf": filed.leaf, "moved_to": str(filed.moved_to), "upload_log": filed.upload_log[:2000]})
    return filed


def _settle(factory: sessionmaker[Session], applier: Applier, apply: Apply, result: spool.UploadResult,
            admin: Admin | None) -> Outcome:
    """Commit the transition ``result`` calls for: the admin's trigger under the admin's name, or the event."""
    job_id = result.job_id
    if admin is not None and job_id is not None:
        with factory() as session:
            session.begin()
            job = session.get(Job, job_id)
            trigger = admin_trigger(applier.workflow, result, job.state) if job is not None else None
            change: Change | None = None
            try:
                if trigger is not None:
                    change = fire_for_admin(session, applier, job_id, trigger, result, admin)
            except TransitionRefused:
                # The job moved since it was read: the event path says why and keeps the event for a replay.
                trigger = None
            except BaseException:
                session.rollback()
                raise
            if trigger is None:
                session.rollback()
            else:
                session.commit()
                if change is None:
                    return Outcome("duplicate", upload_event_id(result), result.event_type, job_id)
                return Outcome("applied", upload_event_id(result), result.event_type, job_id, change.trigger,
                               change.source, change.dest)
    (outcome,) = apply([json.dumps(upload_event(result))], minted=True)
    return outcome


def _where_else(config: Config, result: spool.UploadResult) -> spool.UploadResult:
    """A leaf an admin named that is not in incoming/: say where it is, if the spool has it elsewhere."""
    if leaf_name_problem(result.leaf) is not None:
        return result
    for sub, hint in ((FAILED, f"move it back to {config.spool_dir / INCOMING} first, or rescue its job with "
                               f"`retracer rescue JOB`"),
                      (ACCEPTED, "it was accepted already: look at its job with `retracer show JOB`")):
        if lexists_in(config.spool_dir, sub, result.leaf):
            more = f"{result.leaf} is in {config.spool_dir / sub}: {hint}"
            return replace(result, upload_log=f"{result.upload_log}\n{more}", problems=(*result.problems, more))
    return result


def _tell_left(config: Config, leaf: str, job: spool.ExpectedJob) -> None:
    if _told.get(leaf) == "admin":
        return
    _told[leaf] = "admin"
    log.warning("upload left for an admin", extra={
        "leaf": leaf, "job": job.job_id, "state": job.state,
        "hint": f"job {job.job_id} is {job.state}: only an admin moves it on; reprocess the upload with "
                f"`retracer process-upload --leaf {leaf}` or `retracer rescue {job.job_id}`, or remove "
                f"{config.spool_dir / INCOMING / leaf}"})


def _stuck(config: Config, leaf: str, why: str, what_to_do: str, admin: Admin | None) -> None:
    """An upload that can be neither processed nor filed away stays in incoming/: `serve` says so once (not on
    every round) and goes on with the next; an admin is told at once, as the command's error."""
    if admin is not None:
        raise UploadRejected(f"upload {leaf!r} stays in {config.spool_dir / INCOMING}: {why}; {what_to_do}")
    if _told.get(leaf) == why:
        return
    _told[leaf] = why
    log.warning("upload left in incoming/", extra={
        "leaf": leaf, "error": why[:2000],
        "hint": f"{what_to_do} ({config.spool_dir / INCOMING / leaf}); the other uploads go on being processed"})
