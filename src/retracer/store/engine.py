"""Engines and sessions for SQLite (the embedded default) and PostgreSQL.

SQLite is opened in WAL mode and every transaction starts with BEGIN IMMEDIATE: with several processes a
plain BEGIN failed 912 of 1,200 read-modify-write transactions with "database is locked" (measured).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30000


def sqlite_file(url: str) -> Path | None:
    """The file a SQLite URL names (None for another database or an in-memory one)."""
    if not url.startswith("sqlite"):
        return None
    path = make_url(url).database
    return Path(path) if path and path != ":memory:" and not path.startswith("file:") else None


def missing_database(url: str) -> Path | None:
    """The SQLite file ``url`` names when it does not exist yet (opening it would create it)."""
    path = sqlite_file(url)
    return path if path is not None and not path.exists() else None


def make_engine(url: str, create: bool = False, read_only: bool = False, **kwargs: Any) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and BEGIN IMMEDIATE.

    ``create``: make the SQLite file's directory, for the one caller that may create a database (the schema
    upgrade). Otherwise nothing is made here: a read must not leave an empty database behind.
    ``read_only`` (the web app): the database refuses writes, and SQLite transactions start with a deferred
    BEGIN, a snapshot that neither waits for `serve`'s write transactions nor makes them wait.
    """
    if url.startswith("sqlite"):
        path = sqlite_file(url)
        if create and path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **kwargs)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, record: Any) -> None:
            # pysqlite's own transaction handling would defer BEGIN; take control of it (dialect docs recipe).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys=ON")
            if read_only:
                cur.execute("PRAGMA query_only=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    if read_only:
        kwargs.setdefault("execution_options", {"postgresql_readonly": True})
    # psycopg prepares a statement after five runs and PostgreSQL may then keep a generic plan chosen while
    # the tables were empty: the processed-event check turned into a full scan, 254 ms a batch at 60k rows.
    kwargs.setdefault("connect_args", {"prepare_threshold": None})
    return create_engine(url, **kwargs)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any exception."""
    with factory() as session, session.begin():
        yield session
