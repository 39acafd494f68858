"""Missing symbols made visible, and an import releasing the jobs it unblocks: the ``missing`` field of
retrace.failed, the rows the apply path keeps from it, `retracer symbols missing`, and release_unblocked's
rules, on both databases. The index's rows are inserted here as an import writes them."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from retracer import config as cfg
from retracer import events as ev
from retracer import reports, store
from retracer.apply.applier import Applier, Outcome
from retracer.cli import cli
from retracer.errors import InvalidEvent
from retracer.store.models import History, Job, MissingSymbol, SymbolArchive, SymbolFile, utcnow
from retracer.symbols.missing import listing, of_job, window_start
from retracer.symbols.release import release_unblocked
from retracer.testing.factories import crash_data, event
from retracer.worker.loop_attempt import missing_field
from retracer.worker.request import Failed, Missing
from retracer.workflow import load
from tests.conftest import make_config

A = "aa" * 20
B = "bb" * 20
C = "cc" * 20
ROLES = load().roles
IMPORTER = "import:celso"


# -- the event field -----------------------------------------------------------------------------------------


def failed_event(**data: Any) -> dict[str, Any]:
    return {"id": "e-1", "type": "retrace.failed", "job": 3, "occurred_at": "2026-11-21T08:00:00Z",
            "source": "worker-1", "data": {"error": "no symbols", **data}}


class TestEventField:
    def test_old_events_without_the_field_stay_valid(self) -> None:
        assert "missing" not in ev.parse(failed_event()).data

    def test_a_list_of_build_ids_and_modules(self) -> None:
        """Entries name a build-id and a module path; the module may be left out; other keys are ignored."""
        given = [{"build_id": A, "module": "/usr/bin/crashy"}, {"build_id": B.upper()}, {"build_id": C, "x": 1}]
        assert ev.parse(failed_event(missing=given)).data["missing"] == given

    @pytest.mark.parametrize(("value", "said"), [
        ("aabbccdd", "must be a list of at most 512 objects"),
        ([{"build_id": A}] * 513, "must be a list of at most 512 objects"),
        (["aabbccdd"], "entry 0 is not an object"),
        ([{"module": "/usr/bin/x"}], "entry 0 has a build_id that is not a hex build-id: 'None'"),
        ([{"build_id": A}, {"build_id": "zz"}], "entry 1 has a build_id that is not a hex build-id: 'zz'"),
        ([{"build_id": "abc"}], "entry 0 has a build_id that is not a hex build-id"),
        ([{"build_id": A, "module": "/usr/bin/x\nBcc: y"}], "entry 0 has a module that must not contain control"),
        ([{"build_id": A, "module": "/" + "x" * 4096}], "entry 0 has a module that is 4097 characters long"),
        ([{"build_id": A, "module": 7}], "entry 0 has a module that must be a non-empty string"),
    ])
    def test_bad_values_are_named(self, value: Any, said: str) -> None:
        with pytest.raises(InvalidEvent) as exc:
            ev.parse(failed_event(missing=value))
        assert f"data.missing {said}" in str(exc.value)

    def test_the_worker_sends_what_failed_the_attempt(self) -> None:
        """Only the modules whose lack failed the attempt, lower-cased, once each; a path a core made unprintable
        is mended and a build-id the contract refuses left out, so the event can always be published; nothing
        at all when the attempt ended before symbols were judged."""
        failed = Failed("no symbols", transient=True, missing=[Missing(A, "/lib/libc.so.6")],
                        blocking=[Missing(B.upper(), "/usr/bin/crashy"), Missing(B, "/usr/bin/crashy"),
                                  Missing("abc", "/usr/lib/short"), Missing(C, "/usr/lib/a\nb")])
        data = missing_field(failed)
        assert data == {"missing": [{"build_id": B, "module": "/usr/bin/crashy"},
                                    {"build_id": C, "module": "/usr/lib/a?b"}]}
        ev.make("retrace.failed", 1, {"error": "x", **data}, source="w")
        assert missing_field(Failed("gdb timed out", transient=True)) == {}
        assert missing_field(Failed("stack corrupt", transient=False, blocking=[])) == {"missing": []}


# -- the apply path and the listing --------------------------------------------------------------------------


class World:
    def __init__(self, config: cfg.Config, factory: sessionmaker[Session]) -> None:
        self.config = config
        self.factory = factory
        self.applier = Applier(config)
        self.seen: list[SymbolArchive] = []

    def apply(self, *bodies: dict[str, Any]) -> list[Outcome]:
        with store.transaction(self.factory) as session:
            outcomes = self.applier.apply_batch(session, list(bodies))
        assert all(o.status == "applied" for o in outcomes), outcomes
        return outcomes

    def submit(self) -> int:
        (outcome,) = self.apply(event("crash.submitted", **crash_data()))
        assert outcome.job_id is not None
        return outcome.job_id

    def fail(self, job_id: int, *build_ids: str, transient: bool = True, field: bool = True) -> None:
        """A started attempt of ``job_id`` failing for lack of ``build_ids``."""
        data: dict[str, Any] = {"error": "no symbols", "transient": transient}
        if field:
            data["missing"] = [{"build_id": b, "module": f"/usr/lib/{b[:4]}.so"} for b in build_ids]
        self.apply(event("retrace.started", job_id, worker="w"), event("retrace.failed", job_id, **data))

    def waiting_job(self, *build_ids: str) -> int:
        job_id = self.submit()
        self.fail(job_id, *build_ids)
        return job_id

    def job(self, job_id: int) -> Job:
        with self.factory() as session:
            job = session.get(Job, job_id)
            assert job is not None
            session.expunge(job)
            return job

    def rows(self, job_id: int) -> list[str]:
        with self.factory() as session:
            return [r["build_id"] for r in of_job(session, job_id)]

    def listing(self, **kwargs: Any) -> list[dict[str, Any]]:
        with self.factory() as session:
            return listing(session, **kwargs)

    def index(self, *build_ids: str, kind: str = "debuginfo", at: datetime | None = None) -> None:
        """An import of a package holding ``build_ids`` (as the importer writes it), without releasing."""
        with store.transaction(self.factory) as session:
            archive = SymbolArchive(path=f"/srv/ddebs/{build_ids[0]}.ddeb", sha256=f"{len(self.seen):064x}",
                                    size=1, kind="ddeb", package="crashy", version="1.0",
                                    architecture="amd64", imported_by=IMPORTER, imported_at=at or utcnow())
            archive.files = [SymbolFile(build_id=b, kind=kind, member=f"/usr/lib/debug/{b}.debug", size=1)
                             for b in build_ids]
            session.add(archive)
            self.seen.append(archive)

    def release(self, *build_ids: str, **kwargs: Any) -> list[int]:
        """An import of ``build_ids``, and the release it runs in its transaction."""
        if build_ids:
            self.index(*build_ids, **kwargs)
        with store.transaction(self.factory) as session:
            return release_unblocked(session, IMPORTER)

    def history(self, job_id: int) -> list[History]:
        with self.factory() as session:
            rows = reports.history_of(session, job_id)
            session.expunge_all()
            return rows


@pytest.fixture
def world(config: cfg.Config, factory: sessionmaker[Session]) -> World:
    return World(config, factory)


class TestRecorded:
    def test_a_failed_attempt_records_what_it_lacked(self, world: World) -> None:
        """The rows are written with the transition: build-id (lower-cased, once), module, when."""
        job_id = world.submit()
        t0 = utcnow()
        world.apply(event("retrace.started", job_id, worker="w"),
                    event("retrace.failed", job_id, error="no symbols", transient=True,
                          missing=[{"build_id": A.upper(), "module": "/usr/bin/crashy"}, {"build_id": A},
                                   {"build_id": B}]))
        assert world.job(job_id).state == ROLES.queue
        with world.factory() as session:
            rows = of_job(session, job_id)
        assert [(r["build_id"], r["module"]) for r in rows] == [(A, "/usr/bin/crashy"), (B, None)]
        assert all(t0 <= r["recorded_at"] <= utcnow() for r in rows)

    def test_the_next_attempt_replaces_the_list(self, world: World) -> None:
        """Each attempt that judged symbols says what the job now waits for; one that did not (no field)
        leaves the list as it was."""
        job_id = world.waiting_job(A, B)
        world.fail(job_id, B, C)
        assert world.rows(job_id) == [B, C]
        world.fail(job_id, field=False)
        assert (world.job(job_id).state, world.rows(job_id)) == (ROLES.held, [B, C])
        with store.transaction(world.factory) as session:  # an admin's retry: the job still lacks them
            world.applier.fire(session, job_id, _admin_retry(), by="admin:celso")
        assert world.rows(job_id) == [B, C]
        world.fail(job_id)
        assert world.rows(job_id) == []

    def test_a_held_job_keeps_its_list(self, world: World) -> None:
        job_id = world.submit()
        world.fail(job_id, A, transient=False)
        assert (world.job(job_id).state, world.rows(job_id)) == (ROLES.held, [A])

    def test_success_clears_it(self, world: World) -> None:
        """A retraced and uploaded job waits for nothing."""
        job_id = world.waiting_job(A)
        other = world.waiting_job(A)
        world.apply(event("retrace.started", job_id, worker="w"), event("upload.accepted", job_id, leaf="up-1"))
        assert world.job(job_id).state == ROLES.success
        assert (world.rows(job_id), world.rows(other)) == ([], [A])

    def test_in_one_batch_the_last_word_wins(self, world: World) -> None:
        job_id = world.submit()
        world.apply(event("retrace.started", job_id, worker="w"),
                    event("retrace.failed", job_id, error="x", transient=True, missing=[{"build_id": A}]),
                    event("retrace.started", job_id, worker="w"),
                    event("retrace.failed", job_id, error="x", transient=True, missing=[{"build_id": B}]))
        assert world.rows(job_id) == [B]


class TestListing:
    def test_most_waited_for_first_with_the_jobs(self, world: World) -> None:
        one = world.waiting_job(A, B)
        two = world.waiting_job(B)
        three = world.waiting_job(B, C)
        listed = world.listing()
        assert [(r["build_id"], r["waiting"], r["jobs"]) for r in listed] == [
            (B, 3, [one, two, three]), (A, 1, [one]), (C, 1, [three])]
        assert listed[0]["module"] == f"/usr/lib/{B[:4]}.so" and listed[0]["since"] is not None
        assert [r["build_id"] for r in world.listing(limit=1)] == [B]
        with world.factory() as session:
            assert reports.missing_symbols(session) == listed

    def test_only_jobs_still_waiting_count(self, world: World) -> None:
        """A job retracing again, or retraced, is not waiting; a held one is."""
        held = world.submit()
        world.fail(held, A, transient=False)
        running = world.waiting_job(A)
        world.apply(event("retrace.started", running, worker="w"))
        assert [(r["build_id"], r["jobs"]) for r in world.listing()] == [(A, [held])]

    def test_job_ids_are_bounded_the_count_is_not(self, world: World) -> None:
        jobs = [world.waiting_job(A) for _ in range(4)]
        (row,) = world.listing(jobs_per_build_id=2)
        assert (row["waiting"], row["jobs"]) == (4, jobs[:2])
        assert world.listing(limit=0) == []

    def test_a_window_counts_only_the_latest_reports(self, world: World) -> None:
        """What the status page shows: the reports after window_start, the newest ones."""
        first = world.waiting_job(A, B)
        second = world.waiting_job(B)
        with world.factory() as session:
            assert window_start(session, 3) is None
            after = window_start(session, 1)
        assert after is not None
        assert [(r["build_id"], r["waiting"], r["jobs"]) for r in world.listing(after_id=after)] == [(B, 1, [second])]
        # A window holding every report lists what the whole aggregate does.
        assert world.listing(after_id=0) == world.listing()
        assert [(r["build_id"], r["waiting"], r["jobs"]) for r in world.listing()] == [(B, 2, [first, second]),
                                                                                  (A, 1, [first])]

    def test_the_command(self, world: World, tmp_path: Path, db_url: str) -> None:
        """`retracer symbols missing` prints the table, --json the listing, --limit bounds it."""
        job_id = world.waiting_job(A, B)
        env = {"RETRACER__SERVICE__DATA_DIR": str(tmp_path / "data"), "RETRACER__DATABASE__URL": db_url}
        run = CliRunner()
        shown = run.invoke(cli, ["symbols", "missing", "--json", "--limit", "1"], env=env)
        assert shown.exit_code == 0, shown.output
        (row,) = json.loads(shown.output)
        assert (row["build_id"], row["waiting"], row["jobs"]) == (A, 1, [job_id])
        table = run.invoke(cli, ["symbols", "missing"], env=env)
        assert table.exit_code == 0, table.output
        header, *lines = table.output.splitlines()
        assert header.split()[:3] == ["BUILD-ID", "MODULE", "JOBS"]
        assert [line.split()[0] for line in lines] == [A, B] and lines[0].split()[-1] == str(job_id)
        bad = run.invoke(cli, ["symbols", "missing", "--limit", "0"], env=env)
        assert bad.exit_code == 2 and "--limit" in bad.output
        world.release(A, B)
        assert run.invoke(cli, ["symbols", "missing"], env=env).output == "no job waits for missing symbols\n"


# -- the release ---------------------------------------------------------------------------------------------


class TestRelease:
    def test_a_waiting_job_goes_back_to_the_queue_now(self, world: World) -> None:
        job_id = world.waiting_job(A)
        before = world.job(job_id)
        assert before.not_before is not None and before.not_before > utcnow() and before.attempts == 1
        t0 = utcnow()
        assert world.release(A) == [job_id]
        after = world.job(job_id)
        assert (after.state, after.not_before, after.attempts, after.version_id) == (
            ROLES.queue, None, 0, before.version_id + 1)
        last = world.history(job_id)[-1]
        assert (last.from_state, last.to_state, last.trigger, last.actor) == (
            ROLES.queue, ROLES.queue, ROLES.symbols_arrived, IMPORTER)
        assert last.reason is not None and A in last.reason and "imported" in last.reason
        assert t0 <= last.at <= utcnow()
        assert world.rows(job_id) == [] and world.listing() == []
        assert world.release() == []  # nothing new: released once

    def test_a_job_held_after_its_attempts_is_released_with_attempts_reset(
            self, tmp_path: Path, db_url: str) -> None:
        config = make_config(tmp_path / "data", db_url, RETRACER__POLICY__MAX_ATTEMPTS="1")
        engine = store.make_engine(config.database_url)
        try:
            w = World(config, store.session_factory(engine))
            job_id = w.waiting_job(A)
            assert (w.job(job_id).state, w.job(job_id).attempts) == (ROLES.held, 1)
            assert w.release(A) == [job_id]
            after = w.job(job_id)
            assert (after.state, after.attempts, after.hold_reason) == (ROLES.queue, 0, None)
            assert w.history(job_id)[-1].from_state == ROLES.held
        finally:
            engine.dispose()

    def test_a_job_missing_two_build_ids_waits_for_both(self, world: World) -> None:
        """The import of one does not release it (and no longer lists it as missing); the other's does."""
        job_id = world.waiting_job(A, B)
        assert world.release(A) == []
        assert world.job(job_id).not_before is not None and world.rows(job_id) == [B]
        assert [r["build_id"] for r in world.listing()] == [B]
        assert world.release(B) == [job_id]

    def test_one_import_releases_every_job_it_unblocks(self, world: World) -> None:
        first, second = world.waiting_job(A), world.waiting_job(A, B)
        third = world.waiting_job(B)
        assert world.release(A, B) == [first, second, third]

    def test_an_admins_hold_is_the_admins_to_lift(self, world: World) -> None:
        """A job an admin held stays held, even if its last attempt lacked the symbols imported."""
        job_id = world.waiting_job(A)
        with store.transaction(world.factory) as session:
            world.applier.fire(session, job_id, _admin_hold(), by="admin:celso",
                               reason="core looks truncated")
        assert world.release(A) == []
        assert (world.job(job_id).state, world.job(job_id).hold_reason) == (ROLES.held, "core looks truncated")

    def test_a_priority_change_does_not_hide_the_workflows_hold(self, world: World) -> None:
        """What counts is who moved the job into its hold, not the last thing recorded on it."""
        job_id = world.submit()
        world.fail(job_id, A, transient=False)
        with store.transaction(world.factory) as session:
            world.applier.fire(session, job_id, ROLES.reprioritize, by="admin:celso", data={"priority": 9})
        assert world.release(A) == [job_id]

    def test_an_import_looks_only_at_the_build_ids_it_brought(self, world: World) -> None:
        """An import names what it brought: a job covered by something else is left to that import's run."""
        job_id = world.waiting_job(A)
        world.index(A)
        with store.transaction(world.factory) as session:
            assert release_unblocked(session, IMPORTER, build_ids={B}) == []
            assert release_unblocked(session, IMPORTER, build_ids=set()) == []
        assert world.rows(job_id) == [A]
        with store.transaction(world.factory) as session:
            assert release_unblocked(session, IMPORTER, build_ids={A, B}) == [job_id]

    def test_an_executable_alone_does_not_release(self, world: World) -> None:
        job_id = world.waiting_job(A)
        assert world.release(A, kind="executable") == []
        assert world.rows(job_id) == [A]

    def test_symbols_indexed_before_the_failure_do_not_release(self, world: World) -> None:
        """The worker lacked them with them in the index: releasing would fail again, at every import."""
        world.index(A, at=utcnow() - timedelta(hours=1))
        job_id = world.waiting_job(A)
        assert world.release(B) == []
        assert world.rows(job_id) == [A]

    def test_only_waiting_jobs_move(self, world: World) -> None:
        """A job ready now (an admin's retry) or retracing is not moved; what it lacked is no longer listed."""
        ready = world.submit()
        world.fail(ready, A, transient=False)
        with store.transaction(world.factory) as session:
            world.applier.fire(session, ready, _admin_retry(), by="admin:celso")
        running = world.waiting_job(A)
        world.apply(event("retrace.started", running, worker="w"))
        assert world.release(A) == []
        assert [h.trigger for j in (ready, running) for h in world.history(j)
                if h.trigger == ROLES.symbols_arrived] == []
        assert world.rows(ready) == world.rows(running) == []

    def test_a_job_taken_meanwhile_is_left_alone(self, world: World) -> None:
        """Checked again under the job's lock: a job whose retry time passed is not moved."""
        job_id = world.waiting_job(A)
        with store.transaction(world.factory) as session:
            session.execute(update(Job).where(Job.id == job_id).values(not_before=utcnow() - timedelta(seconds=1)))
        assert world.release(A) == []

    def test_nothing_to_release(self, world: World) -> None:
        assert world.release() == []
        world.waiting_job(A)
        assert world.release(B) == []
        with world.factory() as session:
            assert len(session.scalars(select(MissingSymbol)).all()) == 1


def _admin_hold() -> str:
    """The admin trigger that holds a job (read from the workflow file, as the code does)."""
    return next(t.trigger for t in load().transitions if t.admin and t.dest == ROLES.held)


def _admin_retry() -> str:
    """The admin trigger that sends a held job back to the queue with its attempts reset."""
    return next(t.trigger for t in load().transitions
                if t.admin and ROLES.held in t.source and t.dest == ROLES.queue and t.effect == "reset")
