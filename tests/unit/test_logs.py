"""serve's log lines: one JSON object per line, one line per event of a batch."""

from __future__ import annotations

import json
import logging

from retracer.logs import LINES, JsonFormatter


def record(**extra: object) -> logging.LogRecord:
    return logging.makeLogRecord({"msg": "applied", "levelname": "INFO", "name": "retracer.apply", **extra})


def test_one_line_per_entry_with_the_record_fields() -> None:
    entries: list[dict[str, object]] = [{"event_id": "e-1", "job": 3, "from": "PENDING", "to": "RETRACING"},
                                        {"event_id": "e-2", "job": None, "note": 'quote " and\nnewline'}]
    lines = JsonFormatter().format(record(**{LINES: entries})).split("\n")
    assert len(lines) == 2
    parsed = [json.loads(line) for line in lines]
    for got, want in zip(parsed, entries, strict=True):
        assert {k: got[k] for k in want} == want
        assert (got["level"], got["logger"], got["msg"]) == ("info", "retracer.apply", "applied")
        assert got["at"].endswith("Z")


def test_an_empty_entry_is_the_record_alone() -> None:
    (line,) = JsonFormatter().format(record(**{LINES: [{}]})).split("\n")
    assert set(json.loads(line)) == {"at", "level", "logger", "msg"}


def test_a_plain_record_carries_its_extra_fields() -> None:
    got = json.loads(JsonFormatter().format(record(job=7, reason="no heartbeat")))
    assert (got["job"], got["reason"], got["msg"]) == (7, "no heartbeat", "applied")
