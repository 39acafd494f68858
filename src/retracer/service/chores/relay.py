"""The outbox relay: messages written with a transition (work requests) are published once committed.

Unsent rows are taken with SKIP LOCKED, so several services never publish the same row; a row is marked sent
in the transaction that published it. On a bus whose workers read the outbox itself (the embedded one)
there is nothing to relay.
"""

from __future__ import annotations

from sqlalchemy import select, update

from retracer.bus.base import Publisher
from retracer.service.chores.registry import ChoreContext
from retracer.store.models import Outbox, utcnow


class Relay:
    """Publishes unsent outbox rows over one publisher, kept between rounds."""

    def __init__(self, ctx: ChoreContext) -> None:
        self.ctx = ctx
        self.publisher: Publisher | None = None

    def __call__(self) -> int:
        if not self.ctx.bus.relays_outbox:
            return 0
        if self.publisher is None:
            self.publisher = self.ctx.bus.publisher()
        n = 0
        with self.ctx.factory() as session, session.begin():
            rows = list(session.scalars(select(Outbox).where(Outbox.sent_at.is_(None)).order_by(Outbox.id)
                                        .limit(500).with_for_update(skip_locked=True)))
            for row in rows:
                self.publisher.publish(row.routing_key, row.body, row.message_id)
                n += 1
            if rows:
                session.execute(update(Outbox).where(Outbox.id.in_([r.id for r in rows])).values(sent_at=utcnow()))
        return n

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()


