"""`retracer worker` against the real RabbitMQ (fake engines, in-process and in killed processes), and end to
end with the real engine and gdb on a real core through `retracer serve` in the embedded mode."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kombu.connection import Connection

from retracer import config as cfg
from retracer.bus.amqp import Publisher, Topology
from retracer.config import Config
from retracer.errors import BrokerError
from retracer.events import WORK_REQUEST
from retracer.testing import crashes
from retracer.testing.instance import Instance
from retracer.worker.loop import Worker
from retracer.worker.request import Failed, Outcome, Request, Retraced

from ..conftest import AMQP_URL, require_server
from .conftest import crashed_program

BACKTRACE = "#0  0x0000555555555131 in main () at crash.c:3\n"


@pytest.fixture
def broker(tmp_path: Path, sqlite_url: str) -> Iterator[Instance]:
    """An installation on RabbitMQ with exchange and queues of its own (deleted afterwards); the worker needs
    no database, the Instance's SQLite is unused."""
    require_server("RabbitMQ", "127.0.0.1", 5672)
    inst = Instance(tmp_path / "data", sqlite_url, AMQP_URL)
    inst.set(WORKER__NAME="mq-worker", WORKER__HEARTBEAT_INTERVAL_S="0.05")
    with Connection(AMQP_URL, connect_timeout=5) as conn:
        Topology(config_of(inst)).declare(conn)
    yield inst
    inst.close()


def config_of(inst: Instance) -> Config:
    return cfg.load(environ=inst.env)


def request_body(job: int, attempt: int = 1) -> dict[str, Any]:
    return {"id": f"request:{job}:{attempt - 1}:1", "type": WORK_REQUEST, "job": job,
            "occurred_at": datetime.now(UTC).isoformat(), "source": "retracer",
            "data": {"crash_id": f"crash-{job}", "package": "cdrkit", "version": "1.0", "architecture": "amd64",
                     "release": "noble", "core": f"/srv/crashes/{job}/core", "executable": "/usr/bin/cdrecord",
                     "build_ids": [], "attempt": attempt}}


def send(config: Config, *bodies: dict[str, Any] | str) -> None:
    """Publish work requests (or any text) to the work queue, as serve's relay does."""
    publisher = Publisher(config)
    try:
        for i, body in enumerate(bodies):
            text = body if isinstance(body, str) else json.dumps(body)
            publisher.publish(WORK_REQUEST, text, f"m-{i}-{time.monotonic_ns()}")
    finally:
        publisher.close()


def ready(config: Config, queue: str) -> int:
    """Messages ready in ``queue`` (delivered but unacknowledged ones are not counted)."""
    with Connection(config.broker_url, connect_timeout=5) as conn:
        _, count, _ = conn.channel().queue_declare(queue, passive=True)
        return int(count)


def events(config: Config) -> list[dict[str, Any]]:
    """Take every event from the events queue (the worker's retrace.* events land there)."""
    found = []
    with Connection(config.broker_url, connect_timeout=5) as conn:
        channel = conn.channel()
        while (message := channel.basic_get(config["broker"]["queue"], no_ack=True)) is not None:
            found.append(json.loads(message.body))
    return found


def wait_until(what: str, predicate: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def answer(outcome: Outcome, sleep: float = 0.0) -> Any:
    def engine(request: Request, config: Config, workdir: Path, stop: threading.Event | None) -> Outcome:
        time.sleep(sleep)
        return outcome

    return engine


@pytest.mark.rabbitmq
class TestRabbitMQ:
    def test_once_retraces_and_acks(self, broker: Instance) -> None:
        """A request from the work queue becomes started, heartbeats and an upload; then it is acknowledged
        (the queue is empty once the worker's connection is gone)."""
        config = config_of(broker)
        send(config, request_body(5))
        summary = Worker(config, None, once=True,
                         engine=answer(Retraced(BACKTRACE, "log", signature="s"), sleep=0.3)).run()
        (attempt,) = summary.attempts
        assert attempt.outcome == "retraced" and attempt.upload is not None
        manifest = json.loads((attempt.upload / "manifest.json").read_text())
        assert (manifest["job"], manifest["attempt"], manifest["worker"], manifest["signature"]) == (
            5, 1, "mq-worker", "s")
        got = events(config)
        assert got[0]["type"] == "retrace.started" and got[0]["data"] == {"worker": "mq-worker", "attempt": 1}
        assert len([e for e in got if e["type"] == "retrace.heartbeat"]) >= 2
        assert ready(config, config["broker"]["work_queue"]) == 0

    def test_failed_is_published_then_acked(self, broker: Instance) -> None:
        config = config_of(broker)
        send(config, request_body(6, attempt=2))
        Worker(config, None, once=True, engine=answer(Failed("E: Failed to fetch x", transient=True))).run()
        failed = [e for e in events(config) if e["type"] == "retrace.failed"]
        assert [(f["job"], f["data"]) for f in failed] == [
            (6, {"error": "E: Failed to fetch x", "transient": True, "worker": "mq-worker", "attempt": 2})]
        assert ready(config, config["broker"]["work_queue"]) == 0

    def test_nothing_waiting(self, broker: Instance) -> None:
        summary = Worker(config_of(broker), None, once=True, engine=answer(Retraced(BACKTRACE, ""))).run()
        assert summary.attempts == [] and summary.malformed == 0

    def test_malformed_request_is_rejected_without_requeue(self, broker: Instance) -> None:
        """Not JSON, and JSON that is no request: both dropped (never redelivered); the valid one is done."""
        config = config_of(broker)
        send(config, "{not json", {"type": WORK_REQUEST, "job": 1, "data": {}}, request_body(7))
        summary = Worker(config, None, once=True, engine=answer(Retraced(BACKTRACE, ""))).run()
        assert summary.malformed == 2 and [a.request.job for a in summary.attempts] == [7]
        assert ready(config, config["broker"]["work_queue"]) == 0

    def test_unpublished_outcome_leaves_the_request_on_the_queue(self, broker: Instance) -> None:
        """A retrace.failed the broker never confirmed: the request is not acknowledged, so it is back on the
        queue for the next worker, and this one exits with the error."""
        config = config_of(broker)
        send(config, request_body(8))

        class NoFailures(Publisher):
            def publish(self, routing_key: str, body: str, message_id: str) -> None:
                if routing_key == "retrace.failed":
                    raise BrokerError("the broker did not confirm retrace.failed")
                super().publish(routing_key, body, message_id)

        runner = Worker(config, None, once=True, engine=answer(Failed("E: x", transient=True)),
                        publisher=lambda: NoFailures(config))
        with pytest.raises(BrokerError, match="did not confirm"):
            runner.run()
        wait_until("the request back on the queue", lambda: ready(config, config["broker"]["work_queue"]) == 1)

    def test_prefetch_is_the_concurrency(self, broker: Instance) -> None:
        """--concurrency 2 with three requests: two run, the third stays ready on the queue for other workers."""
        config = config_of(broker)
        send(config, request_body(11), request_body(12), request_body(13))
        release = threading.Event()
        running: list[int] = []

        def held(request: Request, cfg_: Config, workdir: Path, stop: threading.Event | None) -> Outcome:
            running.append(request.job)
            release.wait(30)
            return Retraced(BACKTRACE, "")

        runner = Worker(config, None, concurrency=2, engine=held)
        thread = threading.Thread(target=runner.run)
        thread.start()
        try:
            wait_until("two attempts", lambda: len(running) == 2)
            time.sleep(0.3)
            assert len(running) == 2 and ready(config, config["broker"]["work_queue"]) == 1
            release.set()
            wait_until("all three", lambda: len(runner.summary.attempts) == 3)
        finally:
            release.set()
            runner.stop()
            thread.join(timeout=30)
        assert sorted(a.request.job for a in runner.summary.attempts) == [11, 12, 13]
        assert ready(config, config["broker"]["work_queue"]) == 0

    def test_killed_worker_request_is_redelivered(self, broker: Instance, tmp_path: Path) -> None:
        """SIGKILL mid-attempt: the request was never acknowledged, so the broker gives it to the next worker,
        which finishes it."""
        config = config_of(broker)
        send(config, request_body(9))
        script = textwrap.dedent("""\
            import sys, time
            from pathlib import Path
            from retracer import config as cfg
            from retracer.worker.loop import Worker
            marks = Path(sys.argv[1])

            def slow(request, config, workdir, stop):
                (marks / "started").write_text(request.id)
                time.sleep(120)

            Worker(cfg.load(), None, engine=slow).run()
            """)
        marks = tmp_path / "marks"
        marks.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", script, str(marks)], env=broker.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_until("the first attempt", lambda: (marks / "started").exists() or proc.poll() is not None)
            assert proc.poll() is None, proc.communicate()[1]
            assert ready(config, config["broker"]["work_queue"]) == 0  # delivered, not acknowledged
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=30)
        wait_until("the redelivery", lambda: ready(config, config["broker"]["work_queue"]) == 1)
        summary = Worker(config, None, once=True, engine=answer(Retraced(BACKTRACE, ""))).run()
        (attempt,) = summary.attempts
        assert attempt.request.id == (marks / "started").read_text() and attempt.outcome == "retraced"
        assert ready(config, config["broker"]["work_queue"]) == 0

    def test_broker_unreachable(self, broker: Instance) -> None:
        """No broker: the worker's own failure, one line naming the broker and what to check."""
        broker.set(BROKER__URL="pyamqp://guest:guest@127.0.0.1:1//", BROKER__PUBLISH_RETRIES="0")
        with pytest.raises(BrokerError, match=r"127\.0\.0\.1:1.*check \[broker\] url"):
            Worker(config_of(broker), None, once=True, engine=answer(Retraced(BACKTRACE, ""))).run()


# -- end to end, with the real engine -----------------------------------------------------------------------

def build_crash(where: Path) -> tuple[Path, Path, Path, str]:
    """(executable without debug info, its core, a debug directory holding .build-id/xx/rest.debug, build-id)."""
    program, core = crashed_program(where)
    return program.executable, core, program.install_debug(where / "debug"), program.build_id


def submit(inst: Instance, exe: Path, core: Path, build_id: str, crash_id: str = "e2e-1") -> int:
    out = inst.run("submit", "--crash-id", crash_id, "--creator", "mark@example.com", "--package", "crash",
                   "--version", "1.0", "--architecture", "amd64", "--release", "noble", "--core", str(core),
                   "--executable", str(exe), "--build-id", build_id).stdout
    return int(out)


class TestEndToEnd:
    def test_a_stripped_binarys_core_ends_fullybuilt(self, instance: Instance, tmp_path: Path) -> None:
        """In both modes, with the shipped rule that a worker starts only what it was offered: serve dispatches,
        `retracer worker --once` retraces the real core of a binary without debug info (symbols from a
        .build-id tree) and uploads, serve accepts: FULLYBUILT, the backtrace naming the source file and line.
        A second crash with the same stack is recorded as the first one's duplicate."""
        exe, core, debug_dir, build_id = build_crash(tmp_path)
        second_core = tmp_path / "core-2"
        crashes.make_core([exe], second_core)
        inst = instance
        scaled = "RETRACER__BROKER__URL" in inst.env
        inst.set(WORKER__DEBUG_DIRS=json.dumps([str(debug_dir)]), WORKER__NAME="e2e-worker",
                 SERVICE__START_REQUIRES_OFFER="true")
        serve = inst.serve()
        jobs = []
        for n, path in enumerate((core, second_core), start=1):
            job = submit(inst, exe, path, build_id, crash_id=f"e2e-{n}")
            jobs.append(job)
            # With a broker the request must have left the outbox for the work queue before --once looks.
            offered = "SELECT count(*) FROM outbox" + (" WHERE sent_at IS NOT NULL" if scaled else "")
            inst.wait_for("the work request", lambda n=n, q=offered: inst.scalar(q) >= n)  # type: ignore[misc]
            out = inst.run("worker", "--once").stdout
            assert out.startswith(f"job {job} attempt 1: retraced"), out
            inst.wait_for("the upload's verdict", lambda job=job: inst.scalar(  # type: ignore[misc]
                "SELECT state FROM job WHERE id = :id", id=job) in ("FULLYBUILT", "FAILEDTOUPLOAD", "ON_HOLD"))
        first, second = (inst.json("show", str(j)) for j in jobs)
        assert first["state"] == "FULLYBUILT", first.get("upload_log") or first.get("hold_reason")
        assert second["state"] == "FULLYBUILT", second.get("upload_log") or second.get("hold_reason")
        stored = (inst.data_dir / "results" / str(jobs[0]) / "backtrace.txt").read_text()
        assert "read_value" in stored and "prog.c:4" in stored, stored
        assert first["signature"] and first["signature"] == second["signature"]
        assert first["duplicate_of"] is None and second["duplicate_of"] == jobs[0]
        assert first["core_check"] == "read" and build_id in first["build_ids"]
        assert inst.stop(serve) == 0
        assert [p.name for p in (inst.data_dir / "worker").iterdir()] in ([], ["debuginfod-cache"])

    def test_sigterm_kills_gdb_and_reports_the_attempt(self, embedded: Instance, tmp_path: Path) -> None:
        """gdb that never ends (a script that sleeps): SIGTERM makes the worker kill it, report a transient
        failure and exit 0, leaving no gdb behind."""
        exe, core, debug_dir, build_id = build_crash(tmp_path)
        marks = tmp_path / "marks"
        marks.mkdir()
        fake_gdb = tmp_path / "gdb"
        fake_gdb.write_text(f"#!/bin/sh\necho $$ > {marks}/gdb.pid\nexec sleep 300\n", encoding="utf-8")
        fake_gdb.chmod(0o755)
        inst = embedded
        inst.set(WORKER__GDB=str(fake_gdb), WORKER__DEBUG_DIRS=json.dumps([str(debug_dir)]))
        serve = inst.serve()
        job = submit(inst, exe, core, build_id)
        inst.wait_for("the work request", lambda: inst.scalar("SELECT count(*) FROM outbox") == 1)
        proc = subprocess.Popen([sys.executable, "-m", "retracer", "worker", "--once"], env=inst.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until("gdb", lambda: ((marks / "gdb.pid").exists() and (marks / "gdb.pid").read_text().strip())
                   or proc.poll() is not None)
        assert proc.poll() is None, proc.communicate()
        gdb_pid = int((marks / "gdb.pid").read_text())
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.startswith(f"job {job} attempt 1: failed (transient)"), out
        wait_until("gdb gone", lambda: not _alive(gdb_pid), timeout=10)
        inst.wait_for("the failure applied", lambda: inst.scalar("SELECT attempts FROM job WHERE id = :id",
                                                                 id=job) == 1)
        assert inst.stop(serve) == 0


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"



def test_a_hanging_gdb_keeps_the_job_alive_then_fails_it_transiently(embedded: Instance, tmp_path: Path) -> None:
    """gdb that never ends: heartbeats keep the job RETRACING past the heartbeat timeout while it runs, the
    deadline kills gdb's whole group, and the transient failure sends the job back to PENDING."""
    exe, core, debug_dir, build_id = build_crash(tmp_path)
    marks = tmp_path / "marks"
    marks.mkdir()
    hanging = tmp_path / "gdb"
    # A child of its own, so that killing only gdb would leave the group behind.
    hanging.write_text(f"#!/bin/sh\nsleep 300 &\necho $! > {marks}/child.pid\nexec sleep 300\n", encoding="utf-8")
    hanging.chmod(0o755)
    inst = embedded
    inst.set(WORKER__GDB=str(hanging), WORKER__DEBUG_DIRS=json.dumps([str(debug_dir)]),
             WORKER__GDB_TIMEOUT_S="6", WORKER__HEARTBEAT_INTERVAL_S="0.5", SERVICE__HEARTBEAT_TIMEOUT_S="3",
             SERVICE__START_REQUIRES_OFFER="true", POLICY__BACKOFF_BASE_S="600")
    serve = inst.serve()
    job = submit(inst, exe, core, build_id)
    inst.wait_for("the work request", lambda: inst.scalar("SELECT count(*) FROM outbox") == 1)
    out = inst.run("worker", "--once").stdout
    assert out.startswith(f"job {job} attempt 1: failed (transient): gdb did not finish within 6"), out
    child = int((marks / "child.pid").read_text())
    wait_until("gdb's group gone", lambda: not _alive(child), timeout=10)
    inst.wait_for("the failure applied", lambda: inst.scalar("SELECT attempts FROM job WHERE id = :id",
                                                             id=job) == 1)
    shown = inst.json("show", str(job))
    assert shown["state"] == "PENDING" and "gdb did not finish within 6" in shown["last_error"]
    # Six seconds of gdb against a three-second heartbeat timeout: only the heartbeats kept the watchdog off.
    assert all(h["trigger"] != "heartbeat_lost" for h in shown["history"]), shown["history"]
    assert inst.stop(serve) == 0
