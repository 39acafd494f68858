"""Microseconds per job transition through the real apply path, on SQLite and PostgreSQL.

For each database and each table size (1,000 and 100,000 jobs already present, bulk-inserted), a fresh
database is migrated with alembic and --jobs new jobs are driven through their life by JSON events applied
with ``Applier.apply_batch``, 200 events per transaction, exactly as ``retracer serve`` applies them:

    crash.submitted, retrace.started, retrace.heartbeat, retrace.failed (transient: back to PENDING),
    retrace.started, retrace.heartbeat, upload.accepted (FULLYBUILT, which queues a mail to the creator)

Each event is one transition (heartbeats included: the machine runs, the job row is updated). The figure is
wall time of all those transactions divided by the number of transitions. The bare machine cost is
``load().fire`` on an in-memory Job with no database at all.

Each configuration is run --repeat times (new jobs each time, after an uncounted warm-up) and the median is
reported; the machine is shared and noisy.

Run: python bench/transition_cost.py [--jobs 500] [--repeat 3] [--sizes 1000,100000] [--no-postgres]
PostgreSQL: RETRACER_BENCH_PG (default postgresql+psycopg://postgres@127.0.0.1:5432/postgres) is used to
create and drop a scratch database. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import sqlalchemy
from sqlalchemy import Table, create_engine, text
from sqlalchemy.engine import Engine

from retracer import config as cfg
from retracer import store
from retracer.apply.applier import Applier
from retracer.store.models import History, Job, ProcessedEvent, utcnow
from retracer.testing.factories import crash_data, event
from retracer.testing.postgres import scratch_postgres
from retracer.workflow import FailurePolicy, TriggerContext, load

BATCH = 200
PG_ADMIN_URL = os.environ.get("RETRACER_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
# (event type, data) for each step after crash.submitted; one transition each.
LIFE: list[tuple[str, dict[str, Any]]] = [
    ("retrace.started", {"worker": "bench-worker"}),
    ("retrace.heartbeat", {"worker": "bench-worker"}),
    ("retrace.failed", {"error": "E: Failed to fetch http://archive/pool/x.deb", "transient": True}),
    ("retrace.started", {"worker": "bench-worker"}),
    ("retrace.heartbeat", {"worker": "bench-worker"}),
    ("upload.accepted", {"leaf": "upload-bench"}),
]
# What the jobs already in the table look like: mostly done, some waiting, held or failed to upload.
BACKGROUND_MIX = [("FULLYBUILT", 90), ("PENDING", 4), ("ON_HOLD", 3), ("FAILEDTOUPLOAD", 3)]


# -- databases ------------------------------------------------------------------------------------------------


@contextmanager
def sqlite_database() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="retracer-bench-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'retracer.db'}"
        store.upgrade(url)
        yield url


def postgres_database() -> AbstractContextManager[str]:
    return scratch_postgres(PG_ADMIN_URL, "retracer_bench")


def postgres_reachable() -> str | None:
    """None if the scratch-database server answers, else why not."""
    try:
        engine = create_engine(PG_ADMIN_URL)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return None
    except sqlalchemy.exc.OperationalError as exc:
        return str(exc.orig).strip().splitlines()[0]


def fill(engine: Engine, count: int) -> float:
    """Bulk-insert ``count`` finished-looking jobs (with a history row and a processed event each)."""
    started = time.perf_counter()
    now = utcnow()
    states = [state for state, share in BACKGROUND_MIX for _ in range(share)]
    chunk = 10_000
    with engine.begin() as conn:
        first_id = int(conn.execute(text("SELECT COALESCE(MAX(id), 0) FROM job")).scalar_one()) + 1
        for offset in range(0, count, chunk):
            n = min(chunk, count - offset)
            jobs = []
            for i in range(offset, offset + n):
                state = states[i % len(states)]
                jobs.append({
                    "state": state, "crash_id": f"bg-{i:07d}", "creator": "bg@example.com", "package": "bg",
                    "version": "1.0", "architecture": "amd64", "release": "noble", "core": f"/srv/bg/{i}/core",
                    "executable": "/usr/bin/bg", "build_ids": [], "priority": i % 7, "manual_priority": False,
                    "attempts": 0, "hold_reason": "background" if state == "ON_HOLD" else None,
                    "upload_log": "background" if state == "FAILEDTOUPLOAD" else None,
                    "created_at": now - timedelta(seconds=count - i), "version_id": 1,
                })
            conn.execute(cast(Table, Job.__table__).insert(), jobs)
            conn.execute(cast(Table, History.__table__).insert(), [
                {"job_id": first_id + i, "from_state": None, "to_state": "PENDING", "trigger": "submit",
                 "event_id": f"bg-submit-{i}", "actor": "event:bg", "reason": None, "at": now}
                for i in range(offset, offset + n)])
            conn.execute(cast(Table, ProcessedEvent.__table__).insert(), [
                {"event_id": f"bg-submit-{i}", "job_id": first_id + i, "outcome": "applied", "at": now}
                for i in range(offset, offset + n)])
        conn.execute(text("ANALYZE"))
    return time.perf_counter() - started


# -- the measured workload ---------------------------------------------------------------------------------------


def apply_all(applier: Applier, engine: Engine, bodies: list[str]) -> list[Any]:
    factory = store.session_factory(engine)
    outcomes = []
    for start in range(0, len(bodies), BATCH):
        with store.transaction(factory) as session:
            outcomes += applier.apply_batch(session, bodies[start:start + BATCH])
    return outcomes


def drive(url: str, jobs: int) -> tuple[int, int, float]:
    """Drive ``jobs`` new jobs through LIFE; return (transitions, transactions, seconds)."""
    engine = store.make_engine(url)
    try:
        with tempfile.TemporaryDirectory(prefix="retracer-bench-data-") as data_dir:
            config = cfg.load(environ={"RETRACER__SERVICE__DATA_DIR": data_dir, "RETRACER__DATABASE__URL": url,
                                       "RETRACER__MAIL__ADMINS": "admin@example.com",
                                       "RETRACER__POLICY__MAX_ATTEMPTS": "5",
                                       # the jobs are driven by events alone, without serve's offers
                                       "RETRACER__SERVICE__START_REQUIRES_OFFER": "false"})
            applier = Applier(config)
            submits = [json.dumps(event("crash.submitted", None, source="bench", **crash_data()))
                       for _ in range(jobs)]
            began = time.perf_counter()
            outcomes = apply_all(applier, engine, submits)
            elapsed = time.perf_counter() - began
            # Later events need the new job ids; they are built before their clock starts.
            steps = [[json.dumps(event(etype, o.job_id, source="bench", **data)) for o in outcomes]
                     for etype, data in LIFE]
            began = time.perf_counter()
            for bodies in steps:
                outcomes += apply_all(applier, engine, bodies)
            elapsed += time.perf_counter() - began
            transactions = sum(-(-len(bodies) // BATCH) for bodies in [submits, *steps])
        bad = [o for o in outcomes if o.status != "applied"]
        if bad:
            raise SystemExit(f"bench: {len(bad)} events were not applied, e.g. {bad[0]}")
        return len(outcomes), transactions, elapsed
    finally:
        engine.dispose()


def machine_only(cycles: int = 30_000) -> float:
    """Microseconds per trigger of the bare module-level machine on an in-memory job."""
    wf = load()
    job = Job()
    job.attempts = 0
    wf.create(job, TriggerContext())
    start = TriggerContext(data={"worker": "w"})
    beat = TriggerContext(data={"worker": "w"})
    policy = FailurePolicy.from_config(cfg.load(environ={})["policy"])
    failed = TriggerContext(data={"error": "x", "transient": True}, policy=policy)
    began = time.perf_counter()
    for _ in range(cycles):
        wf.fire(job, "start", start)
        wf.fire(job, "heartbeat", beat)
        wf.fire(job, "retrace_failed", failed)
    elapsed = time.perf_counter() - began
    assert job.state == "PENDING"
    return elapsed / (3 * cycles) * 1e6


# -- main ------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500, help="new jobs driven per run (7 events each)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration; the median is reported")
    parser.add_argument("--sizes", default="1000,100000", help="jobs already in the table, comma-separated")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    databases: list[tuple[str, Any]] = [("sqlite", sqlite_database)]
    pg_note = "skipped (--no-postgres)" if args.no_postgres else postgres_reachable()
    if pg_note is None:
        databases.append(("postgresql", postgres_database))
    else:
        print(f"postgresql: not measured: {pg_note}", file=sys.stderr)

    warm_jobs = min(args.jobs, 100)
    results = []
    header = f"{'database':<11} {'jobs in table':>13} {'transitions':>11} {'txns':>5} {'fill s':>7} " \
             f"{'apply s':>8} {'us/transition':>14}"
    print(f"retracer transition benchmark: {args.jobs} new jobs x {len(LIFE) + 1} events, batches of {BATCH}, "
          f"median of {args.repeat} runs")
    print(header)
    print("-" * len(header))
    for name, make in databases:
        for size in sizes:
            with make() as url:
                engine = store.make_engine(url)
                fill_s = fill(engine, size)
                engine.dispose()
                drive(url, warm_jobs)  # warm-up: connections, statement caches, the machine; not counted
                runs = [drive(url, args.jobs) for _ in range(args.repeat)]
            transitions, txns, _ = runs[0]
            seconds = statistics.median(r[2] for r in runs)
            per = seconds / transitions * 1e6
            results.append({"database": name, "jobs_in_table": size, "transitions": transitions,
                            "transactions": txns, "seconds": round(seconds, 3),
                            "us_per_transition": round(per, 1),
                            "us_per_transition_runs": [round(r[2] / r[0] * 1e6, 1) for r in runs]})
            print(f"{name:<11} {size:>13,} {transitions:>11,} {txns:>5} {fill_s:>7.1f} {seconds:>8.2f} "
                  f"{per:>14.1f}", flush=True)
    machine_us = machine_only()
    print(f"{'machine':<11} {'(no db)':>13} {'90,000':>11} {'-':>5} {'-':>7} {'-':>8} {machine_us:>14.1f}"
          "   load().fire on an in-memory Job")
    print(json.dumps({
        "bench": "transitions", "batch": BATCH, "events_per_job": len(LIFE) + 1, "jobs": args.jobs,
        "repeat": args.repeat,
        "results": results, "machine_us_per_trigger": round(machine_us, 2),
        "postgresql": "measured" if pg_note is None else f"not measured: {pg_note}",
        "python": platform.python_version(), "sqlalchemy": sqlalchemy.__version__, "cpus": os.cpu_count(),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
