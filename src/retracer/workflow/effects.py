"""What a transition does to a job's fields besides its state, by the effect name the workflow file gives it.

The workflow file decides whether a trigger may fire, where it leads and which effect it has; these
functions only record its consequences (worker, times, attempts, logs, reasons) once it has. They run inside
the same transaction, and each returns the reason to write in the job's history (None: nothing to add to
what the admin gave).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from retracer.workflow.context import Change, TriggerContext
from retracer.workflow.policy import first_line

if TYPE_CHECKING:
    from retracer.store.models import Job

Effect = Callable[["Job", Change, TriggerContext, datetime], "str | None"]

#: The crash.submitted fields a new job copies.
CRASH_FIELDS = ("crash_id", "creator", "package", "version", "architecture", "release", "core", "executable")


def create(job: Job, change: Change, ctx: TriggerContext, now: datetime) -> str | None:
    """A crash report becomes a job: its crash fields, build-ids and priority; no attempts yet."""
    d = ctx.data
    for name in CRASH_FIELDS:
        setattr(job, name, d[name])
    job.build_ids = list(d.get("build_ids", []))
    job.priority = int(d.get("priority", 0))
    job.manual_priority = False
    job.attempts = 0
    job.created_at = now
    job.core_check = ctx.notes.get("core_check")
    return None


def worker_took(job: Job, change: Change, ctx: TriggerContext, now: datetime) -> str | None:
    """A worker holds the job: who, since when, its first heartbeat; the offer is taken."""
    job.worker = ctx.data["worker"]
    job.started_at = job.started_at or now
    job.last_heartbeat = now
    job.dispatched_at = None
    return None


def worker_alive(job: Job, change: Change, ctx: TriggerContext, now: datetime) -> str | None:
    """The worker is alive."""
    job.last_heartbeat = now
    job.worker = ctx.data.get("worker", job.worker)
    return None


def uploaded(job: Job, change: Change, ctx: TriggerContext, now: datetime) -> str | None:
    """The result is stored: its leaf, text and signatures; the upload log of an earlier refusal is cleared. A
    job whose signature an earlier job has (the apply path looks it up) is recorded as that job's duplicate."""
    job.upload_leaf = ctx.data.get("leaf", job.upload_leaf)
    job.result = ctx.data.get("result", job.result)
    job.upload_log = None
    job.finished_at = now
    if ctx.data.get("signature"):
        job.signature = ctx.data["signature"]
        job.address_signature = ctx.data.get("address_signature")
    duplicate = ctx.notes.get("duplicate_of")
    job.duplicate_of = duplicate
    return f"duplicate of job {duplicate} (the same crash signature)" if duplicate else None


def upload_refused(job: Job, change: Change, ctx: TriggerContext, now: datetime) -> str | None:
    """The result could not be uploaded: its leaf and the upload log that says why."""
    job.upload_leaf = ctx.data.get("leaf", job.upload_leaf)
    job.upload_log = ctx.data["upload_log"]
    job.finished_at = now
    return _upload_reason(job)


def upload_refused_again(job: Job, change: Change, ctx: TriggerContext, now: datetime) -> str | None:
    """A rescued upload was refused again: the new upload log replaces the old."""
    job.upload_log = ctx.data["upload_log"]
    return _upload_reason(job)


def retry_later(job: Job, change: Change, ctx: TriggerContext, now: datetime) -> str | None:
    """A failed attempt with attempts left: back to the queue, not before the policy's backoff."""
    _failed(job, change)
    job.last_error = str(ctx.data.get("error", ""))
    job.not_before = now + ctx.policy.backoff(job.attempts)
    return f"attempt {job.attempts} failed: {first_line(job.last_error) or 'no error text'}"


def hold_failed(job: Job, change: Change, ctx: TriggerContext, now: datetime) -> str | None:
    """A failed attempt with none left, or a permanent failure (the is_transient guard's verdict says which):
    held, with a reason naming the attempts, the pattern and the error."""
    return _hold_after_failure(job, change, ctx, bool(change.notes.get("transient")))


def hold_exhausted(job: Job, change: Change, ctx: TriggerContext, now: datetime) -> str | None:
    """A failed attempt that is transient by nature (a lost worker) with none left: held, retries exhausted."""
    return _hold_after_failure(job, change, ctx, True)


def reset(job: Job, change: Change, ctx: TriggerContext, now: datetime) -> str | None:
    """Back to the queue with its attempts reset and every trace of the earlier tries cleared (so times and
    the final mail's duration count from the new start); the crash and its priority are kept."""
    job.attempts = 0
    job.not_before = None
    job.hold_reason = None
    job.upload_log = None
    job.upload_leaf = None
    job.last_error = None
    job.failure_pattern = None
    job.worker = None
    job.dispatched_at = None
    job.last_heartbeat = None
    job.started_at = None
    job.finished_at = None
    return None


def park(job: Job, change: Change, ctx: TriggerContext, now: datetime) -> str | None:
    """Parked by an admin, with the admin's reason; no longer offered."""
    job.hold_reason = (ctx.reason or "").strip()
    job.dispatched_at = None
    job.not_before = None
    return None


def unpark(job: Job, change: Change, ctx: TriggerContext, now: datetime) -> str | None:
    """Back to the queue after a hold, at once."""
    job.hold_reason = None
    job.not_before = None
    job.worker = None
    return None


def requeue_unblocked(job: Job, change: Change, ctx: TriggerContext, now: datetime) -> str | None:
    """The symbols its last attempt lacked were imported: back to the queue at once. Its attempts are reset
    because they failed for a cause now removed, so they say nothing of the next one; a job held after its
    last attempt would otherwise be held again by its next transient failure. Repeats are bounded: only
    symbols imported after the attempt reported them missing release a job."""
    job.attempts = 0
    job.not_before = None
    job.hold_reason = None
    job.failure_pattern = None
    job.dispatched_at = None
    job.worker = None
    return None


def set_priority(job: Job, change: Change, ctx: TriggerContext, now: datetime) -> str | None:
    """An admin's priority, sticky: automatic scoring never overrides it."""
    job.priority = int(ctx.data["priority"])
    job.manual_priority = True
    return None


def _failed(job: Job, change: Change) -> None:
    job.attempts += 1
    job.failure_pattern = change.notes.get("pattern")
    # job.worker is kept: the mail and `show` say which worker had the failed attempt.
    job.dispatched_at = None
    job.last_heartbeat = None


def _hold_after_failure(job: Job, change: Change, ctx: TriggerContext, transient: bool) -> str:
    _failed(job, change)
    job.last_error = str(ctx.data.get("error", ""))
    job.not_before = None
    job.hold_reason = ctx.policy.hold_reason(job.attempts, transient, job.failure_pattern, job.last_error)
    return job.hold_reason


def _upload_reason(job: Job) -> str | None:
    first = first_line(job.upload_log or "")
    return f"upload failed: {first}" if first else None



EFFECTS: dict[str, Effect] = {
    "create": create,
    "worker_took": worker_took,
    "worker_alive": worker_alive,
    "uploaded": uploaded,
    "upload_refused": upload_refused,
    "upload_refused_again": upload_refused_again,
    "retry_later": retry_later,
    "hold_failed": hold_failed,
    "hold_exhausted": hold_exhausted,
    "reset": reset,
    "park": park,
    "unpark": unpark,
    "set_priority": set_priority,
    "requeue_unblocked": requeue_unblocked,
}
