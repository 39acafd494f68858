"""The `retracer` commands that look at jobs and create them: submit, jobs, show, status, states, db upgrade."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from retracer import config as cfg
from retracer import store
from retracer.apply.applier import Applier
from retracer.cli import cli
from retracer.testing.factories import event
from retracer.workflow import load, mermaid

SUBMIT = ("submit --crash-id {crash} --creator mark@example.com --package cdrkit --version 1.0 "
          "--architecture i386 --release breezy --core /srv/crashes/{crash}/core --executable /usr/bin/cdrecord")


class Retracer:
    """One embedded instance: runs command lines through CliRunner and drives jobs through the apply path."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.config = cfg.load(environ=env)
        self.engine = store.make_engine(self.config.database_url)
        self.factory = store.session_factory(self.engine)

    def run(self, line: str) -> Result:
        return CliRunner().invoke(cli, line.split(), env=self.env)

    def ok(self, line: str) -> str:
        result = self.run(line)
        assert result.exit_code == 0, (line, result.output)
        return result.output

    def json(self, line: str) -> Any:
        return json.loads(self.ok(line + " --json"))

    def submit(self, crash: str, extra: str = "") -> int:
        return int(self.ok(SUBMIT.format(crash=crash) + extra))

    def apply(self, etype: str, job: int, **data: Any) -> None:
        with store.transaction(self.factory) as session:
            (outcome,) = Applier(self.config).apply_batch(session, [event(etype, job, source="w", **data)])
        assert outcome.status == "applied", outcome

    def fire(self, job: int, trigger: str, **kwargs: Any) -> None:
        with store.transaction(self.factory) as session:
            Applier(self.config).fire(session, job, trigger, by="admin:celso", **kwargs)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No RETRACER_CONFIG or RETRACER__* from the developer's shell leaks into these tests."""
    for name in list(os.environ):
        if name.startswith("RETRACER"):
            monkeypatch.delenv(name)


@pytest.fixture
def rt(tmp_path: Path, sqlite_url: str) -> Iterator[Retracer]:
    """A migrated embedded instance."""
    instance = Retracer({"RETRACER__SERVICE__DATA_DIR": str(tmp_path / "data"),
                         "RETRACER__DATABASE__URL": sqlite_url,
                         "RETRACER__MAIL__ADMINS": "celso@example.com"})
    yield instance
    instance.engine.dispose()


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
        assert result.output.startswith("Error: cannot submit: data.creator is not an email address; "
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
        assert [h["by"] for h in history] == ["event:cli:submit", "event:w", "event:w"]
        assert [h["reason"] for h in history] == [None, None, "upload failed: Rejected: bad signature"]
        times = [datetime.fromisoformat(h["at"]) for h in history]
        assert times == sorted(times) and all(t.utcoffset() == timedelta(0) for t in times)

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
        assert history[0].split() == ["AT", "FROM", "TO", "TRIGGER", "BY", "REASON"]
        assert [line.split()[2:5] for line in history[1:]] == [
            ["-", "PENDING", "submit"], ["PENDING", "RETRACING", "start"],
            ["RETRACING", "FAILEDTOUPLOAD", "upload_failed"]]

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
        assert [q["id"] for q in report["queue"]] == [busy["manual"], busy["urgent"], busy["old"], busy["flaky"]]
        assert [q["manual"] for q in report["queue"]] == [True, False, False, False]
        assert report["queue"][3]["not_before"] is not None
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
        assert set(sections) == {"Retracing", "Queue (dispatch order)", "Recent failures", "On hold"}
        queue = sections["Queue (dispatch order)"].splitlines()
        assert [line.split()[0] for line in queue[1:]] == [str(busy[n]) for n in ("manual", "urgent", "old", "flaky")]
        assert "1 (manual)" in queue[1] and re.search(r" in 4m5\ds$", queue[4]), queue  # backoff 300 s
        assert f"{busy['running']}" in sections["Retracing"] and "w-run" in sections["Retracing"]
        assert "core file looks truncated" in sections["On hold"]
        assert "upload failed: bad checksum" in sections["Recent failures"]

    def test_empty(self, rt: Retracer) -> None:
        """status on an empty instance says there is nothing in each section."""
        out = rt.ok("status")
        assert "Retracing:\n  none" in out and "Queue (dispatch order):\n  empty" in out
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

    @pytest.mark.parametrize("line", ["jobs", "show 1", "status", SUBMIT.format(crash="c1")],
                             ids=["jobs", "show", "status", "submit"])
    def test_missing_database_says_upgrade(self, fresh: Retracer, line: str) -> None:
        """A command on a database with no schema exits 1 and says to run `retracer db upgrade`."""
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
