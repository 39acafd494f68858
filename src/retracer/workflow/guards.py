"""Guards named in states/workflow.toml.

A guard answers one question about a job and the trigger's context; the workflow file decides which
transition it protects. Guards never change the job.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from retracer.workflow.context import TriggerContext

if TYPE_CHECKING:
    from retracer.store.models import Job

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
    verdict = ctx.policy.classify(str(ctx.data.get("error", "")), ctx.data.get("transient"))
    ctx.notes["pattern"] = verdict.pattern
    ctx.notes["transient"] = verdict.transient
    return verdict.transient


def was_offered(job: Job, ctx: TriggerContext) -> bool:
    """A worker may start only a job the dispatcher offered it (so max_parallel holds)."""
    return not ctx.offers_required or job.dispatched_at is not None


def has_attempts_left(job: Job, ctx: TriggerContext) -> bool:
    """The attempt that just failed was not the last one the policy allows."""
    return ctx.policy.attempts_left(job.attempts)


GUARDS: dict[str, Guard] = {
    "has_upload_log": has_upload_log,
    "has_reason": has_reason,
    "is_transient": is_transient,
    "has_attempts_left": has_attempts_left,
    "was_offered": was_offered,
}
