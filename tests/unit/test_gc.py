"""`retracer gc` and the gc chore: exactly what the retention says goes, nothing of a job that is not final."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from click.testing import CliRunner
from sqlalchemy import func, insert, select, text
from sqlalchemy.orm import Session, sessionmaker

from retracer import config as cfg
from retracer.cli import cli
from retracer.ops.gc import KINDS, collect, deletable_states
from retracer.service.chores import ChoreContext
from retracer.service.chores import gc as gc_chore
from retracer.store.models import STATES, Audit, History, Job, Mail, Outbox, ProcessedEvent, Rejected, utcnow
from retracer.workflow import load_spec
from tests.conftest import make_config

NOW = utcnow()
OLD = NOW - timedelta(days=400)
NEW = NOW - timedelta(days=1)
SUCCESS = load_spec().roles.success
RESCUABLE = load_spec().roles.rescuable


def _job(session: Session, state: str, finished: datetime) -> int:
    values: dict[str, Any] = {
        "state": state, "crash_id": f"c-{state}-{finished:%Y%m%d}", "creator": "mark@example.com",
        "package": "cdrkit", "version": "1.0", "architecture": "i386", "release": "breezy", "core": "/c",
        "executable": "/usr/bin/cdrecord", "build_ids": [], "priority": 0, "manual_priority": False,
        "attempts": 1, "created_at": finished, "finished_at": finished, "version_id": 1}
    job_id = int(session.execute(insert(Job).values(values).returning(Job.id)).scalar_one())
    session.execute(text("UPDATE job SET upload_leaf = :leaf WHERE id = :id"), {"leaf": f"leaf-{job_id}", "id": job_id})
    history_id = session.execute(insert(History).values(
        job_id=job_id, from_state=None, to_state=state, trigger="t", actor="test", at=finished
    ).returning(History.id)).scalar_one()
    session.execute(insert(Mail).values(job_id=job_id, history_id=history_id, state=state, recipient="m@example.com",
                                        rationale="creator", context={}, status="sent", created_at=finished,
                                        sent_at=finished))
    return job_id


def _mail(session: Session, status: str, at: datetime) -> None:
    session.execute(insert(Mail).values(job_id=None, history_id=None, state="DIGEST", recipient="a@example.com",
                                        rationale="digest", context={}, status=status, created_at=at,
                                        sent_at=at if status == "sent" else None))


def _set_mtime(path: Path, at: datetime) -> None:
    os.utime(path, (at.timestamp(), at.timestamp()))


@pytest.fixture
def world(config: cfg.Config, factory: sessionmaker[Session]) -> dict[str, Any]:
    """Jobs in every state, old and new, with their rows and files; markers, mails, outbox rows, rejected
    events and failed uploads on both sides of their retention."""
    jobs: dict[tuple[str, str], int] = {}
    with factory() as session, session.begin():
        for state in STATES:
            for age, at in (("old", OLD), ("new", NEW)):
                jobs[(state, age)] = _job(session, state, at)
        # A success job that has not finished (no finished_at) is never old enough.
        unfinished = _job(session, SUCCESS, OLD)
        session.execute(text("UPDATE job SET finished_at = NULL WHERE id = :id"), {"id": unfinished})
        for n, at in enumerate((OLD, NEW, OLD)):
            session.execute(insert(ProcessedEvent).values(event_id=f"ev-{n}", outcome="applied", at=at))
        for status, at in (("sent", OLD), ("stale", OLD), ("sent", NEW), ("pending", OLD), ("failed", OLD),
                           ("digested", OLD)):
            _mail(session, status, at)
        for n, (sent, at) in enumerate(((OLD, OLD), (NEW, OLD), (None, OLD))):
            session.execute(insert(Outbox).values(routing_key="r", message_id=f"m-{n}", body="{}", created_at=at,
                                                  sent_at=sent))
        for replayed, at in ((OLD, OLD), (None, OLD), (None, NEW)):
            session.execute(insert(Rejected).values(body="{}", reason="bad", at=at, replayed_at=replayed))
    results, spool = config.results_dir, config.spool_dir
    for job_id in jobs.values():
        (results / str(job_id)).mkdir(parents=True)
        (results / str(job_id) / "backtrace.txt").write_text("#0 main\n")
        (spool / "accepted" / f"leaf-{job_id}").mkdir(parents=True)
        (spool / "accepted" / f"leaf-{job_id}" / "manifest.json").write_text("{}")
    failed = spool / "failed"
    failed.mkdir(parents=True)
    rescuable_leaf = f"leaf-{jobs[(RESCUABLE, 'old')]}"
    for name, at in (("old-upload", OLD), ("new-upload", NEW), (rescuable_leaf, OLD)):
        (failed / name).mkdir()
        (failed / name / "worker.log").write_text("x")
        _set_mtime(failed / name, at)
    # A symlink in failed/ is removed itself, never what it points to.
    outside = config.data_dir / "outside"
    outside.mkdir(parents=True)
    (outside / "precious").write_text("keep")
    (failed / "old-link").symlink_to(outside)
    os.utime(failed / "old-link", (OLD.timestamp(), OLD.timestamp()), follow_symlinks=False)
    return {"jobs": jobs, "unfinished": unfinished, "rescuable_leaf": rescuable_leaf}


# Mails: the old success job's, and every old sent mail (the other old jobs', the unfinished job's, a digest's)
# and the old stale one.
EXPECTED = {"jobs": 1, "history": 1, "mails": len(STATES) + 3, "outbox": 1, "markers": 2, "rejected": 2,
            "results_dirs": 1, "accepted_uploads": 1, "failed_uploads": 2}


def snapshot(factory: sessionmaker[Session], config: cfg.Config) -> dict[str, Any]:
    with factory() as session:
        rows = {model.__tablename__: session.scalar(select(func.count()).select_from(model))
                for model in (Job, History, Mail, Outbox, ProcessedEvent, Rejected)}
    files = sorted(str(p.relative_to(config.data_dir)) for p in config.data_dir.rglob("*"))
    return {"rows": rows, "files": files}


class TestRetention:
    def test_only_final_success_state_is_deletable(self) -> None:
        spec = load_spec()
        assert deletable_states() == (SUCCESS,)
        assert all(spec.states[s].final for s in deletable_states())

    def test_dry_run_counts_and_changes_nothing_then_the_run_deletes_exactly_that(
            self, config: cfg.Config, factory: sessionmaker[Session], world: dict[str, Any]) -> None:
        before = snapshot(factory, config)
        dry = collect(factory, config, dry_run=True)
        assert snapshot(factory, config) == before
        assert {k: v for k, v in dry.to_dict().items() if k != "dry_run"} == EXPECTED and dry.dry_run
        with factory() as session:
            assert session.scalar(select(func.count()).select_from(Audit)) == 0

        done = collect(factory, config, actor="admin:celso", reason="spring cleaning")
        assert {k: v for k, v in done.to_dict().items() if k != "dry_run"} == EXPECTED and not done.dry_run
        jobs = world["jobs"]
        gone = jobs[(SUCCESS, "old")]
        with factory() as session:
            left = set(session.scalars(select(Job.id)))
            assert left == {*jobs.values(), world["unfinished"]} - {gone}
            assert session.scalar(select(func.count()).select_from(History).where(History.job_id == gone)) == 0
            assert set(session.scalars(select(Mail.status).where(Mail.job_id.is_(None)))) == \
                {"sent", "pending", "failed", "digested"}
            assert set(session.scalars(select(ProcessedEvent.event_id))) == {"ev-1"}
            assert session.scalar(select(func.count()).select_from(Outbox)) == 2
            assert [at > NOW - timedelta(days=2) for at in session.scalars(select(Rejected.at))] == [True]
            (audit,) = session.scalars(select(Audit))
            assert audit.actor == "admin:celso" and audit.action == "gc"
            assert json.loads(audit.detail)["jobs"] == 1 and json.loads(audit.detail)["reason"] == "spring cleaning"
        assert not (config.results_dir / str(gone)).exists()
        assert not (config.spool_dir / "accepted" / f"leaf-{gone}").exists()
        for key, job_id in jobs.items():
            if job_id != gone:
                assert (config.results_dir / str(job_id) / "backtrace.txt").exists(), key
                assert (config.spool_dir / "accepted" / f"leaf-{job_id}").is_dir(), key
        failed = sorted(p.name for p in (config.spool_dir / "failed").iterdir())
        assert failed == sorted(["new-upload", world["rescuable_leaf"]])
        assert (config.data_dir / "outside" / "precious").read_text() == "keep"

        again = collect(factory, config)
        assert again.total == 0

    def test_small_batches_delete_the_same(self, tmp_path: Path, db_url: str, factory: sessionmaker[Session],
                                           world: dict[str, Any]) -> None:
        config = make_config(tmp_path / "data", db_url, RETRACER__GC__BATCH_SIZE="1")
        counts = collect(factory, config)
        assert {k: v for k, v in counts.to_dict().items() if k != "dry_run"} == EXPECTED

    def test_a_budget_stops_early_and_a_later_call_finishes(
            self, tmp_path: Path, db_url: str, factory: sessionmaker[Session], world: dict[str, Any]) -> None:
        config = make_config(tmp_path / "data", db_url, RETRACER__GC__BATCH_SIZE="1")
        first = collect(factory, config, max_batches=2)
        assert not first.complete and first.total > 0
        rest = collect(factory, config)
        assert rest.complete
        total = {k: first.to_dict()[k] + rest.to_dict()[k] for k in KINDS}
        assert total == EXPECTED


class TestCommand:
    def env(self, config: cfg.Config) -> dict[str, str]:
        return {"RETRACER__SERVICE__DATA_DIR": str(config.data_dir), "RETRACER__DATABASE__URL": config.database_url}

    def test_json_dry_run_then_text(self, config: cfg.Config, factory: sessionmaker[Session],
                                    world: dict[str, Any]) -> None:
        runner = CliRunner()
        result = runner.invoke(cli, ["gc", "--dry-run", "--json"], env=self.env(config))
        assert result.exit_code == 0, result.output
        assert json.loads(result.output) == {**EXPECTED, "dry_run": True}
        result = runner.invoke(cli, ["gc", "--as", "celso", "--reason", "disk"], env=self.env(config))
        assert result.exit_code == 0, result.output
        assert result.output.startswith("deleted:\n") and "processed-event markers  2" in result.output
        with factory() as session:
            (audit,) = session.scalars(select(Audit))
        assert audit.actor == "admin:celso"
        result = runner.invoke(cli, ["gc", "--json"], env=self.env(config))
        assert json.loads(result.output) == {**dict.fromkeys(EXPECTED, 0), "dry_run": False}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _marker(factory: sessionmaker[Session], name: str) -> None:
    with factory() as session, session.begin():
        session.execute(insert(ProcessedEvent).values(event_id=name, outcome="applied", at=OLD))


def _markers(factory: sessionmaker[Session]) -> int:
    with factory() as session:
        return int(session.scalar(select(func.count()).select_from(ProcessedEvent)) or 0)


class TestChore:
    def chore(self, tmp_path: Path, db_url: str, factory: sessionmaker[Session], clock: Clock,
              **settings: str) -> gc_chore.Gc:
        config = make_config(tmp_path / "data", db_url, **settings)
        ctx = cast(ChoreContext, SimpleNamespace(config=config, factory=factory))
        return gc_chore.Gc(ctx, clock=clock)

    def test_runs_at_most_every_interval(self, tmp_path: Path, db_url: str, factory: sessionmaker[Session]) -> None:
        clock = Clock()
        chore = self.chore(tmp_path, db_url, factory, clock, RETRACER__GC__INTERVAL_S="100")
        _marker(factory, "a")
        assert chore() == 1 and _markers(factory) == 0
        _marker(factory, "b")
        clock.now += 99
        assert chore() == 0 and _markers(factory) == 1
        clock.now += 2
        assert chore() == 1 and _markers(factory) == 0
        with factory() as session:
            actors = list(session.scalars(select(Audit.actor)))
        assert actors == ["service:gc", "service:gc"]
        chore.close()

    def test_interval_zero_never_runs(self, tmp_path: Path, db_url: str, factory: sessionmaker[Session]) -> None:
        clock = Clock()
        chore = self.chore(tmp_path, db_url, factory, clock, RETRACER__GC__INTERVAL_S="0")
        _marker(factory, "a")
        for _ in range(3):
            clock.now += 10**6
            assert chore() == 0
        assert _markers(factory) == 1

    def test_an_unfinished_run_goes_on_next_round(self, tmp_path: Path, db_url: str, factory: sessionmaker[Session],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(gc_chore, "BATCHES_PER_ROUND", 1)
        clock = Clock()
        chore = self.chore(tmp_path, db_url, factory, clock, RETRACER__GC__INTERVAL_S="100",
                           RETRACER__GC__BATCH_SIZE="2")
        for n in range(5):
            _marker(factory, f"m{n}")
        assert [chore(), chore(), chore(), chore()] == [2, 2, 1, 0]
        assert _markers(factory) == 0
