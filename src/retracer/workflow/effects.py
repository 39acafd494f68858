"""What a transition does to a job's fields besides its state.

The workflow file decides whether a trigger may fire and where it leads; these functions only record its
consequences (worker, times, attempts, logs, reasons) once it has. They run inside the same transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from retracer.store.models import Job
from retracer.workflow import Change
from retracer.workflow.guards import TriggerContext
from retracer.workflow.policy import FailurePolicy

Effect = Callable[[Job, Change, TriggerContext, datetime], None]


def _submit(job: Job, change: Change, ctx: TriggerContext, now: datetime) -> None:
    d = ctx.data
    for name in ("crash_id", "creator", "package", "version", "architecture", "release", "core", "executable"):
        setattr(job, name, d[name])
    job.build_ids = list(d.get("build_ids", []))
    job.priority = int(d.get("priority", 0))
    job.manual_priority = False
    job.attempts = 0
    job.created_at = now


def _start(job: Job, change: Change, ctx: TriggerContext, now: datetime) -> None:
    job.worker = ctx.data["worker"]
    job.started_at = job.started_at or now
    job.last_heartbeat = now
    job.dispatched_at = None


def _heartbeat(job: Job, change: Change, ctx: TriggerContext, now: datetime) -> None:
    job.last_heartbeat = now
    job.worker = ctx.data.get("worker", job.worker)


def _uploaded(job: Job, change: Change, ctx: TriggerContext, now: datetime) -> None:
    job.upload_leaf = ctx.data.get("leaf", job.upload_leaf)
    job.result = ctx.data.get("result", job.result)
    job.upload_log = None
    job.finished_at = now


def _upload_failed(job: Job, change: Change, ctx: TriggerContext, now: datetime) -> None:
    job.upload_leaf = ctx.data.get("leaf", job.upload_leaf)
    job.upload_log = ctx.data["upload_log"]
    job.finished_at = now


def _failed(job: Job, change: Change, ctx: TriggerContext, now: datetime) -> None:
    """A failed attempt (worker error or lost heartbeat): back to the queue after a backoff, or held."""
    job.attempts += 1
    job.last_error = str(ctx.data.get("error", ""))
    job.failure_pattern = change.notes.get("pattern")
    # job.worker is kept: the mail and `show` say which worker had the failed attempt.
    job.dispatched_at = None
    job.last_heartbeat = None
    policy = ctx.policy or FailurePolicy()
    if change.dest == "PENDING":
        job.not_before = now + policy.backoff(job.attempts)
        return
    job.not_before = None
    first_line = job.last_error.strip().splitlines()[0][:300] if job.last_error.strip() else "no error text"
    if change.notes.get("transient") or change.trigger == "heartbeat_lost":
        why = f"retries exhausted after {job.attempts} of {policy.max_attempts} attempts"
    else:
        why = f"permanent failure on attempt {job.attempts}"
    pattern = f"; matched transient pattern {job.failure_pattern!r}" if job.failure_pattern else ""
    job.hold_reason = f"{why}{pattern}; last error: {first_line}"


def _retry(job: Job, change: Change, ctx: TriggerContext, now: datetime) -> None:
    job.attempts = 0
    job.not_before = None
    job.hold_reason = None
    job.upload_log = None
    job.worker = None
    job.dispatched_at = None
    job.finished_at = None


def _hold(job: Job, change: Change, ctx: TriggerContext, now: datetime) -> None:
    job.hold_reason = (ctx.reason or "").strip()
    job.dispatched_at = None
    job.not_before = None


def _release(job: Job, change: Change, ctx: TriggerContext, now: datetime) -> None:
    job.hold_reason = None
    job.not_before = None
    job.worker = None


def _reprioritize(job: Job, change: Change, ctx: TriggerContext, now: datetime) -> None:
    job.priority = int(ctx.data["priority"])
    job.manual_priority = True


def _rescue_failed(job: Job, change: Change, ctx: TriggerContext, now: datetime) -> None:
    job.upload_log = ctx.data["upload_log"]


EFFECTS: dict[str, Effect] = {
    "submit": _submit,
    "start": _start,
    "heartbeat": _heartbeat,
    "upload_accepted": _uploaded,
    "rescue": _uploaded,
    "upload_failed": _upload_failed,
    "rescue_failed": _rescue_failed,
    "retrace_failed": _failed,
    "heartbeat_lost": _failed,
    "retry": _retry,
    "hold": _hold,
    "release": _release,
    "reprioritize": _reprioritize,
}
