"""The uploads chore: the spool's complete uploads become upload.accepted / upload.failed events."""

from __future__ import annotations

from retracer.service.chores.registry import Chore, ChoreContext, Simple
from retracer.uploads.intake import process_incoming


def make(ctx: ChoreContext) -> Chore:
    def run() -> int:
        done = process_incoming(ctx.config, ctx.factory, ctx.runner.apply)
        outcomes = [outcome for _, outcome in done if outcome is not None]
        if outcomes:
            ctx.hooks.after_uploads(outcomes)
        return len(done)

    return Simple(run)


