"""The transaction runner: a batch of events applied in one transaction, again after a conflict with another
writer, and event by event when one of them breaks the batch.

Shared by `serve` (both buses), its apply workers and the commands that apply events themselves
(`retracer process-upload`). It never raises for a bad event: an event that cannot be applied even alone is
kept in `rejected` with the error. An unusable database raises, so that nothing is acknowledged for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from retracer.apply.applier import Applier, Outcome
from retracer.bus import embedded
from retracer.config import Config
from retracer.errors import RetracerError
from retracer.testing import faults

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


class Runner:
    """Applies batches of event bodies for one process, each in its own transaction."""

    def __init__(self, config: Config, factory: sessionmaker[Session], applier: Applier | None = None) -> None:
        self.config = config
        self.factory = factory
        self.applier = applier or Applier(config)
        self._last_failure: BaseException | None = None

    def apply(self, bodies: Sequence[str | bytes], fresh: bool = False,
              job_ids: Sequence[int | None] | None = None, minted: bool = False) -> list[Outcome]:
        """Apply a batch in one transaction, retrying on conflicts; never raises for a bad event.

        ``fresh``: the broker delivers these for the first time, so they are most likely new; the batch is
        first applied without looking up their processed-event markers (a SELECT of ~4 ms a batch on
        PostgreSQL). An event applied before still cannot take effect twice: its marker's primary key
        fails the insert, the transaction rolls back, and the batch is applied again with the lookup.
        ``job_ids``, ``minted``: see Applier.apply_batch.
        """
        outcomes = None
        if fresh:
            outcomes = self._retrying(lambda session: self.applier.apply_batch(
                session, list(bodies), unseen=True, job_ids=job_ids, minted=minted), tentative=True)
        if outcomes is None:
            outcomes = self._retrying(lambda session: self.applier.apply_batch(
                session, list(bodies), job_ids=job_ids, minted=minted))
        if outcomes is None:  # one event breaks the batch: apply them one at a time to isolate it
            outcomes = []
            for i, body in enumerate(bodies):
                outcomes += (self._retrying(_one(self.applier, body, job_ids[i] if job_ids else None, minted),
                                            quiet=True)
                             or self._keep_rejected([body], minted))
        return outcomes

    def drain_inbox(self, size: int) -> list[Outcome]:
        """Embedded bus: apply one batch from the inbox; its rows are deleted in the same transaction."""
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
        return outcomes

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

    def _keep_rejected(self, bodies: list[str | bytes] | None, minted: bool = False) -> list[Outcome]:
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
            return [self.applier.reject(session, body, None, f"internal error: {exc!r}", minted=minted)
                    for body in found]


def _one(applier: Applier, body: str | bytes, job_id: int | None,
         minted: bool) -> Callable[[Session], list[Outcome]]:
    return lambda session: applier.apply_batch(session, [body], job_ids=[job_id] if job_id else None,
                                               minted=minted)
