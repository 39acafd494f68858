"""What a worker is asked (a work request) and what one attempt ends with: a retraced crash, or a failure
an admin can act on. The retrace engine (``worker.retrace``) produces these; the worker loop
(``worker.loop``) turns them into an upload in the spool or a ``retrace.failed`` event."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from retracer.errors import InvalidEvent
from retracer.events import HEX, MAX_JOB_ID, WORK_REQUEST


@dataclass(frozen=True)
class Request:
    """One work request (``retrace.requested``), as `serve` dispatched it."""

    id: str
    job: int
    attempt: int
    crash_id: str
    package: str
    version: str
    architecture: str
    release: str
    core: str
    executable: str
    build_ids: tuple[str, ...] = ()

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Request:
        """The request in ``body``, or InvalidEvent naming what is wrong with it."""
        if not isinstance(body, dict) or body.get("type") != WORK_REQUEST:
            raise InvalidEvent(f"not a work request (type {WORK_REQUEST})")
        data = body.get("data")
        job = body.get("job")
        if not isinstance(data, dict):
            raise InvalidEvent("work request without data")
        if isinstance(job, bool) or not isinstance(job, int) or not 1 <= job <= MAX_JOB_ID:
            raise InvalidEvent(f"work request with job {job!r}, not a job id")
        attempt = data.get("attempt")
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            raise InvalidEvent(f"work request with attempt {attempt!r}, not a positive integer")
        text = {}
        for name in ("crash_id", "package", "version", "architecture", "release", "core", "executable"):
            value = data.get(name)
            if not isinstance(value, str) or not value or "\x00" in value:
                raise InvalidEvent(f"work request with data.{name} {value!r}, not a non-empty string")
            text[name] = value
        build_ids = data.get("build_ids") or []
        if not isinstance(build_ids, list) or not all(isinstance(b, str) and HEX.match(b) for b in build_ids):
            raise InvalidEvent("work request with data.build_ids that are not hex build-ids")
        return cls(id=str(body.get("id") or ""), job=job, attempt=attempt, build_ids=tuple(build_ids), **text)


@dataclass(frozen=True)
class Missing:
    """A module whose debug symbols no source had."""

    build_id: str
    path: str


@dataclass
class Retraced:
    """An attempt that produced a symbolic backtrace (it becomes an upload in the spool)."""

    backtrace: str
    log: str
    signature: str | None = None
    address_signature: str | None = None


@dataclass
class Failed:
    """An attempt that failed: ``transient`` ones are retried after a backoff (within the failure policy's
    cap), permanent ones hold the job. ``error`` says what is wrong and what to do."""

    error: str
    transient: bool
    log: str = ""
    missing: list[Missing] = field(default_factory=list)
    #: The modules whose missing symbols failed the attempt (what the job now waits for: an import of them
    #: releases it); None when the attempt ended before symbols were judged, so it says nothing of them.
    blocking: list[Missing] | None = None


Outcome = Retraced | Failed
