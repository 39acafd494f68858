"""An in-memory bus for tests: what is published is kept in a list, what a test queues is consumed in batches.

It runs the service's real consume path (batches, verdicts, chores) with no broker and no database table.
Nothing survives the process, so it proves nothing about durability: the real buses' tests do that.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from retracer.bus.base import Consumer, Publisher, Sink


@dataclass
class Message:
    """One published message."""

    routing_key: str
    body: str
    message_id: str


@dataclass
class StubBus:
    """The bus: ``queue(body, ...)`` events for the service, read ``published`` for what it sent."""

    batch_size: int = 500
    name: str = "stub"
    relays_outbox: bool = True
    delivers: bool = True
    queued: deque[bytes] = field(default_factory=deque)
    published: list[Message] = field(default_factory=list)
    acked: int = 0
    rejected: int = 0

    def queue(self, *bodies: str | bytes) -> None:
        """Queue event bodies as a broker would deliver them."""
        self.queued.extend(b if isinstance(b, bytes) else b.encode() for b in bodies)

    def consumer(self) -> Consumer:
        return _StubConsumer(self)

    def publisher(self) -> Publisher:
        return _StubPublisher(self)

    def describe(self) -> str:
        return "in-memory stub bus"


class _StubPublisher:
    def __init__(self, bus: StubBus) -> None:
        self.bus = bus

    def publish(self, routing_key: str, body: str, message_id: str) -> None:
        self.bus.published.append(Message(routing_key, body, message_id))

    def publish_all(self, messages: Sequence[tuple[str, str, str]]) -> None:
        for message in messages:
            self.publish(*message)

    def close(self) -> None:
        return None


class _StubConsumer:
    def __init__(self, bus: StubBus) -> None:
        self.bus = bus
        self.stopping = False

    def run(self, sink: Sink, until_idle: bool) -> None:
        while not (self.stopping or sink.stop_event.is_set()):
            batch = [self.bus.queued.popleft() for _ in range(min(self.bus.batch_size, len(self.bus.queued)))]
            if batch:
                verdicts = sink.apply_deliveries(batch, True)
                settled: Sequence[bool] = verdicts if isinstance(verdicts, Sequence) else verdicts.result()
                self.bus.acked += sum(1 for ok in settled if ok)
                self.bus.rejected += sum(1 for ok in settled if not ok)
            busy = sink.run_chores() > 0 or bool(batch)
            if until_idle and not busy and not self.bus.queued:
                return
            if not batch:
                sink.stop_event.wait(0.01)

    def stop(self) -> None:
        self.stopping = True
