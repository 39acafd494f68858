"""How fast `retracer web` answers with a big database: p50 and p95 of `/`, `/api/status` and `/api/jobs/<id>`
over real HTTP, against the bare per-state count every status page starts from.

    python bench/web.py                              # 1,000,000 jobs, SQLite and PostgreSQL
    python bench/web.py --jobs 100000 --db sqlite --requests 200

Fills a fresh database (a temporary SQLite file; a scratch PostgreSQL database, dropped at the end) with
--jobs jobs in one INSERT ... SELECT: mostly FULLYBUILT, a queue of PENDING jobs (some waiting for their retry
time), a few RETRACING (one per worker), some FAILEDTOUPLOAD and ON_HOLD, each failure with its history rows.
Then starts `retracer web` on a free loopback port and asks each route --requests times, one request after
the other on one keep-alive connection, and runs `SELECT state, count(*) FROM job GROUP BY state` as many
times on a connection of its own. Prints one table per database; the goal is a p95 under 100 ms each.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import httpx
from sqlalchemy import text
from sqlalchemy.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retracer import store
from retracer.testing.instance import RETRACER
from retracer.testing.postgres import scratch_postgres

PG_ADMIN_URL = os.environ.get("RETRACER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
#: Out of every 1,000 jobs (i % 1000): what a busy instance holds. RETRACING is bounded by the workers, not
#: by the table: 20 jobs in all, whatever its size.
SPREAD = [("PENDING", 20), ("FAILEDTOUPLOAD", 5), ("ON_HOLD", 10)]
RETRACING = 20
TARGET_P95_MS = 100.0


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def state_case(i: str) -> str:
    parts, low = [], 0
    for state, share in SPREAD:
        parts.append(f"WHEN {i} % 1000 < {low + share} THEN '{state}'")
        low += share
    return f"CASE WHEN {i} <= {RETRACING} THEN 'RETRACING' {' '.join(parts)} ELSE 'FULLYBUILT' END"


def fill(engine: Engine, n: int) -> float:
    """n jobs and the history of their failures, in two INSERT ... SELECT statements; returns seconds."""
    start = time.perf_counter()
    pg = engine.dialect.name == "postgresql"
    now = datetime.now(UTC)
    t = now if pg else now.replace(tzinfo=None)
    later = (now + timedelta(minutes=30)) if pg else (now + timedelta(minutes=30)).replace(tzinfo=None)
    false = "false" if pg else "0"
    state = state_case("i")
    cols = ("state, crash_id, creator, package, version, architecture, release, core, executable, build_ids, "
            "priority, manual_priority, attempts, not_before, created_at, started_at, finished_at, worker, "
            "upload_leaf, upload_log, hold_reason, last_error, version_id")
    values = (f"{state}, 'crash-' || i, 'mark@example.com', 'pkg' || (i % 5000), '1.0-' || (i % 97), 'amd64', "
              f"'noble', '/srv/crashes/' || i || '/core', '/usr/bin/prog', '[]', i % 7, {false}, "
              f"CASE WHEN i % 1000 BETWEEN 15 AND 19 THEN 1 ELSE 0 END, "
              f"CASE WHEN i % 1000 BETWEEN 15 AND 19 THEN :later END, :t, :t, :t, "
              f"CASE WHEN i <= {RETRACING} THEN 'worker-' || i END, 'upload-' || i, "
              f"CASE WHEN i % 1000 BETWEEN 20 AND 24 THEN 'checksum mismatch' END, "
              f"CASE WHEN i % 1000 BETWEEN 25 AND 34 THEN 'permanent failure: gdb crashed' END, "
              f"CASE WHEN i % 1000 BETWEEN 20 AND 34 THEN 'gdb crashed' END, 3")
    series = ("generate_series(1, :n) AS g(i)" if pg else "g")
    prefix = "" if pg else "WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < :n) "
    with engine.begin() as conn:
        conn.execute(text(f"{prefix}INSERT INTO job ({cols}) SELECT {values} FROM {series}"),
                     {"n": n, "t": t, "later": later})
        # Every failed or held job: submitted, started, failed (the rows status's recent failures read).
        conn.execute(text(
            "INSERT INTO history (job_id, from_state, to_state, trigger, actor, reason, at) "
            "SELECT id, s.from_state, CASE WHEN s.step = 3 THEN job.state ELSE s.to_state END, "
            "CASE WHEN s.step = 3 AND job.state = 'FAILEDTOUPLOAD' THEN 'upload_failed' ELSE s.trigger END, "
            "'event:bench', CASE WHEN s.step = 3 THEN job.last_error END, :t FROM job CROSS JOIN ("
            "SELECT 1 AS step, NULL AS from_state, 'PENDING' AS to_state, 'submit' AS trigger "
            "UNION ALL SELECT 2, 'PENDING', 'RETRACING', 'start' "
            "UNION ALL SELECT 3, 'RETRACING', NULL, 'retrace_failed') s "
            "WHERE job.state IN ('FAILEDTOUPLOAD', 'ON_HOLD') ORDER BY job.id, s.step"), {"t": t})
        if pg:
            conn.execute(text("SELECT setval(pg_get_serial_sequence('job', 'id'), (SELECT max(id) FROM job))"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        # A table of that size has statistics in real life (autovacuum, SQLite's ANALYZE after an upgrade).
        conn.execute(text("VACUUM ANALYZE job" if pg else "ANALYZE"))
        if pg:
            conn.execute(text("VACUUM ANALYZE history"))
    return time.perf_counter() - start


@contextmanager
def database(kind: str, tmp: Path) -> Iterator[str]:
    if kind == "sqlite":
        url = f"sqlite:///{tmp / 'data' / 'retracer.db'}"
        store.upgrade(url)
        yield url
    else:
        with scratch_postgres(PG_ADMIN_URL, "retracer_bench_web") as url:
            yield url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def web_server(url: str, tmp: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "RETRACER__DATABASE__URL": url, "RETRACER__SERVICE__DATA_DIR": str(tmp / "data")}
    env.pop("RETRACER_CONFIG", None)
    log = tmp / "web.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([*RETRACER, "web", "--port", str(port), "--log-level", "WARNING"],
                                env=env, stdout=out, stderr=out)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{base}/openapi.json", timeout=5)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"retracer web did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(30)


def timed(call: Callable[[], object], n: int) -> list[float]:
    """Milliseconds of n calls, after two warm-up calls (connections, caches)."""
    for _ in range(2):
        call()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        out.append((time.perf_counter() - start) * 1000)
    return out


def figures(samples: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return statistics.median(samples), cuts[94]


def run(kind: str, n: int, requests: int) -> list[tuple[str, float, float]]:
    with tempfile.TemporaryDirectory(prefix="retracer-bench-web-") as where:
        tmp = Path(where)
        with database(kind, tmp) as url:
            engine = store.make_engine(url)
            say(f"[{kind}] inserting {n:,} jobs")
            say(f"[{kind}] filled in {fill(engine, n):.1f} s")
            with engine.connect() as conn:
                counts: dict[str, int] = {state: n for state, n in conn.execute(
                    text("SELECT state, count(*) FROM job GROUP BY state"))}
            say(f"[{kind}] jobs per state: {counts}")
            rows: list[tuple[str, float, float]] = []
            with engine.connect() as conn:
                rows.append(("SELECT state, count(*) GROUP BY state", *figures(timed(
                    lambda: conn.execute(text("SELECT state, count(*) FROM job GROUP BY state")).all(),
                    requests))))
            engine.dispose()
            ids = random.Random(7).choices(range(1, n + 1), k=requests + 2)
            with web_server(url, tmp) as base, httpx.Client(base_url=base, timeout=60) as client:
                def get(path: str) -> None:
                    answer = client.get(path)
                    if answer.status_code != 200:
                        raise SystemExit(f"GET {path}: {answer.status_code} {answer.text[:500]}")

                for path in ("/", "/api/status"):
                    say(f"[{kind}] GET {path} x {requests}")
                    rows.append((f"GET {path}", *figures(timed(partial(get, path), requests))))
                say(f"[{kind}] GET /api/jobs/<id> x {requests}")
                pick = iter(ids)
                rows.append(("GET /api/jobs/<id>", *figures(timed(lambda: get(f"/api/jobs/{next(pick)}"),
                                                                  requests))))
            return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--requests", type=int, default=300, help="Requests per route (default 300).")
    args = parser.parse_args()
    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    slow = []
    for kind in kinds:
        rows = run(kind, args.jobs, args.requests)
        base_p95 = rows[0][2]
        print(f"\n{kind}, {args.jobs:,} jobs, {args.requests} requests each (ms)")
        print(f"{'what':<40} {'p50':>8} {'p95':>8} {'p95 / bare count':>17}")
        for what, p50, p95 in rows:
            print(f"{what:<40} {p50:>8.1f} {p95:>8.1f} {p95 / base_p95:>16.1f}x")
            if what.startswith("GET") and p95 > TARGET_P95_MS:
                slow.append(f"{kind} {what}")
    print(f"\np95 over {TARGET_P95_MS:.0f} ms: {', '.join(slow) if slow else 'none'}")


if __name__ == "__main__":
    main()
