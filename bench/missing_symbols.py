"""Missing symbols with many jobs: `retracer symbols missing`'s listing and an import's release, on SQLite
and PostgreSQL.

    python bench/missing_symbols.py [--jobs N] [--build-ids B] [--no-pg]

N jobs (default 100,000) each wait for 3 of B build-ids (default 2,000; one build-id, "libc", is missing for
every job), written in bulk as a failed attempt leaves them, half queued for a retry and half held. Then:

  listing_ms        reports.missing_symbols(session, 50): the most-waited-for 50 build-ids with their jobs
  page_listing_ms   the same as the status page counts it: over the newest reports.MISSING_SCAN reports only
  release_none_ms   release_unblocked after an import that covers nothing anybody waits for
  release_one_ms    release_unblocked after an import of the debug file of one build-id (its jobs still
                    wait for others: none is released, their rows for it go)
  *_scan_ms         the same two without naming the imported build-ids (a scan of the whole missing list:
                    what every import did before it passed what it brought)

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Table, insert, text
from sqlalchemy.orm import Session

from retracer import reports, store
from retracer.store import bulk
from retracer.store.models import Job, MissingSymbol, SymbolArchive, SymbolFile, utcnow
from retracer.symbols import missing
from retracer.symbols.release import release_unblocked
from retracer.testing.postgres import scratch_postgres
from retracer.workflow import load_spec

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def fill(url: str, jobs: int, build_ids: int) -> None:
    roles = load_spec().roles
    now = utcnow()
    engine = store.make_engine(url)
    job_table = Job.__table__
    missing_table = MissingSymbol.__table__
    assert isinstance(job_table, Table) and isinstance(missing_table, Table)
    with engine.begin() as conn:
        step = 10000
        for start in range(1, jobs + 1, step):
            rows = [bulk.complete(job_table, {
                "id": i, "state": roles.queue if i % 2 else roles.held, "crash_id": f"c{i}", "creator": "a@b.c",
                "package": "p", "version": "1", "architecture": "amd64", "release": "r", "core": "/c",
                "executable": "/e", "build_ids": [], "priority": 0, "manual_priority": False, "attempts": 1,
                "not_before": now + timedelta(hours=1) if i % 2 else None, "created_at": now, "version_id": 1})
                for i in range(start, min(start + step, jobs + 1))]
            conn.execute(insert(job_table), rows)
            missing = [{"job_id": r["id"], "build_id": b, "module": f"/usr/lib/{b[:6]}.so", "recorded_at": now}
                       for r in rows for b in ("ff" * 20, f"{r['id'] % build_ids:040x}",
                                               f"{(r['id'] * 7 + 1) % build_ids + build_ids:040x}")]
            bulk.insert_rows(conn, missing_table, missing)
    if engine.dialect.name == "postgresql":  # as autovacuum would after such a load
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("ANALYZE"))
    engine.dispose()


def timed(url: str, work: Any) -> float:
    engine = store.make_engine(url)
    factory = store.session_factory(engine)
    with store.transaction(factory) as session:
        began = time.perf_counter()
        work(session)
        elapsed = (time.perf_counter() - began) * 1000
    engine.dispose()
    return round(elapsed, 1)


def imported(build_id: str, n: int, named: bool = True) -> Any:
    def work(session: Session) -> None:
        archive = SymbolArchive(path=f"/x{n}.ddeb", sha256=f"{n:064x}", size=1, kind="ddeb", imported_by="bench")
        archive.files = [SymbolFile(build_id=build_id, kind="debuginfo", member="/usr/lib/debug/x", size=1)]
        session.add(archive)
        session.flush()
        release_unblocked(session, "bench", build_ids={build_id} if named else None)
    return work


def measure(url: str, jobs: int, build_ids: int) -> dict[str, float]:
    fill(url, jobs, build_ids)
    return {
        "listing_ms": timed(url, lambda s: reports.missing_symbols(s, 50)),
        "page_listing_ms": timed(url, lambda s: missing.listing(
            s, 50, after_id=missing.window_start(s, reports.MISSING_SCAN))),
        "release_none_ms": timed(url, imported("ee" * 20, 1)),
        "release_one_ms": timed(url, imported(f"{5:040x}", 2)),
        "release_none_scan_ms": timed(url, imported("ef" * 20, 3, named=False)),
        "release_one_scan_ms": timed(url, imported(f"{6:040x}", 4, named=False)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=100000)
    parser.add_argument("--build-ids", type=int, default=2000)
    parser.add_argument("--no-pg", action="store_true")
    args = parser.parse_args()
    figures: dict[str, Any] = {"jobs": args.jobs, "rows": 3 * args.jobs}
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        store.upgrade(url)
        for key, value in measure(url, args.jobs, args.build_ids).items():
            figures[f"sqlite_{key}"] = value
            print(f"sqlite {key}: {value}")
    if not args.no_pg:
        with scratch_postgres(PG_ADMIN, "retracer_bench_missing") as pg:
            for key, value in measure(pg, args.jobs, args.build_ids).items():
                figures[f"pg_{key}"] = value
                print(f"postgresql {key}: {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
