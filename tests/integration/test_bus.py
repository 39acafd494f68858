"""A worker drives jobs purely by publishing the documented events, in both modes."""

from __future__ import annotations

import json
import signal
import time

import pytest

from retracer.testing.factories import crash_data, event
from retracer.testing.instance import Instance


def state_of(inst: Instance, job: int) -> str | None:
    value = inst.scalar("SELECT state FROM job WHERE id = :id", id=job)
    return None if value is None else str(value)


def history(inst: Instance, job: int) -> list[tuple[str | None, str, str]]:
    return [(r[0], r[1], r[2]) for r in inst.rows(
        "SELECT from_state, to_state, trigger FROM history WHERE job_id = :id ORDER BY id", id=job)]


def submit_event(**overrides: object) -> dict[str, object]:
    return event("crash.submitted", **crash_data(**overrides))


class TestDrivenByEvents:
    def test_every_event_type_moves_the_job(self, instance: Instance) -> None:
        """submitted -> started -> heartbeat -> failed (transient) -> started -> upload failed, via the bus."""
        inst = instance
        inst.set(POLICY__BACKOFF_BASE_S="0.2", POLICY__BACKOFF_MAX_S="0.2")
        serve = inst.serve()
        inst.publish(submit_event(crash_id="bus-1"))
        inst.wait_for("the job", lambda: state_of(inst, 1) == "PENDING")
        inst.wait_for("a work request", lambda: inst.scalar("SELECT count(*) FROM outbox") == 1)
        inst.publish(event("retrace.started", 1, worker="bob"), event("retrace.heartbeat", 1, worker="bob"),
                     event("retrace.failed", 1, error="E: Failed to fetch http://archive/pool/x.deb  404"))
        inst.wait_for("the retry", lambda: inst.scalar("SELECT attempts FROM job WHERE id = 1") == 1)
        assert state_of(inst, 1) == "PENDING"
        inst.wait_for("the second offer", lambda: inst.scalar("SELECT count(*) FROM outbox") == 2, timeout=30)
        inst.publish(event("retrace.started", 1, worker="alice"),
                     event("upload.failed", 1, leaf="upload-1", upload_log="checksum mismatch in backtrace.txt"))
        inst.wait_for("FAILEDTOUPLOAD", lambda: state_of(inst, 1) == "FAILEDTOUPLOAD")
        assert inst.stop(serve) == 0
        assert history(inst, 1) == [
            (None, "PENDING", "submit"), ("PENDING", "RETRACING", "start"),
            ("RETRACING", "PENDING", "retrace_failed"), ("PENDING", "RETRACING", "start"),
            ("RETRACING", "FAILEDTOUPLOAD", "upload_failed")]
        shown = inst.json("show", "1")
        assert shown["upload_log"] == "checksum mismatch in backtrace.txt"
        assert shown["worker"] == "alice"

    def test_upload_accepted_finishes_the_job(self, instance: Instance) -> None:
        """An accepted upload makes the job FULLYBUILT and queues the creator's mail."""
        inst = instance
        serve = inst.serve()
        inst.publish(submit_event(), event("retrace.started", 1, worker="bob"),
                     event("upload.accepted", 1, leaf="upload-2", result="#0 main () at x.c:3"))
        inst.wait_for("FULLYBUILT", lambda: state_of(inst, 1) == "FULLYBUILT")
        assert inst.stop(serve) == 0
        assert inst.rows("SELECT recipient, rationale FROM mail") == [("mark@example.com", "Creator")]

    def test_replayed_event_changes_nothing(self, instance: Instance) -> None:
        """The same event published twice gives one history row and counts as a duplicate."""
        inst = instance
        serve = inst.serve()
        submitted = submit_event()
        started = event("retrace.started", 1, worker="bob")
        inst.publish(submitted, submitted)
        inst.wait_for("the job", lambda: state_of(inst, 1) == "PENDING")
        inst.publish(started)
        inst.publish(started)
        inst.wait_for("both copies", lambda: inst.scalar("SELECT count(*) FROM processed_event") == 2
                      and _drained(inst))
        assert inst.stop(serve) == 0
        assert inst.scalar("SELECT count(*) FROM job") == 1
        assert history(inst, 1) == [(None, "PENDING", "submit"), ("PENDING", "RETRACING", "start")]
        assert inst.scalar("SELECT count(*) FROM rejected") == 0

    def test_bad_events_are_kept_and_the_next_good_one_applied(self, instance: Instance) -> None:
        """A refused transition and an unknown job land in `rejected` with reasons; serve goes on."""
        inst = instance
        serve = inst.serve()
        inst.publish(submit_event())
        inst.wait_for("the job", lambda: state_of(inst, 1) == "PENDING")
        inst.publish(event("upload.accepted", 1, leaf="too-early"), event("retrace.started", 99, worker="x"),
                     event("retrace.started", 1, worker="bob"))
        inst.wait_for("RETRACING", lambda: state_of(inst, 1) == "RETRACING")
        inst.wait_for("two rejections", lambda: inst.scalar("SELECT count(*) FROM rejected") == 2)
        assert serve.poll() is None
        listed = inst.json("rejected")
        reasons = sorted(r["reason"] for r in listed)
        assert "job 1 is PENDING: 'upload_accepted' refused" in reasons[0]
        assert "job 99 does not exist" in reasons[1]
        assert inst.stop(serve) == 0

    def test_malformed_body_is_rejected_not_fatal(self, instance: Instance) -> None:
        """A body that is not an event at all (sent around the validating CLI) is kept with its reason."""
        inst = instance
        serve = inst.serve()
        _send_raw(inst, b"{not json", "crash.submitted")
        inst.publish(submit_event())
        inst.wait_for("the good job", lambda: state_of(inst, 1) == "PENDING")
        inst.wait_for("the rejection", lambda: inst.scalar("SELECT count(*) FROM rejected") == 1)
        (row,) = inst.json("rejected")
        assert row["reason"].startswith("event is not JSON")
        assert row["body"] == "{not json"
        assert inst.stop(serve) == 0

    def test_replay_after_fixing_the_cause(self, instance: Instance) -> None:
        """An event that arrived before its job existed is applied when the admin replays it."""
        inst = instance
        inst.publish(event("retrace.started", 1, worker="bob"))
        serve = inst.serve()
        inst.wait_for("the rejection", lambda: inst.scalar("SELECT count(*) FROM rejected") == 1)
        inst.publish(submit_event())
        inst.wait_for("the job", lambda: state_of(inst, 1) == "PENDING")
        (row,) = inst.json("rejected")
        out = inst.run("rejected", "replay", str(row["id"]), "--as", "alice", "--reason", "job exists now")
        assert "applied: job 1 PENDING -> RETRACING" in out.stdout
        assert state_of(inst, 1) == "RETRACING"
        assert inst.json("rejected") == []
        assert inst.stop(serve) == 0


def _drained(inst: Instance) -> bool:
    if "RETRACER__BROKER__URL" not in inst.env:
        pending: int = inst.scalar("SELECT count(*) FROM inbox")
        return pending == 0
    return True


def _send_raw(inst: Instance, body: bytes, routing_key: str) -> None:
    """Put a body on the bus without validation, as a broken publisher would."""
    if "RETRACER__BROKER__URL" not in inst.env:
        with inst.engine.begin() as conn:
            from sqlalchemy import text

            conn.execute(text("INSERT INTO inbox (body, received_at) VALUES (:b, CURRENT_TIMESTAMP)"),
                         {"b": body.decode()})
        return
    from kombu.connection import Connection

    from retracer import config
    from retracer.bus.amqp import Topology

    topology = Topology(config.load(environ=inst.env))
    with Connection(inst.env["RETRACER__BROKER__URL"]) as conn:
        topology.declare(conn)
        conn.Producer().publish(body, exchange=topology.exchange, routing_key=routing_key,
                                content_type="application/json", content_encoding="binary")


@pytest.mark.slow
class TestDispatch:
    def test_priority_order_and_max_parallel(self, instance: Instance) -> None:
        """Offers go out in priority order, sticky manual priority first, never more than max_parallel."""
        inst = instance
        inst.set(SERVICE__MAX_PARALLEL="2")
        for prio in (0, 5, 1):
            inst.publish(submit_event(priority=prio))
        serve = inst.serve()
        inst.wait_for("jobs", lambda: inst.scalar("SELECT count(*) FROM job") == 3)
        inst.wait_for("two offers", lambda: inst.scalar("SELECT count(*) FROM outbox") == 2)
        time.sleep(1)
        offered = [json.loads(b)["job"] for (b,) in inst.rows("SELECT body FROM outbox ORDER BY id")]
        assert offered == [2, 3]
        inst.run("priority", "1", "100", "--as", "alice")
        inst.publish(event("retrace.started", 2, worker="w"), event("upload.accepted", 2, leaf="l2"))
        inst.wait_for("the next offer", lambda: inst.scalar("SELECT count(*) FROM outbox") == 3)
        assert json.loads(inst.rows("SELECT body FROM outbox ORDER BY id DESC")[0][0])["job"] == 1
        assert inst.stop(serve) == 0

    def test_missed_heartbeat_is_a_transient_failure(self, instance: Instance) -> None:
        """A RETRACING job whose worker goes silent goes back to PENDING, then ON_HOLD at the cap."""
        inst = instance
        inst.set(SERVICE__HEARTBEAT_TIMEOUT_S="1", POLICY__MAX_ATTEMPTS="2", POLICY__BACKOFF_BASE_S="0.1",
                 POLICY__BACKOFF_MAX_S="0.1")
        serve = inst.serve()
        inst.publish(submit_event(), event("retrace.started", 1, worker="ghost"))
        inst.wait_for("the first timeout", lambda: inst.scalar("SELECT attempts FROM job WHERE id = 1") == 1)
        inst.publish(event("retrace.started", 1, worker="ghost"))
        inst.wait_for("ON_HOLD", lambda: state_of(inst, 1) == "ON_HOLD", timeout=30)
        assert inst.stop(serve) == 0
        reason = inst.json("show", "1")["hold_reason"]
        assert "retries exhausted after 2 of 2 attempts" in reason
        assert "no heartbeat from worker ghost" in reason


@pytest.mark.usefixtures("pg_database")
@pytest.mark.slow
class TestSeveralServers:
    def test_two_servers_never_dispatch_twice_nor_exceed_max_parallel(self, scaled: Instance) -> None:
        """Two `serve` processes on one PostgreSQL share the work without double offers."""
        inst = scaled
        inst.set(SERVICE__MAX_PARALLEL="3", SERVICE__DISPATCH_TIMEOUT_S="600")
        inst.publish(*[submit_event() for _ in range(20)])
        servers = [inst.serve(), inst.serve()]
        inst.wait_for("jobs", lambda: inst.scalar("SELECT count(*) FROM job") == 20)
        inst.wait_for("three offers", lambda: inst.scalar("SELECT count(*) FROM outbox") == 3)
        finished = 0
        while finished < 20:
            offered = [json.loads(b)["job"] for (b,) in inst.rows("SELECT body FROM outbox ORDER BY id")]
            assert len(offered) == len(set(offered)), f"a job was offered twice: {offered}"
            busy = inst.scalar("SELECT count(*) FROM job WHERE state = 'RETRACING' OR "
                               "(state = 'PENDING' AND dispatched_at IS NOT NULL)")
            assert busy <= 3
            todo = [j for j in offered if state_of(inst, j) == "PENDING"]
            for job in todo:
                inst.publish(event("retrace.started", job, worker="w"), event("upload.accepted", job, leaf=f"l{job}"))
            for job in todo:

                def built(job: int = job) -> bool:
                    return state_of(inst, job) == "FULLYBUILT"

                inst.wait_for(f"job {job}", built)
            finished = inst.scalar("SELECT count(*) FROM job WHERE state = 'FULLYBUILT'")
            if finished < 20:

                def more_offers(n: int = len(offered)) -> bool:
                    outbox: int = inst.scalar("SELECT count(*) FROM outbox")
                    return outbox > n

                inst.wait_for("more offers", more_offers)
        for proc in servers:
            assert inst.stop(proc) == 0
        offered = [json.loads(b)["job"] for (b,) in inst.rows("SELECT body FROM outbox ORDER BY id")]
        assert sorted(offered) == list(range(1, 21))


@pytest.mark.slow
class TestEmbeddedProcesses:
    def test_kill_9_loses_nothing(self, embedded: Instance) -> None:
        """serve killed with SIGKILL mid-stream and restarted: every event applied exactly once."""
        inst = embedded
        inst.set(SERVICE__BATCH_SIZE="20")
        inst.publish(*[submit_event() for _ in range(300)])
        for _ in range(4):
            proc = inst.serve()
            time.sleep(0.6)
            inst.stop(proc, signal.SIGKILL)
        proc = inst.serve()
        inst.wait_for("all events", lambda: inst.scalar("SELECT count(*) FROM inbox") == 0)
        assert inst.stop(proc) == 0
        assert inst.scalar("SELECT count(*) FROM job") == 300
        assert inst.scalar("SELECT count(*) FROM history") == 300
        assert inst.scalar("SELECT count(*) FROM processed_event") == 300


def test_topology_delete_takes_its_queues_and_exchanges_away(scaled: Instance) -> None:
    """Topology.delete (test and benchmark clean-up) removes exactly what declare made, messages included."""
    from amqp.exceptions import NotFound
    from kombu.connection import Connection

    from retracer import config as cfg
    from retracer.bus.amqp import Publisher, Topology

    from ..conftest import AMQP_URL

    config = cfg.load(environ=scaled.env)
    publisher = Publisher(config)
    publisher.publish("retrace.heartbeat", json.dumps({"n": 1}), "delete-1")  # declares, leaves one message
    publisher.close()
    topology = Topology(config)
    with Connection(AMQP_URL, connect_timeout=5) as conn:
        assert topology.events.bind(conn.channel()).queue_declare(passive=True).message_count == 1
        topology.delete(conn)
        for queue in (topology.events, topology.work, topology.dead):
            with pytest.raises(NotFound):
                queue.bind(conn.channel()).queue_declare(passive=True)
        for exchange in (topology.exchange, topology.dlx):
            with pytest.raises(NotFound):
                exchange.bind(conn.channel()).declare(passive=True)
