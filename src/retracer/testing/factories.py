"""Factories for tests and benchmarks: crash data and events with sensible, distinct defaults."""

from __future__ import annotations

import itertools
from typing import Any

from sqlalchemy.orm import Session

from retracer import events as ev
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
