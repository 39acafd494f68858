"""Shared fixtures: a migrated database on SQLite and on the real PostgreSQL, and a configuration for it.

Tests marked or parametrized for PostgreSQL and RabbitMQ skip on a laptop without them, and fail in CI
(CI=true), where a missing server is a broken machine, not a reason to test less.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from retracer import config as cfg
from retracer import store
from retracer.store.models import Base
from retracer.testing.postgres import scratch_postgres

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_ADMIN_URL = os.environ.get("RETRACER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
AMQP_URL = os.environ.get("RETRACER_TEST_AMQP", "pyamqp://guest:guest@127.0.0.1:5672//")


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_server(name: str, host: str, port: int) -> None:
    """Skip without the server, except in CI where its absence fails the test."""
    if _port_open(host, port):
        return
    message = f"{name} is not answering on {host}:{port}"
    if IN_CI:
        pytest.fail(message + " (CI must have it: .ci/run starts it)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for the whole run, migrated to head, dropped at the end."""
    require_server("PostgreSQL", "127.0.0.1", 5432)
    with scratch_postgres(PG_ADMIN_URL, "retracer_test") as url:
        yield url


def truncate_all(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, copied for each test (migrating each time would cost ~0.1 s a test)."""
    path = tmp_path_factory.mktemp("template") / "retracer.db"
    store.upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path) -> str:
    """A migrated, empty database: each test runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        target = tmp_path / "data" / "retracer.db"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(sqlite_template.read_bytes())
        return f"sqlite:///{target}"
    url: str = request.getfixturevalue("pg_database")
    truncate_all(url)
    return url


@pytest.fixture
def sqlite_url(tmp_path: Path, sqlite_template: Path) -> str:
    target = tmp_path / "data" / "retracer.db"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(sqlite_template.read_bytes())
    return f"sqlite:///{target}"


def make_config(data_dir: Path, db_url: str | None = None, **overrides: str) -> cfg.Config:
    env = {"RETRACER__SERVICE__DATA_DIR": str(data_dir),
           "RETRACER__MAIL__ADMINS": "celso@example.com,foo.bar@example.com",
           # Most tests drive jobs with events directly, without serve's offers (tests of offers set it).
           "RETRACER__SERVICE__START_REQUIRES_OFFER": "false"}
    if db_url:
        env["RETRACER__DATABASE__URL"] = db_url
    env.update(overrides)
    return cfg.load(environ=env)


@pytest.fixture
def config(tmp_path: Path, db_url: str) -> cfg.Config:
    return make_config(tmp_path / "data", db_url)


@pytest.fixture
def engine(config: cfg.Config) -> Iterator[Engine]:
    engine = store.make_engine(config.database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def factory(engine: Engine) -> sessionmaker[Session]:
    return store.session_factory(engine)
