"""Apply workers: each batch split by job over several processes that commit their parts side by side.

`serve` in RabbitMQ mode is the events queue's single active consumer, so the broker's order is the order
events are applied in. Applying is Python work (~150 µs an event) that one process does on one core; with
PostgreSQL several transactions can commit at once, so `serve` hands each batch's parts to
``[service] apply_workers`` processes and acknowledges the batch once every part has committed:

- the order that matters is a job's own: all of a job's events go to one worker (job id modulo the number of
  workers), in their order in the batch, and the next batch is handed out only after this one committed;
- a crash.submitted has no job yet: its id is drawn from the job sequence here, before the split, so the
  events that follow it in the same batch (a fast worker's retrace.started) land in the same part;
- a part that cannot be applied leaves the whole batch unacknowledged: the consumer ends, the broker delivers
  the batch again, and the parts that did commit come back as duplicates (their processed-event markers).

A worker that dies takes `serve` down with a clear message, and the batch in hand is delivered again to the
next `serve`; `serve` killed takes its workers with it (PR_SET_PDEATHSIG), so no orphan keeps applying.
SQLite takes one writer at a time: with it (the embedded mode) `serve` applies in its own process.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from retracer import events as ev
from retracer import logs, store
from retracer.apply.applier import Outcome, reserve_ids
from retracer.apply.runner import Runner, unavailable
from retracer.config import Config
from retracer.errors import DatabaseUnavailable, RetracerError
from retracer.testing import faults

log = logging.getLogger("retracer.serve")

_PR_SET_PDEATHSIG = 1


class ApplyPool:
    """``size`` worker processes, each with its own database connection, applying parts of one batch at a time."""

    def __init__(self, config: Config, factory: sessionmaker[Session], size: int) -> None:
        if size < 2:
            raise ValueError("an ApplyPool needs at least two workers; one applies in the serving process")
        self.factory = factory
        self.size = size
        # spawn, not fork: the parent holds connections (database, broker) a forked child must not share.
        context = multiprocessing.get_context("spawn")
        level = logging.getLevelName(logging.getLogger("retracer").getEffectiveLevel())
        self.pipes: list[Connection] = []
        self.workers: list[Any] = []
        for number in range(size):
            here, there = context.Pipe()
            worker = context.Process(target=_work, args=(there, config, level, os.getpid()),
                                     name=f"retracer-apply-{number}", daemon=True)
            worker.start()
            there.close()
            self.pipes.append(here)
            self.workers.append(worker)
        log.info("apply workers started", extra={"workers": size, "pids": [w.pid for w in self.workers]})

    def submit(self, bodies: Sequence[bytes], fresh: bool) -> InFlight:
        """Hand one batch's parts to the workers and return at once; ``result()`` of what it returns waits for
        them. Submit a batch only after the previous one's result: a job's order rests on it."""

        def reserve(count: int) -> list[int]:
            with self.factory() as session, session.begin():
                return reserve_ids(session, "job", count)

        parts, job_ids = split(bodies, self.size, reserve)
        busy = []
        for number, part in enumerate(parts):
            if part:
                self._send(number, ([bodies[i] for i in part], fresh, [job_ids[i] for i in part]))
                busy.append((number, part))
        return InFlight(self, len(bodies), busy)

    def _send(self, number: int, request: Any) -> None:
        try:
            self.pipes[number].send(request)
        except OSError:
            raise self._died(number) from None

    def _receive(self, number: int) -> Any:
        try:
            return self.pipes[number].recv()
        except (EOFError, OSError):
            raise self._died(number) from None

    def _died(self, number: int) -> RetracerError:
        worker = self.workers[number]
        worker.join(timeout=5)
        code = worker.exitcode
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit status {code}"
        return RetracerError(
            f"apply worker {number} (pid {worker.pid}) died ({how}); serve stops without acknowledging the batch "
            f"in hand, which the broker delivers again. Start `retracer serve` again; if a worker keeps dying, "
            f"look for its traceback in serve's log, or set service.apply_workers = 1 to apply in one process.")

    def close(self) -> None:
        """Workers leave when their pipe closes (after the batch in hand: nothing is cut off mid-commit)."""
        for pipe in self.pipes:
            pipe.close()
        for worker in self.workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
                worker.join()


def split(bodies: Sequence[bytes | str], size: int,
          reserve: Callable[[int], list[int]]) -> tuple[list[list[int]], list[int | None]]:
    """The batch's positions for each of ``size`` workers, each part in the batch's order, and per position the
    id a crash.submitted there gets (drawn with ``reserve(count)``, in the batch's order).

    A job's events all go to part ``job % size``, a new job's with it; an event naming no usable job (it will
    be rejected) goes anywhere. A second copy of an event id goes where the first went, whatever it says, so
    that the first is applied and the copy is its duplicate, as in one process (two workers applying one id
    at once would leave it to chance which copy wins).
    """
    parts: list[list[int]] = [[] for _ in range(size)]
    job_ids: list[int | None] = [None] * len(bodies)
    submits: list[int] = []
    first: dict[str, int] = {}  # event id -> position of its first copy
    copies: list[tuple[int, int]] = []
    for index, body in enumerate(bodies):
        head = ev.peek(body)
        event_id = head.get("id")
        if event_id is not None:
            if event_id in first:
                copies.append((index, first[event_id]))
                continue
            first[event_id] = index
        if head.get("type") == "crash.submitted":
            submits.append(index)
        elif "job" in head:
            parts[head["job"] % size].append(index)
        else:
            parts[index % size].append(index)
    if submits:
        for index, job_id in zip(submits, reserve(len(submits)), strict=True):
            job_ids[index] = job_id
            parts[job_id % size].append(index)
    if copies:
        where = {index: number for number, part in enumerate(parts) for index in part}
        for index, original in copies:
            parts[where[original]].append(index)
    if submits or copies:
        for part in parts:
            part.sort()  # what was drawn into a part late goes back to its place in the batch's order
    return parts, job_ids


class InFlight:
    """A batch whose parts the workers are applying."""

    def __init__(self, pool: ApplyPool, size: int, parts: list[tuple[int, list[int]]]) -> None:
        self.pool = pool
        self.size = size
        self.parts = parts

    def result(self) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * self.size
        failure: RetracerError | None = None
        for number, part in self.parts:  # every reply is read, even after a failure: no pipe is left out of step
            reply = self.pool._receive(number)
            if reply[0] == "ok":
                for index, outcome in zip(part, reply[1], strict=True):
                    outcomes[index] = outcome
            elif failure is None:
                failure = (DatabaseUnavailable if reply[0] == "unavailable" else RetracerError)(reply[1])
        if failure is not None:
            raise failure
        return [o for o in outcomes if o is not None]


def _work(pipe: Connection, config: Config, level: str, parent: int) -> None:
    """One worker: apply the parts it is sent, reply with their outcomes, until the pipe closes."""
    _die_with(parent)
    # serve decides when to stop and lets the batch in hand finish; a Ctrl-C sent to the whole process group
    # must not interrupt a worker in the middle of it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    faults.take_down(parent)
    logs.setup(level)
    engine = store.make_engine(config.database_url)
    runner = Runner(config, store.session_factory(engine))
    try:
        while True:
            try:
                bodies, fresh, job_ids = pipe.recv()
            except (EOFError, OSError):  # serve closed the pipe, or died (a reset, before PR_SET_PDEATHSIG acts)
                return
            try:
                reply: tuple[str, Any] = ("ok", runner.apply(bodies, fresh, job_ids))
            except Exception as exc:
                if unavailable(exc):
                    reply = ("unavailable", str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:500])
                else:
                    log.exception("apply worker failed")
                    reply = ("error", f"an apply worker failed: {exc!r}"[:1000])
            try:
                pipe.send(reply)
            except OSError:  # serve is gone; its batch is not acknowledged and will be delivered again
                return
    finally:
        engine.dispose()


def _die_with(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (a killed serve must not leave a worker
    applying on its own); elsewhere, the closed pipe ends the worker at its next batch."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
