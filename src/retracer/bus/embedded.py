"""The embedded bus: an inbox table in the job database (the default: nothing to start).

Publishers append rows in their own transaction; `serve` takes a batch, applies it and deletes the rows in
one transaction. Durable across kill -9 and shared by any number of processes, because it is the same
database (SQLite serialises writers with BEGIN IMMEDIATE; PostgreSQL an advisory lock). kombu's broker-less
transports were measured losing messages on kill -9 (they keep unacknowledged messages in process memory),
which is why none is used here. Workers take their requests from the outbox table (``take_work``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from retracer.bus.base import Consumer, Publisher, Sink
from retracer.config import Config
from retracer.events import WORK_REQUEST
from retracer.store.models import Inbox, Job, Outbox, utcnow
from retracer.workflow import load_spec


def append(session: Session, bodies: Iterable[str]) -> int:
    """Queue event bodies for `serve` (validated by the caller)."""
    rows = [Inbox(body=b) for b in bodies]
    session.add_all(rows)
    return len(rows)


INBOX_LOCK_KEY = 0x7265_7469  # one advisory lock id for draining the inbox on PostgreSQL


def take(session: Session, limit: int) -> list[Any]:
    """The oldest queued events (rows of ``seq`` and ``body``), for this transaction alone.

    Batches are taken one process at a time (BEGIN IMMEDIATE on SQLite, an advisory lock on PostgreSQL) so
    that the events of one job are applied in the order they were published, whichever `serve` runs them.
    Plain rows, not ORM objects: they are read once and deleted (~10% of the embedded apply path as objects).
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": INBOX_LOCK_KEY})
    return list(session.execute(select(Inbox.seq, Inbox.body).order_by(Inbox.seq).limit(limit)))


def done(session: Session, rows: Sequence[Any]) -> None:
    if rows:
        # The list, not seq <= the largest: on PostgreSQL a smaller seq can commit after this batch was taken.
        # No session synchronisation: nothing of the inbox is in the session.
        session.execute(delete(Inbox).where(Inbox.seq.in_([r.seq for r in rows]))
                        .execution_options(synchronize_session=False))


def pending_count(session: Session) -> int:
    """How many events wait in the inbox."""
    return int(session.scalar(select(func.count()).select_from(Inbox)) or 0)


def take_work(session: Session, limit: int, now: datetime | None = None) -> list[dict[str, Any]]:
    """Work requests for a worker in the embedded mode: unsent outbox rows, marked sent as they are taken.

    A request goes stale when its job left PENDING before a worker took it (held, say) or was offered
    again; stale requests are marked sent and not handed out, so no two workers get the same job.
    """
    rows = list(session.scalars(
        select(Outbox).where(Outbox.routing_key == WORK_REQUEST, Outbox.sent_at.is_(None))
        .order_by(Outbox.id).limit(max(limit * 10, 100)).with_for_update(skip_locked=True)))
    if not rows:
        return []
    bodies = [json.loads(r.body) for r in rows]
    newest = {b["job"]: r.id for r, b in zip(rows, bodies, strict=True)}
    states = {i: s for i, s in session.execute(select(Job.id, Job.state).where(Job.id.in_(newest)))}
    queue = load_spec().roles.queue
    handed: list[dict[str, Any]] = []
    done_ids: list[int] = []
    for row, body in zip(rows, bodies, strict=True):
        if len(handed) == limit:
            break
        done_ids.append(row.id)
        if newest[body["job"]] == row.id and states.get(body["job"]) == queue:
            handed.append(body)
    session.execute(update(Outbox).where(Outbox.id.in_(done_ids)).values(sent_at=now or utcnow()))
    return handed


class EmbeddedBus:
    """The inbox table as a bus: `retracer publish` appends to it, `serve` drains it."""

    name = "embedded"
    relays_outbox = False  # workers take their requests from the outbox itself (`retracer work take`)
    delivers = False

    def __init__(self, config: Config, factory: sessionmaker[Session]) -> None:
        self.config = config
        self.factory = factory

    def consumer(self) -> Consumer:
        return _InboxConsumer(self.config["service"]["poll_interval_s"])

    def publisher(self) -> Publisher:
        return _InboxPublisher(self.factory)

    def describe(self) -> str:
        return "the embedded inbox"


class _InboxPublisher:
    def __init__(self, factory: sessionmaker[Session]) -> None:
        self.factory = factory

    def publish(self, routing_key: str, body: str, message_id: str) -> None:
        self.publish_all([(routing_key, body, message_id)])

    def publish_all(self, messages: Sequence[tuple[str, str, str]]) -> None:
        with self.factory() as session, session.begin():  # one transaction: all of them or none
            append(session, [body for _, body, _ in messages])

    def close(self) -> None:
        return None


class _InboxConsumer:
    """Drains the inbox batch by batch, running the chores when it is empty and at least every poll interval."""

    def __init__(self, poll_interval_s: float) -> None:
        self.poll = poll_interval_s

    def run(self, sink: Sink, until_idle: bool) -> None:
        last_chores = 0.0
        while not sink.stop_event.is_set():
            n = sink.drain_inbox()
            now = time.monotonic()
            busy = n > 0
            if not n or now - last_chores >= self.poll:
                busy = sink.run_chores() > 0 or busy
                last_chores = now
            if until_idle and not busy:
                return
            if not n:
                sink.stop_event.wait(min(self.poll, 0.1))

    def stop(self) -> None:
        return None  # the loop watches the sink's stop event
