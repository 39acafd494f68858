"""Apply workers, the parts that need no processes: how a batch is split by job, and how the consumer holds one
batch in flight (acked only once settled, settled before the next one is handed over, nothing acked after a
failure). tests/integration/test_parallel.py drives the real workers through PostgreSQL and RabbitMQ."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from retracer import config as cfg
from retracer.apply.pool import split
from retracer.bus.amqp import BatchConsumer
from retracer.testing.factories import crash_data, event


def body(etype: str, job: int | None, n: int) -> bytes:
    data: dict[str, Any] = crash_data(crash_id=f"c{n}") if etype == "crash.submitted" else {"worker": "w1"}
    return json.dumps(event(etype, job, event_id=f"e{n}", **data)).encode()


class TestSplit:
    def test_a_jobs_events_stay_together_and_in_order(self) -> None:
        bodies = [body("retrace.heartbeat", job, n) for n, job in enumerate([7, 8, 9, 7, 10, 8, 7])]
        parts, job_ids = split(bodies, 2, lambda n: pytest.fail("no submit, nothing to reserve"))
        assert parts == [[1, 4, 5], [0, 2, 3, 6]]  # even jobs 8, 10; odd jobs 7, 9: each part in batch order
        assert job_ids == [None] * 7

    def test_a_new_job_goes_where_its_reserved_id_sends_its_later_events(self) -> None:
        asked = []

        def reserve(count: int) -> list[int]:
            asked.append(count)
            return [41, 42][:count]

        bodies = [body("retrace.started", 5, 0), body("crash.submitted", None, 1), body("crash.submitted", None, 2),
                  body("retrace.started", 41, 3), body("retrace.started", 42, 4)]
        parts, job_ids = split(bodies, 2, reserve)
        assert asked == [2], "one reservation for the batch's submits"
        assert job_ids == [None, 41, 42, None, None], "ids drawn in the batch's order"
        assert parts == [[2, 4], [0, 1, 3]], "job 41's submit ahead of its start, in the part of 41 % 2"

    def test_a_copy_of_an_event_id_goes_where_the_first_went(self) -> None:
        """Whatever job the copy names: one worker sees both, applies the first and counts the copy a duplicate."""
        submit = body("crash.submitted", None, 1)
        other_job = json.dumps({**json.loads(body("retrace.started", 4, 2)), "job": 5}).encode()
        bodies = [submit, body("retrace.started", 4, 2), submit, other_job, body("retrace.started", 5, 3)]
        parts, job_ids = split(bodies, 2, lambda n: [11] * n)
        assert job_ids == [11, None, None, None, None], "no id drawn for the copy of a submit"
        assert parts == [[1, 3], [0, 2, 4]], "event e2's copy stays with job 4's part; job 5's own event goes to 5 % 2"

    def test_bodies_naming_no_usable_job_are_spread_and_kept(self) -> None:
        bodies = [b"not json", b"[1, 2]", json.dumps({"type": "retrace.started", "job": "seven"}).encode(),
                  json.dumps({"type": "retrace.started", "job": -3}).encode()]
        parts, _ = split(bodies, 3, lambda n: [])
        assert sorted(i for part in parts for i in part) == [0, 1, 2, 3], "every body goes to some worker"


# -- the consumer with a batch in flight, on doubles of py-amqp's messages ------------------------------------


class Channel:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.log.append(f"ack {tag}{' multiple' if multiple else ''}")

    def basic_reject(self, tag: int, requeue: bool) -> None:
        self.log.append(f"reject {tag}")


class Message:
    def __init__(self, tag: int, channel: Channel) -> None:
        self.body = json.dumps({"n": tag}).encode()
        self.delivery_tag = tag
        self.delivery_info = {"redelivered": False}
        self.channel = channel


class Later:
    """A Pending: the verdicts, or the error, come when the consumer settles it."""

    def __init__(self, log: list[str], first: int, verdicts: Sequence[bool], error: Exception | None) -> None:
        self.log, self.first, self.verdicts, self.error = log, first, verdicts, error

    def result(self) -> Sequence[bool]:
        self.log.append(f"result {self.first}")
        if self.error is not None:
            raise self.error
        return self.verdicts


def consumer(tmp_path: Path, log: list[str], errors: dict[int, Exception] | None = None) -> BatchConsumer:
    config = cfg.load(environ={"RETRACER__SERVICE__DATA_DIR": str(tmp_path), "RETRACER__SERVICE__BATCH_SIZE": "3",
                               "RETRACER__BROKER__URL": "pyamqp://guest:guest@127.0.0.1:5672//"})

    def handle(bodies: Sequence[bytes], fresh: bool) -> Later:
        first = json.loads(bodies[0])["n"]
        log.append(f"handle {first}")
        return Later(log, first, [True] * len(bodies), (errors or {}).get(first))

    return BatchConsumer(config, handle, idle=lambda: None, connection=object())  # type: ignore[arg-type]


class TestBatchInFlight:
    def test_a_batch_is_acked_once_settled_and_settled_before_the_next_is_handed_over(self, tmp_path: Path) -> None:
        log: list[str] = []
        c = consumer(tmp_path, log)
        channel = Channel(log)
        for tag in range(1, 7):
            c.on_message(Message(tag, channel))
        assert log == ["handle 1", "result 1", "ack 3 multiple", "handle 4"], \
            "batch 1 acked only when settled, and settled before batch 4 was handed over; batch 4 still in flight"
        c.stop()
        c.on_iteration()
        assert log[-2:] == ["result 4", "ack 6 multiple"], "stopping settles the batch in flight"

    def test_a_batch_in_flight_is_settled_when_nothing_more_arrives(self, tmp_path: Path) -> None:
        log: list[str] = []
        c = consumer(tmp_path, log)
        channel = Channel(log)
        for tag in range(1, 4):
            c.on_message(Message(tag, channel))
        c.on_iteration()
        assert log == ["handle 1"], "held while deliveries may still come"
        c.last_at -= c.batch_wait
        c.on_iteration()
        assert log == ["handle 1", "result 1", "ack 3 multiple"]

    def test_a_failed_batch_leaves_it_and_everything_after_it_unacked(self, tmp_path: Path) -> None:
        log: list[str] = []
        c = consumer(tmp_path, log, errors={1: RuntimeError("the database went away")})
        channel = Channel(log)
        for tag in range(1, 4):
            c.on_message(Message(tag, channel))
        c.on_message(Message(4, channel))
        c.on_message(Message(5, channel))
        with pytest.raises(RuntimeError, match="went away"):
            c.on_message(Message(6, channel))
        for tag in range(7, 10):
            c.on_message(Message(tag, channel))
        assert log == ["handle 1", "result 1"], "no ack at all, and batch 4 never handed over"
        assert c.should_stop and isinstance(c.failure, RuntimeError)
