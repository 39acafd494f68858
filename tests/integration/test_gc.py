"""`retracer gc` on 100,000 jobs, on SQLite and PostgreSQL, while `retracer serve` keeps applying events."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from retracer.testing.factories import crash_data, event
from retracer.testing.instance import Instance
from retracer.workflow import load_spec

from ..conftest import truncate_all

N = 100_000
LIVE = 200
SPEC = load_spec()
SUCCESS = SPEC.roles.success
OTHERS = [s for s in SPEC.states if s != SUCCESS]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def instance(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Instance]:
    """An embedded-bus instance on SQLite or PostgreSQL."""
    if request.param == "sqlite":
        url: str = request.getfixturevalue("sqlite_url")
    else:
        url = request.getfixturevalue("pg_database")
        truncate_all(url)
    inst = Instance(tmp_path / "data", url)
    # The command does the collecting here; the service only applies events.
    inst.set(GC__INTERVAL_S="0")
    yield inst
    inst.close()


def insert_jobs(inst: Instance) -> int:
    """N jobs: every 25th one in each state that is not the success state, the rest successes; odd ids finished
    400 days ago, even ones yesterday; one history row each. Returns how many gc should delete."""
    cases = " ".join(f"WHEN i % 25 = {k} THEN '{state}'" for k, state in enumerate(OTHERS))
    state = f"CASE {cases} ELSE '{SUCCESS}' END"
    cols = ("state, crash_id, creator, package, version, architecture, release, core, executable, build_ids, "
            "priority, manual_priority, attempts, created_at, started_at, finished_at, upload_leaf, version_id")
    when = "CASE WHEN i % 2 = 1 THEN :old ELSE :new END"
    body = (f"{state}, 'bg-' || i, 'mark@example.com', 'pkg', '1.0', 'amd64', 'jammy', '/c', '/usr/bin/p', "
            f"'[]', 0, {{false}}, 1, {when}, {when}, {when}, 'upload-bg-' || i, 1")
    now = datetime.now(UTC)
    old, new = now - timedelta(days=400), now - timedelta(days=1)
    with inst.engine.begin() as conn:
        if inst.engine.dialect.name == "postgresql":
            conn.execute(text(f"INSERT INTO job ({cols}) SELECT {body.format(false='false')} "
                              f"FROM generate_series(1, :n) AS g(i)"), {"n": N, "old": old, "new": new})
            conn.execute(text("SELECT setval(pg_get_serial_sequence('job', 'id'), (SELECT max(id) FROM job))"))
        else:
            conn.execute(text(f"WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < :n) "
                              f"INSERT INTO job ({cols}) SELECT {body.format(false='0')} FROM g"),
                         {"n": N, "old": old.replace(tzinfo=None), "new": new.replace(tzinfo=None)})
        conn.execute(text("INSERT INTO history (job_id, from_state, to_state, trigger, actor, at) "
                          "SELECT id, NULL, state, 'bulk', 'test', created_at FROM job"))
    if inst.engine.dialect.name == "postgresql":
        with inst.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE job"))
            conn.execute(text("VACUUM ANALYZE history"))
    return int(inst.scalar("SELECT count(*) FROM job WHERE state = :s AND finished_at < :cut",
                           s=SUCCESS, cut=(now - timedelta(days=90)) if inst.engine.dialect.name == "postgresql"
                           else (now - timedelta(days=90)).replace(tzinfo=None)))


@pytest.mark.slow
def test_gc_deletes_what_the_retention_says_while_serve_applies_events(instance: Instance) -> None:
    inst = instance
    inst.run("db", "upgrade")
    expected = insert_jobs(inst)
    assert expected == sum(1 for i in range(1, N + 1) if i % 2 == 1 and i % 25 >= len(OTHERS))
    kept_others = int(inst.scalar("SELECT count(*) FROM job WHERE state <> :s", s=SUCCESS))
    inst.serve()

    published: list[float] = []

    def publish() -> None:
        for chunk in range(LIVE // 20):
            inst.publish(*[event("crash.submitted", **crash_data(crash_id=f"live-{chunk}-{n}")) for n in range(20)])
            published.append(time.monotonic())

    publisher = threading.Thread(target=publish)
    began = time.monotonic()
    publisher.start()
    counts = inst.json("gc", "--as", "tester", "--reason", "integration")
    ended = time.monotonic()
    publisher.join(timeout=120)
    assert published and published[0] < ended, "events were published while gc ran"
    assert began < ended

    assert counts["jobs"] == expected and counts["history"] == expected and not counts["dry_run"]
    inst.wait_for("every live event to be applied",
                  lambda: inst.scalar("SELECT count(*) FROM job WHERE crash_id LIKE 'live-%'") == LIVE, timeout=90)
    assert inst.scalar("SELECT count(*) FROM job WHERE crash_id LIKE 'bg-%'") == N - expected
    assert inst.scalar("SELECT count(*) FROM job WHERE state <> :s AND crash_id LIKE 'bg-%'", s=SUCCESS) \
        == kept_others
    assert inst.scalar("SELECT count(*) FROM history h LEFT JOIN job j ON j.id = h.job_id WHERE j.id IS NULL") == 0
    assert inst.scalar("SELECT count(*) FROM rejected") == 0
    assert inst.scalar("SELECT count(*) FROM audit WHERE action = 'gc' AND actor = 'admin:tester'") == 1
    assert inst.json("gc", "--dry-run")["jobs"] == 0
