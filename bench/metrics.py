"""What a scrape of the web app's /metrics costs with a million jobs, on SQLite and PostgreSQL.

    python bench/metrics.py [--jobs N] [--no-pg] [--rounds R]

A fresh database (a SQLite file; a scratch PostgreSQL database, dropped at the end) is filled with N jobs
(default 1,000,000) spread over the states as a long-running site has them (90% FULLYBUILT; 5% PENDING
spread over the whole id range, the worst case for the oldest-pending lookup), four history rows a job,
and 100,000 mail rows, bulk-inserted with SQL. Then:

  <db>_scrape_ms          median of R scrapes (generate_latest on the app's registry) once the history's
                          count is cached (the usual scrape)
  <db>_scrape_history_ms  one scrape that counts the history too (at most once a minute, HISTORY_TTL_S)
  <db>_query_ms           each query of the collector alone, median of R

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from sqlalchemy import distinct, func, select, text
from sqlalchemy.engine import Engine

from retracer import store
from retracer.store.models import History, Job, Mail, MissingSymbol, Rejected
from retracer.testing.postgres import scratch_postgres
from retracer.web.metrics import DatabaseCollector, registry_for

PG_ADMIN_URL = os.environ.get("RETRACER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")

# (state, share of jobs in per mille): by id modulo 1000, so every state is spread over the whole range.
STATE_CASE = ("CASE WHEN n % 1000 < 900 THEN 'FULLYBUILT' WHEN n % 1000 < 950 THEN 'PENDING' "
              "WHEN n % 1000 < 970 THEN 'RETRACING' WHEN n % 1000 < 990 THEN 'ON_HOLD' ELSE 'FAILEDTOUPLOAD' END")
TRIGGER_CASE = ("CASE WHEN k = 0 THEN 'submit' WHEN k = 1 THEN 'start' WHEN k = 2 THEN 'retrace_failed' "
                "ELSE 'upload_accepted' END")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fill(engine: Engine, jobs: int) -> None:
    pg = engine.dialect.name == "postgresql"
    series = "generate_series(1, :n) AS s(n)" if pg else \
        "(WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < :n) SELECT n FROM s) AS s"
    now = "now()" if pg else "datetime('now')"

    def age(col: str) -> str:
        return f"{now} - ({col}) * interval '1 second'" if pg else f"datetime('now', '-' || ({col}) || ' seconds')"

    json_list = "'[]'::json" if pg else "'[]'"
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO job (id, state, crash_id, creator, package, version, architecture, release, core, "
            "executable, build_ids, priority, manual_priority, attempts, created_at, version_id) "
            f"SELECT n, {STATE_CASE}, 'crash-' || n, 'c@example.com', 'pkg', '1.0', 'amd64', 'noble', "
            f"'/cores/' || n, '/usr/bin/x', {json_list}, 0, false, 1, {age(':n - n')}, 1 FROM {series}"),
            {"n": jobs})
        say(f"{jobs} jobs")
        history_series = series.replace(":n", ":h")
        conn.execute(text(
            "INSERT INTO history (id, job_id, from_state, to_state, trigger, actor, at) "
            f"SELECT n, (n - 1) / 4 + 1, NULL, 'PENDING', {TRIGGER_CASE.replace('k', '((n - 1) % 4)')}, "
            f"'event:bench', {age(':h - n')} FROM {history_series}"), {"h": jobs * 4})
        say(f"{jobs * 4} history rows")
        mail_series = series.replace(":n", ":m")
        conn.execute(text(
            "INSERT INTO mail (job_id, state, recipient, rationale, context, status, attempts, created_at) "
            f"SELECT n, 'FULLYBUILT', 'c@example.com', 'creator', {json_list.replace('[]', '{}')}, "
            f"CASE WHEN n % 10 = 0 THEN 'pending' ELSE 'sent' END, 1, {now} FROM {mail_series}"),
            {"m": min(jobs, 100_000)})
        if pg:
            conn.execute(text("SELECT setval(pg_get_serial_sequence('job', 'id'), :n)"), {"n": jobs})
    if pg:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
    else:
        with engine.begin() as conn:
            conn.execute(text("ANALYZE"))


def timed(work: Callable[[], object], rounds: int) -> float:
    spent = []
    for _ in range(rounds):
        began = time.perf_counter()
        work()
        spent.append((time.perf_counter() - began) * 1000)
    return round(statistics.median(spent), 1)


def measure(name: str, url: str, jobs: int, rounds: int) -> dict[str, Any]:
    engine = store.make_engine(url)
    try:
        say(f"{name}: filling")
        fill(engine, jobs)
        factory = store.session_factory(engine)
        figures: dict[str, Any] = {}
        registry = registry_for(factory)
        began = time.perf_counter()
        generate_latest(registry)
        figures[f"{name}_scrape_history_ms"] = round((time.perf_counter() - began) * 1000, 1)
        figures[f"{name}_scrape_ms"] = timed(lambda: generate_latest(registry), rounds)
        queue = DatabaseCollector(factory).queue
        queries: dict[str, Any] = {
            "jobs_by_state": select(Job.state, func.count()).group_by(Job.state),
            "oldest_pending": select(func.min(Job.id)).where(Job.state == queue),
            "history_by_trigger": select(History.trigger, func.count()).group_by(History.trigger),
            "mail_by_status": select(Mail.status, func.count()).group_by(Mail.status),
            "rejected": select(func.count()).select_from(Rejected).where(Rejected.replayed_at.is_(None)),
            "missing_symbols": select(func.count(distinct(MissingSymbol.build_id))),
        }
        with factory() as session:
            figures[f"{name}_query_ms"] = {label: timed(partial(session.execute, query), rounds)
                                           for label, query in queries.items()}
        return figures
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-pg", action="store_true")
    args = parser.parse_args()
    figures: dict[str, Any] = {"jobs": args.jobs}
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'retracer.db'}"
        store.upgrade(url)
        figures.update(measure("sqlite", url, args.jobs, args.rounds))
    if not args.no_pg:
        with scratch_postgres(PG_ADMIN_URL, "retracer_bench_metrics") as url:
            figures.update(measure("pg", url, args.jobs, args.rounds))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
