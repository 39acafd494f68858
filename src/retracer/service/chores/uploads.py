"""The uploads chore: the spool's complete uploads become upload.accepted / upload.failed events."""

from __future__ import annotations

from retracer.service.chores.registry import Chore, ChoreContext, Simple
from retracer.uploads.intake import process_incoming


def make(ctx: ChoreContext) -> Chore:
    return Simple(lambda: len(process_incoming(ctx.config, ctx.factory, ctx.runner.apply)))


