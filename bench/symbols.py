"""The symbol index: lookup latency with a million build-ids, and import rate against debuginfod.

    python bench/symbols.py [--rows N] [--lookups K] [--packages P] [--no-postgres] [--skip-lookup]
                            [--skip-import]

  1. lookup   N build-ids (default 1,000,000; one symbol_file row each, 1,000 per archive) bulk-inserted into
              a migrated SQLite file and a scratch PostgreSQL database (127.0.0.1:5432, user postgres); then K
              lookups (default 2,000: half present, half absent, random order), each in a session of its own as
              a web request would: ``index.lookup(session, [id])`` and ``index.find(session, id, kind)``. p50,
              p95, p99 in ms. Target: p95 < 10 ms on both.
  2. import   P programs (default 50) built by gcc, each packed by dpkg-deb into a .deb and a .ddeb (2P
              packages, 2P ELF members) in a directory of their own. `retracer symbols import DIR` on a fresh
              SQLite database, timed as a process (with Python's start-up) and in-process (``import_paths``,
              another fresh database); against ``debuginfod -U -t0 -g0 -d :memory: DIR`` in ``unshare --net``,
              timed from its start to its last "scanned archive" log line (-vvv; it scans with 2 threads
              here: ``-c`` defaults to the number of cores). Packages/s, ELF members/s, and the ratio.

Progress goes to stderr; the figures to stdout, the last line one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import insert, text
from sqlalchemy.engine import Engine

from retracer import store
from retracer.store.models import SymbolArchive, SymbolFile
from retracer.symbols.archive import Limits
from retracer.symbols.importer import import_paths
from retracer.symbols.index import find, lookup
from retracer.testing.packages import make_packages
from retracer.testing.postgres import scratch_postgres

PG_ADMIN_URL = os.environ.get("RETRACER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
PER_ARCHIVE = 1000


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_id(n: int) -> str:
    return hashlib.sha1(n.to_bytes(8, "little"), usedforsecurity=False).hexdigest()


def _archives(rows: int) -> list[dict[str, Any]]:
    return [{"id": a + 1, "path": f"/srv/pool/p{a}_1.0_amd64.deb", "sha256": f"{a:064x}", "size": 1, "kind": "deb",
             "package": f"p{a}", "version": "1.0", "architecture": "amd64", "imported_by": "bench",
             "imported_at": None} for a in range(-(-rows // PER_ARCHIVE))]


def _file_rows(rows: int) -> Iterator[tuple[int, str, str, str, int]]:
    for n in range(rows):
        yield (n // PER_ARCHIVE + 1, build_id(n), "debuginfo" if n % 2 else "executable", f"/usr/lib/f{n}.so", 4096)


def fill_sqlite(engine: Engine, rows: int) -> None:
    with engine.begin() as conn:
        archives = _archives(rows)
        for a in archives:
            a.pop("imported_at")
        conn.execute(insert(SymbolArchive), archives)
        batch: list[dict[str, Any]] = []
        for archive_id, bid, kind, member, size in _file_rows(rows):
            batch.append({"archive_id": archive_id, "build_id": bid, "kind": kind, "member": member, "size": size})
            if len(batch) == 50_000:
                conn.execute(insert(SymbolFile), batch)
                batch = []
        if batch:
            conn.execute(insert(SymbolFile), batch)
    with engine.begin() as conn:
        conn.execute(text("ANALYZE"))


def fill_postgres(engine: Engine, rows: int) -> None:
    with engine.begin() as conn:
        archives = _archives(rows)
        for a in archives:
            a.pop("imported_at")
        conn.execute(insert(SymbolArchive), archives)
        conn.execute(text("SELECT setval('symbol_archive_id_seq', (SELECT max(id) FROM symbol_archive))"))
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        # COPY: a million rows in seconds, where INSERTs take minutes.
        with cursor.copy("COPY symbol_file (archive_id, build_id, kind, member, size) FROM STDIN") as copy:
            for row in _file_rows(rows):
                copy.write_row(row)
        raw.commit()
    finally:
        raw.close()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE symbol_file"))
        conn.execute(text("ANALYZE symbol_archive"))


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)
    return {"p50_ms": at(0.50), "p95_ms": at(0.95), "p99_ms": at(0.99), "max_ms": round(ordered[-1] * 1000, 3)}


def measure_lookups(engine: Engine, rows: int, count: int) -> dict[str, Any]:
    factory = store.session_factory(engine)
    rng = random.Random(42)
    present = [build_id(rng.randrange(rows)) for _ in range(count // 2)]
    absent = [build_id(rows + rng.randrange(10 * rows)) for _ in range(count - count // 2)]
    wanted = present + absent
    rng.shuffle(wanted)
    for bid in wanted[:50]:  # warm the pool and the caches
        with factory() as session:
            lookup(session, [bid])
    timings: dict[str, list[float]] = {"lookup": [], "find": []}
    hits = 0
    for bid in wanted:
        start = time.perf_counter()
        with factory() as session:
            hits += bool(lookup(session, [bid]))
        timings["lookup"].append(time.perf_counter() - start)
        start = time.perf_counter()
        with factory() as session:
            find(session, bid, "debuginfo")
        timings["find"].append(time.perf_counter() - start)
    assert hits == len(present), (hits, len(present))
    return {name: percentiles(values) for name, values in timings.items()}


def bench_lookup(rows: int, count: int, postgres: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-symbols-") as tmp:
        url = f"sqlite:///{tmp}/retracer.db"
        store.upgrade(url)
        engine = store.make_engine(url)
        start = time.perf_counter()
        fill_sqlite(engine, rows)
        say(f"sqlite: {rows} rows in {time.perf_counter() - start:.1f} s")
        results["sqlite"] = measure_lookups(engine, rows, count)
        engine.dispose()
        say(f"sqlite: {results['sqlite']}")
    if postgres:
        if not _port_open("127.0.0.1", 5432):
            say("postgresql: not answering on 127.0.0.1:5432, skipped")
        else:
            with scratch_postgres(PG_ADMIN_URL, "bench_symbols") as url:
                engine = store.make_engine(url)
                start = time.perf_counter()
                fill_postgres(engine, rows)
                say(f"postgresql: {rows} rows in {time.perf_counter() - start:.1f} s")
                results["postgresql"] = measure_lookups(engine, rows, count)
                engine.dispose()
                say(f"postgresql: {results['postgresql']}")
    return results


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_pool(where: Path, programs: int) -> Path:
    pool = where / "pool"
    pool.mkdir()
    build = where / "build"
    build.mkdir()
    for n in range(programs):
        made = make_packages(build / f"p{n}", name=f"prog{n}", variant=n)
        shutil.move(made.deb, pool)
        shutil.move(made.ddeb, pool)
    return pool


@contextmanager
def timed() -> Iterator[Callable[[], float]]:
    start = time.perf_counter()
    end: list[float] = []
    yield lambda: (end[0] if end else time.perf_counter()) - start
    end.append(time.perf_counter())


def run_retracer(pool: Path, where: Path) -> float:
    data = where / "cli-data"
    url = f"sqlite:///{data}/retracer.db"
    data.mkdir()
    store.upgrade(url)
    env = {**os.environ, "RETRACER__SERVICE__DATA_DIR": str(data), "RETRACER__DATABASE__URL": url}
    env.pop("RETRACER_CONFIG", None)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "retracer", "symbols", "import", "--json", str(pool)],
                          env=env, capture_output=True, text=True, timeout=3600, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"retracer symbols import failed: {proc.stderr[-2000:]}")
    counts = json.loads(proc.stdout)["counts"]
    say(f"retracer (process): {counts} in {elapsed:.2f} s")
    return elapsed


def run_in_process(pool: Path, where: Path) -> tuple[float, int, int]:
    url = f"sqlite:///{where}/inproc.db"
    store.upgrade(url)
    engine = store.make_engine(url)
    start = time.perf_counter()
    report = import_paths(store.session_factory(engine), [pool], Limits(), "bench")
    elapsed = time.perf_counter() - start
    engine.dispose()
    archives = report.count("imported")
    members = sum(a.elf_members for a in report.archives)
    return elapsed, archives, members


def run_debuginfod(pool: Path, where: Path, archives: int) -> float | None:
    if shutil.which("debuginfod") is None or shutil.which("unshare") is None:
        say("debuginfod or unshare missing: no comparison")
        return None
    log_path = where / "debuginfod.log"
    port = _free_port()
    with log_path.open("wb") as log:
        start = time.perf_counter()
        # Its own network namespace: debuginfod listens on every address and has no option to choose one.
        proc = subprocess.Popen(["unshare", "--net", "--", "sh", "-c",
                                 f"ip link set lo up && exec debuginfod -vvv -U -t0 -g0 -d :memory: -p {port} {pool}"],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = start + 3600
            while time.perf_counter() < deadline:
                text_ = log_path.read_text(errors="replace")
                if text_.count("scanned archive=") >= archives:
                    return time.perf_counter() - start
                if proc.poll() is not None:
                    say(f"debuginfod exited {proc.returncode}: {text_[-1000:]}")
                    return None
                time.sleep(0.01)
            return None
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def bench_import(programs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-symbols-import-") as tmp:
        where = Path(tmp)
        say(f"building {programs} programs into {2 * programs} packages ...")
        pool = make_pool(where, programs)
        packages = len(list(pool.iterdir()))
        in_process, archives, members = run_in_process(pool, where)
        say(f"retracer (in-process): {archives} archives, {members} ELF members in {in_process:.2f} s")
        cli = run_retracer(pool, where)
        startup_start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "retracer", "--help"], capture_output=True, check=True,
                       timeout=120)
        startup = time.perf_counter() - startup_start
        debuginfod = run_debuginfod(pool, where, packages)
        say(f"debuginfod: {debuginfod if debuginfod is None else round(debuginfod, 2)} s")
    result: dict[str, Any] = {
        "packages": packages, "elf_members": members,
        "retracer_in_process_s": round(in_process, 3),
        "retracer_in_process_packages_per_s": round(packages / in_process, 1),
        "retracer_in_process_members_per_s": round(members / in_process, 1),
        "retracer_cli_s": round(cli, 3), "python_startup_s": round(startup, 3),
        "retracer_cli_packages_per_s": round(packages / cli, 1),
        "retracer_cli_members_per_s": round(members / cli, 1),
    }
    if debuginfod is not None:
        result.update({"debuginfod_s": round(debuginfod, 3),
                       "debuginfod_packages_per_s": round(packages / debuginfod, 1),
                       "debuginfod_members_per_s": round(members / debuginfod, 1),
                       "ratio_cli_over_debuginfod": round(cli / debuginfod, 2),
                       "ratio_in_process_over_debuginfod": round(in_process / debuginfod, 2)})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--lookups", type=int, default=2000)
    parser.add_argument("--packages", type=int, default=50, help="programs (each a .deb and a .ddeb)")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--skip-lookup", action="store_true")
    parser.add_argument("--skip-import", action="store_true")
    args = parser.parse_args(argv)
    summary: dict[str, Any] = {}
    if not args.skip_lookup:
        summary["lookup"] = bench_lookup(args.rows, args.lookups, not args.no_postgres)
        for db, figures in summary["lookup"].items():
            for what, values in figures.items():
                print(f"lookup {db:10} {what:6} rows={args.rows} p50={values['p50_ms']} ms "
                      f"p95={values['p95_ms']} ms p99={values['p99_ms']} ms max={values['max_ms']} ms")
    if not args.skip_import:
        summary["import"] = figures = bench_import(args.packages)
        print(f"import retracer (process)    {figures['packages']} packages, {figures['elf_members']} ELF members: "
              f"{figures['retracer_cli_s']} s = {figures['retracer_cli_packages_per_s']} packages/s, "
              f"{figures['retracer_cli_members_per_s']} members/s (Python start-up {figures['python_startup_s']} s)")
        print(f"import retracer (in-process) {figures['retracer_in_process_s']} s = "
              f"{figures['retracer_in_process_packages_per_s']} packages/s, "
              f"{figures['retracer_in_process_members_per_s']} members/s")
        if "debuginfod_s" in figures:
            print(f"scan   debuginfod -U         {figures['debuginfod_s']} s = "
                  f"{figures['debuginfod_packages_per_s']} packages/s, {figures['debuginfod_members_per_s']} "
                  f"members/s; retracer/debuginfod time ratio: process {figures['ratio_cli_over_debuginfod']}, "
                  f"in-process {figures['ratio_in_process_over_debuginfod']}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
