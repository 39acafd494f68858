"""Who is mailed when a job enters a state, written as mail rows in the transition's own transaction.

The workflow file says which recipient kinds a state notifies; this module resolves them to addresses,
deduplicates them (an admin who is also the creator gets one mail), and freezes what the mail will say.
Delivery happens after commit (retracer.mail.sender), never inside the transition.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from retracer.store.models import Job
from retracer.workflow import Change, Workflow


def recipients(workflow: Workflow, job: Job, state: str, admins: list[str]) -> list[tuple[str, str]]:
    """(address, rationale) pairs for a job entering ``state``, one per address."""
    chosen: dict[str, tuple[str, str]] = {}
    for kind in workflow.states[state].notify:
        addresses = admins if kind == "admins" else [job.creator]
        rationale = "Admin" if kind == "admins" else "Creator"
        for address in addresses:
            chosen.setdefault(address.strip().lower(), (address.strip(), rationale))
    return list(chosen.values())


def snapshot(workflow: Workflow, job: Job, change: Change, at: datetime, actor: str,
             reason: str | None) -> dict[str, Any]:
    """What the mail shows, as of the transition (the job may change before the mail is sent)."""
    spec = workflow.states[change.dest]
    duration = None
    if job.started_at is not None:
        duration = int(((job.finished_at or at) - job.started_at).total_seconds())
    return {
        "job": job.id, "crash_id": job.crash_id, "creator": job.creator, "package": job.package,
        "version": job.version, "architecture": job.architecture, "release": job.release,
        "state": change.dest, "state_title": spec.title, "from_state": change.source,
        "trigger": change.trigger, "actor": actor, "reason": reason,
        "duration_s": duration, "worker": job.worker, "attempts": job.attempts,
        "upload_leaf": job.upload_leaf, "upload_log": job.upload_log, "hold_reason": job.hold_reason,
        "failure_pattern": job.failure_pattern, "last_error": job.last_error,
        "at": at.isoformat(),
    }


def mail_rows(workflow: Workflow, job: Job, change: Change, at: datetime, actor: str, reason: str | None,
              admins: list[str]) -> list[dict[str, Any]]:
    """One pending mail row per recipient of the state just entered (job and history ids filled by the caller)."""
    people = recipients(workflow, job, change.dest, admins)
    if not people:
        return []
    context = snapshot(workflow, job, change, at, actor, reason)
    return [{"state": change.dest, "recipient": address, "rationale": rationale, "context": context,
             "status": "pending", "attempts": 0, "created_at": at} for address, rationale in people]
