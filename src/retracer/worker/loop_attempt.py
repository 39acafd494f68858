"""One attempt at one work request: ``retrace.started``, the engine in a work directory of its own with
heartbeats while it runs, then exactly one outcome: an upload in the spool or a ``retrace.failed``.

Each attempt runs in a thread of its own and publishes through a publisher of its own (shared with its
heartbeat thread under a lock): a broker connection is not thread-safe, and the engine's work is done in gdb
subprocesses, so threads are enough to run attempts side by side.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from retracer import events as ev
from retracer.bus.base import Publisher
from retracer.config import Config
from retracer.errors import RetracerError
from retracer.worker.request import Failed, Missing, Outcome, Request, Retraced
from retracer.worker.upload import leaf_for, manifest_for, write_upload

log = logging.getLogger("retracer.worker")

#: The retrace engine: ``retracer.worker.retrace.retrace`` unless a caller (a test) gives another.
Engine = Callable[[Request, Config, Path, threading.Event | None], Outcome]

STARTED = "retrace.started"
BEAT = "retrace.heartbeat"
FAILED = "retrace.failed"

#: The events contract caps ``retrace.failed``'s error at 64 KiB (characters).
MAX_ERROR = 65536


@dataclass
class Setup:
    """What every attempt of one worker shares."""

    config: Config
    engine: Engine
    worker: str
    stop: threading.Event
    publisher: Callable[[], Publisher]
    spool_dir: Path
    work_root: Path
    beat_every: float


@dataclass
class Result:
    """How an attempt ended, for the loop (settling its request) and the summary."""

    request: Request
    outcome: str  # "retraced" or "failed"
    seconds: float
    leaf: str | None = None
    upload: Path | None = None
    error: str | None = None
    transient: bool | None = None
    #: The outcome is durable (the upload renamed into incoming/, or the retrace.failed confirmed): the
    #: request may be acknowledged.
    durable: bool = False
    #: The worker itself cannot go on (the bus refuses its events, the spool cannot be written).
    fatal: RetracerError | None = None

    def as_dict(self) -> dict[str, Any]:
        shown: dict[str, Any] = {"job": self.request.job, "attempt": self.request.attempt,
                                 "outcome": self.outcome, "seconds": round(self.seconds, 3)}
        if self.leaf is not None:
            shown["leaf"] = self.leaf
            shown["upload"] = str(self.upload)
        if self.error is not None:
            shown["error"] = self.error
            shown["transient"] = self.transient
        if self.fatal is not None:
            shown["worker_error"] = str(self.fatal)
        return shown


class Reporter:
    """Publishes one attempt's events, one at a time (the attempt's thread and its heartbeat thread share it)."""

    def __init__(self, publisher: Publisher, worker: str) -> None:
        self.publisher = publisher
        self.worker = worker
        self.lock = threading.Lock()

    def send(self, etype: str, request: Request, **data: Any) -> None:
        event = make_event(etype, request, self.worker, **data)
        with self.lock:
            self.publisher.publish(event.type, event.to_json(), event.id)


def make_event(etype: str, request: Request, worker: str, **data: Any) -> ev.Event:
    """A worker's event about ``request``: a fresh uuid4 id (never the service's reserved prefix), the worker as
    its source, and the worker and attempt in its data; InvalidEvent if the request cannot be reported on."""
    return ev.make(etype, request.job, {**data, "worker": worker, "attempt": request.attempt}, source=worker)


class Beats:
    """A ``retrace.heartbeat`` every ``every`` seconds while the engine runs (started counts as the first)."""

    def __init__(self, reporter: Reporter, request: Request, every: float) -> None:
        self.reporter = reporter
        self.request = request
        self.every = every
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"beats-job-{request.job}", daemon=True)

    def _run(self) -> None:
        while not self.done.wait(self.every):
            try:
                self.reporter.send(BEAT, self.request)
            except RetracerError as exc:
                # One lost beat is not the end of the attempt: the service allows heartbeat_timeout_s.
                log.warning("heartbeat not published", extra={"job": self.request.job,
                                                              "attempt": self.request.attempt, "error": str(exc)})

    def __enter__(self) -> Beats:
        self.thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        # Joined before the outcome is published, so that no beat follows it (it would be rejected).
        self.done.set()
        self.thread.join()


def failure_text(failed: Failed) -> str:
    """The error of a retrace.failed: the engine's text, every missing build-id and path named, cut to the
    contract's 64 KiB with a note saying so (the list of missing modules is kept whole if it fits)."""
    error = failed.error.replace("\x00", "\\0").strip() or "the retrace failed without saying why"
    absent = [m for m in failed.missing if m.build_id not in error]
    blocking = None if failed.blocking is None else {m.build_id for m in failed.blocking}
    section = _missing_section(absent, blocking)
    room = MAX_ERROR - len(section)
    if len(error) > room:
        note = f"\n[error cut: {len(error) - room} more characters; the worker's log has it all]"
        error = error[:max(0, room - len(note))] + note
    return _encodable(error + section)[:MAX_ERROR]


def missing_field(failed: Failed) -> dict[str, Any]:
    """retrace.failed's ``missing`` (the modules whose lack of symbols failed the attempt, at most the
    contract's count), or nothing when the attempt did not get as far as judging symbols."""
    if failed.blocking is None:
        return {}
    entries: dict[str, dict[str, str]] = {}
    for m in failed.blocking:
        # A core names its modules itself: a build-id or path the contract refuses would make the whole
        # event unpublishable, so such an entry is left out (the error text still names it) or its path mended.
        if not ev.HEX.match(m.build_id):
            continue
        entry = {"build_id": m.build_id.lower()}
        module = ev.CONTROL.sub("?", _encodable(m.path))[:4096]
        if module.strip():
            entry["module"] = module
        entries.setdefault(entry["build_id"], entry)
    return {"missing": list(entries.values())[:ev.MAX_MISSING]}


def _missing_section(missing: list[Missing], blocking: set[str] | None) -> str:
    if not missing:
        return ""
    if blocking is not None and not blocking & {m.build_id for m in missing}:
        # An admin reading "install ... then retry" would fetch packages the retry does not need.
        text = (f"\n{len(missing)} other module(s) have no debug symbols either (build-id, path); they did not "
                f"fail this attempt, their frames show as ??: import their packages for a fuller backtrace:")
    else:
        text = (f"\nno debug symbols for {len(missing)} module(s) (build-id, path); install their debug files "
                f"in one of [worker] debug_dirs or on a debuginfod server, or import their packages with "
                f"`retracer symbols import`, then retry the job:")
    # Half the error at most: the engine's own words must keep some room.
    for shown, m in enumerate(missing):
        line = f"\n  {m.build_id} {m.path}"
        if len(text) + len(line) > MAX_ERROR // 2 - 40:
            return text + f"\n  ... and {len(missing) - shown} more"
        text += line
    return text


def _encodable(text: str) -> str:
    # Lone surrogates pass through Python strings but no event may carry them.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def run_attempt(setup: Setup, request: Request) -> Result:
    """Run one attempt to its outcome; never raises (a worker's own failure is the result's ``fatal``)."""
    began = time.monotonic()
    publisher = setup.publisher()
    reporter = Reporter(publisher, setup.worker)
    result = Result(request, "failed", 0.0)
    try:
        reporter.send(STARTED, request)
        outcome = _retrace(setup, reporter, request)
        if isinstance(outcome, Retraced):
            result = _upload(setup, reporter, request, outcome)
        else:
            result = Result(request, "failed", 0.0, error=failure_text(outcome), transient=outcome.transient)
            reporter.send(FAILED, request, error=result.error, transient=outcome.transient,
                          **missing_field(outcome))
            result.durable = True
    except RetracerError as exc:
        result.fatal = exc
    finally:
        publisher.close()
    result.seconds = time.monotonic() - began
    _log(setup, result)
    return result


def _retrace(setup: Setup, reporter: Reporter, request: Request) -> Outcome:
    log.info("attempt started", extra={"job": request.job, "attempt": request.attempt, "request": request.id,
                                       "crash_id": request.crash_id, "worker": setup.worker})
    try:
        workdir = Path(tempfile.mkdtemp(prefix=f"job-{request.job}-attempt-{request.attempt}-",
                                        dir=setup.work_root))
    except OSError as exc:
        return Failed(f"the worker's work directory {setup.work_root} cannot be used ({exc.strerror}); check "
                      f"[worker] work_dir on {setup.worker}", transient=True)
    try:
        with Beats(reporter, request, setup.beat_every):
            try:
                return setup.engine(request, setup.config, workdir, setup.stop)
            except Exception as exc:
                log.exception("the retrace engine failed", extra={"job": request.job, "attempt": request.attempt})
                return Failed(f"the worker's retrace engine failed unexpectedly ({type(exc).__name__}: {exc}); "
                              f"this is a bug in retracer: see the log of worker {setup.worker}", transient=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _upload(setup: Setup, reporter: Reporter, request: Request, outcome: Retraced) -> Result:
    leaf = leaf_for(request)
    result = Result(request, "retraced", 0.0, leaf=leaf)
    try:
        result.upload = write_upload(setup.spool_dir, leaf, manifest_for(request, outcome, setup.worker),
                                     outcome.backtrace, outcome.log)
    except RetracerError as exc:
        # The crash was retraced, but this worker cannot deliver results: the job goes back to the queue at
        # once (not after the heartbeat timeout), and the worker stops instead of failing every job it takes.
        result = Result(request, "failed", 0.0, error=failure_text(Failed(str(exc), transient=True)),
                        transient=True, fatal=exc)
        reporter.send(FAILED, request, error=result.error, transient=True)
    result.durable = True
    return result


def _log(setup: Setup, result: Result) -> None:
    fields: dict[str, Any] = {"job": result.request.job, "attempt": result.request.attempt,
                              "worker": setup.worker, "seconds": round(result.seconds, 3)}
    if result.fatal is not None and not result.durable:
        log.error("attempt left unfinished: the worker cannot go on", extra={**fields, "error": str(result.fatal)})
    elif result.outcome == "retraced":
        log.info("attempt retraced", extra={**fields, "leaf": result.leaf, "upload": str(result.upload)})
    else:
        log.info("attempt failed", extra={**fields, "transient": result.transient,
                                          "error": (result.error or "")[:300]})
    if result.fatal is not None and result.durable:
        log.error("the worker cannot go on", extra={**fields, "error": str(result.fatal)})
