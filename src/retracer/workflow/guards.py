"""Guards named in states/workflow.toml.

A guard answers one question about a job and the trigger's context; the workflow file decides which
transition it protects. Guards never change the job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retracer.store.models import Job
    from retracer.workflow.policy import FailurePolicy


@dataclass
class TriggerContext:
    """What a trigger carries besides the job: the event's data, who fired it and why, and the policy."""

    data: dict[str, Any] = field(default_factory=dict)
    by: str = ""
    reason: str | None = None
    event_id: str | None = None
    policy: FailurePolicy | None = None
    # Filled by guards that classify (is_transient) so effects and mails can say what matched.
    notes: dict[str, Any] = field(default_factory=dict)


Guard = Callable[["Job", TriggerContext], bool]


def has_upload_log(job: Job, ctx: TriggerContext) -> bool:
    """An upload failure must say why: a non-empty upload log."""
    log = ctx.data.get("upload_log")
    return isinstance(log, str) and bool(log.strip())


def has_reason(job: Job, ctx: TriggerContext) -> bool:
    """Holding a job needs a reason a human can read later."""
    return bool(ctx.reason and ctx.reason.strip())


def is_transient(job: Job, ctx: TriggerContext) -> bool:
    """The worker said so, or the error matches a built-in or admin-registered pattern."""
    if ctx.policy is None:
        return bool(ctx.data.get("transient"))
    verdict = ctx.policy.classify(str(ctx.data.get("error", "")), ctx.data.get("transient"))
    ctx.notes["pattern"] = verdict.pattern
    ctx.notes["transient"] = verdict.transient
    return verdict.transient


def has_attempts_left(job: Job, ctx: TriggerContext) -> bool:
    """The attempt that just failed was not the last one the policy allows."""
    max_attempts = ctx.policy.max_attempts if ctx.policy else 3
    return job.attempts + 1 < max_attempts


GUARDS: dict[str, Guard] = {
    "has_upload_log": has_upload_log,
    "has_reason": has_reason,
    "is_transient": is_transient,
    "has_attempts_left": has_attempts_left,
}
