"""Where a worker takes its work requests: the outbox table (embedded mode) or the broker's work queue.

A source hands out raw deliveries and settles each once the loop says so. On RabbitMQ settling is the
acknowledgement, sent only once the attempt's outcome is durable; a delivery never settled goes back to the
queue when the connection closes (a worker killed mid-attempt included), and the next worker gets it. The
embedded mode has no acknowledgement: ``take_work`` marks a request sent as it hands it out, and a request
whose worker vanished is recovered by the service (the dispatch timeout before ``retrace.started``, the
heartbeat watchdog after it).

A source is used from the loop's thread alone: a py-amqp connection is not thread-safe, so the attempts
publish through connections of their own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Protocol

from amqp.exceptions import NotFound
from kombu.connection import Connection
from kombu.exceptions import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from retracer.bus import embedded
from retracer.config import Config
from retracer.errors import BrokerError, RetracerError

#: How long the loop's thread blocks on the broker's socket at most, so that a finished attempt is acked and a
#: stop is noticed within this long.
PUMP_S = 0.2


@dataclass
class Delivery:
    """One work request as the source gave it: its body (bytes from a broker, a dict from the outbox) and
    what settles it (the broker's delivery tag)."""

    body: bytes | str | dict[str, Any]
    tag: Any = None


class Source(Protocol):
    """Work requests for the loop."""

    #: A short name for logs and the summary ("embedded", "rabbitmq").
    name: str

    def take(self, limit: int, wait: float) -> list[Delivery]:
        """Up to ``limit`` requests, waiting at most ``wait`` seconds for the first (0: look once)."""

    def settle(self, delivery: Delivery, done: bool) -> None:
        """``done``: the outcome is durable (acknowledge it); else the request is malformed (drop it, never
        redeliver it: it would come back forever)."""

    def idle(self, wait: float) -> None:
        """Nothing to take now: keep the connection alive for at most ``wait`` seconds (sooner if woken)."""

    def close(self) -> None:
        """Release the connection; what was taken and not settled goes back to the queue."""


class EmbeddedSource:
    """The outbox table: requests taken in a transaction of their own, a poll every ``poll_interval_s``."""

    name = "embedded"

    def __init__(self, factory: sessionmaker[Session], wake: threading.Event) -> None:
        self.factory = factory
        self.wake = wake

    def take(self, limit: int, wait: float) -> list[Delivery]:
        with self.factory() as session, session.begin():
            found = embedded.take_work(session, limit)
        if not found and wait > 0:
            self.idle(wait)
        return [Delivery(body) for body in found]

    def settle(self, delivery: Delivery, done: bool) -> None:
        return None  # taken is sent: nothing to acknowledge

    def idle(self, wait: float) -> None:
        self.wake.wait(wait)
        self.wake.clear()

    def close(self) -> None:
        return None


class AmqpSource:
    """The broker's work queue, consumed with manual acknowledgements.

    Continuous: a consumer with a prefetch of ``prefetch`` (the worker's concurrency), so the broker never
    hands this worker more requests than it can run at once, and the others go to idle workers. ``once``: one
    basic.get, which says at once whether a request is waiting.
    """

    name = "rabbitmq"

    def __init__(self, config: Config, prefetch: int, once: bool,
                 connect: Callable[[Config], Connection] | None = None) -> None:
        self.queue = config["broker"]["work_queue"]
        self.once = once
        self.buffer: list[Delivery] = []
        self.connection = (connect or _connect)(config)
        where = self.connection.as_uri()
        try:
            self.connection.ensure_connection(max_retries=config["broker"]["publish_retries"])
            self.channel = self.connection.channel()
            self.channel.queue_declare(self.queue, passive=True)
            if not once:
                self.channel.basic_qos(0, prefetch, False)
                self.channel.basic_consume(self.queue, callback=self._on_message, no_ack=False)
        except NotFound:
            self.connection.release()
            raise BrokerError(f"the work queue {self.queue!r} does not exist on {where}: start `retracer serve` "
                              f"once (it declares the queues), or check [broker] work_queue") from None
        except (OperationalError, *self.connection.connection_errors, *self.connection.channel_errors) as exc:
            self.connection.release()
            raise BrokerError(f"cannot consume the work queue {self.queue!r} on {where} ({exc}); check "
                              f"[broker] url and that RabbitMQ is running, then start the worker again") from None

    def _on_message(self, message: Any) -> None:
        self.buffer.append(Delivery(message.body, message.delivery_tag))

    def take(self, limit: int, wait: float) -> list[Delivery]:
        if self.once:
            return self._get(limit)
        if not self.buffer:
            self._pump(wait)
        taken, self.buffer = self.buffer[:limit], self.buffer[limit:]
        return taken

    def _get(self, limit: int) -> list[Delivery]:
        taken: list[Delivery] = []
        while len(taken) < limit:
            message = self._call(lambda: self.channel.basic_get(self.queue, no_ack=False))
            if message is None:
                break
            taken.append(Delivery(message.body, message.delivery_tag))
        return taken

    def settle(self, delivery: Delivery, done: bool) -> None:
        if done:
            self._call(lambda: self.channel.basic_ack(delivery.tag))
        else:
            self._call(lambda: self.channel.basic_reject(delivery.tag, requeue=False))

    def idle(self, wait: float) -> None:
        self._pump(wait)

    def _pump(self, wait: float) -> None:
        """Read what the broker sends for at most ``wait`` seconds, and send our AMQP heartbeat when due (the
        broker closes a connection that stays silent: an attempt can outlast its heartbeat timeout)."""
        def drain() -> None:
            self.connection.heartbeat_check()
            with suppress(TimeoutError):  # nothing came within the wait
                self.connection.drain_events(timeout=max(0.01, min(wait, PUMP_S)))

        self._call(drain)

    def _call(self, what: Callable[[], Any]) -> Any:
        try:
            return what()
        except (OperationalError, *self.connection.connection_errors, *self.connection.channel_errors) as exc:
            raise BrokerError(f"lost the work queue's connection to {self.connection.as_uri()} ({exc}); the "
                              f"requests this worker had not finished go back to the queue: start the worker "
                              f"again once the broker answers") from None

    def close(self) -> None:
        try:
            self.connection.release()
        except (OSError, *self.connection.connection_errors, *self.connection.channel_errors):
            pass  # the broker takes back what was not acknowledged when the connection goes, however it goes


def _connect(config: Config) -> Connection:
    # No publisher confirms here: this connection only consumes and acknowledges.
    return Connection(config.broker_url, heartbeat=30, connect_timeout=10)


def open_source(config: Config, factory: sessionmaker[Session] | None, prefetch: int, once: bool,
                wake: threading.Event) -> Source:
    """The configured bus's work requests: the outbox table in the embedded mode, else the work queue."""
    if not config.embedded_bus:
        return AmqpSource(config, prefetch, once)
    if factory is None:
        raise RetracerError("in the embedded mode work requests are in the database's outbox table: a database "
                            "is needed to take them (run `retracer db upgrade`, or set [broker] url)")
    return EmbeddedSource(factory, wake)
