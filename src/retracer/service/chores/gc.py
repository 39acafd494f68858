"""The gc chore: `retracer gc` run by the service itself, at most every ``[gc] interval_s`` (0: never)."""

from __future__ import annotations

import time
from collections.abc import Callable

from retracer.ops.gc import SERVICE_ACTOR, collect
from retracer.service.chores.registry import ChoreContext

#: Batches one round may delete: a first run on a large database goes on over the next rounds, so that the
#: service never stops applying events for long.
BATCHES_PER_ROUND = 20


class Gc:
    """Deletes what the retention says when the interval has passed since its last run began."""

    def __init__(self, ctx: ChoreContext, clock: Callable[[], float] = time.monotonic) -> None:
        self.ctx = ctx
        self.clock = clock
        self.last: float | None = None
        self.unfinished = False

    def __call__(self) -> int:
        interval = float(self.ctx.config["gc"]["interval_s"])
        if interval <= 0:
            return 0
        now = self.clock()
        if not self.unfinished and self.last is not None and now - self.last < interval:
            return 0
        if not self.unfinished:
            # Set before running: a run that fails is tried again after the interval, not every round.
            self.last = now
        self.unfinished = True
        counts = collect(self.ctx.factory, self.ctx.config, actor=SERVICE_ACTOR, max_batches=BATCHES_PER_ROUND)
        self.unfinished = not counts.complete
        return counts.total

    def close(self) -> None:
        return None
