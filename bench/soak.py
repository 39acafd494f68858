"""The long version of the kill -9 matrix (tests/faults/test_kill_matrix.py).

    python bench/soak.py --mode embedded --events 100000 --kills 200
    python bench/soak.py --mode scaled --events 100000 --kills 200

Builds a fresh instance (embedded: SQLite, inbox, mbox in a temporary directory; scaled: a new PostgreSQL
database, RabbitMQ queues with unique names, an in-process SMTP server), publishes the workload through a
`retracer serve` that a supervisor keeps restarting while it is SIGKILLed at every fault point and from
outside, then prints the tally in Jepsen's terms. Exit status 0 only if nothing was lost, duplicated or
unexpected and at least --kills kills happened.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.faults.scenario import (
    DEFAULT_FAULTS,
    Delivered,
    Supervisor,
    Workload,
    configure,
    delivered_from,
    kill_doings,
    read_mbox,
    run_scenario,
)

from retracer.testing.instance import Instance

EVENTS_PER_JOB = 4.5  # submitted, started, 1.5 heartbeats on average, the ending (replays come on top)


@contextmanager
def instance(mode: str, workdir: Path) -> Iterator[tuple[Instance, Callable[[], list[Delivered]]]]:
    """A fresh installation for one soak run, torn down afterwards (database, queues, SMTP server)."""
    from sqlalchemy import create_engine, text
    from tests.conftest import AMQP_URL, PG_ADMIN_URL, _port_open

    from retracer import store

    if mode == "embedded":
        data = workdir / "data"
        url = f"sqlite:///{data / 'retracer.db'}"
        data.mkdir(parents=True)
        store.upgrade(url)
        local = Instance(data, url)
        configure(local)
        try:
            yield local, lambda: read_mbox(data / "mail" / "outbox.mbox")
        finally:
            local.close()
        return

    from retracer.testing.smtp import CaptureServer

    for name, port in (("PostgreSQL", 5432), ("RabbitMQ", 5672)):
        if not _port_open("127.0.0.1", port):
            raise SystemExit(f"{name} is not answering on 127.0.0.1:{port}")
    name = f"retracer_soak_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    server = CaptureServer().start()
    inst: Instance | None = None
    try:
        store.upgrade(url)
        inst = Instance(workdir / "data", url, AMQP_URL)
        assert inst.env["RETRACER__BROKER__URL"] == AMQP_URL
        configure(inst, mail_url=server.url)

        def captured() -> list[Delivered]:
            with server._lock:
                return delivered_from(list(server.messages))

        yield inst, captured
    finally:
        if inst is not None:
            inst.close()
        server.stop()
        with admin.connect() as conn:
            conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def parse_faults(text: str, scale: float = 1.0) -> dict[str, float]:
    """The default per-incarnation probabilities times ``scale``, then any --faults overrides."""
    chosen = {point: min(0.9, p * scale) for point, p in DEFAULT_FAULTS.items()}
    for item in filter(None, (p.strip() for p in text.split(","))):
        point, _, probability = item.partition("=")
        if point not in DEFAULT_FAULTS:
            raise SystemExit(f"--faults: unknown point {point!r}; known: {', '.join(DEFAULT_FAULTS)}")
        chosen[point] = float(probability)
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("embedded", "scaled"), default="embedded")
    parser.add_argument("--events", type=int, default=100_000, help="at least this many events are published")
    parser.add_argument("--kills", type=int, default=200, help="kill serve this many times (then let it finish)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--faults", default="", help="per-incarnation probabilities, e.g. mail.after_send=0.05")
    parser.add_argument("--external", type=float, default=0.3,
                        help="probability that an incarnation is also SIGKILLed from outside (0.5..5 s in)")
    parser.add_argument("--deadline", type=float, default=7200, help="give up after this many seconds")
    parser.add_argument("--stall", type=float, default=120, help="give up after this long without progress")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs, database)")
    args = parser.parse_args(argv)

    jobs = math.ceil(args.events / EVENTS_PER_JOB)
    workload = Workload.build(jobs, seed=args.seed)
    workdir = Path(tempfile.mkdtemp(prefix=f"retracer-soak-{args.mode}-"))
    print(f"soak: mode {args.mode}, {jobs} jobs (>= {args.events} events), up to {args.kills} kills, "
          f"working directory {workdir}", flush=True)
    started = time.monotonic()
    with instance(args.mode, workdir) as (inst, deliveries):
        # The CI-sized run (~10,500 events) gets ~45 kills with the defaults: scale them so that the kills
        # asked for are spread over the whole run rather than spent in its first minutes.
        scale = max(0.05, min(3.0, args.kills / 45 * 10_500 / args.events))
        supervisor = Supervisor(inst, args.mode, parse_faults(args.faults, scale), external=(args.external, 0.5, 5.0),
                                max_kills=args.kills, seed=args.seed)
        tally = run_scenario(inst, args.mode, workload, supervisor, deliveries, deadline_s=args.deadline,
                             stall_s=args.stall, log=lambda line: print(line, flush=True))
        print(f"last log line at each kill: {kill_doings(supervisor)}")
    kills = sum(tally.kills.values())
    problems = tally.problems(allow_smtp_resends=4 * kills)
    if kills < args.kills:
        problems.append(f"only {kills} kills happened, {args.kills} asked for")
    print(f"[soak {args.mode}, {time.monotonic() - started:.0f}s] {tally.line()}")
    for problem in problems:
        print(f"PROBLEM: {problem[:3000]}")
    if not args.keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
