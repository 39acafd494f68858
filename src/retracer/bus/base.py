"""What every bus is: a consumer that hands the service batches of raw event bodies, and a publisher that takes
messages. The service depends on these protocols alone; the embedded inbox, RabbitMQ and the in-memory stub
implement them."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol


class Pending(Protocol):
    """A batch being applied elsewhere (the apply workers): ``result()`` waits and gives the verdicts, or
    raises if the batch could not be committed."""

    def result(self) -> Sequence[bool]: ...


class Sink(Protocol):
    """What a consumer hands its batches to (the service).

    A broker's consumer calls ``apply_deliveries`` and acknowledges a delivery only once it has a verdict for
    it (True: applied or kept as rejected, ack; False: rejected, dead-letter). A consumer whose queue is a
    table of the job database calls ``drain_inbox``, which applies a batch and removes it in one transaction.
    Between batches, and at least every poll interval, it calls ``run_chores``.
    """

    stop_event: threading.Event

    def apply_deliveries(self, bodies: Sequence[bytes], fresh: bool) -> Sequence[bool] | Pending: ...

    def drain_inbox(self) -> int: ...

    def run_chores(self) -> int: ...


class Consumer(Protocol):
    """Feeds a sink until stopped (or, with ``until_idle``, until there is nothing left, where it can tell)."""

    def run(self, sink: Sink, until_idle: bool) -> None: ...

    def stop(self) -> None: ...


class Publisher(Protocol):
    """Sends one message (an event, or a work request for workers) and returns once the bus holds it."""

    def publish(self, routing_key: str, body: str, message_id: str) -> None: ...

    def publish_all(self, messages: Sequence[tuple[str, str, str]]) -> None:
        """Send (routing key, body, message id) messages in order; where the bus can, all or none."""

    def close(self) -> None: ...


class Bus(Protocol):
    """One installation's bus."""

    #: A short name for logs and messages ("embedded", "rabbitmq", "stub").
    name: str
    #: Whether work requests written to the outbox must be relayed to this bus; False when the workers read
    #: them from the outbox table itself (the embedded bus).
    relays_outbox: bool
    #: Whether its consumer hands batches of deliveries to ``Sink.apply_deliveries`` (a broker) rather than
    #: draining a table of the job database with ``Sink.drain_inbox``.
    delivers: bool

    def consumer(self) -> Consumer: ...

    def publisher(self) -> Publisher: ...

    def describe(self) -> str: ...
