"""The configured bus: the embedded inbox unless [broker] url names a RabbitMQ."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from retracer.bus.amqp import AmqpBus
from retracer.bus.base import Bus
from retracer.bus.embedded import EmbeddedBus
from retracer.config import Config


def open_bus(config: Config, factory: sessionmaker[Session]) -> Bus:
    """The bus of ``config``; nothing is connected until a consumer runs or a publisher publishes."""
    return AmqpBus(config) if not config.embedded_bus else EmbeddedBus(config, factory)
