"""`retracer worker`: takes work requests and turns each into an upload or a ``retrace.failed``.

One thread (the loop's) owns the source of requests: it takes as many as there are free slots
(``concurrency``), starts an attempt thread for each (``loop_attempt``), and settles each request once its
attempt's outcome is durable. On RabbitMQ that settling is the acknowledgement, so a worker killed at any
point before it leaves its request unacknowledged, and the broker hands it to the next worker.

A first SIGTERM or SIGINT stops the taking and sets the stop event every engine watches: each engine ends
its gdb and returns a transient failure, which is published and acknowledged like any other outcome, and the
worker exits 0. A second signal exits at once, killing the process groups of the worker's children first, so
that no gdb outlives it.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import queue
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy.orm import Session, sessionmaker

from retracer import events as ev
from retracer.bus.base import Publisher
from retracer.bus.connect import open_bus
from retracer.config import Config
from retracer.errors import InvalidEvent, RetracerError
from retracer.ops import lock
from retracer.uploads import spool
from retracer.worker.loop_attempt import STARTED, Engine, Result, Setup, make_event, run_attempt
from retracer.worker.request import Request
from retracer.worker.sources import Delivery, Source, open_source

if TYPE_CHECKING:
    from retracer.worker.metrics import WorkerMetrics

log = logging.getLogger("retracer.worker")

ENGINE_MODULE = "retracer.worker.retrace"

#: How long the loop waits between looks at a broker while it has free slots (the embedded mode polls every
#: [service] poll_interval_s instead).
BROKER_WAIT_S = 0.2


def default_engine(config: Config | None = None, factory: sessionmaker[Session] | None = None) -> Engine:
    """``retracer.worker.retrace.retrace``, imported when a worker starts (not when this module is); given the
    worker's configuration and database, with retracer's symbol index as a symbol source (``engine_for``)."""
    try:
        module = importlib.import_module(ENGINE_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != ENGINE_MODULE:
            raise
        raise RetracerError(f"the retrace engine ({ENGINE_MODULE}) is not installed with this retracer; "
                            f"install a retracer that has it, then start the worker again") from None
    if config is not None and hasattr(module, "engine_for"):
        return cast(Engine, module.engine_for(config, factory))
    return cast(Engine, module.retrace)


def worker_name(config: Config) -> str:
    """``[worker] name``, or ``<hostname>-<pid>``: the source of the worker's events and its name in them."""
    name = str(config["worker"]["name"]).strip()
    if not name:
        host = ev.CONTROL.sub("", socket.gethostname()).strip() or "worker"
        name = f"{host[:180]}-{os.getpid()}"
    return name


@dataclass
class Summary:
    """What a worker did, for its last log line and `--json`."""

    worker: str
    bus: str
    concurrency: int
    once: bool
    attempts: list[Result] = field(default_factory=list)
    malformed: int = 0
    stopped_by: str | None = None

    def count(self, outcome: str) -> int:
        return sum(1 for r in self.attempts if r.outcome == outcome and r.durable)

    def as_dict(self) -> dict[str, Any]:
        return {"worker": self.worker, "bus": self.bus, "concurrency": self.concurrency, "once": self.once,
                "taken": len(self.attempts) + self.malformed, "retraced": self.count("retraced"),
                "failed": self.count("failed"), "malformed": self.malformed, "stopped_by": self.stopped_by,
                "attempts": [r.as_dict() for r in self.attempts]}


class Worker:
    """Takes work requests and runs them, ``concurrency`` at a time, until stopped (or one, with ``once``).

    ``engine`` is the retrace engine (default: ``default_engine()``); ``publisher`` makes each attempt's
    publisher (default: the configured bus's). ``factory`` is the database, needed in the embedded mode only.
    """

    def __init__(self, config: Config, factory: sessionmaker[Session] | None, *, concurrency: int | None = None,
                 once: bool = False, engine: Engine | None = None,
                 publisher: Callable[[], Publisher] | None = None, metrics: WorkerMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.factory = factory
        self.concurrency = 1 if once else concurrency or int(config["worker"]["concurrency"])
        self.once = once
        self.engine = engine
        self.publisher = publisher
        self.name = worker_name(config)
        self.stop_event = threading.Event()
        #: Set when an attempt ends or the worker is told to stop: the embedded mode's poll wakes at once.
        self.wake = threading.Event()
        self.finished: queue.Queue[tuple[int, Delivery, Result]] = queue.Queue()
        self.running: dict[int, threading.Thread] = {}
        self.fatal: RetracerError | None = None
        self.summary = Summary(self.name, "embedded" if config.embedded_bus else "rabbitmq", self.concurrency, once)

    # -- stopping ------------------------------------------------------------------------------------------

    def stop(self, why: str = "stop") -> None:
        """Take nothing more; every running engine abandons its attempt (a transient failure)."""
        if self.summary.stopped_by is None:
            self.summary.stopped_by = why
        self.stop_event.set()
        self.wake.set()

    @contextmanager
    def signals(self) -> Iterator[None]:
        """SIGTERM and SIGINT stop the worker; a second one exits at once. The previous handlers come back
        when the block ends (the main thread only, as Python requires)."""
        def handler(signum: int, frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            if self.stop_event.is_set():
                log.error("second signal: exiting at once, killing the attempts' processes",
                          extra={"signal": name, "worker": self.name})
                kill_children()
                lock.release_all()
                os._exit(128 + signum)
            log.info("stopping: no new requests; the attempts in hand are abandoned and reported",
                     extra={"signal": name, "worker": self.name, "running": len(self.running)})
            self.stop(name)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    # -- running -------------------------------------------------------------------------------------------

    def run(self) -> Summary:
        """Work until stopped, or (``once``) until one request has its outcome or none is waiting. Raises
        RetracerError for the worker's own failures (bus, database, spool), after the attempts in hand end."""
        setup = self._setup()
        source = open_source(self.config, self.factory, self.concurrency, self.once, self.wake)
        log.info("worker started", extra={"worker": self.name, "bus": source.name, "concurrency": self.concurrency,
                                          "once": self.once})
        try:
            self._loop(source, setup)
        finally:
            if self.running:
                # The source failed (the broker went away) or a bug: the attempts in hand are abandoned and
                # waited for, so that none is left running gdb behind the exit.
                self.stop_event.set()
                for thread in list(self.running.values()):
                    thread.join()
            source.close()
        counters = {k: v for k, v in self.summary.as_dict().items() if k != "attempts"}
        log.info("worker stopped", extra=counters)
        if self.fatal is not None:
            raise self.fatal
        return self.summary

    def _setup(self) -> Setup:
        problem = ev.NAME(self.name)
        if problem is not None:
            # Every event would be refused: better no worker than one that drops every request as malformed.
            raise RetracerError(f"[worker] name {self.name[:80]!r} {problem}; set a name of at most 200 "
                                f"characters on one line (or leave it empty for <hostname>-<pid>)")
        engine = self.engine or default_engine(self.config, self.factory)
        spool.ensure_layout(self.config.spool_dir)
        section = self.config["worker"]
        work_root = Path(os.path.expanduser(section["work_dir"])) if section["work_dir"] else \
            self.config.data_dir / "worker"
        try:
            work_root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RetracerError(f"the work directory {work_root} cannot be created ({exc.strerror}); create it "
                                f"or change [worker] work_dir") from None
        publisher = self.publisher or open_bus(self.config, self.factory).publisher
        return Setup(self.config, engine, self.name, self.stop_event, publisher, self.config.spool_dir, work_root,
                     float(section["heartbeat_interval_s"]))

    def _loop(self, source: Source, setup: Setup) -> None:
        poll = BROKER_WAIT_S if source.name != "embedded" else float(self.config["service"]["poll_interval_s"])
        looked = False  # once: a request was taken, or there was none
        while True:
            self._settle(source)
            taking = not (self.stop_event.is_set() or self.fatal is not None or (self.once and looked))
            room = self.concurrency - len(self.running) if taking else 0
            if room <= 0:
                if not self.running:
                    return
                source.idle(BROKER_WAIT_S)
                continue
            deliveries = source.take(room, 0 if self.once else poll)
            started = sum(self._start(source, setup, d) for d in deliveries)
            if self.once and (started or not deliveries):
                looked = True

    def _start(self, source: Source, setup: Setup, delivery: Delivery) -> bool:
        """Start an attempt for ``delivery``; False (and the request dropped) if it is not a valid request."""
        try:
            request = Request.from_body(_decode(delivery.body))
            make_event(STARTED, request, self.name)  # a request its events could not report on is malformed too
        except InvalidEvent as exc:
            self.summary.malformed += 1
            if self.metrics is not None:
                self.metrics.dropped()
            log.error("malformed work request dropped", extra={"worker": self.name, "error": str(exc)[:500],
                                                               "body": _excerpt(delivery.body)})
            source.settle(delivery, done=False)
            return False
        thread = threading.Thread(target=self._attempt, args=(setup, request, delivery),
                                  name=f"attempt-job-{request.job}", daemon=True)
        self.running[id(delivery)] = thread
        thread.start()
        if self.metrics is not None:
            self.metrics.started()
        return True

    def _attempt(self, setup: Setup, request: Request, delivery: Delivery) -> None:
        try:
            result = run_attempt(setup, request)
        except BaseException as exc:  # a bug: the loop must still hear of it, or it would wait forever
            log.exception("attempt crashed", extra={"job": request.job, "attempt": request.attempt})
            result = Result(request, "failed", 0.0, fatal=RetracerError(f"attempt crashed: {exc!r}"))
        self.finished.put((id(delivery), delivery, result))
        self.wake.set()

    def _settle(self, source: Source) -> None:
        while True:
            try:
                key, delivery, result = self.finished.get_nowait()
            except queue.Empty:
                return
            self.running.pop(key).join()  # it has nothing left to do but return
            self.summary.attempts.append(result)
            if self.metrics is not None:
                self.metrics.finished(result)
            if result.durable:
                try:
                    source.settle(delivery, done=True)
                except RetracerError as exc:
                    self._fail(exc)
            if result.fatal is not None:
                self._fail(result.fatal)

    def _fail(self, error: RetracerError) -> None:
        if self.fatal is None:
            self.fatal = error
            self.stop("error")


def _decode(body: bytes | str | dict[str, Any]) -> Any:
    if isinstance(body, dict):
        return body
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise InvalidEvent(f"work request is not JSON ({str(exc)[:200]})") from None


def _excerpt(body: bytes | str | dict[str, Any]) -> str:
    text = repr(body)
    return text if len(text) <= 300 else text[:297] + "..."


def kill_children() -> None:
    """SIGKILL every child of this process with its process group (gdb runs in a group of its own)."""
    me, my_group = os.getpid(), os.getpgrp()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after the last ")".
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) < 3 or int(fields[1]) != me:
            continue
        pid, group = int(entry.name), int(fields[2])
        with suppress(OSError):
            if group != my_group:
                os.killpg(group, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
