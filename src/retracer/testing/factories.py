"""Factories for tests, specs and the demo: crash data and events with sensible, distinct defaults."""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from retracer import events as ev
from retracer import store
from retracer.apply.applier import Applier, Outcome
from retracer.errors import RetracerError

_counter = itertools.count(1)


def crash_data(**overrides: Any) -> dict[str, Any]:
    """The data of a crash.submitted event; each call gets its own crash id."""
    n = next(_counter)
    data: dict[str, Any] = {
        "crash_id": f"crash-{n:04d}", "creator": "mark@example.com", "package": "cdrkit",
        "version": "1.0", "architecture": "i386", "release": "breezy-autotest",
        "core": f"/srv/crashes/{n:04d}/core", "executable": "/usr/bin/cdrecord",
    }
    data.update(overrides)
    return data


def event(etype: str, job: int | None = None, source: str = "test", event_id: str | None = None,
          **data: Any) -> dict[str, Any]:
    """A valid event envelope as a dict."""
    return ev.make(etype, job, data, source=source, event_id=event_id).to_dict()


def apply(applier: Applier, session: Session, *bodies: Any) -> list[Outcome]:
    return applier.apply_batch(session, list(bodies))


def submit(applier: Applier, session: Session, **overrides: Any) -> int:
    """Create a job through crash.submitted and return its id."""
    (outcome,) = applier.apply_batch(session, [event("crash.submitted", **crash_data(**overrides))])
    if outcome.status != "applied" or outcome.job_id is None:
        raise RetracerError(f"submit failed: {outcome.reason}")
    return outcome.job_id


class Shell:
    """Runs `retracer ...` command lines in-process, printing what a terminal would show.

    Used by the doctests (tests/doctests/), so the specs read like an admin's session. A non-zero exit is
    printed as ``[exit N]`` after the output.
    """

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = dict(env or {})

    def __call__(self, command_line: str) -> None:
        import shlex

        from click.testing import CliRunner

        from retracer.cli import cli

        args = shlex.split(command_line)
        if args and args[0] == "retracer":
            args = args[1:]
        result = CliRunner().invoke(cli, args, env=self.env, catch_exceptions=False)
        out = result.output.rstrip("\n")
        if out:
            print(out)
        if result.exit_code:
            print(f"[exit {result.exit_code}]")


@contextmanager
def captured_logs(level: int = logging.INFO) -> Iterator[list[logging.LogRecord]]:
    """The records retracer's loggers emit inside the block, each once, whatever propagation other code set."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("retracer")
    handler, before = Keep(level), logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level, before) if before else level)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)


@contextmanager
def scratch_postgres(admin_url: str, prefix: str) -> Iterator[str]:
    """The URL of a new PostgreSQL database migrated to head, dropped at the end even if a process left
    behind is still connected (tests and benchmarks; ``admin_url`` may create databases)."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    # pre_ping: the outage tests restart PostgreSQL, which leaves this pool's connection dead.
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
            store.upgrade(url)
            yield url
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
