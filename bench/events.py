"""Event throughput: the durable apply path against its raw ceilings, in one run on this machine.

    python bench/events.py [--events N] [--quick] [--rounds R] [--no-pg-scale]
    python bench/events.py --profile          # cProfile of the apply path, SQL per event
    python bench/events.py --soak 1000000     # serve's RSS over a million events

Measured with the same settings (batch size, prefetch, queue type) in one run:

  rabbitmq_pg_events_per_s   events pre-published to a fresh events queue (per job: crash.submitted,
                             retrace.started, retrace.heartbeat x2, upload.accepted; jobs interleaved in
                             waves), consumed by a real `retracer serve` subprocess (BatchConsumer ->
                             Service.apply -> PostgreSQL commit -> multiple-ack); first to last applied,
                             polled on processed_event.
  raw_consume_ack_per_s      kombu consume + per-message ack of the same bodies from an identical queue,
                             same prefetch, no database (raw_consume_batch_ack_per_s: one multiple-ack per
                             batch_size messages, as BatchConsumer does).
  pg_single_commit_per_s     a one-row UPDATE + COMMIT loop on the same PostgreSQL (psycopg, TCP).
  sqlite_events_per_s        the embedded mode: the same mix in the inbox of a SQLite file, drained
                             in-process by Service.run(until_idle=True), logging to a file as `serve` does.
  *_scale_ratio              the rate with 1,000,000 (--quick: 100,000) background jobs in the job table
                             divided by the rate with 1,000 (background jobs are bulk-inserted, not applied).
  *_rss_growth_mb            consumer RSS growth from the first applied batch to the last, and the slope of
                             RSS over events (least squares, last three quarters) extrapolated to 1M events.

--profile runs cProfile over the apply path instead (drain_inbox on SQLite, Service.apply on PostgreSQL,
a few thousand events each) and counts the SQL statements per event.
Fresh database, queues and exchanges are created with unique names and removed at the end.
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import event, insert, text
from sqlalchemy.engine import Engine, make_url

from retracer import config as cfg
from retracer import events as ev
from retracer import logs, store
from retracer.service import Service
from retracer.store.models import Inbox
from retracer.testing.factories import crash_data
from retracer.testing.postgres import scratch_postgres

AMQP_URL = os.environ.get("RETRACER_BENCH_AMQP", "pyamqp://guest:guest@127.0.0.1:5672//")
PG_ADMIN_URL = os.environ.get("RETRACER_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
ADMINS = "celso@example.com,foo.bar@example.com"
EVENTS_PER_JOB = 5
WAVE = 100  # jobs whose events are interleaved: 100 submits, 100 starts, 200 heartbeats, 100 accepts

TARGETS = {
    "pg_vs_single_commit": 3.0,     # rabbitmq_pg >= 3x pg_single_commit
    "pg_vs_raw_consume": 0.5,       # rabbitmq_pg >= 50% of raw consume+ack
    "sqlite_events_per_s": 5000.0,  # embedded >= 5,000 events/s
    "scale_ratio": 0.8,             # rate with 1M jobs >= 0.8x the rate with 1k
    "rss_growth_mb_per_1m": 10.0,   # <= 10 MB over 1,000,000 events
}


# -- helpers -----------------------------------------------------------------------------------------


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def family(pid: int | str) -> list[str]:
    """The process and its children (serve's apply workers), from /proc/PID/task/*/children."""
    pids = [str(pid)]
    if pid == "self":
        return pids
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with suppress(OSError):
            pids += task.read_text().split()
    return pids


def cpu_s(pid: int | str = "self") -> float:
    """User + system CPU seconds so far of a process and its children (/proc/PID/stat fields 14 and 15)."""
    total = 0
    for one in family(pid):
        try:
            with open(f"/proc/{one}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # a child that just left
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int | str = "self") -> float:
    """Resident set size (VmRSS) of a process and its children, in MB."""
    total = 0
    for one in family(pid):
        try:
            with open(f"/proc/{one}/status") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
        except OSError:
            continue
    return total / 1024


@dataclass
class Mix:
    """The pre-built event stream: (routing key, message id, JSON body) per event, and the jobs it creates."""

    first_job: int
    jobs: int
    items: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def bodies(self) -> list[str]:
        return [b for _, _, b in self.items]


def event_mix(n_events: int, first_job: int) -> Mix:
    """Per job: crash.submitted, retrace.started, retrace.heartbeat x2, upload.accepted, in waves of WAVE jobs.

    The job ids the later events name are predicted: one consumer applies the stream in order, so the
    k-th crash.submitted creates job first_job + k (checked afterwards: no event may be rejected).
    """
    jobs = max(1, n_events // EVENTS_PER_JOB)
    mix = Mix(first_job, jobs)

    def add(etype: str, job: int | None, **data: Any) -> None:
        e = ev.make(etype, job, data, source="bench")
        mix.items.append((etype, e.id, e.to_json()))

    for start in range(0, jobs, WAVE):
        wave = range(first_job + start, first_job + min(start + WAVE, jobs))
        for _ in wave:
            add("crash.submitted", None, **crash_data(build_ids=["a1b2c3d4e5f60718"], priority=1))
        for j in wave:
            add("retrace.started", j, worker=f"worker-{j % 8}")
        for j in wave:
            add("retrace.heartbeat", j, worker=f"worker-{j % 8}")
        for j in wave:
            add("retrace.heartbeat", j, worker=f"worker-{j % 8}")
        for j in wave:
            add("upload.accepted", j, leaf=f"upload-{j}", result="#0  main () at cdrecord.c:42\n#1  __libc_start_main")
    return mix


def insert_background_jobs(engine: Engine, n: int) -> float:
    """Bulk-insert n finished jobs (mostly FULLYBUILT, 2% ON_HOLD, 2% FAILEDTOUPLOAD) in one INSERT ... SELECT."""
    if n <= 0:
        return 0.0
    start = time.perf_counter()
    cols = ("state, crash_id, creator, package, version, architecture, release, core, executable, build_ids, "
            "priority, manual_priority, attempts, created_at, started_at, finished_at, upload_leaf, hold_reason, "
            "upload_log, version_id")
    state = ("CASE WHEN i % 50 = 0 THEN 'ON_HOLD' WHEN i % 50 = 1 THEN 'FAILEDTOUPLOAD' ELSE 'FULLYBUILT' END")
    common = (f"{state}, 'bg-' || i, 'mark@example.com', 'pkg' || (i % 5000), '1.0-' || (i % 97), 'amd64', "
              f"'jammy', '/srv/crashes/bg-' || i || '/core', '/usr/bin/prog', '[]', i % 7, {{false}}, 1, "
              f":t, :t, :t, 'upload-bg-' || i, CASE WHEN i % 50 = 0 THEN 'permanent failure' END, "
              f"CASE WHEN i % 50 = 1 THEN 'checksum mismatch' END, 3")
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            sql = (f"INSERT INTO job ({cols}) SELECT {common.format(false='false')} "
                   f"FROM generate_series(1, :n) AS g(i)")
            conn.execute(text(sql), {"n": n, "t": datetime.now(UTC)})
            conn.execute(text("SELECT setval(pg_get_serial_sequence('job', 'id'), (SELECT max(id) FROM job))"))
        else:
            sql = (f"WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < :n) "
                   f"INSERT INTO job ({cols}) SELECT {common.format(false='0')} FROM g")
            conn.execute(text(sql), {"n": n, "t": datetime.now(UTC).replace(tzinfo=None)})
    if engine.dialect.name == "postgresql":
        # A real table of that size has statistics (autovacuum); without them the planner guesses.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE job"))
    return time.perf_counter() - start


def next_job_id(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT COALESCE(MAX(id), 0) + 1 FROM job")).scalar_one())


def check_effects(engine: Engine, mix: Mix, n_events: int) -> dict[str, Any]:
    """The run's effects are all there: every event applied once, every job FULLYBUILT, its history and mail."""
    lo, hi = mix.first_job, mix.first_job + mix.jobs
    q = {
        "applied": "SELECT count(*) FROM processed_event WHERE outcome = 'applied'",
        "rejected": "SELECT count(*) FROM rejected",
        "fullybuilt": f"SELECT count(*) FROM job WHERE id >= {lo} AND id < {hi} AND state = 'FULLYBUILT'",
        "history": f"SELECT count(*) FROM history WHERE job_id >= {lo} AND job_id < {hi}",
        "mail": f"SELECT count(*) FROM mail WHERE job_id >= {lo} AND job_id < {hi}",
    }
    with engine.connect() as conn:
        got = {k: int(conn.execute(text(v)).scalar_one()) for k, v in q.items()}
    want = {"applied": n_events, "rejected": 0, "fullybuilt": mix.jobs, "history": 3 * mix.jobs, "mail": mix.jobs}
    got["ok"] = all(got[k] == v for k, v in want.items())
    if not got["ok"]:
        say(f"EFFECTS WRONG: got {got}, want {want}")
    return got


def applied_span(engine: Engine) -> float:
    """Seconds between the first and the last processed_event.at (stamped by the applier)."""
    with engine.connect() as conn:
        lo, hi = conn.execute(text("SELECT min(at), max(at) FROM processed_event")).one()
    if isinstance(lo, str):  # SQLite through text(): no type processing
        lo, hi = datetime.fromisoformat(lo), datetime.fromisoformat(hi)
    span: timedelta = hi - lo
    return span.total_seconds()


def base_env(data_dir: Path, db_url: str, args: argparse.Namespace) -> dict[str, str]:
    return {"RETRACER__SERVICE__DATA_DIR": str(data_dir), "RETRACER__DATABASE__URL": db_url,
            "RETRACER__MAIL__ADMINS": ADMINS, "RETRACER__SERVICE__BATCH_SIZE": str(args.batch_size),
            "RETRACER__BROKER__PREFETCH": str(args.prefetch),
            "RETRACER__SERVICE__APPLY_WORKERS": str(args.apply_workers),
            # The workload starts its jobs with events of its own, as a fleet of workers would, without
            # serve's offers in between.
            "RETRACER__SERVICE__START_REQUIRES_OFFER": "false",
            # gc scans whole tables once at start: not what this bench measures.
            "RETRACER__GC__INTERVAL_S": "0"}


def broker_names() -> dict[str, str]:
    tag = f"rt-bench-{uuid.uuid4().hex[:8]}"
    return {"exchange": tag, "queue": f"{tag}.events", "work_queue": f"{tag}.work",
            "dead_letter_exchange": f"{tag}.dlx", "dead_letter_queue": f"{tag}.dead"}


def broker_env(names: dict[str, str]) -> dict[str, str]:
    env = {"RETRACER__BROKER__URL": AMQP_URL}
    env.update({f"RETRACER__BROKER__{k.upper()}": v for k, v in names.items()})
    return env


def delete_broker_objects(names: dict[str, str]) -> None:
    from kombu.connection import Connection

    from retracer.bus.amqp import Topology

    try:
        with Connection(AMQP_URL, connect_timeout=5) as conn:
            Topology(cfg.load(environ=broker_env(names))).delete(conn)
    except Exception as exc:  # cleanup reports, never hides the figures
        say(f"could not delete broker objects {names}: {exc}")


@contextmanager
def pg_database(label: str) -> Iterator[str]:
    """A fresh PostgreSQL database migrated to head; dropped at the end."""
    with scratch_postgres(PG_ADMIN_URL, f"retracer_bench_{label}") as url:
        yield url


def publish_all(config: cfg.Config, mix: Mix) -> float:
    """Publish the mix persistently to the events exchange (no per-message confirm; the queue depth is
    checked instead); returns the publish rate."""
    from kombu.connection import Connection

    from retracer.bus.amqp import Topology

    topology = Topology(config)
    with Connection(AMQP_URL, connect_timeout=10) as conn:
        topology.declare(conn)
        producer = conn.Producer(serializer=None)
        start = time.perf_counter()
        for rk, mid, body in mix.items:
            producer.publish(body, exchange=topology.exchange, routing_key=rk, delivery_mode=2,
                             content_type="application/json", content_encoding="utf-8", message_id=mid)
        queue = topology.events.bind(conn.default_channel)
        deadline = time.monotonic() + 120
        while True:
            depth = queue.queue_declare(passive=True).message_count
            if depth >= len(mix.items):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"only {depth} of {len(mix.items)} events reached queue {queue.name}")
            time.sleep(0.05)
        return len(mix.items) / (time.perf_counter() - start)


# -- 1. RabbitMQ + PostgreSQL through `retracer serve` ---------------------------------------------------


def serve_rabbitmq_pg(args: argparse.Namespace, tmp: Path, background: int, label: str,
                      workers: int | None = None) -> dict[str, Any]:
    """``workers``: service.apply_workers for this run (default --apply-workers)."""
    names = broker_names()
    workers = workers or args.apply_workers
    out: dict[str, Any] = {"background_jobs": background, "apply_workers": workers}
    with pg_database(label) as url:
        engine = store.make_engine(url)
        try:
            out["background_insert_s"] = round(insert_background_jobs(engine, background), 1)
            mix = event_mix(args.events, next_job_id(engine))
            n = len(mix.items)
            data_dir = tmp / f"serve-{label}"
            data_dir.mkdir()
            env = {**base_env(data_dir, url, args), **broker_env(names),
                   "RETRACER__SERVICE__POLL_INTERVAL_S": str(args.poll_interval),
                   "RETRACER__SERVICE__APPLY_WORKERS": str(workers)}
            config = cfg.load(environ=env)
            say(f"[pg/{label}] publishing {n} events ({mix.jobs} jobs) to {names['queue']}")
            out["publish_per_s"] = round(publish_all(config, mix))
            log_path = data_dir / "serve.log"
            child_env = {k: v for k, v in os.environ.items() if not k.startswith("RETRACER")}
            child_env.update(env)
            say(f"[pg/{label}] starting `retracer serve` on {n} queued events")
            with open(log_path, "wb") as log:
                proc = subprocess.Popen([sys.executable, "-m", "retracer", "serve"], env=child_env,
                                        stdout=log, stderr=log)
            try:
                out.update(watch_serve(proc, engine, n, log_path, label))
            finally:
                stop_serve(proc)
            out["serve_exit"] = proc.returncode
            out["serve_stats"] = serve_stats(log_path)
            out["db_span_events_per_s"] = round((n - 1) / max(applied_span(engine), 1e-9))
            out["effects"] = check_effects(engine, mix, n)
        finally:
            engine.dispose()
            delete_broker_objects(names)
    return out


def stop_serve(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (serve finishes its batch and says "stopped" with its counters), SIGKILL after a minute."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve_stats(log_path: Path) -> dict[str, Any] | None:
    """The counters `serve` logs when it stops (its "stopped" line), and how often each chore ran."""
    stats: dict[str, Any] | None = None
    chores: Counter[str] = Counter()
    consuming = 0
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        if rec.get("msg") == "consuming":
            consuming += 1
        elif rec.get("msg") == "chore":
            chores[str(rec.get("chore"))] += 1
        elif rec.get("msg") == "stopped" or ("applied" in rec and "batches" in rec):
            stats = {k: rec[k] for k in ("applied", "duplicate", "rejected", "batches", "dispatched", "relayed",
                                         "timeouts", "chores") if k in rec}
    if stats is not None:
        stats["chore_rounds_with_work"] = dict(chores)
        # More than one "consuming": the broker connection was lost and re-established (a RabbitMQ restart
        # by someone else on a shared machine, say); the batch in hand comes back as duplicates.
        stats["broker_reconnects"] = max(consuming - 1, 0)
    return stats


def watch_serve(proc: subprocess.Popen[bytes], engine: Engine, n: int, log_path: Path,
                label: str) -> dict[str, Any]:
    """Poll processed_event until n events are applied; time first to last and sample the consumer's RSS."""
    t_first = t_last = None
    cpu_first = cpu_last = 0.0
    samples: list[tuple[int, float]] = []  # (events applied, RSS MB)
    progress: list[tuple[float, int]] = []  # (seconds since the first applied, events applied)
    deadline = time.monotonic() + max(300.0, n / 100)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        while True:
            done = int(conn.execute(text("SELECT count(*) FROM processed_event")).scalar_one())
            now = time.perf_counter()
            if done and t_first is None:
                t_first, cpu_first = now, cpu_s(proc.pid)
            if done:
                samples.append((done, rss_mb(proc.pid)))
                progress.append((now - t_first, done))  # type: ignore[operator]
            if done >= n:
                t_last, cpu_last = now, cpu_s(proc.pid)
                break
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise SystemExit(f"serve exited {proc.returncode} after {done} of {n} events:\n{tail}")
            if time.monotonic() > deadline:
                raise SystemExit(f"serve applied only {done} of {n} events before the deadline")
            time.sleep(0.1)
    assert t_first is not None and t_last is not None
    rate = n / max(t_last - t_first, 1e-9)
    cpu_per_event = (cpu_last - cpu_first) / n * 1e6
    say(f"[pg/{label}] {n} events in {t_last - t_first:.2f} s: {rate:.0f} events/s "
        f"(serve CPU {cpu_per_event:.0f} µs per event)")
    return {"events": n, "seconds": round(t_last - t_first, 2), "events_per_s": round(rate),
            "serve_cpu_us_per_event": round(cpu_per_event),
            "quarters_per_s": quarters(progress, n), **rss_figures(samples, n)}


def quarters(progress: list[tuple[float, int]], n: int) -> list[int]:
    """The rate in each quarter of the events (a falling rate means something grows with the run)."""
    out = []
    prev_t, prev_n = 0.0, progress[0][1] if progress else 0
    for q in (1, 2, 3, 4):
        point = next((p for p in progress if p[1] >= n * q // 4), progress[-1])
        out.append(round((point[1] - prev_n) / max(point[0] - prev_t, 1e-9)))
        prev_t, prev_n = point
    return out


def rss_figures(samples: list[tuple[int, float]], n: int) -> dict[str, Any]:
    """Growth from the first applied batch to the end, and the RSS slope extrapolated to 1M events."""
    if not samples:
        return {}
    first, last = samples[0], samples[-1]
    # Least-squares slope of RSS over events applied, after the first quarter (warm-up: caches, arenas).
    tail = [s for s in samples if s[0] >= n // 4] or samples
    mx = sum(s[0] for s in tail) / len(tail)
    my = sum(s[1] for s in tail) / len(tail)
    var = sum((s[0] - mx) ** 2 for s in tail)
    slope = sum((s[0] - mx) * (s[1] - my) for s in tail) / var if var else 0.0
    at_quarters = [next((s[1] for s in samples if s[0] >= n * q // 4), last[1]) for q in (1, 2, 3, 4)]
    return {"rss_start_mb": round(first[1], 1), "rss_end_mb": round(last[1], 1),
            "rss_by_quarter_mb": [round(v, 1) for v in at_quarters],
            "rss_peak_mb": round(max(s[1] for s in samples), 1), "rss_growth_mb": round(last[1] - first[1], 1),
            "rss_mb_per_1m_events": round(slope * 1_000_000, 1)}


# -- 2. raw consume + ack --------------------------------------------------------------------------------


def raw_consume_ack(args: argparse.Namespace, tmp: Path, mix: Mix, batch_ack: bool) -> dict[str, Any]:
    """kombu consume + ack alone, from a queue declared exactly as retracer's (queue type, DLX, single active)."""
    from kombu.connection import Connection
    from kombu.messaging import Consumer

    from retracer.bus.amqp import Topology

    names = broker_names()
    config = cfg.load(environ={**base_env(tmp, "sqlite://", args), **broker_env(names)})
    try:
        publish_all(config, mix)
        topology = Topology(config)
        n = len(mix.items)
        state = {"count": 0, "first": 0.0, "last": 0.0, "pending": 0}

        def on_message(message: Any) -> None:
            if not state["count"]:
                state["first"] = time.perf_counter()
            state["count"] += 1
            if batch_ack:
                state["pending"] += 1
                if state["pending"] >= args.batch_size or state["count"] >= n:
                    message.channel.basic_ack(message.delivery_tag, multiple=True)
                    state["pending"] = 0
            else:
                message.ack()
            if state["count"] >= n:
                state["last"] = time.perf_counter()

        with Connection(AMQP_URL, connect_timeout=10) as conn:
            channel = conn.channel()
            # on_message (raw message, no kombu decode), as retracer's BatchConsumer consumes.
            consumer = Consumer(channel, queues=[topology.events], on_message=on_message,
                                accept=["json", "application/json"], prefetch_count=args.prefetch,
                                no_ack=False, auto_declare=True)
            with consumer:
                while state["count"] < n:
                    conn.drain_events(timeout=30)
        rate = n / max(state["last"] - state["first"], 1e-9)
        say(f"[raw {'batch-ack' if batch_ack else 'ack'}] {n} messages: {rate:.0f} msg/s")
        return {"messages": n, "seconds": round(state["last"] - state["first"], 2), "per_s": round(rate)}
    finally:
        delete_broker_objects(names)


# -- 3. PostgreSQL single-row commit ceiling ----------------------------------------------------------------


def pg_single_commit(seconds: float) -> dict[str, Any]:
    import psycopg

    with pg_database("commit") as url:
        u = make_url(url)
        with psycopg.connect(host=u.host, port=u.port or 5432, user=u.username, password=u.password,
                             dbname=u.database) as conn:
            conn.execute("CREATE TABLE bench_counter (id integer PRIMARY KEY, n bigint NOT NULL)")
            conn.execute("INSERT INTO bench_counter VALUES (1, 0)")
            conn.commit()
            sync = conn.execute("SHOW synchronous_commit").fetchone()[0]  # type: ignore[index]
            n = 0
            start = time.perf_counter()
            end = start + seconds
            while True:
                conn.execute("UPDATE bench_counter SET n = n + 1 WHERE id = 1")
                conn.commit()
                n += 1
                if n % 100 == 0 and time.perf_counter() >= end:
                    break
            elapsed = time.perf_counter() - start
    rate = n / elapsed
    say(f"[pg single commit] {n} commits in {elapsed:.2f} s: {rate:.0f}/s (synchronous_commit={sync})")
    return {"commits": n, "seconds": round(elapsed, 2), "per_s": round(rate), "synchronous_commit": sync}


# -- 4. embedded SQLite ----------------------------------------------------------------------------------


@contextmanager
def serve_logging(path: Path) -> Iterator[None]:
    """retracer's JSON log lines, one per applied event as `serve` writes them, into a file."""
    logs.setup("INFO")
    logger = logging.getLogger("retracer")
    stream = open(path, "a", encoding="utf-8")  # noqa: SIM115
    for h in logger.handlers:
        if isinstance(h, logging.StreamHandler):
            h.setStream(stream)
    try:
        yield
    finally:
        logger.handlers.clear()
        logs.quiet()
        stream.close()


def fill_inbox(engine: Engine, bodies: list[str]) -> None:
    now = datetime.now(UTC)
    with engine.begin() as conn:
        for i in range(0, len(bodies), 5000):
            conn.execute(insert(Inbox), [{"body": b, "received_at": now} for b in bodies[i:i + 5000]])


def prepare_sqlite(args: argparse.Namespace, tmp: Path, background: int, label: str,
                   n_events: int) -> tuple[Service, Engine, Mix, Path]:
    data_dir = tmp / f"sqlite-{label}"
    url = f"sqlite:///{data_dir / 'retracer.db'}"
    store.upgrade(url)
    engine = store.make_engine(url)
    if background:
        say(f"[sqlite/{label}] inserting {background:,} background jobs")
        insert_background_jobs(engine, background)
    mix = event_mix(n_events, next_job_id(engine))
    fill_inbox(engine, mix.bodies)
    config = cfg.load(environ={**base_env(data_dir, url, args),
                               "RETRACER__SERVICE__POLL_INTERVAL_S": str(args.poll_interval)})
    return Service(config, store.session_factory(engine)), engine, mix, data_dir


def serve_sqlite(args: argparse.Namespace, tmp: Path, background: int, label: str, n_events: int | None = None,
                 quiet: bool = False) -> dict[str, Any]:
    service, engine, mix, data_dir = prepare_sqlite(args, tmp, background, label, n_events or args.events)
    n = len(mix.items)
    times: list[float] = []
    samples: list[tuple[int, float]] = []
    progress: list[tuple[float, int]] = [(0.0, 0)]
    drain = service.drain_inbox

    def timed_drain() -> int:
        got = drain()
        if got:
            times.append(time.perf_counter())
            done = service.stats.applied + service.stats.rejected + service.stats.duplicate
            samples.append((done, rss_mb()))
            progress.append((times[-1] - start, done))
        return got

    service.drain_inbox = timed_drain  # type: ignore[method-assign]  # count each batch as it is drained
    say(f"[sqlite/{label}] draining {n} events ({mix.jobs} jobs, {background:,} background jobs)")
    with serve_logging(data_dir / "serve.log"):
        start = time.perf_counter()
        service.run(until_idle=True)
    # The first batch's own work counts too: time it from the start of the drain.
    seconds = times[-1] - start
    rate = n / seconds
    if not quiet:
        say(f"[sqlite/{label}] {n} events in {seconds:.2f} s: {rate:.0f} events/s")
    out = {"background_jobs": background, "events": n, "seconds": round(seconds, 2), "events_per_s": round(rate),
           "db_span_events_per_s": round((n - 1) / max(applied_span(engine), 1e-9)),
           "batches": service.stats.batches, "quarters_per_s": quarters(progress, n), **rss_figures(samples, n),
           "effects": check_effects(engine, mix, n)}
    engine.dispose()
    return out


# -- soak: the consumer's memory over many events ------------------------------------------------------


def mix_waves(n_events: int, first_job: int) -> Iterator[list[tuple[str, str, str]]]:
    """The same per-job mix as event_mix, generated a wave at a time (a million events do not fit in a list
    cheaply); bodies are built directly as JSON: serve validates them anyway."""
    jobs = max(1, n_events // EVENTS_PER_JOB)
    now = datetime.now(UTC).isoformat()

    def body(etype: str, job: int | None, data: dict[str, Any]) -> tuple[str, str, str]:
        eid = str(uuid.uuid4())
        return etype, eid, json.dumps({"id": eid, "type": etype, "job": job, "occurred_at": now,
                                       "source": "bench", "data": data})

    for start in range(0, jobs, WAVE):
        wave = range(first_job + start, first_job + min(start + WAVE, jobs))
        items = [body("crash.submitted", None, crash_data(build_ids=["a1b2c3d4e5f60718"], priority=1))
                 for _ in wave]
        items += [body("retrace.started", j, {"worker": f"worker-{j % 8}"}) for j in wave]
        items += [body("retrace.heartbeat", j, {"worker": f"worker-{j % 8}"}) for j in wave]
        items += [body("retrace.heartbeat", j, {"worker": f"worker-{j % 8}"}) for j in wave]
        items += [body("upload.accepted", j, {"leaf": f"upload-{j}", "result": "#0  main () at cdrecord.c:42"})
                  for j in wave]
        yield items


def soak(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """`retracer serve` (RabbitMQ + PostgreSQL) consumes --soak events fed while it runs (the queue is kept
    under 20,000 messages); its RSS and rate are reported at each tenth of the run (sampled every 2 s)."""
    from kombu.connection import Connection

    from retracer.bus.amqp import Topology

    n = (args.soak // EVENTS_PER_JOB) * EVENTS_PER_JOB
    names = broker_names()
    out: dict[str, Any] = {"events": n}
    with pg_database("soak") as url:
        engine = store.make_engine(url)
        try:
            insert_background_jobs(engine, 1000)
            first_job = next_job_id(engine)
            data_dir = tmp / "soak"
            data_dir.mkdir()
            env = {**base_env(data_dir, url, args), **broker_env(names),
                   "RETRACER__SERVICE__POLL_INTERVAL_S": str(args.poll_interval)}
            config = cfg.load(environ=env)
            topology = Topology(config)
            log_path = data_dir / "serve.log"
            child_env = {k: v for k, v in os.environ.items() if not k.startswith("RETRACER")}
            child_env.update(env)
            with Connection(AMQP_URL, connect_timeout=10) as conn:
                topology.declare(conn)
                with open(log_path, "wb") as log:
                    proc = subprocess.Popen([sys.executable, "-m", "retracer", "serve", "--log-level", args.soak_log],
                                            env=child_env, stdout=log, stderr=log)
                try:
                    out.update(feed_and_watch(args, conn, topology, proc, engine, n, first_job, log_path))
                finally:
                    stop_serve(proc)
            out["serve_stats"] = serve_stats(log_path)
            with engine.connect() as c:
                out["rejected"] = int(c.execute(text("SELECT count(*) FROM rejected")).scalar_one())
        finally:
            engine.dispose()
            delete_broker_objects(names)
    return out


def feed_and_watch(args: argparse.Namespace, conn: Any, topology: Any, proc: subprocess.Popen[bytes],
                   engine: Engine, n: int, first_job: int, log_path: Path) -> dict[str, Any]:
    producer = conn.Producer(serializer=None)
    queue = topology.events.bind(conn.default_channel)
    waves = mix_waves(n, first_job)
    published = 0
    tenths: list[dict[str, Any]] = []
    start = time.perf_counter()
    last_check = 0.0
    next_tenth = n // 10
    t_prev, n_prev = start, 0
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as db_conn:
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise SystemExit(f"serve exited {proc.returncode} during the soak:\n{tail}")
            depth = queue.queue_declare(passive=True).message_count
            while published < n and depth < 20000:
                for rk, mid, body in next(waves):
                    producer.publish(body, exchange=topology.exchange, routing_key=rk, delivery_mode=2,
                                     content_type="application/json", content_encoding="utf-8", message_id=mid)
                published += WAVE * EVENTS_PER_JOB
                depth += WAVE * EVENTS_PER_JOB
            now = time.perf_counter()
            if now - last_check >= 2.0:
                last_check = now
                done = int(db_conn.execute(text("SELECT count(*) FROM processed_event")).scalar_one())
                if done >= next_tenth:
                    tenths.append({"events": done, "s": round(now - start, 1), "rss_mb": round(rss_mb(proc.pid), 1),
                                   "events_per_s": round((done - n_prev) / max(now - t_prev, 1e-9))})
                    say(f"[soak] {done:,} of {n:,} events applied, serve RSS (with its apply workers) "
                        f"{tenths[-1]['rss_mb']} MB, {tenths[-1]['events_per_s']} events/s")
                    t_prev, n_prev = now, done
                    next_tenth = n * (done * 10 // n + 1) // 10
                if done >= n:
                    break
            time.sleep(0.2)
    first, last = tenths[0], tenths[-1]
    return {"seconds": round(time.perf_counter() - start, 1), "tenths": tenths,
            "rss_after_first_tenth_mb": first["rss_mb"], "rss_end_mb": last["rss_mb"],
            "rss_growth_after_first_tenth_mb": round(last["rss_mb"] - first["rss_mb"], 1)}


# -- profile ---------------------------------------------------------------------------------------------


def count_statements(engine: Engine) -> Counter[str]:
    """Tally each SQL statement by verb and table, to show what a batch costs in round trips."""
    tally: Counter[str] = Counter()

    @event.listens_for(engine, "before_cursor_execute")
    def _count(conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool) -> None:
        words = statement.split()
        upper = [w.upper() for w in words]
        verb = upper[0] if upper else "?"
        kw = {"INSERT": "INTO", "UPDATE": "UPDATE", "SELECT": "FROM", "DELETE": "FROM"}.get(verb)
        table = "?"
        if kw in upper and upper.index(kw) + 1 < len(words):
            table = words[upper.index(kw) + 1].strip('"(')
        many = " (executemany)" if executemany else (" (multi-row VALUES)" if "VALUES (" in statement
                                                      and statement.count("), (") else "")
        tally[f"{verb} {table}{many}"] += 1

    return tally


def print_profile(title: str, prof: cProfile.Profile, n: int, seconds: float, tally: Counter[str],
                  top: int) -> None:
    print(f"\n=== profile: {title}: {n} events in {seconds:.2f} s under cProfile ({n / seconds:.0f} events/s "
          f"profiled) ===")
    print("SQL statements executed (per event):")
    for key, count in tally.most_common(20):
        print(f"  {count:7d}  {count / n:6.2f}/event  {key}")
    for order in ("tottime", "cumulative"):
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        stats.sort_stats(order).print_stats(top)
        lines = buf.getvalue().splitlines()
        start = next((i for i, ln in enumerate(lines) if ln.strip().startswith("ncalls")), 0)
        print(f"-- top {top} by {order} --")
        print("\n".join(lines[start:]).rstrip())


def profile(args: argparse.Namespace, tmp: Path) -> None:
    n_events = args.profile_events
    # SQLite: the embedded drain loop.
    service, engine, mix, data_dir = prepare_sqlite(args, tmp, 1000, "profile", n_events)
    tally = count_statements(engine)
    prof = cProfile.Profile()
    with serve_logging(data_dir / "serve.log"):
        start = time.perf_counter()
        prof.enable()
        while service.drain_inbox():
            pass
        prof.disable()
        seconds = time.perf_counter() - start
    check_effects(engine, mix, len(mix.items))
    engine.dispose()
    print_profile("SQLite, Service.drain_inbox", prof, len(mix.items), seconds, tally, args.profile_top)

    # PostgreSQL: Service.apply on batches, as BatchConsumer hands them over (no broker in the way).
    with pg_database("profile") as url:
        engine = store.make_engine(url)
        insert_background_jobs(engine, 1000)
        mix = event_mix(n_events, next_job_id(engine))
        data_dir = tmp / "pg-profile"
        data_dir.mkdir()
        config = cfg.load(environ=base_env(data_dir, url, args))
        service = Service(config, store.session_factory(engine))
        bodies = [b.encode() for b in mix.bodies]
        tally = count_statements(engine)
        prof = cProfile.Profile()
        with serve_logging(data_dir / "serve.log"):
            start = time.perf_counter()
            prof.enable()
            for i in range(0, len(bodies), args.batch_size):
                service.apply(bodies[i:i + args.batch_size])
            prof.disable()
            seconds = time.perf_counter() - start
        check_effects(engine, mix, len(mix.items))
        engine.dispose()
    print_profile("PostgreSQL, Service.apply", prof, len(mix.items), seconds, tally, args.profile_top)


# -- report ----------------------------------------------------------------------------------------------


def shipped_queue_type() -> str:
    return str(cfg.defaults()["broker"]["queue_type"])


def source_revision() -> str:
    """The commit measured, with +dirty when src/ has uncommitted changes (read-only git queries)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=root, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def verdict(ok: bool | None) -> str:
    return "n/a " if ok is None else ("MET " if ok else "MISS")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=None,
                        help="events per measured run, a multiple of 5 (default 20000; --quick 5000)")
    parser.add_argument("--quick", action="store_true",
                        help="5,000 events and 100,000 instead of 1,000,000 background jobs")
    parser.add_argument("--big", type=int, default=None, help="background jobs for the scale ratio")
    parser.add_argument("--no-pg-scale", action="store_true", help="skip the PostgreSQL run with --big jobs")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the shipped config's")
    parser.add_argument("--prefetch", type=int, default=None, help="default: the shipped config's")
    parser.add_argument("--poll-interval", type=float, default=None, help="default: the shipped config's")
    parser.add_argument("--apply-workers", type=int, default=None, help="default: the shipped config's")
    parser.add_argument("--commit-seconds", type=float, default=3.0, help="length of the single-commit loop")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure the 1,000-job runs and the ceilings R times, keep the best of each")
    parser.add_argument("--soak", type=int, default=0, metavar="N",
                        help="instead of measuring: feed N events (e.g. 1000000) through `retracer serve` on "
                             "RabbitMQ + PostgreSQL and report its RSS per tenth of the run")
    parser.add_argument("--soak-log", default="INFO", choices=["INFO", "WARNING"],
                        help="serve's log level in the soak (INFO writes one line per event)")
    parser.add_argument("--profile", action="store_true", help="profile the apply path instead of measuring")
    parser.add_argument("--profile-events", type=int, default=5000)
    parser.add_argument("--profile-top", type=int, default=30)
    args = parser.parse_args()
    shipped = cfg.defaults()
    args.events = args.events or (5000 if args.quick else 20000)
    args.big = args.big or (100_000 if args.quick else 1_000_000)
    args.batch_size = args.batch_size or shipped["service"]["batch_size"]
    args.prefetch = args.prefetch or shipped["broker"]["prefetch"]
    args.poll_interval = args.poll_interval or shipped["service"]["poll_interval_s"]
    args.apply_workers = args.apply_workers or shipped["service"]["apply_workers"]
    small = 1000

    logging.getLogger("retracer").addHandler(logging.NullHandler())
    with tempfile.TemporaryDirectory(prefix="retracer-bench-") as tmpdir:
        tmp = Path(tmpdir)
        if args.profile:
            profile(args, tmp)
            return
        if args.soak:
            res = soak(args, tmp)
            growth = res["rss_growth_after_first_tenth_mb"]
            print(f"\nsoak: {res['events']:,} events through `retracer serve` (RabbitMQ + PostgreSQL) in "
                  f"{res['seconds']} s; rejected {res['rejected']}; serve {res['serve_stats']}")
            print(f"  {'applied':>10} {'seconds':>8} {'RSS MB':>7} {'events/s':>9}")
            for t in res["tenths"]:
                print(f"  {t['events']:>10,} {t['s']:>8} {t['rss_mb']:>7} {t['events_per_s']:>9,}")
            print(f"  [{verdict(growth <= TARGETS['rss_growth_mb_per_1m'] if res['events'] >= 1_000_000 else None)}] "
                  f"RSS growth after the first tenth: {growth} MB (target <= 10 MB over 1,000,000 events)")
            print(json.dumps({"soak_events": res["events"], "soak_rss_growth_mb": growth,
                              "soak_rss_end_mb": res["rss_end_mb"], "soak_seconds": res["seconds"],
                              "soak_events_per_s": round(res["events"] / res["seconds"]),
                              "soak_rejected": res["rejected"]}))
            return
        started = time.perf_counter()
        r: dict[str, Any] = {"load_start": round(os.getloadavg()[0], 2), "src": source_revision()}
        if r["load_start"] > 0.5:
            say(f"load average is {r['load_start']} before the run: other processes share the CPUs, "
                f"expect noisy figures")
        raw_mix = event_mix(args.events, 1)
        # Warm the in-process caches (imports, compiled statements, the workflow) off the clock.
        serve_sqlite(args, tmp, small, "warmup", n_events=min(args.events, 1000), quiet=True)
        for i in range(args.rounds):
            # With --rounds R each of these is measured R times, interleaved, and the best run kept.
            runs: tuple[tuple[str, Callable[[], dict[str, Any]], str], ...] = (
                ("pg_small", partial(serve_rabbitmq_pg, args, tmp, small, f"small{i}"), "events_per_s"),
                # The same run with one applying process: what the apply workers add, measured side by side.
                ("pg_one_process", partial(serve_rabbitmq_pg, args, tmp, small, f"one{i}", workers=1),
                 "events_per_s"),
                ("raw_ack", lambda: raw_consume_ack(args, tmp, raw_mix, batch_ack=False), "per_s"),
                ("raw_batch_ack", lambda: raw_consume_ack(args, tmp, raw_mix, batch_ack=True), "per_s"),
                ("commit", lambda: pg_single_commit(args.commit_seconds), "per_s"),
                ("sqlite_small", partial(serve_sqlite, args, tmp, small, f"small{i}"), "events_per_s"),
            )
            for key, run, rate in runs:
                if key == "pg_one_process" and args.apply_workers < 2:
                    continue
                got = run()
                if key not in r or got[rate] > r[key][rate]:
                    r[key] = got
        r["sqlite_big"] = serve_sqlite(args, tmp, args.big, "big")
        if not args.no_pg_scale:
            r["pg_big"] = serve_rabbitmq_pg(args, tmp, args.big, "big")
        total = time.perf_counter() - started

    report(args, r, small, total)


def report(args: argparse.Namespace, r: dict[str, Any], small: int, total: float) -> None:
    pg, sq = r["pg_small"], r["sqlite_small"]
    res: dict[str, Any] = {
        "rabbitmq_pg_events_per_s": pg["events_per_s"],
        "raw_consume_ack_per_s": r["raw_ack"]["per_s"],
        "pg_single_commit_per_s": r["commit"]["per_s"],
        "sqlite_events_per_s": sq["events_per_s"],
        "raw_consume_batch_ack_per_s": r["raw_batch_ack"]["per_s"],
        "rabbitmq_pg_vs_single_commit": round(pg["events_per_s"] / r["commit"]["per_s"], 2),
        "rabbitmq_pg_vs_raw_consume_ack": round(pg["events_per_s"] / r["raw_ack"]["per_s"], 3),
        "rabbitmq_pg_vs_raw_consume_batch_ack": round(pg["events_per_s"] / r["raw_batch_ack"]["per_s"], 3),
        "apply_workers": pg["apply_workers"],
        "rabbitmq_pg_one_process_events_per_s": r["pg_one_process"]["events_per_s"] if "pg_one_process" in r else None,
        "apply_workers_speedup": (round(pg["events_per_s"] / r["pg_one_process"]["events_per_s"], 2)
                                  if "pg_one_process" in r else None),
        "sqlite_big_events_per_s": r["sqlite_big"]["events_per_s"],
        "sqlite_scale_ratio": round(r["sqlite_big"]["events_per_s"] / sq["events_per_s"], 3),
        "rabbitmq_pg_big_events_per_s": r["pg_big"]["events_per_s"] if "pg_big" in r else None,
        "pg_scale_ratio": round(r["pg_big"]["events_per_s"] / pg["events_per_s"], 3) if "pg_big" in r else None,
        "big_jobs": args.big, "small_jobs": small, "events": pg["events"],
        "rabbitmq_pg_db_span_events_per_s": pg["db_span_events_per_s"],
        "sqlite_db_span_events_per_s": sq["db_span_events_per_s"],
        "serve_rss_start_mb": pg.get("rss_start_mb"), "serve_rss_end_mb": pg.get("rss_end_mb"),
        "serve_cpu_us_per_event": pg.get("serve_cpu_us_per_event"),
        "serve_rss_growth_mb": pg.get("rss_growth_mb"), "serve_rss_mb_per_1m_events": pg.get("rss_mb_per_1m_events"),
        "sqlite_rss_growth_mb": sq.get("rss_growth_mb"), "sqlite_rss_mb_per_1m_events": sq.get("rss_mb_per_1m_events"),
        "synchronous_commit": r["commit"]["synchronous_commit"],
        "batch_size": args.batch_size, "prefetch": args.prefetch, "queue_type": shipped_queue_type(),
        "effects_ok": all(x["effects"]["ok"] for k, x in r.items() if isinstance(x, dict) and "effects" in x),
        "cpus": os.cpu_count(), "total_s": round(total), "loadavg_start": r["load_start"],
        "loadavg_end": round(os.getloadavg()[0], 2), "src": r["src"],
    }

    print(f"\nretracer bench/events.py: best of {args.rounds}, {pg['events']} events per run "
          f"({pg['events'] // EVENTS_PER_JOB} jobs x "
          f"submitted/started/heartbeat x2/accepted), batch_size {args.batch_size}, prefetch {args.prefetch}, "
          f"{shipped_queue_type()} queue, {os.cpu_count()} CPUs, "
          f"PostgreSQL synchronous_commit={res['synchronous_commit']}")
    rows = [
        (f"RabbitMQ + PostgreSQL, `retracer serve` x{pg['apply_workers']}", f"{small:,}", pg["events_per_s"],
         "events/s", f"{pg['seconds']} s; db-stamped {pg['db_span_events_per_s']}/s; by quarter "
                     f"{pg['quarters_per_s']}; CPU {pg['serve_cpu_us_per_event']} µs/event"),
    ]
    if "pg_one_process" in r:
        o = r["pg_one_process"]
        rows.append(("  the same, applying in one process", f"{small:,}", o["events_per_s"], "events/s",
                     f"{o['seconds']} s; by quarter {o['quarters_per_s']}; CPU {o['serve_cpu_us_per_event']} µs/event; "
                     f"workers' speed-up {res['apply_workers_speedup']}x"))
    if "pg_big" in r:
        b = r["pg_big"]
        rows.append(("RabbitMQ + PostgreSQL, `retracer serve`", f"{args.big:,}", b["events_per_s"], "events/s",
                     f"{b['seconds']} s; db-stamped {b['db_span_events_per_s']}/s; by quarter {b['quarters_per_s']}"))
    rows += [
        ("raw kombu consume + ack per message", "-", r["raw_ack"]["per_s"], "msg/s", f"{r['raw_ack']['seconds']} s"),
        (f"raw kombu consume + multiple-ack per {args.batch_size}", "-", r["raw_batch_ack"]["per_s"], "msg/s",
         f"{r['raw_batch_ack']['seconds']} s"),
        ("PostgreSQL 1-row UPDATE + COMMIT", "-", r["commit"]["per_s"], "commits/s",
         f"{r['commit']['commits']} in {r['commit']['seconds']} s"),
        ("SQLite embedded, drain_inbox", f"{small:,}", sq["events_per_s"], "events/s",
         f"{sq['seconds']} s; {sq['batches']} batches; by quarter {sq['quarters_per_s']}"),
        ("SQLite embedded, drain_inbox", f"{args.big:,}", r["sqlite_big"]["events_per_s"], "events/s",
         f"{r['sqlite_big']['seconds']} s; by quarter {r['sqlite_big']['quarters_per_s']}"),
    ]
    print(f"\n  {'measurement':<44} {'jobs in table':>13} {'rate':>9}  {'unit':<10} detail")
    print("  " + "-" * 110)
    for name, jobs, rate, unit, detail in rows:
        print(f"  {name:<44} {jobs:>13} {rate:>9,}  {unit:<10} {detail}")
    print(f"\n  consumer RSS (serve subprocess, {pg['events']} events): start {pg.get('rss_start_mb')} MB, "
          f"end {pg.get('rss_end_mb')} MB, peak {pg.get('rss_peak_mb')} MB, growth {pg.get('rss_growth_mb')} MB; "
          f"slope -> {pg.get('rss_mb_per_1m_events')} MB per 1M events")
    print(f"  embedded RSS (in-process drain): growth {sq.get('rss_growth_mb')} MB; slope -> "
          f"{sq.get('rss_mb_per_1m_events')} MB per 1M events")
    for key in ("pg_small", "pg_one_process", "pg_big", "sqlite_small", "sqlite_big"):
        if key in r:
            print(f"  effects {key}: {r[key]['effects']}")
    for key in ("pg_small", "pg_one_process", "pg_big"):
        if key in r:
            print(f"  serve {key}: exit {r[key]['serve_exit']}, stats {r[key]['serve_stats']}")
            if (r[key]["serve_stats"] or {}).get("broker_reconnects"):
                print(f"  WARNING {key}: serve reconnected to RabbitMQ during the run (restarted by someone else?); "
                      f"its rate is not comparable")
    for key in ("pg_small", "pg_big", "sqlite_small", "sqlite_big"):
        q = r.get(key, {}).get("quarters_per_s") or []
        if len(q) == 4 and q[0] and q[3] < 0.7 * q[0]:
            print(f"  WARNING {key}: the rate fell from {q[0]}/s in the first quarter to {q[3]}/s in the last: "
                  f"something costs more as the tables grow (run --profile, or a longer --events)")

    def ratio_line(name: str, value: float | None, target: str, ok: bool | None) -> None:
        shown = "-" if value is None else f"{value:,.2f}"
        print(f"  [{verdict(ok)}] {name:<52} {shown:>10}   target {target}")

    print("\nTargets:")
    ratio_line("rabbitmq_pg / pg_single_commit", res["rabbitmq_pg_vs_single_commit"], ">= 3.00x",
               res["rabbitmq_pg_vs_single_commit"] >= TARGETS["pg_vs_single_commit"])
    ratio_line("rabbitmq_pg / raw_consume_ack (per-message ack)", res["rabbitmq_pg_vs_raw_consume_ack"], ">= 0.50",
               res["rabbitmq_pg_vs_raw_consume_ack"] >= TARGETS["pg_vs_raw_consume"])
    ratio_line("rabbitmq_pg / raw_consume_batch_ack (stricter)", res["rabbitmq_pg_vs_raw_consume_batch_ack"],
               ">= 0.50", res["rabbitmq_pg_vs_raw_consume_batch_ack"] >= TARGETS["pg_vs_raw_consume"])
    ratio_line("sqlite_events_per_s", sq["events_per_s"], ">= 5,000/s",
               sq["events_per_s"] >= TARGETS["sqlite_events_per_s"])
    big = f"{args.big:,}" + (" (--quick: not 1,000,000)" if args.big != 1_000_000 else "")
    ratio_line(f"sqlite rate {big} / {small:,} jobs", res["sqlite_scale_ratio"], ">= 0.80",
               res["sqlite_scale_ratio"] >= TARGETS["scale_ratio"])
    ratio_line(f"pg rate {big} / {small:,} jobs", res["pg_scale_ratio"], ">= 0.80",
               None if res["pg_scale_ratio"] is None else res["pg_scale_ratio"] >= TARGETS["scale_ratio"])
    growth = pg.get("rss_mb_per_1m_events")
    # A slope from a few thousand events is mostly warm-up and page granularity: no verdict below 20,000.
    ratio_line("serve RSS MB per 1M events (extrapolated)", growth, "<= 10 MB (authoritative: --soak 1000000)",
               None if growth is None or pg["events"] < 20000 else growth <= TARGETS["rss_growth_mb_per_1m"])
    print(f"  (RSS growth measured over {pg['events']} events only: {pg.get('rss_growth_mb')} MB incl. warm-up)")
    print(f"  effects checked (every event applied once, jobs FULLYBUILT, history, mail): "
          f"{'OK' if res['effects_ok'] else 'WRONG'}; total {res['total_s']} s; source {res['src']}; "
          f"load average {res['loadavg_start']} -> {res['loadavg_end']}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
