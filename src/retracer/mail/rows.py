"""Who is mailed when a job enters a state, written as mail rows in the transition's own transaction.

The workflow file says which recipient kinds a state notifies; this module resolves them to addresses,
deduplicates them (an admin who is also the creator gets one mail), and freezes what the mail will say.
Delivery happens after commit (retracer.mail.sender), never inside the transition.
"""

from __future__ import annotations

import os
import shlex
from datetime import datetime
from pathlib import Path
from typing import Any

from retracer.config import Config
from retracer.store.models import Job
from retracer.uploads.files import FAILED, INCOMING, is_plain_component
from retracer.workflow import Change, Workflow

#: The settings that say where an instance keeps its state: a command pasted from a mail needs them to act on
#: the same jobs (the others, like who is mailed, do not change what a rescue or a retry does).
LOCATING = ("service.data_dir", "database.url", "spool.path")


def recipients(workflow: Workflow, job: Job, state: str, admins: list[str]) -> list[tuple[str, str]]:
    """(address, rationale) pairs for a job entering ``state``, one per address."""
    chosen: dict[str, tuple[str, str]] = {}
    for kind in workflow.states[state].notify:
        addresses = admins if kind == "admins" else [job.creator]
        rationale = "Admin" if kind == "admins" else "Creator"
        for address in addresses:
            chosen.setdefault(address.strip().lower(), (address.strip(), rationale))
    return list(chosen.values())


def command(config: Config) -> str:
    """How an admin runs `retracer` on this instance, as a mail prints it: with the instance's configuration
    file when it has one, else with the environment settings that locate it (never one holding a password)."""
    if config.path:
        return f"retracer --config {shlex.quote(str(Path(config.path).resolve()))}"
    settings = []
    for key in LOCATING:
        origin = config.origin.get(key, "")
        section, name = key.split(".")
        value = str(config[section][name])
        if origin.startswith("env ") and not _has_password(value):
            settings.append(f"{origin[4:]}={shlex.quote(value)}")
    return " ".join([*settings, "retracer"])


def _has_password(value: str) -> bool:
    userinfo = value.partition("://")[2].partition("@")
    return bool(userinfo[1]) and ":" in userinfo[0]


def upload_kept(config: Config, leaf: str | None) -> bool:
    """Whether the spool holds the upload ``leaf`` (still in incoming/, or kept in failed/) for a rescue."""
    if not leaf or not is_plain_component(leaf):
        return False
    return any(os.path.lexists(config.spool_dir / where / leaf) for where in (INCOMING, FAILED))


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
        "signature": job.signature, "duplicate_of": job.duplicate_of, "at": at.isoformat(),
    }


def mail_rows(workflow: Workflow, job: Job, change: Change, at: datetime, actor: str, reason: str | None,
              config: Config) -> list[dict[str, Any]]:
    """One pending mail row per recipient of the state just entered (job and history ids filled by the caller)."""
    people = recipients(workflow, job, change.dest, list(config["mail"]["admins"]))
    if not people:
        return []
    context = snapshot(workflow, job, change, at, actor, reason)
    context["retracer"] = command(config)
    if change.dest == workflow.roles.rescuable:
        # Looked up now: an upload.failed from an uploader may name an upload the spool never had.
        context["upload_kept"] = upload_kept(config, job.upload_leaf)
    return [{"state": change.dest, "recipient": address, "rationale": rationale, "context": context,
             "status": "pending", "attempts": 0, "created_at": at} for address, rationale in people]
