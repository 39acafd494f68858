"""`retracer serve`: applies events, dispatches work, watches heartbeats, relays the outbox.

One loop per process. In the embedded mode it drains the inbox table; in RabbitMQ mode a BatchConsumer
feeds it. Either way a batch of events is applied in one transaction and acknowledged only after the
commit; with PostgreSQL, by default, in parts by job across apply workers (parallel.py), one transaction
each, acknowledged once all have committed. Between batches (and at least every poll_interval_s) the chores
run: the heartbeat watchdog, the dispatcher, the upload spool, the outbox relay and mail delivery, each in its
own short transaction.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from retracer.apply.applier import Applier, Outcome
from retracer.bus import embedded
from retracer.config import Config
from retracer.errors import RetracerError
from retracer.service.chores import dispatch
from retracer.store.models import Outbox, utcnow
from retracer.testing import faults
from retracer.uploads import intake as uploads

if TYPE_CHECKING:  # parallel.py imports this module: at run time it is imported where a pool is built
    from retracer.apply.pool import ApplyPool, InFlight

log = logging.getLogger("retracer.serve")

# Conflicts another process can cause (two consumers applying one redelivered event, a job updated by
# an admin at the same moment, SQLite busy): the batch is rolled back and applied again, and the markers
# sort it out.
RETRYABLE = (IntegrityError, StaleDataError, OperationalError)
MAX_BATCH_RETRIES = 5


def unavailable(exc: BaseException) -> bool:
    """The database itself is gone or refuses writes (not this batch's fault): nothing may be rejected for it.

    Such an error leaves `serve` (with a clear message) before anything is acknowledged, so the events are
    delivered again once the database is back, instead of being kept as rejected.
    """
    if isinstance(exc, InterfaceError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
        return True
    return isinstance(exc, OperationalError) and not _busy(exc)


def _busy(exc: OperationalError) -> bool:
    text = str(exc.orig).lower()
    return "database is locked" in text or "deadlock" in text or "could not serialize" in text


@dataclass
class Stats:
    """Counters a running service keeps (and prints on shutdown)."""

    applied: int = 0
    duplicate: int = 0
    rejected: int = 0
    batches: int = 0
    dispatched: int = 0
    relayed: int = 0
    timeouts: int = 0
    chores: dict[str, int] = field(default_factory=dict)

    def count(self, outcomes: Sequence[Outcome]) -> None:
        if outcomes:
            self.batches += 1
        for o in outcomes:
            setattr(self, o.status, getattr(self, o.status) + 1)


Chore = Callable[[], int]


def _one(applier: Applier, body: str | bytes, job_id: int | None) -> Callable[[Session], list[Outcome]]:
    return lambda session: applier.apply_batch(session, [body], job_ids=[job_id] if job_id else None)


class Service:
    """The long-running service of one process."""

    def __init__(self, config: Config, factory: sessionmaker[Session]) -> None:
        self.config = config
        self.factory = factory
        self.applier = Applier(config)
        self.stats = Stats()
        self.stop_event = threading.Event()
        self.publisher: Any = None
        self.consumer: Any = None
        self.chores: list[tuple[str, Chore]] = [
            ("uploads", self.uploads), ("watchdog", self.watchdog), ("dispatch", self.dispatch),
            ("relay", self.relay), ("mail", self.mail),
        ]
        self.sender: Any = None
        self._last_failure: BaseException | None = None

    # -- applying events --------------------------------------------------------------------------------

    def apply(self, bodies: Sequence[str | bytes], fresh: bool = False,
              job_ids: Sequence[int | None] | None = None) -> list[Outcome]:
        """Apply a batch in one transaction, retrying on conflicts; never raises for a bad event.

        ``fresh``: the broker delivers these for the first time, so they are most likely new; the batch is
        first applied without looking up their processed-event markers (a SELECT of ~4 ms a batch on
        PostgreSQL). An event applied before still cannot take effect twice: its marker's primary key
        fails the insert, the transaction rolls back, and the batch is applied again with the lookup.
        ``job_ids``: see Applier.apply_batch.
        """
        outcomes = None
        if fresh:
            outcomes = self._retrying(lambda session: self.applier.apply_batch(session, list(bodies), unseen=True,
                                                                               job_ids=job_ids), tentative=True)
        if outcomes is None:
            outcomes = self._retrying(lambda session: self.applier.apply_batch(session, list(bodies),
                                                                               job_ids=job_ids))
        if outcomes is None:  # one event breaks the batch: apply them one at a time to isolate it
            outcomes = []
            for i, body in enumerate(bodies):
                outcomes += (self._retrying(_one(self.applier, body, job_ids[i] if job_ids else None), quiet=True)
                             or self._keep_rejected([body]))
        self.stats.count(outcomes)
        return outcomes

    def drain_inbox(self) -> int:
        """Embedded mode: apply one batch from the inbox; its rows are deleted in the same transaction."""
        size = self.config["service"]["batch_size"]
        outcomes = self._retrying(lambda session: self._drain(session, size))
        if outcomes is None:  # one row breaks the batch: take them one at a time to isolate it
            outcomes = []
            for _ in range(size):
                one = self._retrying(lambda session: self._drain(session, 1), quiet=True)
                if one is None:
                    one = self._keep_rejected(None)
                if not one:
                    break
                outcomes += one
        self.stats.count(outcomes)
        return len(outcomes)

    def _drain(self, session: Session, size: int) -> list[Outcome]:
        rows = embedded.take(session, size)
        outcomes = self.applier.apply_batch(session, [r.body for r in rows]) if rows else []
        embedded.done(session, rows)
        return outcomes

    def _retrying(self, work: Callable[[Session], list[Outcome]], quiet: bool = False,
                  tentative: bool = False) -> list[Outcome] | None:
        """Run ``work`` in one transaction, again after a conflict with another writer.

        Returns None when it failed for a reason of its own (a DataError from one hostile value, a bug),
        so the caller can isolate the event behind it; an unusable database raises instead, and `serve`
        leaves before anything is acknowledged. ``tentative``: one try, None on any failure but an
        unusable database, nothing logged (the caller has a careful way to do the same work).
        """
        for attempt in range(1 if tentative else MAX_BATCH_RETRIES):
            try:
                with self.factory() as session, session.begin():
                    outcomes = work(session)
                    faults.point("apply.before_commit")
                faults.point("apply.after_commit")
                return outcomes
            except RetracerError:
                raise
            except Exception as exc:
                if unavailable(exc):
                    raise
                if tentative:
                    return None
                if isinstance(exc, RETRYABLE) and attempt + 1 < MAX_BATCH_RETRIES:
                    log.warning("batch conflict, retrying", extra={"attempt": attempt + 1, "error": str(exc)[:300]})
                    time.sleep(0.01 * (attempt + 1))
                    continue
                if isinstance(exc, OperationalError):
                    raise  # still busy after every retry: the database's problem, never the event's
                self._last_failure = exc
                if not quiet:
                    log.exception("batch failed; applying its events one by one")
                return None
        return None

    def _keep_rejected(self, bodies: list[str | bytes] | None) -> list[Outcome]:
        """An event that cannot be applied even alone is kept, with the error, for an admin to look at.

        ``bodies`` is the event from the broker; None takes the next inbox row, removed in the same
        transaction as its rejection is kept.
        """
        exc = self._last_failure
        log.error("event failed; keeping it as rejected", exc_info=exc)
        with self.factory() as session, session.begin():
            rows = embedded.take(session, 1) if bodies is None else []
            embedded.done(session, rows)
            found = bodies if bodies is not None else [r.body for r in rows]
            return [self.applier.reject(session, body, None, f"internal error: {exc!r}") for body in found]

    # -- chores ------------------------------------------------------------------------------------------

    def watchdog(self) -> int:
        """RETRACING jobs with a stale heartbeat get a transient failure (back to PENDING or ON_HOLD)."""
        n = 0
        with self.factory() as session, session.begin():
            policy = None
            for job in dispatch.stale_jobs(session, self.config):
                policy = policy or self.applier.policy(session)
                silent = round((utcnow() - job.last_heartbeat).total_seconds(), 1) if job.last_heartbeat else None
                error = f"no heartbeat from worker {job.worker or '?'} for {silent}s " \
                        f"(timeout {self.config['service']['heartbeat_timeout_s']}s)"
                # The version makes the id unique per stale episode, so two services cannot both fire it.
                self.applier.fire(session, job.id, self.applier.workflow.roles.watchdog, by="service:watchdog",
                                  data={"error": error, "transient": True},
                                  event_id=f"watchdog:{job.id}:{job.version_id}", policy=policy)
                n += 1
        self.stats.timeouts += n
        return n

    def uploads(self) -> int:
        """Process the spool's complete uploads into upload.accepted / upload.failed events."""
        return len(uploads.process_incoming(self.config, self.factory, self.apply))

    def dispatch(self) -> int:
        with self.factory() as session, session.begin():
            n = len(dispatch.dispatch(session, self.config))
        self.stats.dispatched += n
        return n

    def relay(self) -> int:
        """RabbitMQ mode: publish unsent outbox rows, then mark them sent (SKIP LOCKED: one publisher per row)."""
        if self.config.embedded_bus:
            return 0  # embedded workers take their requests from the outbox itself (`retracer work take`)
        if self.publisher is None:
            from retracer.bus.amqp import Publisher

            self.publisher = Publisher(self.config)
        n = 0
        with self.factory() as session, session.begin():
            rows = list(session.scalars(select(Outbox).where(Outbox.sent_at.is_(None)).order_by(Outbox.id)
                                        .limit(500).with_for_update(skip_locked=True)))
            for row in rows:
                self.publisher.publish(row.routing_key, row.body, row.message_id)
                n += 1
            if rows:
                session.execute(update(Outbox).where(Outbox.id.in_([r.id for r in rows])).values(sent_at=utcnow()))
        self.stats.relayed += n
        return n

    def mail(self) -> int:
        """Deliver due mails over the sender's reused connections (kept between rounds)."""
        if self.sender is None:
            from retracer.mail.sender import Sender

            self.sender = Sender(self.factory, self.config)
        report = self.sender.deliver_pending()
        return int(report.sent + report.digests)

    def run_chores(self) -> int:
        done = 0
        for name, chore in self.chores:
            if self.stop_event.is_set():
                break
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
            if n:
                self.stats.chores[name] = self.stats.chores.get(name, 0) + n
                log.info("chore", extra={"chore": name, "count": n})
            done += n
        return done

    # -- loops -------------------------------------------------------------------------------------------

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
        """Serve until stopped (or, with ``until_idle``, until there is nothing left to do)."""
        log.info("serving", extra={"bus": "embedded" if self.config.embedded_bus else "rabbitmq",
                                   "database": self.factory.kw["bind"].url.render_as_string(hide_password=True)})
        try:
            if self.config.embedded_bus:
                self._run_embedded(until_idle)
            else:
                self._run_amqp()
        finally:
            if self.publisher is not None:
                self.publisher.close()
            if self.sender is not None:
                self.sender.close()
        log.info("stopped", extra={k: v for k, v in self.stats.__dict__.items()})
        return self.stats

    def _run_embedded(self, until_idle: bool) -> None:
        poll = self.config["service"]["poll_interval_s"]
        last_chores = 0.0
        while not self.stop_event.is_set():
            n = self.drain_inbox()
            now = time.monotonic()
            busy = n > 0
            if not n or now - last_chores >= poll:
                busy = self.run_chores() > 0 or busy
                last_chores = now
            if until_idle and not busy:
                return
            if not n:
                self.stop_event.wait(min(poll, 0.1))

    def _run_amqp(self) -> None:
        from retracer.bus.amqp import BatchConsumer

        pool = self._apply_pool()

        def handle(bodies: Sequence[bytes], fresh: bool) -> list[bool] | _Verdicts:
            if pool is not None:
                return _Verdicts(pool.submit(bodies, fresh), self.stats)
            return [o.status != "rejected" for o in self.apply(bodies, fresh)]

        try:
            self.consumer = BatchConsumer(self.config, handle, idle=self.run_chores)
            if self.stop_event.is_set():
                return
            self.consumer.run_until_stopped()
        finally:
            if pool is not None:
                pool.close()

    def _apply_pool(self) -> ApplyPool | None:
        """Worker processes for the batches (parallel.py), or None to apply here (one worker asked for, or a
        SQLite database, which takes one writer at a time)."""
        size = self.config["service"]["apply_workers"]
        if size < 2 or self.factory.kw["bind"].dialect.name != "postgresql":
            return None
        from retracer.apply.pool import ApplyPool

        return ApplyPool(self.config, self.factory, size)


class _Verdicts:
    """The consumer's view of a batch the apply workers have (bus.amqp.Pending)."""

    def __init__(self, in_flight: InFlight, stats: Stats) -> None:
        self.in_flight = in_flight
        self.stats = stats

    def result(self) -> list[bool]:
        outcomes = self.in_flight.result()
        self.stats.count(outcomes)
        return [o.status != "rejected" for o in outcomes]
