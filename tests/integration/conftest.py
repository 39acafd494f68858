"""Integration fixtures: a retracer instance (retracer.testing.instance) in each mode."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from retracer.testing.instance import Instance

from ..conftest import AMQP_URL, require_server


@pytest.fixture
def embedded(tmp_path: Path, sqlite_url: str) -> Iterator[Instance]:
    """The embedded default: SQLite, no broker."""
    inst = Instance(tmp_path / "data", sqlite_url)
    yield inst
    inst.close()


@pytest.fixture
def scaled(tmp_path: Path, pg_database: str) -> Iterator[Instance]:
    """At scale: RabbitMQ carries the events, PostgreSQL holds the state."""
    require_server("RabbitMQ", "127.0.0.1", 5672)
    from ..conftest import truncate_all

    truncate_all(pg_database)
    inst = Instance(tmp_path / "data", pg_database, AMQP_URL)
    inst.data_dir.mkdir(parents=True, exist_ok=True)
    yield inst
    inst.close()


@pytest.fixture(params=["embedded", pytest.param("scaled", marks=[pytest.mark.postgres, pytest.mark.rabbitmq])])
def instance(request: pytest.FixtureRequest) -> Instance:
    """Each test runs in both modes."""
    inst: Instance = request.getfixturevalue(request.param)
    return inst
