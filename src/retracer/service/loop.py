"""`retracer serve`: the loop that applies events from the bus and runs the chores between batches.

One loop per process. The bus's consumer feeds it: the embedded inbox is drained batch by batch, RabbitMQ's
deliveries come in batches that are acknowledged only after their commit. Either way a batch is applied in
one transaction (apply.runner); with RabbitMQ and PostgreSQL, by default, in parts by job across apply
workers (apply.pool), one transaction each, acknowledged once all have committed. Between batches, and at
least every poll_interval_s, the registered chores run, each in its own short transaction. Subscribers to
the hooks (service.hooks) see every batch, chore and mail round.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from types import FrameType

from sqlalchemy.orm import Session, sessionmaker

from retracer.apply.applier import Applier, Outcome
from retracer.apply.pool import ApplyPool, InFlight
from retracer.apply.runner import Runner, unavailable
from retracer.bus.base import Bus, Consumer, Pending
from retracer.bus.connect import open_bus
from retracer.config import Config
from retracer.service.chores import Chore, ChoreContext, registered
from retracer.service.hooks import HookList, Hooks
from retracer.service.stats import Stats

log = logging.getLogger("retracer.serve")


class Service:
    """The long-running service of one process."""

    def __init__(self, config: Config, factory: sessionmaker[Session], bus: Bus | None = None,
                 hooks: Sequence[Hooks] = ()) -> None:
        self.config = config
        self.factory = factory
        self.applier = Applier(config)
        self.runner = Runner(config, factory, self.applier)
        self.bus = bus or open_bus(config, factory)
        self.stats = Stats()
        self.hooks = HookList([self.stats, *hooks])
        self.stop_event = threading.Event()
        self.consumer: Consumer | None = None
        self.pool: ApplyPool | None = None
        context = ChoreContext(config, factory, self.applier, self.runner, self.bus, self.hooks)
        self.chores: list[tuple[str, Chore]] = [(name, make(context)) for name, make in registered()]

    # -- applying events --------------------------------------------------------------------------------

    def apply(self, bodies: Sequence[str | bytes], fresh: bool = False,
              job_ids: Sequence[int | None] | None = None) -> list[Outcome]:
        """Apply a batch in one transaction here (see Runner.apply), and tell the hooks."""
        self.hooks.before_batch(len(bodies))
        began = time.perf_counter()
        outcomes = self.runner.apply(bodies, fresh, job_ids)
        self.hooks.after_batch(outcomes, time.perf_counter() - began)
        return outcomes

    def drain_inbox(self) -> int:
        """Embedded bus: apply one batch from the inbox; its rows are deleted in the same transaction."""
        began = time.perf_counter()
        outcomes = self.runner.drain_inbox(self.config["service"]["batch_size"])
        if outcomes:
            self.hooks.after_batch(outcomes, time.perf_counter() - began)
        return len(outcomes)

    def apply_deliveries(self, bodies: Sequence[bytes], fresh: bool) -> Sequence[bool] | Pending:
        """A broker's batch: True per delivery to acknowledge, False to dead-letter (kept as rejected); handed to
        the apply workers when there are some, in which case the verdicts come when they have committed."""
        pool = self._apply_pool()
        if pool is not None:
            self.hooks.before_batch(len(bodies))
            return _Verdicts(pool.submit(bodies, fresh), self.hooks, time.perf_counter())
        return [o.status != "rejected" for o in self.apply(bodies, fresh)]

    def _apply_pool(self) -> ApplyPool | None:
        """The apply workers (started once), or None to apply here (one worker asked for, or a SQLite database,
        which takes one writer at a time)."""
        size = self.config["service"]["apply_workers"]
        if size < 2 or self.factory.kw["bind"].dialect.name != "postgresql":
            return None
        if self.pool is None:
            self.pool = ApplyPool(self.config, self.factory, size)
        return self.pool

    # -- chores ------------------------------------------------------------------------------------------

    def run_chores(self) -> int:
        """Run every chore once, in order; one that fails is logged and runs again next round."""
        done = 0
        for name, chore in self.chores:
            if self.stop_event.is_set():
                break
            self.hooks.before_chore(name)
            began = time.perf_counter()
            try:
                n = chore()
            except Exception as exc:
                if unavailable(exc):
                    # Not a bug: one line, no traceback. The chore runs again at the next round, and the
                    # apply path stops serve if the database stays away.
                    log.error("chore failed: the database cannot be used; it runs again at the next round",
                              extra={"chore": name, "error": str(getattr(exc, "orig", exc)).strip()[:300]})
                else:
                    log.exception("chore failed; it runs again at the next round", extra={"chore": name})
                continue
            self.hooks.after_chore(name, n, time.perf_counter() - began)
            if n:
                log.info("chore", extra={"chore": name, "count": n})
            done += n
        return done

    # -- running -----------------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            log.info("stopping: finishing the batch in hand", extra={"signal": signal.Signals(signum).name})
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def stop(self) -> None:
        self.stop_event.set()
        if self.consumer is not None:
            self.consumer.stop()

    def run(self, until_idle: bool = False) -> Stats:
        """Serve until stopped (or, with ``until_idle``, until no event is queued and a round of chores did
        nothing: the consumer of each bus decides, from the inbox table or the broker's queue)."""
        log.info("serving", extra={"bus": self.bus.name,
                                   "database": self.factory.kw["bind"].url.render_as_string(hide_password=True)})
        try:
            self.consumer = self.bus.consumer()
            if self.bus.delivers:
                self._apply_pool()  # started before the first delivery, not in the middle of its batch
            if not self.stop_event.is_set():
                self.consumer.run(self, until_idle)
        finally:
            if self.pool is not None:
                self.pool.close()
            for _, chore in self.chores:
                chore.close()
            self.hooks.after_stop()
        log.info("stopped", extra=self.stats.as_dict())
        return self.stats


class _Verdicts:
    """The consumer's view of a batch the apply workers have (bus.base.Pending)."""

    def __init__(self, in_flight: InFlight, hooks: Hooks, began: float) -> None:
        self.in_flight = in_flight
        self.hooks = hooks
        self.began = began

    def result(self) -> list[bool]:
        outcomes = self.in_flight.result()
        self.hooks.after_batch(outcomes, time.perf_counter() - self.began)
        return [o.status != "rejected" for o in outcomes]
