"""The configured bus: the embedded inbox unless [broker] url names a RabbitMQ."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from retracer.bus.amqp import AmqpBus
from retracer.bus.base import Bus
from retracer.bus.embedded import EmbeddedBus
from retracer.config import Config
from retracer.errors import RetracerError


def open_bus(config: Config, factory: sessionmaker[Session] | None) -> Bus:
    """The bus of ``config``; nothing is connected until a consumer runs or a publisher publishes.

    ``factory`` is the database, which the embedded bus is; a broker needs none (a worker's host may publish
    with broker credentials alone), so it may be None when ``config.embedded_bus`` is false.
    """
    if not config.embedded_bus:
        return AmqpBus(config)
    if factory is None:
        raise RetracerError("the embedded bus is the database's inbox table: a database is needed to use it")
    return EmbeddedBus(config, factory)
