"""RabbitMQ mode: kombu over py-amqp.

Topology (names from the [broker] config; defaults shown):
  exchange ``retracer`` (topic, durable)
    -> queue ``retracer.events`` (classic by default, durable, single active consumer), bound to the event types;
       rejected events go to
       exchange ``retracer.dlx`` -> queue ``retracer.events.dead``
    -> queue ``retracer.work``, bound to ``retrace.requested`` (the workers' queue)

Events are consumed in batches: each batch is applied and committed in one transaction, and only then
acknowledged (one multiple-ack). A kill between commit and ack redelivers the batch, and the
processed-event markers make the replay a no-op. ConsumerMixin reconnects after a broker restart (a plain
Consumer does not: measured, with the broker down 10 s). Publishing waits for publisher confirms and retries a
bounded number of times (``retry=True`` alone retries forever).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any, NoReturn

from amqp.exceptions import AccessRefused, NotFound
from kombu.connection import Connection
from kombu.entity import Exchange, Queue, binding
from kombu.messaging import Consumer
from kombu.mixins import ConsumerMixin

from retracer.bus import base
from retracer.bus.base import Pending, Sink
from retracer.config import Config
from retracer.errors import BrokerError
from retracer.events import TYPES, WORK_REQUEST
from retracer.testing import faults

log = logging.getLogger("retracer.amqp")


class Topology:
    """The exchanges and queues of one retracer installation, declared idempotently."""

    def __init__(self, config: Config) -> None:
        b = config["broker"]
        self.exchange = Exchange(b["exchange"], type="topic", durable=True)
        self.dlx = Exchange(b["dead_letter_exchange"], type="fanout", durable=True)
        # Single active consumer: events of one job must be applied in the order they were published, so
        # one `serve` consumes at a time and the others stand by to take over; throughput comes from
        # applying each batch in one transaction, not from competing consumers.
        args: dict[str, Any] = {"x-dead-letter-exchange": b["dead_letter_exchange"],
                                "x-single-active-consumer": True}
        if b["queue_type"] == "quorum":
            args["x-queue-type"] = "quorum"
        self.events = Queue(b["queue"], bindings=[binding(self.exchange, routing_key=t) for t in TYPES],
                            durable=True, queue_arguments=args)
        self.dead = Queue(b["dead_letter_queue"], exchange=self.dlx, routing_key="#", durable=True)
        self.work = Queue(b["work_queue"], exchange=self.exchange, routing_key=WORK_REQUEST, durable=True,
                          queue_arguments={"x-queue-type": "quorum"} if b["queue_type"] == "quorum" else None)

    def declare(self, connection: Connection) -> None:
        channel = connection.default_channel
        for entity in (self.exchange, self.dlx, self.events, self.dead, self.work):
            entity.bind(channel).declare()

    def delete(self, connection: Connection) -> None:
        """Remove the queues (with their messages) and exchanges: an installation taken down, a test's or a
        benchmark's own names cleaned up."""
        channel = connection.channel()
        for queue in (self.events, self.work, self.dead):
            channel.queue_delete(queue.name)
        for exchange in (self.exchange, self.dlx):
            channel.exchange_delete(exchange.name)


def connect(config: Config) -> Connection:
    return Connection(config.broker_url, transport_options={"confirm_publish": True},
                      heartbeat=30, connect_timeout=10)


class Publisher:
    """Publishes JSON bodies persistently, waiting for the broker's confirm; bounded retries."""

    def __init__(self, config: Config, connection: Connection | None = None) -> None:
        self.config = config
        self.topology = Topology(config)
        self.connection = connection or connect(config)
        self._owns = connection is None
        self._declared = False
        self._producer: Any = None

    def publish(self, routing_key: str, body: str, message_id: str) -> None:
        retries = self.config["broker"]["publish_retries"]
        try:
            if not self._declared:
                self.connection.ensure_connection(max_retries=retries)
                self._ensure_topology()
                self._declared = True
            if self._producer is None:
                self._producer = self.connection.Producer(serializer="json")
            self._producer.publish(
                body, exchange=self.topology.exchange, routing_key=routing_key, delivery_mode=2,
                content_type="application/json", content_encoding="utf-8", message_id=message_id,
                retry=True, retry_policy={"max_retries": retries, "interval_start": 0.2,
                                          "interval_step": 0.5, "interval_max": 3},
                declare=[],
            )
        except self.connection.connection_errors + self.connection.channel_errors as exc:
            self._producer = None
            raise BrokerError(f"could not publish {routing_key} {message_id} to "
                              f"{self.connection.as_uri()}: {exc}") from None

    def _ensure_topology(self) -> None:
        """Declare the exchanges and queues only if one is missing.

        A passive declare needs no permission, so a publisher whose broker user may only write its own event
        types (README, "Who may publish what") publishes once `serve` has declared the topology; declaring it
        again would need the configure permission that lets a user delete the events queue.
        """
        channel = self.connection.channel()
        try:
            channel.exchange_declare(self.topology.exchange.name, "topic", passive=True)
            for queue in (self.topology.events, self.topology.work):
                channel.queue_declare(queue.name, passive=True)
        except NotFound:
            try:
                self.topology.declare(self.connection)
            except AccessRefused as exc:
                raise BrokerError(f"the exchange and queues are not declared yet, and this broker user may not "
                                  f"declare them ({exc}); start `retracer serve` once with its user") from None
            return
        channel.close()

    def publish_all(self, messages: Sequence[tuple[str, str, str]]) -> None:
        """Each message confirmed before the next is sent (a broker has no transaction across them)."""
        for message in messages:
            self.publish(*message)

    def close(self) -> None:
        if self._owns:
            self.connection.release()


#: (bodies, fresh: no delivery of the batch was ever delivered before) -> per body, ack (True) or reject
#: (False), now or once the Pending is settled
BatchHandler = Callable[[Sequence[bytes], bool], Sequence[bool] | Pending]


class RawConsumer(Consumer):
    """A kombu Consumer that hands ``on_message`` the broker's own message (py-amqp's: ``body``,
    ``delivery_tag``, ``channel``). kombu's wrapper copies properties and headers into a new object for
    every delivery, ~9 µs that nothing here reads (measured: 7% of `serve`'s time at 5,000 events/s)."""

    def _receive_callback(self, message: Any) -> None:
        if self.on_message is not None:  # always set: BatchConsumer gives it
            self.on_message(message)


class BatchConsumer(ConsumerMixin):
    """Collects deliveries into batches, hands each batch to ``handle`` and then acks it.

    ``handle`` applies and commits the batch and returns, per message, True to ack or False to reject it
    to the dead-letter exchange (an event the service kept in `rejected`). If ``handle`` raises, nothing is
    acked and the channel is recovered, so the batch is delivered again.

    ``handle`` may instead return a Pending (the batch handed to apply workers): the consumer goes on
    reading the next batch meanwhile, and settles the pending one (waits, acks) when the next batch is
    full, or when nothing more arrives for batch_wait_ms. One batch at most is pending, and it is settled
    before the next is handed over, so a batch is never applied before the one ahead of it has committed.
    """

    def __init__(self, config: Config, handle: BatchHandler, idle: Callable[[], object],
                 connection: Connection | None = None, until_idle: bool = False) -> None:
        self.config = config
        self.connection = connection or connect(config)
        self.topology = Topology(config)
        self.handle = handle
        self.idle = idle
        self.batch_size = config["service"]["batch_size"]
        self.batch_wait = config["service"]["batch_wait_ms"] / 1000
        self.idle_every = config["service"]["poll_interval_s"]
        self.buffer: list[Any] = []
        self.pending: tuple[list[Any], Pending] | None = None
        self.first_at = self.last_at = 0.0
        self.last_idle = 0.0
        self.until_idle = until_idle
        #: Since when nothing was delivered and a round of chores ended; infinite until the first round ends,
        #: because deliveries handed over while the chores ran are only drained after them.
        self.quiet_since = float("inf")
        self.stopping = False
        self.batches = 0
        self.failure: BaseException | None = None

    def get_consumers(self, consumer_cls: Any, channel: Any) -> list[Any]:
        self.topology.declare(self.connection)
        # on_message, not callbacks: kombu would decode every body only for the service to parse it again,
        # and a body it cannot decode must still reach the service to be kept as rejected.
        return [RawConsumer(channel, queues=[self.topology.events], on_message=self.on_message,
                            prefetch_count=self.config["broker"]["prefetch"], no_ack=False,
                            auto_declare=True)]  # type: ignore[no-untyped-call]

    def on_consume_ready(self, connection: Any, channel: Any, consumers: Any, **kwargs: Any) -> None:
        # Deliveries held from a lost channel cannot be acked any more; the broker redelivers them (a batch
        # still being applied is waited for, unacked: its replay is a duplicate).
        self.buffer = []
        self.quiet_since = float("inf")
        if self.pending is not None:
            pending = self.pending[1]
            self.pending = None
            try:
                pending.result()
            except Exception as exc:
                self._fail(exc)
        log.info("consuming", extra={"queue": self.topology.events.name, "broker": connection.as_uri()})

    def on_message(self, message: Any) -> None:
        if self.failure is not None:
            return  # left unacked: back to the broker, in order, with the channel (see _fail)
        self.last_at = self.quiet_since = time.monotonic()
        if not self.buffer:
            self.first_at = self.last_at
        self.buffer.append(message)
        if len(self.buffer) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.buffer or self.failure is not None:
            return
        self.settle()  # the batch ahead commits before this one is handed over
        batch, self.buffer = self.buffer, []
        try:
            verdicts = self.handle([m.body if isinstance(m.body, bytes) else str(m.body).encode() for m in batch],
                                   not any(m.delivery_info.get("redelivered") for m in batch))
        except BaseException as exc:
            self._fail(exc)
        if isinstance(verdicts, Sequence):
            self._ack(batch, verdicts)
        else:
            self.pending = (batch, verdicts)

    def settle(self) -> None:
        """Wait for the pending batch, if any, and ack it."""
        if self.pending is None:
            return
        batch, pending = self.pending
        self.pending = None
        try:
            verdicts = pending.result()
        except BaseException as exc:
            self._fail(exc)
        self._ack(batch, verdicts)

    def _fail(self, exc: BaseException) -> NoReturn:
        # Nothing more is acked on this channel (a later multiple-ack would cover this batch): the run ends and
        # the broker takes back every unacked delivery when the channel closes. Not requeued one by one: a
        # quorum queue puts a requeued message at its back (measured on RabbitMQ 3.10), behind later events of
        # the same job; the deliveries of a closed channel keep their place.
        self.failure = exc
        self.should_stop = True
        raise exc

    def _ack(self, batch: list[Any], verdicts: Sequence[bool]) -> None:
        self.batches += 1
        rejects = [m for m, ok in zip(batch, verdicts, strict=True) if not ok]
        for message in rejects:
            message.channel.basic_reject(message.delivery_tag, requeue=False)
        acks = [m for m, ok in zip(batch, verdicts, strict=True) if ok]
        if acks and not rejects:
            # One multiple-ack for the whole batch: the broker's round trips stay off the per-event path.
            acks[-1].channel.basic_ack(acks[-1].delivery_tag, multiple=True)
        else:
            for message in acks:
                message.channel.basic_ack(message.delivery_tag)
        faults.point("ack.after")

    def on_iteration(self) -> None:
        now = time.monotonic()
        if self.buffer and (self.stopping or now - self.first_at >= self.batch_wait):
            self.flush()
        if self.pending is not None and (self.stopping or now - self.last_at >= self.batch_wait):
            self.settle()  # nothing more is coming for now: no reason to hold its ack
        if self.stopping:
            self.should_stop = True
            return
        if now - self.last_idle >= self.idle_every:
            self.last_idle = now
            done = self.idle()
            if self.until_idle:
                if not done and self._quiet(time.monotonic()):
                    log.info("idle: the events queue stayed empty and the chores found nothing to do")
                    self.stopping = self.should_stop = True
                # Quiet is counted from the end of this round: what arrived meanwhile is drained after it.
                self.quiet_since = time.monotonic() if self.quiet_since == float("inf") else max(
                    self.quiet_since, time.monotonic())

    def _quiet(self, now: float) -> bool:
        """Nothing in hand, nothing delivered for a whole poll interval, and the broker holds no ready message
        (one published while the chores ran may not have been handed over yet)."""
        if self.buffer or self.pending is not None or now - self.quiet_since < self.idle_every:
            return False
        channel = self.connection.channel()
        try:
            _, ready, _ = channel.queue_declare(self.topology.events.name, passive=True)
        except self.connection.connection_errors + self.connection.channel_errors:
            return False  # the broker cannot say: not idle, the consumer's reconnection takes it from here
        finally:
            with suppress(Exception):
                channel.close()
        return int(ready) == 0

    def run_until_stopped(self) -> None:
        """Consume until stopped; a batch that could not be applied ends the run with its error."""
        self.run(safety_interval=self.batch_wait or 0.05)  # type: ignore[no-untyped-call]
        if self.failure is not None:
            raise self.failure

    def stop(self) -> None:
        """Finish the batch in hand, ack it, then leave the consume loop."""
        self.stopping = True


class AmqpBus:
    """RabbitMQ: events on the events queue, work requests relayed from the outbox to the work queue."""

    name = "rabbitmq"
    relays_outbox = True
    delivers = True

    def __init__(self, config: Config) -> None:
        self.config = config

    def consumer(self) -> base.Consumer:
        return _AmqpConsumer(self.config)

    def publisher(self) -> Publisher:
        return Publisher(self.config)

    def describe(self) -> str:
        return f"exchange {self.config['broker']['exchange']!r}"


class _AmqpConsumer:
    """The events queue's consumer for a sink; runs until stopped or, with ``until_idle``, until the queue
    has been empty for a poll interval and a round of chores did nothing (what the embedded inbox's
    consumer decides from the table)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.batches: BatchConsumer | None = None
        self.stopping = False

    def run(self, sink: Sink, until_idle: bool) -> None:
        self.batches = BatchConsumer(self.config, sink.apply_deliveries, idle=sink.run_chores,
                                     until_idle=until_idle)
        if self.stopping or sink.stop_event.is_set():
            return
        self.batches.run_until_stopped()

    def stop(self) -> None:
        self.stopping = True
        if self.batches is not None:
            self.batches.stop()
