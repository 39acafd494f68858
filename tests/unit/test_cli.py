"""The `retracer` commands that look at jobs and create them: submit, jobs, show, status, states, db upgrade."""

from __future__ import annotations

import getpass
import json
import os
import re
import shlex
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, update

from retracer import addresses, store
from retracer import config as cfg
from retracer.apply.applier import Applier
from retracer.cli import cli
from retracer.service.chores.dispatch import dispatch
from retracer.store.models import History, Inbox, Job, Mail
from retracer.testing.factories import event
from retracer.workflow import load, mermaid
from tests.unit.clirun import SUBMIT, Retracer


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No RETRACER_CONFIG or RETRACER__* from the developer's shell leaks into these tests."""
    for name in list(os.environ):
        if name.startswith("RETRACER"):
            monkeypatch.delenv(name)


class TestSubmit:
    def test_prints_the_new_id(self, rt: Retracer) -> None:
        """submit prints the new job's id, one per job."""
        assert rt.ok(SUBMIT.format(crash="c1")) == "1\n"
        assert rt.ok(SUBMIT.format(crash="c2")) == "2\n"

    def test_json(self, rt: Retracer) -> None:
        """submit --json prints {"id": N}."""
        rt.submit("c1")
        assert rt.json(SUBMIT.format(crash="c2")) == {"id": 2}

    def test_fields_reach_the_job(self, rt: Retracer) -> None:
        """Every option of submit ends up on the job, build-ids repeatable and the priority kept."""
        job = rt.submit("c1", " --build-id 0123abcd --build-id deadbeef99 --priority 12")
        shown = rt.json(f"show {job}")
        assert (shown["crash_id"], shown["creator"], shown["package"], shown["version"]) == (
            "c1", "mark@example.com", "cdrkit", "1.0")
        assert (shown["architecture"], shown["release"], shown["core"], shown["executable"]) == (
            "i386", "breezy", "/srv/crashes/c1/core", "/usr/bin/cdrecord")
        assert shown["build_ids"] == ["0123abcd", "deadbeef99"] and shown["priority"] == 12
        assert shown["state"] == "PENDING" and shown["manual_priority"] is False

    def test_invalid_input_is_refused(self, rt: Retracer) -> None:
        """An invalid field exits 1 naming the field, and no job is created."""
        result = rt.run(SUBMIT.format(crash="c1").replace("mark@example.com", "mark") + " --build-id xyz")
        assert result.exit_code == 1
        assert result.output.startswith(f"Error: cannot submit: data.creator {addresses.problem('mark')}; "
                                        "data.build_ids has entries that are not hex build-ids: ['xyz']")
        assert rt.ok("jobs") == "no jobs\n"

    def test_missing_option(self, rt: Retracer) -> None:
        """A missing required option is a usage error (exit 2) naming it."""
        result = rt.run("submit --crash-id c1")
        assert result.exit_code == 2 and "--creator" in result.output


class TestJobs:
    def test_table_newest_first(self, rt: Retracer) -> None:
        """jobs prints a table of jobs, newest first, with state, crash and package."""
        rt.submit("c1")
        rt.submit("c2")
        lines = rt.ok("jobs").splitlines()
        assert lines[0].split() == ["ID", "STATE", "CRASH", "PACKAGE", "VERSION", "ARCH", "PRIO", "TRIES"]
        assert [line.split()[:4] for line in lines[1:]] == [["2", "PENDING", "c2", "cdrkit"],
                                                             ["1", "PENDING", "c1", "cdrkit"]]

    def test_state_filter_and_json(self, rt: Retracer) -> None:
        """jobs --state S --json lists only jobs in S, each with at least id, crash_id and state."""
        for crash in ("c1", "c2", "c3"):
            rt.submit(crash)
        rt.apply("retrace.started", 2, worker="w1")
        retracing = rt.json("jobs --state RETRACING")
        assert [(j["id"], j["crash_id"], j["state"]) for j in retracing] == [(2, "c2", "RETRACING")]
        pending = rt.json("jobs --state PENDING")
        assert [(j["id"], j["state"]) for j in pending] == [(3, "PENDING"), (1, "PENDING")]
        assert len(rt.json("jobs")) == 3

    def test_empty(self, rt: Retracer) -> None:
        """With nothing to list, jobs says so (and --json gives an empty list)."""
        assert rt.ok("jobs") == "no jobs\n"
        assert rt.ok("jobs --state ON_HOLD") == "no jobs in ON_HOLD\n"
        assert rt.json("jobs") == []

    def test_unknown_state(self, rt: Retracer) -> None:
        """An unknown --state is a usage error listing the states."""
        result = rt.run("jobs --state DONE")
        assert result.exit_code == 2 and "FAILEDTOUPLOAD" in result.output


class TestShow:
    def test_json(self, rt: Retracer) -> None:
        """show --json has the job's fields and its history, each entry with from, to, trigger, by, reason, at."""
        job = rt.submit("c1")
        rt.apply("retrace.started", job, worker="w1")
        rt.apply("upload.failed", job, leaf="upload-1", upload_log="Rejected: bad signature\nmore")
        shown = rt.json(f"show {job}")
        assert (shown["id"], shown["state"], shown["attempts"], shown["priority"]) == (job, "FAILEDTOUPLOAD", 0, 0)
        assert shown["upload_log"] == "Rejected: bad signature\nmore" and shown["hold_reason"] is None
        history = shown["history"]
        assert [(h["from"], h["to"], h["trigger"]) for h in history] == [
            (None, "PENDING", "submit"), ("PENDING", "RETRACING", "start"),
            ("RETRACING", "FAILEDTOUPLOAD", "upload_failed")]
        assert [h["by"] for h in history] == [f"event:admin:{getpass.getuser()}", "event:w", "event:w"]
        assert [h["reason"] for h in history] == [None, None, "upload failed: Rejected: bad signature"]
        times = [datetime.fromisoformat(h["at"]) for h in history]
        assert times == sorted(times) and all(t.utcoffset() == timedelta(0) for t in times)

    def test_backtrace(self, rt: Retracer) -> None:
        """show --backtrace prints the stored backtrace; a job without one is an error saying why."""
        job = rt.submit("c1")
        missing = rt.run(f"show {job} --backtrace")
        assert missing.exit_code == 1 and "has no backtrace yet (it is PENDING" in missing.output
        assert rt.run(f"show {job} --backtrace --json").output.count("{") == 1
        rt.apply("retrace.started", job, worker="w1")
        rt.apply("upload.accepted", job, leaf="upload-1", result="#0  crash_here () at crash.c:2\n\x1b[2J")
        assert rt.ok(f"show {job} --backtrace") == "#0  crash_here () at crash.c:2\n\\x1b[2J\n"
        assert rt.json(f"show {job} --backtrace") == {"job": job,
                                                       "backtrace": "#0  crash_here () at crash.c:2\n\x1b[2J"}

    def test_hold_reason(self, rt: Retracer) -> None:
        """show --json carries the hold reason of a held job."""
        job = rt.submit("c1")
        rt.fire(job, "hold", reason="waiting for symbols")
        shown = rt.json(f"show {job}")
        assert (shown["state"], shown["hold_reason"]) == ("ON_HOLD", "waiting for symbols")
        assert shown["history"][-1]["by"] == "admin:celso"

    def test_text(self, rt: Retracer) -> None:
        """show prints the job, its state with the state's title, the upload log and the history table."""
        job = rt.submit("c1")
        rt.apply("retrace.started", job, worker="w1")
        rt.apply("upload.failed", job, leaf="upload-1", upload_log="Rejected: bad signature\nmore")
        out = rt.ok(f"show {job}")
        assert out.startswith(f"Job {job}: cdrkit 1.0 (i386, breezy), crash c1\n")
        assert "  State:    FAILEDTOUPLOAD (Failed to upload)\n" in out
        assert "  Upload log:\n    Rejected: bad signature\n    more\n" in out
        history = out.split("History:\n", 1)[1].splitlines()
        assert history[0].split() == ["AT", "EVENT", "FROM", "TO", "TRIGGER", "BY", "REASON"]
        assert [line.split()[3:6] for line in history[1:]] == [
            ["-", "PENDING", "submit"], ["PENDING", "RETRACING", "start"],
            ["RETRACING", "FAILEDTOUPLOAD", "upload_failed"]]

    def test_text_names_each_event(self, rt: Retracer) -> None:
        """show's history names the event behind each row (an admin's own rows have none)."""
        job = rt.submit("c1")
        rt.apply("retrace.started", job, worker="w1")
        rt.fire(job, "hold", reason="disk swap")
        ids = [h["event_id"] for h in rt.json(f"show {job}")["history"]]
        assert ids[0] and ids[1] and ids[2] is None
        rows = rt.ok(f"show {job}").split("History:\n", 1)[1].splitlines()[1:]
        assert [row.split()[2] for row in rows] == [ids[0], ids[1], "-"]

    def test_missing_job(self, rt: Retracer) -> None:
        """show on a job that does not exist exits 1 with a message saying how to list jobs."""
        result = rt.run("show 99")
        assert result.exit_code == 1
        assert result.output == "Error: job 99 does not exist (list jobs with `retracer jobs`)\n"


class TestStatus:
    @pytest.fixture
    def busy(self, rt: Retracer) -> dict[str, int]:
        """Jobs in every situation status reports."""
        ids = {name: rt.submit(name, extra) for name, extra in [
            ("old", ""), ("urgent", " --priority 10"), ("manual", ""), ("running", ""), ("flaky", ""),
            ("held", ""), ("broken", ""), ("badupload", "")]}
        rt.fire(ids["manual"], "reprioritize", data={"priority": 1}, reason="customer waiting")
        rt.apply("retrace.started", ids["running"], worker="w-run")
        for name in ("flaky", "broken", "badupload"):
            rt.apply("retrace.started", ids[name], worker="w")
        rt.apply("retrace.failed", ids["flaky"], error="E: Failed to fetch http://archive/x", transient=True)
        rt.apply("retrace.failed", ids["broken"], error="gdb crashed")
        rt.apply("upload.failed", ids["badupload"], leaf="up-1", upload_log="bad checksum")
        rt.fire(ids["held"], "hold", reason="core file looks truncated")
        return ids

    def test_json(self, rt: Retracer, busy: dict[str, int]) -> None:
        """status --json has counts, jobs retracing, the queue in dispatch order, recent failures, jobs on hold."""
        report = rt.json("status")
        assert report["counts"] == {"PENDING": 4, "RETRACING": 1, "FAILEDTOUPLOAD": 1, "FULLYBUILT": 0,
                                    "ON_HOLD": 2}
        (running,) = report["retracing"]
        assert (running["id"], running["worker"]) == (busy["running"], "w-run")
        assert 0 <= running["elapsed_s"] < 60
        # Priority, then age: the admin's 1 (sticky) after the submitted 10, before the 0s.
        assert [q["id"] for q in report["queue"]] == [busy["urgent"], busy["manual"], busy["old"]]
        assert [q["manual"] for q in report["queue"]] == [False, True, False]
        assert report["queue_total"] == 3
        (waiting,) = report["waiting"]
        assert (waiting["id"], waiting["attempts"], report["waiting_total"]) == (busy["flaky"], 1, 1)
        assert waiting["not_before"] is not None
        failures = {f["job"]: (f["trigger"], f["to"], f["reason"]) for f in report["recent_failures"]}
        assert failures == {
            busy["flaky"]: ("retrace_failed", "PENDING", "attempt 1 failed: E: Failed to fetch http://archive/x"),
            busy["broken"]: ("retrace_failed", "ON_HOLD", "permanent failure on attempt 1; last error: gdb crashed"),
            busy["badupload"]: ("upload_failed", "FAILEDTOUPLOAD", "upload failed: bad checksum"),
        }
        assert [(h["id"], h["reason"]) for h in report["on_hold"]] == [
            (busy["held"], "core file looks truncated"),
            (busy["broken"], "permanent failure on attempt 1; last error: gdb crashed")]

    def test_text(self, rt: Retracer, busy: dict[str, int]) -> None:
        """status prints the same report as sections a person can read."""
        out = rt.ok("status")
        assert out.startswith("Jobs per state: PENDING 4, RETRACING 1, FAILEDTOUPLOAD 1, FULLYBUILT 0, ON_HOLD 2\n")
        sections = dict(part.split(":\n", 1) for part in out.split("\n\n")[1:])
        assert set(sections) == {"Retracing", "Queue (dispatch order)", "Waiting for their retry time",
                                 "Recent failures", "On hold"}
        queue = sections["Queue (dispatch order)"].splitlines()
        assert [line.split()[0] for line in queue[1:]] == [str(busy[n]) for n in ("urgent", "manual", "old")]
        assert "1 (manual)" in queue[2], queue
        waiting = sections["Waiting for their retry time"].splitlines()
        assert waiting[0].split() == ["JOB", "PACKAGE", "PRIORITY", "FAILED", "RETRY"]
        assert waiting[1].split()[:4] == [str(busy["flaky"]), "cdrkit", "0", "1"]
        assert re.search(r" in 4m5\ds$", waiting[1]), waiting  # backoff 300 s
        assert f"{busy['running']}" in sections["Retracing"] and "w-run" in sections["Retracing"]
        assert "core file looks truncated" in sections["On hold"]
        assert "upload failed: bad checksum" in sections["Recent failures"]

    def test_empty(self, rt: Retracer) -> None:
        """status on an empty instance says there is nothing in each section."""
        out = rt.ok("status")
        assert "Retracing:\n  none" in out and "Queue (dispatch order):\n  empty" in out
        assert "Waiting for their retry time:\n  none" in out
        assert "Recent failures:\n  none" in out and "On hold:\n  none" in out


class TestStates:
    def test_table(self, rt: Retracer) -> None:
        """states lists every state with its title and every transition of the workflow file."""
        out = rt.ok("states")
        wf = load()
        for name, spec in wf.states.items():
            assert any(line.split()[:1] == [name] and spec.title in line for line in out.splitlines()), name
        rows = [line.split()[0] for line in out.split("\n\n", 1)[1].splitlines()[1:]]
        assert rows == [t.trigger for t in wf.transitions]

    def test_json(self, rt: Retracer) -> None:
        """states --json carries the states and transitions as the file has them."""
        shown = rt.json("states")
        wf = load()
        assert shown["initial"] == wf.initial
        assert [s["name"] for s in shown["states"]] == list(wf.states)
        assert [(t["trigger"], t["source"], t["dest"], t["guards"]) for t in shown["transitions"]] == [
            (t.trigger, list(t.source), t.dest, list(t.guards)) for t in wf.transitions]

    def test_diagram(self, rt: Retracer) -> None:
        """states --diagram prints the Mermaid diagram drawn from the workflow file."""
        assert rt.ok("states --diagram") == mermaid(load()) + "\n"


class TestDatabase:
    @pytest.fixture
    def fresh(self, tmp_path: Path) -> Iterator[Retracer]:
        """An instance whose data directory has no database yet."""
        instance = Retracer({"RETRACER__SERVICE__DATA_DIR": str(tmp_path / "fresh")})
        yield instance
        instance.engine.dispose()

    @pytest.mark.parametrize("line", ["jobs", "show 1", "status", "rejected", "mail list", "audit",
                                      "serve --until-idle", SUBMIT.format(crash="c1"), "hold 1 --reason x"],
                             ids=["jobs", "show", "status", "rejected", "mail-list", "audit", "serve", "submit",
                                  "hold"])
    def test_missing_database_is_not_created(self, fresh: Retracer, tmp_path: Path, line: str) -> None:
        """A command on a database that does not exist exits 1 saying so and how to create it, and leaves
        nothing behind: no data directory, no empty database file."""
        result = fresh.run(line)
        assert result.exit_code == 1, result.output
        assert result.output == (f"Error: there is no database at {tmp_path}/fresh/retracer.db: create it with "
                                 f"`retracer db upgrade` (if this is not where it should be, `retracer "
                                 f"check-config` shows the data directory and database URL in use)\n")
        assert not (tmp_path / "fresh").exists()

    def test_missing_database_as_json(self, fresh: Retracer, tmp_path: Path) -> None:
        """Under --json the same refusal is a JSON object with the message and the exit status."""
        result = fresh.run("jobs --json")
        assert result.exit_code == 1
        shown = json.loads(result.stdout)
        assert shown["exit_code"] == 1 and "retracer db upgrade" in shown["error"]
        assert not (tmp_path / "fresh").exists()

    @pytest.mark.parametrize("line", ["jobs", "show 1", "status", SUBMIT.format(crash="c1")],
                             ids=["jobs", "show", "status", "submit"])
    def test_database_without_schema_says_upgrade(self, fresh: Retracer, tmp_path: Path, line: str) -> None:
        """A database file with no schema (created by hand, or by an older retracer) says to run
        `retracer db upgrade`."""
        (tmp_path / "fresh").mkdir(exist_ok=True)
        (tmp_path / "fresh" / "retracer.db").touch()
        result = fresh.run(line)
        assert result.exit_code == 1, result.output
        assert result.output.startswith("Error: the database ")
        assert "is at schema revision none" in result.output
        assert result.output.rstrip().endswith("run `retracer db upgrade`")

    def test_upgrade_then_use(self, fresh: Retracer, tmp_path: Path) -> None:
        """db upgrade creates the schema under the data directory, is safe to repeat, and the CLI then works."""
        first = fresh.ok("db upgrade")
        assert first == f"database sqlite:///{tmp_path}/fresh/retracer.db is at revision {store.head_revision()}\n"
        assert fresh.ok("db upgrade") == first
        assert fresh.submit("c1") == 1
        assert fresh.json("jobs")[0]["crash_id"] == "c1"

    def test_upgrade_json(self, fresh: Retracer, tmp_path: Path) -> None:
        """db upgrade --json says which database, which revision, and whether it was created just now."""
        url = f"sqlite:///{tmp_path}/fresh/retracer.db"
        assert fresh.json("db upgrade") == {"database": url, "revision": store.head_revision(), "created": True}
        assert fresh.json("db upgrade") == {"database": url, "revision": store.head_revision(), "created": False}


def _mails(rt: Retracer) -> list[tuple[str, str]]:
    with rt.factory() as session:
        return [(m.recipient, m.status) for m in session.scalars(select(Mail).order_by(Mail.id))]


def _count(rt: Retracer, model: type[Any]) -> int:
    with rt.factory() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


class TestPriority:
    def test_negative_priority(self, rt: Retracer) -> None:
        """`retracer priority JOB -5` sets a negative priority (a negative number is not an option)."""
        job = rt.submit("c1")
        out = rt.ok(f"priority {job} -5 --as celso")
        assert out == f"job {job} is now PENDING (reprioritize: stays PENDING, by admin:celso)\n"
        shown = rt.json(f"show {job}")
        assert (shown["priority"], shown["manual_priority"]) == (-5, True)

    def test_manual_priority_ranks_by_its_value(self, rt: Retracer) -> None:
        """An admin's priority is sticky, not a trump card: the dispatcher offers an automatic 0 before a
        manual -5, and a manual 3 before an automatic 2; status shows the same order."""
        low, plain, high, two = (rt.submit(c) for c in ("low", "plain", "high", "two"))
        rt.ok(f"priority {two} 0 --as celso")  # manual, then overridden by a higher automatic one below
        rt.ok(f"priority {low} -5 --as celso")
        rt.ok(f"priority {high} 3 --as celso")
        with store.transaction(rt.factory) as session:
            session.execute(update(Job).where(Job.id == two).values(priority=2, manual_priority=False))
        assert [q["id"] for q in rt.json("status")["queue"]] == [high, two, plain, low]
        offered = []
        config = cfg.load(environ={**rt.env, "RETRACER__SERVICE__MAX_PARALLEL": "1"})
        for _ in range(4):
            with store.transaction(rt.factory) as session:
                (job,) = dispatch(session, config)
                offered.append(job.id)
            rt.apply("retrace.started", offered[-1], worker="w")
            rt.apply("upload.accepted", offered[-1], leaf=f"up-{offered[-1]}")
        assert offered == [high, two, plain, low]


class TestJson:
    def test_error_is_json(self, rt: Retracer) -> None:
        """Under --json a refused command prints {"error", "exit_code"} on standard output and exits with it."""
        result = rt.run("show 99 --json")
        assert result.exit_code == 1
        assert json.loads(result.stdout) == {
            "error": "job 99 does not exist (list jobs with `retracer jobs`)", "exit_code": 1}

    def test_refused_transition_is_json(self, rt: Retracer) -> None:
        """A transition the machine refuses is a JSON error too, naming the job, state and what is allowed."""
        job = rt.submit("c1")
        result = rt.run(f"release {job} --as celso --json")
        assert result.exit_code == 1
        shown = json.loads(result.stdout)
        assert shown["exit_code"] == 1 and shown["error"].startswith(f"job {job} is PENDING: 'release' refused")

    @pytest.mark.parametrize("line", ["jobs --state DONE --json", "jobs --json --bogus", "show x --json"])
    def test_usage_error_is_json(self, rt: Retracer, line: str) -> None:
        """A usage error under --json (even one found before --json was read) is JSON with exit status 2."""
        result = rt.run(line)
        assert result.exit_code == 2
        shown = json.loads(result.stdout)
        assert shown["exit_code"] == 2 and "retracer " in shown["error"] and "--help" in shown["error"]

    def test_without_json_errors_stay_text(self, rt: Retracer) -> None:
        """Without --json an error is the usual one line on standard error."""
        result = rt.run("show 99")
        assert (result.exit_code, result.stdout) == (1, "")
        assert result.stderr == "Error: job 99 does not exist (list jobs with `retracer jobs`)\n"

    def test_serve_prints_its_counters(self, rt: Retracer) -> None:
        """serve --json prints the final counters as one JSON object on standard output."""
        job = rt.submit("c1")
        with store.transaction(rt.factory) as session:
            session.add(Inbox(body=json.dumps(event("retrace.started", job, source="w", worker="w"))))
            session.add(Inbox(body="not json"))
        result = rt.run("serve --until-idle --log-level ERROR --json")
        assert result.exit_code == 0, result.output
        stats = json.loads(result.stdout)
        assert (stats["applied"], stats["rejected"], stats["duplicate"]) == (1, 1, 0)
        assert stats["batches"] >= 1 and isinstance(stats["chores"], dict)

    def test_diagram(self, rt: Retracer) -> None:
        """states --diagram --json gives the Mermaid text in a JSON object."""
        assert rt.json("states --diagram") == {"mermaid": mermaid(load())}

    def test_demo_error(self, rt: Retracer, tmp_path: Path) -> None:
        """demo --json refuses a used directory with a JSON error."""
        (tmp_path / "used").mkdir()
        (tmp_path / "used" / "keep").write_text("x")
        result = rt.run(f"demo --dir {tmp_path / 'used'} --json")
        assert result.exit_code == 1
        assert "is not empty" in json.loads(result.stdout)["error"]


class TestSubmitOptions:
    def test_duplicate_crash_is_refused(self, rt: Retracer) -> None:
        """A second job for the same crash is refused, naming the existing job; --allow-duplicate makes it."""
        first = rt.submit("c1")
        result = rt.run(SUBMIT.format(crash="c1"))
        assert result.exit_code == 1
        assert result.output == (
            f"Error: cannot submit: crash c1 already has job {first} (PENDING); see `retracer show {first}` "
            f"(`retracer retry {first}` sends a failed or held job back to the queue), or pass --allow-duplicate "
            f"to make another job for the same crash\n")
        assert len(rt.json("jobs")) == 1
        second = rt.submit("c1", " --allow-duplicate")
        assert second == first + 1 and [j["crash_id"] for j in rt.json("jobs")] == ["c1", "c1"]

    def test_as_and_reason_are_recorded(self, rt: Retracer) -> None:
        """submit --as NAME --reason WHY: the job's history says who submitted it and why."""
        job = rt.submit("c1", " --as celso --reason 'reported twice on the list'")
        (submitted,) = rt.json(f"show {job}")["history"]
        assert (submitted["by"], submitted["reason"]) == ("event:admin:celso", "reported twice on the list")
        assert submitted["event_id"]

    def test_dry_run_creates_nothing(self, rt: Retracer) -> None:
        """submit --dry-run validates and applies in a rolled-back transaction: no job, no id used up."""
        assert rt.ok(SUBMIT.format(crash="c1") + " --dry-run") == (
            "dry run: crash c1 would become a new PENDING job; nothing was created\n")
        assert rt.json(SUBMIT.format(crash="c1") + " --dry-run") == {"id": None, "dry_run": True}
        assert rt.json("jobs") == [] and _count(rt, History) == 0
        assert rt.submit("c1") == 1
        result = rt.run(SUBMIT.format(crash="c1") + " --dry-run")
        assert result.exit_code == 1 and "already has job 1" in result.output


class TestChangingCommands:
    def _events_file(self, tmp_path: Path, *bodies: dict[str, Any]) -> Path:
        path = tmp_path / "events.jsonl"
        path.write_text("".join(json.dumps(b) + "\n" for b in bodies), encoding="utf-8")
        return path

    def test_publish_dry_run(self, rt: Retracer, tmp_path: Path) -> None:
        """publish --dry-run validates every line and sends nothing."""
        job = rt.submit("c1")
        path = self._events_file(tmp_path, event("retrace.started", job, source="w", worker="w"))
        assert rt.ok(f"publish {path} --dry-run") == (
            "dry run: 1 valid event(s), nothing was published to the embedded inbox\n")
        assert _count(rt, Inbox) == 0
        rt.ok(f"publish {path}")
        assert _count(rt, Inbox) == 1

    def test_publish_reason_is_audited(self, rt: Retracer, tmp_path: Path) -> None:
        """publish --as NAME --reason WHY keeps the publication in `retracer audit`; without --reason (a worker's
        routine traffic) nothing is added there."""
        job = rt.submit("c1")
        body = event("retrace.started", job, source="w", worker="w")
        path = self._events_file(tmp_path, body)
        rt.ok(f"publish {path}")
        assert rt.json("audit") == []
        rt.ok(f"publish {path} --as celso --reason 'lost by the old uploader'")
        (row,) = rt.json("audit")
        assert (row["by"], row["action"]) == ("admin:celso", "publish")
        assert row["detail"] == {"events": 1, "ids": [body["id"]], "to": "the embedded inbox",
                                 "reason": "lost by the old uploader"}

    def test_replay_dry_run(self, rt: Retracer, tmp_path: Path) -> None:
        """rejected replay --dry-run says what would become of the event and leaves it rejected, unreplayed."""
        job = rt.submit("c1")
        with store.transaction(rt.factory) as session:
            Applier(rt.config).apply_batch(session, [event("retrace.heartbeat", job, source="w", worker="w")])
        (rejected,) = rt.json("rejected")
        rt.apply("retrace.started", job, worker="w")
        out = rt.ok(f"rejected replay {rejected['id']} --dry-run --as celso")
        assert out == f"event {rejected['event_id']} would be applied: job {job} RETRACING -> RETRACING\n" \
                      "dry run: nothing changed\n"
        assert [r["id"] for r in rt.json("rejected")] == [rejected["id"]] and rt.json("audit") == []
        shown = rt.json(f"rejected replay {rejected['id']} --as celso --reason fixed")
        assert (shown["status"], shown["by"], shown["dry_run"]) == ("applied", "admin:celso", False)
        assert rt.json("rejected") == []

    def test_mail_flush_dry_run(self, rt: Retracer) -> None:
        """mail flush --dry-run lists the mails due and sends none; --as/--reason audit a real flush."""
        job = rt.submit("c1")
        rt.fire(job, "hold", reason="check the core")
        due = _mails(rt)
        assert due and all(status == "pending" for _, status in due)
        out = rt.ok("mail flush --dry-run")
        assert out.startswith(f"dry run: {len(due)} mail{'s' if len(due) > 1 else ''} due, nothing was sent")
        assert [m["recipient"] for m in rt.json("mail flush --dry-run")["due"]] == [r for r, _ in due]
        assert _mails(rt) == due
        rt.ok("mail flush --as cron --reason 'smtp is back'")
        assert all(status == "sent" for _, status in _mails(rt))
        (row,) = rt.json("audit")
        assert (row["by"], row["action"], row["detail"]["sent"], row["detail"]["reason"]) == (
            "admin:cron", "mail.flush", len(due), "smtp is back")

    def test_work_take_dry_run(self, rt: Retracer) -> None:
        """work take --dry-run shows the request and leaves it for the worker that takes it."""
        job = rt.submit("c1")
        rt.ok("serve --until-idle --log-level ERROR")
        out = rt.ok("work take --dry-run")
        assert out.startswith(f"job {job}: cdrkit 1.0 (i386)") and out.endswith("dry run: nothing was taken\n")
        (taken,) = rt.json("work take --as bob --reason 'by hand'")
        assert taken["job"] == job and rt.json("work take") == []
        (row,) = rt.json("audit")
        assert (row["by"], row["action"], row["detail"]["jobs"]) == ("admin:bob", "work.take", [job])


class TestStatusQueue:
    def test_long_queue_says_how_many_more(self, rt: Retracer) -> None:
        """status shows the first 20 of the queue and says how many more there are, and where to see them."""
        for n in range(23):
            rt.submit(f"c{n}")
        out = rt.ok("status")
        queue = out.split("Queue (dispatch order):\n", 1)[1].split("\n\n", 1)[0].splitlines()
        assert len(queue) == 1 + 20 + 1
        assert queue[-1] == ("  ... and 3 more queued jobs (all 23: `retracer status --json`, "
                             "`retracer jobs --state PENDING`)")
        report = rt.json("status")
        assert (len(report["queue"]), report["queue_total"]) == (20, 23)


class TestSpuriousBounded:
    """`spurious add` refuses what cannot be matched in bounded time; `list` shows a stored one serve skips."""

    @pytest.mark.parametrize(("pattern", "what"), [(r"mirror (\w+) \1", "backreferences"),
                                                   (r"fetch(?= failed)", "lookahead"),
                                                   (r"(?<!not )found", "lookbehind"),
                                                   (r"[a-z][^q]{400}q", "too large once compiled")])
    def test_add_refuses(self, rt: Retracer, pattern: str, what: str) -> None:
        """The refusal names what is wrong and what to write; nothing is stored or audited."""
        result = rt.run(f"spurious add {shlex.quote(pattern)} --as alice --reason 'flaky'")
        assert result.exit_code == 1 and what in result.output and "write" in result.output, result.output
        assert rt.json("spurious list") == [] and rt.json("audit") == []

    def test_hostile_failure_does_not_hold_serve(self, rt: Retracer, tmp_path: Path) -> None:
        """With a catastrophic-backtracking pattern registered, serve classifies a hostile failure and finishes,
        so the database is free for the next command."""
        import subprocess
        import sys
        rt.ok("spurious add '(a+)+$' --as alice --reason 'nested quantifiers'")
        job = rt.submit("c1")
        rt.apply("retrace.started", job, worker="w")
        with store.transaction(rt.factory) as session:
            session.add(Inbox(body=json.dumps(event("retrace.failed", job, source="w", error="a" * 65535 + "!"))))
        try:
            done = subprocess.run([sys.executable, "-m", "retracer", "serve", "--until-idle", "--log-level", "ERROR"],
                                  env={**os.environ, **rt.env}, capture_output=True, text=True, timeout=120,
                                  check=False)
        except subprocess.TimeoutExpired:
            pytest.fail("serve did not finish classifying one failure against a registered pattern")
        assert done.returncode == 0, done.stderr
        assert rt.json(f"show {job}")["state"] == "ON_HOLD"

    def test_list_shows_unusable_stored_pattern(self, rt: Retracer) -> None:
        """A pattern stored before such patterns were refused is listed as unusable, with why, and can be removed."""
        from retracer.store.models import SpuriousPattern
        with store.transaction(rt.factory) as session:
            session.add(SpuriousPattern(pattern=r"(\w+) \1", reason="old", added_by="admin:alice"))
        rt.ok("spurious add 'mirror .* 404' --as alice --reason 'syncing'")
        listed = rt.json("spurious list")
        assert [(p["pattern"], p["usable"]) for p in listed] == [(r"(\w+) \1", False), ("mirror .* 404", True)]
        assert "backreferences" in listed[0]["problem"] and listed[1]["problem"] is None
        out = rt.ok("spurious list")
        assert "#1 is unusable and skipped when failures are classified" in out
        assert "`retracer spurious remove 1`" in out and "#2 is unusable" not in out
        rt.ok("spurious remove 1 --as alice --reason 'unusable'")
        assert [p["pattern"] for p in rt.json("spurious list")] == ["mirror .* 404"]


class TestHostileNumbersAndNames:
    """Integers beyond any row id or limit, and upload names longer than a file name can be, are explained
    (usage error, exit 2; or a refused upload, exit 1), never a traceback from the database or the OS."""

    @pytest.mark.parametrize("line", ["show -- {n}", "jobs --limit={n}", "rejected replay -- {n}",
                                      "work take --limit={n}"])
    @pytest.mark.parametrize("n", [0, -1, 2**31, 2**63, 10**20, 10**400],
                             ids=["0", "-1", "2^31", "2^63", "1e20", "1e400"])
    def test_out_of_range(self, rt: Retracer, line: str, n: int) -> None:
        """A job id, rejected-event id or limit outside 1..2147483647 is a usage error naming the range."""
        result = rt.run(line.format(n=n))
        assert result.exit_code == 2, result.output
        assert "is not in the range 1<=x<=2147483647" in result.output
        assert isinstance(result.exception, SystemExit)

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(n=st.integers())
    def test_any_job_id(self, rt: Retracer, n: int) -> None:
        """Whatever integer is given as a job, show answers with a message (no such job, or out of range)."""
        result = rt.run(f"show -- {n}")
        assert result.exit_code in (1, 2) and isinstance(result.exception, SystemExit), result.output

    @pytest.mark.parametrize("length", [256, 4096, 5000])
    def test_leaf_longer_than_a_file_name(self, rt: Retracer, length: int) -> None:
        """process-upload --leaf with a name no file system allows says there is no such upload, and why."""
        result = rt.run(f"process-upload --leaf {'a' * length}")
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert f"the name has {length} characters, more than a file name can have" in result.output

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(leaf=st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=20)
           .map(lambda s: s * 300))
    def test_any_leaf(self, rt: Retracer, leaf: str) -> None:
        """Whatever (long) name is given as --leaf, process-upload refuses it with exit 1, no traceback."""
        result = CliRunner().invoke(cli, ["process-upload", "--leaf", leaf], env=rt.env, prog_name="retracer")
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
