"""`retracer worker` in the embedded mode, with fake retrace engines: what it publishes, what it writes in the
spool, how it settles its requests, and how it stops."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from sqlalchemy import select

from retracer import events as ev
from retracer import store
from retracer.config import Config
from retracer.errors import BrokerError, RetracerError
from retracer.service.chores.dispatch import dispatch, work_request
from retracer.store.models import Inbox, Job, Outbox
from retracer.uploads.files import INCOMING
from retracer.worker import loop
from retracer.worker.loop import ENGINE_MODULE, Worker, worker_name
from retracer.worker.loop_attempt import MAX_ERROR, failure_text
from retracer.worker.request import Failed, Missing, Outcome, Request, Retraced
from retracer.worker.sources import Delivery
from retracer.worker.upload import leaf_for
from tests.unit.clirun import Retracer

BACKTRACE = "#0  0x0000555555555131 in main () at crash.c:3\n"
BUILD_ID = "0123456789abcdef0123456789abcdef01234567"
FakeEngine = Callable[[Request, Config, Path, threading.Event | None], Outcome]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No RETRACER_CONFIG or RETRACER__* from the developer's shell leaks into these tests."""
    for name in list(os.environ):
        if name.startswith("RETRACER"):
            monkeypatch.delenv(name)


@pytest.fixture
def wrt(tmp_path: Path, sqlite_url: str) -> Iterator[Retracer]:
    """An embedded instance whose worker beats every 50 ms and polls every 50 ms."""
    instance = Retracer({"RETRACER__SERVICE__DATA_DIR": str(tmp_path / "data"),
                         "RETRACER__DATABASE__URL": sqlite_url,
                         "RETRACER__MAIL__ADMINS": "celso@example.com",
                         "RETRACER__SERVICE__POLL_INTERVAL_S": "0.05",
                         "RETRACER__WORKER__NAME": "unit-worker",
                         "RETRACER__WORKER__HEARTBEAT_INTERVAL_S": "0.05"})
    yield instance
    instance.engine.dispose()


@pytest.fixture
def use_engine(monkeypatch: pytest.MonkeyPatch) -> Callable[[FakeEngine], None]:
    """Install a fake retracer.worker.retrace whose retrace() is the given function (the CLI imports it)."""
    def install(engine: FakeEngine) -> None:
        module = types.ModuleType(ENGINE_MODULE)
        module.__dict__["retrace"] = engine
        monkeypatch.setitem(sys.modules, ENGINE_MODULE, module)

    return install


class Recorder:
    """A fake engine that records its calls and answers with ``outcome`` after ``sleep`` seconds."""

    def __init__(self, outcome: Outcome, sleep: float = 0.0) -> None:
        self.outcome = outcome
        self.sleep = sleep
        self.calls: list[tuple[Request, Path, bool, bool]] = []

    def __call__(self, request: Request, config: Config, workdir: Path, stop: threading.Event | None) -> Outcome:
        self.calls.append((request, workdir, workdir.is_dir(), stop is not None))
        time.sleep(self.sleep)
        return self.outcome


def dispatched(rt: Retracer, n: int = 1, extra: str = "") -> list[int]:
    """Submit n crashes and dispatch them (what `serve` does each round)."""
    jobs = [rt.submit(f"crash-{i}", extra) for i in range(n)]
    with store.transaction(rt.factory) as session:
        assert len(dispatch(session, rt.config)) == n
    return jobs


def inbox(rt: Retracer) -> list[dict[str, Any]]:
    with rt.factory() as session:
        return [json.loads(b) for b in session.scalars(select(Inbox.body).order_by(Inbox.seq))]


def worker(rt: Retracer, *args: str) -> Result:
    return rt.run("worker " + " ".join(args))


def uploads(rt: Retracer) -> list[Path]:
    return sorted((rt.config.spool_dir / INCOMING).iterdir())


class TestRetraced:
    def test_once_publishes_started_and_heartbeats_then_uploads(self, wrt: Retracer,
                                                                use_engine: Callable[[FakeEngine], None]) -> None:
        """A dispatched job: retrace.started, heartbeats while the engine runs (>2 intervals), then an upload
        in incoming/ whose manifest names the job, crash, build-ids, worker, attempt and signatures."""
        (job,) = dispatched(wrt, extra=f" --build-id {BUILD_ID}")
        engine = Recorder(Retraced(BACKTRACE, "gdb said things\n", signature="crash.c:3 main",
                                   address_signature="main+0x8"), sleep=0.4)
        use_engine(engine)
        result = worker(wrt, "--once")
        assert result.exit_code == 0, result.output
        (leaf,) = uploads(wrt)
        assert result.stdout == f"job {job} attempt 1: retraced, upload {leaf}\n"
        events = inbox(wrt)
        assert events[0]["type"] == "retrace.started"
        beats = [e for e in events if e["type"] == "retrace.heartbeat"]
        assert len(beats) >= 2 and len(events) == len(beats) + 1
        for e in events:
            assert e["job"] == job and e["source"] == "unit-worker"
            assert e["data"] == {"worker": "unit-worker", "attempt": 1}
            assert uuid.UUID(e["id"]).version == 4
        assert json.loads((leaf / "manifest.json").read_text()) == {
            "job": job, "crash_id": "crash-0", "build_ids": [BUILD_ID], "worker": "unit-worker", "attempt": 1,
            "signature": "crash.c:3 main", "address_signature": "main+0x8"}
        assert (leaf / "backtrace.txt").read_text() == BACKTRACE
        assert (leaf / "worker.log").read_text() == "gdb said things\n"
        assert leaf.name.startswith(f"job{job}-attempt1-") and ev.SAFE_NAME.fullmatch(leaf.name)
        assert not [p for p in (wrt.config.spool_dir / INCOMING).iterdir() if p.name.startswith(".")]
        (request, workdir, existed, has_stop), = engine.calls
        assert (request.job, request.attempt, request.build_ids) == (job, 1, (BUILD_ID,))
        assert existed and has_stop and workdir.name.startswith(f"job-{job}-attempt-1-")
        assert workdir.parent == wrt.config.data_dir / "worker" and not workdir.exists()

    def test_serve_accepts_the_upload(self, wrt: Retracer, use_engine: Callable[[FakeEngine], None]) -> None:
        """The worker's events and upload take the job to FULLYBUILT (needs the manifest's attempt, signature
        and address_signature keys in the spool's manifest check)."""
        (job,) = dispatched(wrt)
        use_engine(Recorder(Retraced(BACKTRACE, "log\n", signature="s", address_signature="a")))
        assert worker(wrt, "--once").exit_code == 0
        wrt.ok("serve --until-idle")
        shown = wrt.json(f"show {job}")
        assert shown["state"] == "FULLYBUILT", shown["upload_log"]
        assert shown["worker"] == "unit-worker"

    def test_json_summary(self, wrt: Retracer, use_engine: Callable[[FakeEngine], None]) -> None:
        """--json prints the worker, its bus and each attempt with its upload."""
        (job,) = dispatched(wrt)
        use_engine(Recorder(Retraced(BACKTRACE, "")))
        result = worker(wrt, "--once", "--json")
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        (leaf,) = uploads(wrt)
        assert summary["worker"] == "unit-worker" and summary["bus"] == "embedded" and summary["once"] is True
        assert (summary["taken"], summary["retraced"], summary["failed"], summary["malformed"]) == (1, 1, 0, 0)
        (attempt,) = summary["attempts"]
        assert (attempt["job"], attempt["attempt"], attempt["outcome"], attempt["leaf"]) == (
            job, 1, "retraced", leaf.name)


class TestFailed:
    def test_failed_is_published_with_transient_and_attempt(self, wrt: Retracer,
                                                            use_engine: Callable[[FakeEngine], None]) -> None:
        """A Failed outcome is one retrace.failed carrying the error, transient, worker and attempt; missing
        debug symbols are named by build-id and path; no upload is written."""
        (job,) = dispatched(wrt)
        use_engine(Recorder(Failed("no symbols for 1 module", transient=False, log="gdb log",
                                   missing=[Missing(BUILD_ID, "/usr/lib/libcdio.so.19")])))
        result = worker(wrt, "--once")
        assert result.exit_code == 0, result.output
        assert result.stdout == f"job {job} attempt 1: failed (permanent): no symbols for 1 module\n"
        *_, failed = inbox(wrt)
        assert failed["type"] == "retrace.failed" and failed["source"] == "unit-worker"
        data = failed["data"]
        assert (data["transient"], data["worker"], data["attempt"]) == (False, "unit-worker", 1)
        assert data["error"].startswith("no symbols for 1 module\n")
        assert f"{BUILD_ID} /usr/lib/libcdio.so.19" in data["error"]
        assert uploads(wrt) == []

    def test_transient_failure_sends_the_job_back(self, wrt: Retracer,
                                                  use_engine: Callable[[FakeEngine], None]) -> None:
        """serve applies the worker's transient failure: the job is PENDING again with one attempt spent."""
        (job,) = dispatched(wrt)
        use_engine(Recorder(Failed("E: Failed to fetch http://ddebs/x.ddeb 503", transient=True)))
        assert worker(wrt, "--once").exit_code == 0
        wrt.ok("serve --until-idle")
        shown = wrt.json(f"show {job}")
        assert (shown["state"], shown["attempts"]) == ("PENDING", 1)

    def test_an_engine_that_raises_is_a_transient_failure(self, wrt: Retracer) -> None:
        """A bug in the engine is reported as a transient failure that says so; the worker goes on."""
        dispatched(wrt)

        def broken(request: Request, config: Config, workdir: Path, stop: threading.Event | None) -> Outcome:
            raise ZeroDivisionError("boom")

        summary = Worker(wrt.config, wrt.factory, once=True, engine=broken).run()
        (attempt,) = summary.attempts
        assert attempt.outcome == "failed" and attempt.transient is True and attempt.durable
        assert "ZeroDivisionError: boom" in (attempt.error or "") and "bug" in (attempt.error or "")

    def test_error_is_cut_to_64k_keeping_the_missing_modules(self) -> None:
        """An error past 64 KiB is cut with a note; the missing modules are still named, and the event is valid."""
        missing = [Missing(f"{i:040x}", f"/usr/lib/lib{i}.so") for i in range(3)]
        text = failure_text(Failed("x" * 200_000, transient=True, missing=missing))
        assert len(text) <= MAX_ERROR and "[error cut: " in text
        assert all(f"{m.build_id} {m.path}" in text for m in missing)
        ev.make("retrace.failed", 1, {"error": text, "transient": True}, source="w")

    def test_thousands_of_missing_modules_fit(self) -> None:
        many = [Missing(f"{i:040x}", f"/usr/lib/x86_64-linux-gnu/lib{i}.so.1") for i in range(5000)]
        text = failure_text(Failed("no symbols", transient=False, missing=many))
        assert len(text) <= MAX_ERROR and text.startswith("no symbols\n") and " more" in text.splitlines()[-1]

    def test_modules_that_did_not_fail_the_attempt_are_not_asked_for(self) -> None:
        """An admin told to install libc's symbols "then retry" would fetch what the retry does not need."""
        main, libc = Missing(BUILD_ID, "/usr/bin/crashy"), Missing(f"{7:040x}", "/lib/libc.so.6")
        text = failure_text(Failed(f"no symbols for build-id {BUILD_ID}", transient=True, missing=[main, libc],
                                   blocking=[main]))
        assert "did not fail this attempt" in text and "then retry" not in text and libc.build_id in text
        unjudged = failure_text(Failed("gdb timed out", transient=True, missing=[libc]))
        assert "then retry the job" in unjudged

    def test_a_build_id_the_error_names_is_not_repeated(self) -> None:
        text = failure_text(Failed(f"no debug file for {BUILD_ID}", transient=False,
                                   missing=[Missing(BUILD_ID, "/lib/x.so")]))
        assert text == f"no debug file for {BUILD_ID}"


class TestRequests:
    def test_nothing_to_do(self, wrt: Retracer, use_engine: Callable[[FakeEngine], None]) -> None:
        """--once with no request waiting exits 0 at once, saying so."""
        use_engine(Recorder(Retraced(BACKTRACE, "")))
        result = worker(wrt, "--once")
        assert (result.exit_code, result.stdout) == (0, "no work requested\n")
        summary = json.loads(worker(wrt, "--once", "--json").stdout)
        assert (summary["taken"], summary["attempts"]) == (0, [])

    def test_malformed_request_is_dropped_and_the_next_is_taken(self, wrt: Retracer,
                                                                use_engine: Callable[[FakeEngine], None]) -> None:
        """A request that is not one is logged and dropped; --once goes on to the next valid request."""
        bad, good = wrt.submit("bad"), wrt.submit("good")
        now = datetime.now(UTC)
        with store.transaction(wrt.factory) as session:
            session.add(Outbox(routing_key="retrace.requested", message_id="bad-1", body=json.dumps(
                {"id": "bad-1", "type": "retrace.requested", "job": bad, "data": {"attempt": 1}})))
            job = session.get(Job, good)
            assert job is not None
            body = work_request(job, now)
            session.add(Outbox(routing_key="retrace.requested", message_id=str(body["id"]), body=json.dumps(body)))
        engine = Recorder(Retraced(BACKTRACE, ""))
        use_engine(engine)
        result = worker(wrt, "--once", "--json")
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        assert (summary["malformed"], summary["retraced"]) == (1, 1)
        assert [c[0].job for c in engine.calls] == [good]
        assert "malformed work request dropped" in result.stderr and "crash_id" in result.stderr

    def test_only_malformed(self, wrt: Retracer, use_engine: Callable[[FakeEngine], None]) -> None:
        job = wrt.submit("bad")
        with store.transaction(wrt.factory) as session:
            session.add(Outbox(routing_key="retrace.requested", message_id="bad-1", body=json.dumps(
                {"id": "bad-1", "type": "retrace.requested", "job": job, "data": {"attempt": "one"}})))
        use_engine(Recorder(Retraced(BACKTRACE, "")))
        result = worker(wrt, "--once")
        assert (result.exit_code, result.stdout) == (0, "no work requested (1 malformed request(s) dropped)\n")
        assert inbox(wrt) == []

    def test_concurrency_runs_attempts_side_by_side(self, wrt: Retracer) -> None:
        """--concurrency 3: three attempts run at once (each waits for the other two)."""
        dispatched(wrt, 3)
        barrier = threading.Barrier(3, timeout=10)

        def together(request: Request, config: Config, workdir: Path, stop: threading.Event | None) -> Outcome:
            barrier.wait()
            return Retraced(BACKTRACE, "")

        runner = Worker(wrt.config, wrt.factory, concurrency=3, engine=together)
        thread = threading.Thread(target=runner.run)
        thread.start()
        deadline = time.monotonic() + 20
        while len(runner.summary.attempts) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        runner.stop()
        thread.join(timeout=20)
        assert not thread.is_alive()
        assert runner.summary.count("retraced") == 3 and len(uploads(wrt)) == 3

    def test_default_worker_name_is_host_and_pid(self, wrt: Retracer) -> None:
        config = Retracer({**wrt.env, "RETRACER__WORKER__NAME": ""}).config
        assert worker_name(config) == f"{socket.gethostname()}-{os.getpid()}"

    def test_leaf_names_are_safe_at_the_largest_ids(self) -> None:
        request = Request("r", 2**31 - 1, 2**31 - 1, "c", "p", "v", "a", "r", "/c", "/e")
        leaf = leaf_for(request)
        assert ev.SAFE_NAME.fullmatch(leaf) and len(f".tmp-{leaf}") <= 255


class TestOwnFailures:
    def test_missing_database(self, wrt: Retracer, tmp_path: Path) -> None:
        """Embedded mode without a database: exit 1 with one line saying how to create it."""
        env = {**wrt.env, "RETRACER__DATABASE__URL": f"sqlite:///{tmp_path / 'nowhere.db'}"}
        result = Retracer(env).run("worker --once")
        assert result.exit_code == 1
        assert "there is no database at" in result.output and "retracer db upgrade" in result.output

    def test_bad_worker_name_takes_nothing(self, wrt: Retracer, use_engine: Callable[[FakeEngine], None]) -> None:
        """A name no event may carry: exit 1 before anything is taken (every request would be dropped)."""
        dispatched(wrt)
        use_engine(Recorder(Retraced(BACKTRACE, "")))
        result = Retracer({**wrt.env, "RETRACER__WORKER__NAME": "x" * 201}).run("worker --once")
        assert result.exit_code == 1 and "[worker] name" in result.output
        with wrt.factory() as session:
            assert session.scalar(select(Outbox.sent_at)) is None

    def test_missing_engine(self, wrt: Retracer, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without the engine module nothing is taken: exit 1 naming it, the request still there."""
        dispatched(wrt)
        monkeypatch.setitem(sys.modules, ENGINE_MODULE, None)  # what an import of a missing module finds
        result = worker(wrt, "--once", "--json")
        assert result.exit_code == 1
        assert ENGINE_MODULE in json.loads(result.stdout)["error"]
        with wrt.factory() as session:
            assert session.scalar(select(Outbox.sent_at)) is None

    def test_unwritable_spool_fails_the_attempt_and_stops(self, wrt: Retracer) -> None:
        """A spool the upload cannot be written to: the attempt is reported as a transient failure (the job is
        retried elsewhere at once) and the worker stops with the error instead of taking more."""
        dispatched(wrt, 2)
        incoming = wrt.config.spool_dir / INCOMING

        def break_spool(request: Request, config: Config, workdir: Path, stop: threading.Event | None) -> Outcome:
            if incoming.is_dir():
                incoming.rmdir()
                incoming.write_text("not a directory")
            return Retraced(BACKTRACE, "")

        runner = Worker(wrt.config, wrt.factory, engine=break_spool)
        with pytest.raises(RetracerError, match=r"the spool's .*incoming cannot be opened"):
            runner.run()
        (attempt,) = runner.summary.attempts
        assert attempt.outcome == "failed" and attempt.transient is True
        failed = [e for e in inbox(wrt) if e["type"] == "retrace.failed"]
        assert len(failed) == 1 and failed[0]["data"]["transient"] is True

    def test_unpublishable_outcome_is_not_settled(self, wrt: Retracer, monkeypatch: pytest.MonkeyPatch) -> None:
        """The request is settled (acked) only after its outcome is durable: a retrace.failed the bus refuses
        leaves it unsettled, and the worker exits with the bus's error."""
        settled: list[tuple[Any, bool]] = []

        class OneRequest:
            name = "fake"

            def __init__(self) -> None:
                job = {"id": "req-1", "type": "retrace.requested", "job": 7, "data": {
                    "crash_id": "c", "package": "p", "version": "1", "architecture": "amd64", "release": "noble",
                    "core": "/c", "executable": "/e", "build_ids": [], "attempt": 2}}
                self.waiting = [Delivery(json.dumps(job).encode(), "tag-1"), Delivery(b"{not json", "tag-0")]

            def take(self, limit: int, wait: float) -> list[Delivery]:
                taken, self.waiting = self.waiting[-limit:], self.waiting[:-limit]
                return taken

            def settle(self, delivery: Delivery, done: bool) -> None:
                settled.append((delivery.tag, done))

            def idle(self, wait: float) -> None:
                time.sleep(0.01)

            def close(self) -> None:
                return None

        published: list[str] = []

        class Refusing:
            def publish(self, routing_key: str, body: str, message_id: str) -> None:
                if routing_key == "retrace.failed":
                    raise BrokerError("the broker refused retrace.failed")
                published.append(routing_key)

            def publish_all(self, messages: Any) -> None:
                raise AssertionError("not used")

            def close(self) -> None:
                return None

        monkeypatch.setattr(loop, "open_source", lambda *args: OneRequest())
        runner = Worker(wrt.config, None, once=True, publisher=Refusing,
                        engine=Recorder(Failed("E: gdb died", transient=True)))
        with pytest.raises(BrokerError, match="refused"):
            runner.run()
        assert settled == [("tag-0", False)]  # the malformed one dropped; the real one never acked
        assert published == ["retrace.started"]


class TestStopping:
    def test_stop_abandons_the_attempt_and_reports_it(self, wrt: Retracer) -> None:
        """Stopping sets the engine's stop event; its transient 'abandoned' failure is published, and the
        worker takes nothing more."""
        dispatched(wrt, 2)
        running = threading.Event()

        def patient(request: Request, config: Config, workdir: Path, stop: threading.Event | None) -> Outcome:
            assert stop is not None
            running.set()
            assert stop.wait(20)
            return Failed("abandoned: the worker was stopped", transient=True)

        runner = Worker(wrt.config, wrt.factory, engine=patient)
        thread = threading.Thread(target=runner.run)
        thread.start()
        assert running.wait(20)
        runner.stop("SIGTERM")
        thread.join(timeout=20)
        assert not thread.is_alive()
        (attempt,) = runner.summary.attempts
        assert (attempt.outcome, attempt.transient, runner.summary.stopped_by) == ("failed", True, "SIGTERM")
        failed = [e for e in inbox(wrt) if e["type"] == "retrace.failed"]
        assert [f["data"]["error"] for f in failed] == ["abandoned: the worker was stopped"]
        with wrt.factory() as session:  # the second request was never taken
            assert len(list(session.scalars(select(Outbox.id).where(Outbox.sent_at.is_(None))))) == 1


#: A worker process with a fake engine installed: it signals that it runs by creating ``started``.
SCRIPT = textwrap.dedent("""\
    import os, subprocess, sys, time, types
    from pathlib import Path
    from retracer.worker.request import Failed
    marks = Path(sys.argv[1])

    def retrace(request, config, workdir, stop):
        if os.environ.get("STUBBORN"):
            child = subprocess.Popen(["sleep", "300"], start_new_session=True)
            (marks / "child").write_text(str(child.pid))
            (marks / "started").write_text("")
            while True:
                time.sleep(1)
        (marks / "started").write_text("")
        stop.wait(60)
        return Failed("abandoned: the worker was stopped", transient=True)

    module = types.ModuleType("retracer.worker.retrace")
    module.retrace = retrace
    sys.modules["retracer.worker.retrace"] = module
    from retracer.cli import cli
    cli(["worker", "--once"], prog_name="retracer")
    """)


def _worker_process(rt: Retracer, marks: Path, **env: str) -> subprocess.Popen[str]:
    marks.mkdir()
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(marks)], env={**os.environ, **rt.env, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"  # a zombie waits for its new parent to reap it: it runs no more


class TestSignals:
    def test_sigterm_reports_the_abandoned_attempt_and_exits_0(self, wrt: Retracer, tmp_path: Path) -> None:
        """SIGTERM mid-attempt: the engine is told to stop, its failure is published, the worker exits 0."""
        (job,) = dispatched(wrt)
        proc = _worker_process(wrt, tmp_path / "marks")
        _wait_for(tmp_path / "marks" / "started", proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert out == f"job {job} attempt 1: failed (transient): abandoned: the worker was stopped\n" \
                      f"worker unit-worker: 0 retraced, 1 failed, 0 malformed (stopped by SIGTERM)\n"
        failed = [e for e in inbox(wrt) if e["type"] == "retrace.failed"]
        assert len(failed) == 1 and failed[0]["data"]["transient"] is True
        lines = [json.loads(line) for line in err.splitlines()]
        assert [ln["msg"] for ln in lines if ln["msg"].startswith("attempt")] == ["attempt started", "attempt failed"]

    def test_second_signal_exits_at_once_killing_the_children(self, wrt: Retracer, tmp_path: Path) -> None:
        """An engine that does not stop: a second SIGTERM exits at once, and its child process goes with it."""
        dispatched(wrt)
        proc = _worker_process(wrt, tmp_path / "marks", STUBBORN="1")
        _wait_for(tmp_path / "marks" / "started", proc)
        child = int((tmp_path / "marks" / "child").read_text())
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert proc.poll() is None  # the first signal waits for the engine
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(child)
