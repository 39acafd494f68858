"""Between the spool and the machine: uploads in incoming/ become upload.accepted / upload.failed events.

Order matters for crash safety: an upload is checked and its result stored, then its event is committed,
and only then is the directory filed away to accepted/ or failed/. A kill before the commit leaves the
upload in incoming/ to be processed again; a kill after it processes it again into the same event id
(derived from the leaf and the upload's digest), which the processed-event markers turn into a no-op.
One process works on the spool at a time (an flock on <spool>/.lock), so a rescue never races `serve`.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from retracer import events as ev
from retracer.apply.applier import Outcome
from retracer.config import Config
from retracer.store.models import Job
from retracer.uploads import spool


@contextmanager
def spool_lock(config: Config, blocking: bool = True) -> Iterator[bool]:
    """Hold the spool's lock; yields False (without waiting) when not blocking and another process has it."""
    spool.ensure_layout(config.spool_dir)
    fd = os.open(config.spool_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def expected_job(factory: sessionmaker[Session], job_id: int) -> spool.ExpectedJob | None:
    with factory() as session:
        job = session.get(Job, job_id)
        if job is None:
            return None
        return spool.ExpectedJob(job.id, job.crash_id, list(job.build_ids or []), job.state)


def upload_event(result: spool.UploadResult) -> dict[str, Any]:
    """The event reporting a processed upload; its id is the same each time the same upload is processed."""
    digest = result.digest or hashlib.sha256(result.upload_log.encode()).hexdigest()
    return ev.make(result.event_type, result.job_id, result.to_event_data(), source="retracer:spool",
                   event_id=f"upload:{result.leaf}:{digest[:24]}").to_dict()


def process_incoming(config: Config, factory: sessionmaker[Session], apply: Any, leaf: str | None = None,
                     dry_run: bool = False) -> list[tuple[spool.UploadResult, Outcome | None]]:
    """Process complete uploads in incoming/ (all, or one ``leaf``); ``apply`` commits a batch of events.

    Used by the service's chore and by `retracer process-upload`. In a dry run every check runs and
    nothing is stored, moved or applied. Returns each upload's result and the outcome of its event.
    """
    done: list[tuple[spool.UploadResult, Outcome | None]] = []
    with spool_lock(config, blocking=leaf is not None or dry_run) as locked:
        if not locked:
            return done
        limits = spool.Limits.from_config(config)
        leaves = spool.incoming_leaves(config.spool_dir) if leaf is None else [leaf]
        for name in leaves:
            result = spool.process(config.spool_dir, name, lambda job_id: expected_job(factory, job_id), limits,
                                   config.results_dir, dry_run=dry_run, move=False)
            outcome = None
            if not dry_run:
                if result.job_id is not None:
                    (outcome,) = apply([upload_event(result)])
                result = spool.file_away(config.spool_dir, result)
            done.append((result, outcome))
    return done
