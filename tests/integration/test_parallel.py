"""Apply workers on the real PostgreSQL (and, through `serve`, the real RabbitMQ): a batch split over two
processes comes out as it does in one, a dead worker stops serve with a clear message and loses nothing, and a
killed serve leaves no worker behind."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from retracer import store
from retracer.apply.pool import ApplyPool
from retracer.errors import RetracerError
from retracer.service import Service
from retracer.testing.factories import crash_data, event
from retracer.testing.instance import Instance

from ..conftest import make_config, truncate_all


def dumps(*events: dict[str, Any] | bytes) -> list[bytes]:
    return [e if isinstance(e, bytes) else json.dumps(e).encode() for e in events]


def first_batch() -> list[bytes]:
    return dumps(*(event("crash.submitted", event_id=f"submit-{n}", **crash_data(crash_id=f"par-{n}"))
                   for n in range(1, 7)))


def second_batch(replayed: bytes) -> list[bytes]:
    """Jobs 1-6 started, beating and uploaded, in waves as workers interleave them, with a replay, a malformed
    body, an unknown job, an event its job has left the state for, and a new job (published twice) with its
    start right behind (and a second body with the start's id, naming another job: rejected, the id was used)."""
    waves = [event("retrace.started", j, event_id=f"start-{j}", worker=f"w{j}") for j in range(1, 7)]
    waves += [event("retrace.heartbeat", j, event_id=f"beat-{j}", worker=f"w{j}") for j in range(1, 7)]
    waves += [event("upload.accepted", j, event_id=f"accept-{j}", leaf=f"upload-{j}") for j in range(1, 7)]
    return dumps(*waves[:8], b'{"id": "broken", "type": ', *waves[8:14],
                 event("retrace.heartbeat", 999, event_id="beat-999", worker="w9"),
                 *[event("crash.submitted", event_id="submit-7", **crash_data(crash_id="par-7"))] * 2,
                 event("retrace.started", 7, event_id="start-7", worker="w7"),
                 event("retrace.started", 5, event_id="start-7", worker="w7"),  # a copy of the id, another job
                 # After the new job: the pool draws an id for every submit it cannot tell is a replay (a gap in
                 # the sequence, as a rolled-back transaction leaves), and job 7 must be the new one in both.
                 replayed,
                 *waves[14:], event("retrace.heartbeat", 1, event_id="beat-late-1", worker="w1"))


def summary(outcomes: list[Any]) -> list[tuple[Any, ...]]:
    return [(o.status, o.event_id, o.job_id, o.trigger, o.dest, o.reason) for o in outcomes]


@pytest.fixture
def pooled(tmp_path: Path, pg_database: str) -> Iterator[tuple[ApplyPool, sessionmaker[Session]]]:
    truncate_all(pg_database)
    engine = store.make_engine(pg_database)
    factory = store.session_factory(engine)
    pool = ApplyPool(make_config(tmp_path / "data", pg_database), factory, 2)
    yield pool, factory
    pool.close()
    engine.dispose()


class TestPool:
    def test_a_batch_split_over_two_workers_comes_out_as_in_one_process(
            self, pooled: tuple[ApplyPool, sessionmaker[Session]], tmp_path: Path, sqlite_url: str) -> None:
        pool, factory = pooled
        one = Service(make_config(tmp_path / "one", sqlite_url), store.session_factory(store.make_engine(sqlite_url)))
        first = first_batch()
        in_flight = pool.submit(first, fresh=True)
        assert len(in_flight.parts) == 2, "both workers got a part"
        split_first = in_flight.result()
        assert summary(split_first) == summary(one.apply(first, fresh=True))
        second = second_batch(first[0])
        split_second = pool.submit(second, fresh=False).result()
        assert summary(split_second) == summary(one.apply(second, fresh=False))

        statuses = [o.status for o in split_second]
        assert statuses.count("applied") == 20 and statuses.count("duplicate") == 2
        assert {o.event_id: o.reason for o in split_second if o.status == "rejected"}.keys() == \
            {None, "beat-999", "beat-late-1", "start-7"}
        with factory() as session:
            states: dict[int, str] = dict(session.execute(text("SELECT id, state FROM job ORDER BY id")).all())
            history = session.execute(text("SELECT count(*), count(DISTINCT event_id) FROM history")).one()
        assert states == {**{j: "FULLYBUILT" for j in range(1, 7)}, 7: "RETRACING"}
        assert history == (6 * 3 + 2, 6 * 3 + 2), "one history row per recorded event (heartbeats are not)"

    def test_a_replayed_batch_is_all_duplicates(self, pooled: tuple[ApplyPool, sessionmaker[Session]]) -> None:
        """fresh=True on events already applied: each worker's marker insert fails and it applies its part again
        with the lookup."""
        pool, _ = pooled
        first = first_batch()
        pool.submit(first, fresh=True).result()
        again = pool.submit(first, fresh=True).result()
        assert [o.status for o in again] == ["duplicate"] * len(first)

    def test_a_dead_worker_is_a_clear_error(self, pooled: tuple[ApplyPool, sessionmaker[Session]]) -> None:
        pool, _ = pooled
        os.kill(pool.workers[1].pid, signal.SIGKILL)
        pool.workers[1].join(timeout=10)
        with pytest.raises(RetracerError, match=r"apply worker 1 \(pid \d+\) died \(killed by SIGKILL\); serve "
                                                r"stops without acknowledging the batch in hand"):
            pool.submit(first_batch(), fresh=True).result()


# -- through `serve` -----------------------------------------------------------------------------------------


def worker_pids(inst: Instance, log_index: int = 0) -> list[int]:
    log = inst.data_dir / f"serve-{log_index}.log"
    inst.wait_for("the apply workers", lambda: b"apply workers started" in log.read_bytes(), timeout=30)
    line = next(line for line in log.read_text().splitlines() if "apply workers started" in line)
    return [int(p) for p in json.loads(line)["pids"]]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return re.split(r"\) ", f.read(), maxsplit=1)[1][0] != "Z"
    except FileNotFoundError:
        return False


class TestServe:
    def test_a_killed_worker_stops_serve_and_the_next_serve_applies_everything_once(self, scaled: Instance) -> None:
        inst = scaled
        serve = inst.serve()
        pids = worker_pids(inst)
        assert len(pids) == 2, "two apply workers by default with PostgreSQL"
        os.kill(pids[0], signal.SIGKILL)
        jobs = 20
        inst.publish(*(event("crash.submitted", event_id=f"s-{n}", **crash_data(crash_id=f"k-{n}"))
                       for n in range(jobs)))
        assert serve.wait(timeout=60) == 1
        log = (inst.data_dir / "serve-0.log").read_text()
        assert re.search(r"apply worker 0 \(pid \d+\) died \(killed by SIGKILL\)", log), log[-2000:]
        assert not any(alive(p) for p in pids), "the other worker left with serve"
        # Its exit is this test's point, not a failure to wait on; the next serve logs afresh.
        inst.servers.remove(serve)
        (inst.data_dir / "serve-0.log").rename(inst.data_dir / "serve-0.first.log")

        inst.serve()
        assert not set(worker_pids(inst)) & set(pids)
        inst.wait_for("every submission", lambda: inst.scalar("SELECT count(*) FROM job") == jobs)
        # Not 1..20: the failed batch drew those ids from the sequence before it died (gaps, as after any
        # rolled-back transaction).
        ids = [row[0] for row in inst.rows("SELECT id FROM job ORDER BY id")]
        inst.publish(*(event("retrace.started", j, event_id=f"r-{j}", worker="w") for j in ids))
        inst.wait_for("every start", lambda: inst.scalar(
            "SELECT count(*) FROM job WHERE state = 'RETRACING'") == jobs)
        assert inst.scalar("SELECT count(*) FROM history") == 2 * jobs
        assert inst.scalar("SELECT count(DISTINCT event_id) FROM history") == 2 * jobs
        assert inst.scalar("SELECT count(*) FROM rejected") == 0

    def test_a_killed_serve_takes_its_workers_with_it(self, scaled: Instance) -> None:
        inst = scaled
        serve = inst.serve()
        pids = worker_pids(inst)
        assert all(alive(p) for p in pids)
        inst.stop(serve, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(p) for p in pids), "an apply worker outlived its serve"
