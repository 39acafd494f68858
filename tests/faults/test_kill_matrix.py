"""The kill -9 matrix: >= 10,000 events and their mails through `serve` while it is SIGKILLed at every
fault point and from outside, restarted each time; every effect exactly once, every mail exactly once."""

from __future__ import annotations

import os
import time

import pytest

from retracer.mail.sender import MARK_BATCH
from retracer.testing.instance import Instance
from retracer.testing.smtp import CaptureServer

from .scenario import (
    DEFAULT_FAULTS,
    Delivered,
    Supervisor,
    Tally,
    Workload,
    configure,
    delivered_from,
    kill_doings,
    read_mbox,
    run_scenario,
)

pytestmark = pytest.mark.slow

JOBS = int(os.environ.get("RETRACER_FAULTS_JOBS", "2200"))  # 2,200 scripts make >= 10,000 events
MIN_KILLS = 20


def _report(mode: str, tally: Tally, supervisor: Supervisor, seconds: float, allow: int = 0) -> list[str]:
    """Print the tally, what serve was doing at each kill and every problem; return the problems."""
    problems = tally.problems(allow_smtp_resends=allow)
    print(f"\n[kill matrix, {mode}, {seconds:.0f}s] {tally.line()}\n  last log line at each kill: "
          f"{kill_doings(supervisor)}")
    for problem in problems:
        print(f"  PROBLEM: {problem[:2000]}")
    return problems


def test_kill_matrix_embedded(embedded: Instance) -> None:
    """SQLite + inbox + mbox: serve killed >= 20 times loses, duplicates and misplaces nothing."""
    inst = embedded
    configure(inst)
    workload = Workload.build(JOBS, seed=11)
    supervisor = Supervisor(inst, "embedded", DEFAULT_FAULTS, external=(0.5, 0.5, 5.0), max_kills=45, seed=11)
    started = time.monotonic()
    tally = run_scenario(inst, "embedded", workload, supervisor,
                         lambda: read_mbox(inst.data_dir / "mail" / "outbox.mbox"), deadline_s=600, stall_s=60)
    problems = _report("embedded", tally, supervisor, time.monotonic() - started)
    assert workload.published >= 10_000
    assert sum(tally.kills.values()) >= MIN_KILLS, tally.line()
    assert not problems, "\n".join(p[:2000] for p in problems)


@pytest.mark.usefixtures("pg_database")
def test_kill_matrix_scaled(scaled: Instance, smtp_server: CaptureServer) -> None:
    """RabbitMQ + PostgreSQL + SMTP: the same guarantees, SMTP's same-Message-ID re-send after a kill excepted."""
    inst = scaled
    configure(inst, mail_url=smtp_server.url)
    workload = Workload.build(JOBS, seed=12)
    supervisor = Supervisor(inst, "scaled", DEFAULT_FAULTS, external=(0.5, 0.5, 5.0), max_kills=45, seed=12)
    started = time.monotonic()
    tally = run_scenario(inst, "scaled", workload, supervisor, lambda: _captured(smtp_server),
                         deadline_s=600, stall_s=60)
    # Each kill can leave at most one commit's worth of sent marks unwritten (mails accepted, not marked sent).
    allow = MARK_BATCH * sum(tally.kills.values())
    problems = _report("scaled", tally, supervisor, time.monotonic() - started, allow)
    assert workload.published >= 10_000
    assert sum(tally.kills.values()) >= MIN_KILLS, tally.line()
    assert not problems, "\n".join(p[:2000] for p in problems)


def _captured(server: CaptureServer) -> list[Delivered]:
    with server._lock:
        return delivered_from(list(server.messages))
