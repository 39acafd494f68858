"""Structured logs: one JSON object per line, with the job and event id when there is one."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


#: ``extra={LINES: [{...}, ...]}`` logs one line per dict in a single call: a batch of events costs one
#: record and one write instead of one each (a third of the apply path's time went to per-event records).
LINES = "lines"


class JsonFormatter(logging.Formatter):
    """Formats a record and its ``extra`` fields as one JSON line (one line per entry of ``LINES``)."""

    def __init__(self) -> None:
        super().__init__()
        self.converter = time.gmtime  # the "Z" in every timestamp means UTC

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "at": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        many = getattr(record, LINES, None)
        if many is not None:
            # The record's fields once, each entry's after them: '{"at": ..., "msg": "applied", ' + '"job": ...}'.
            # An entry's key equal to a record field would appear twice; entries carry event fields only.
            head = json.dumps(line, default=str)[:-1] + ", "
            return "\n".join(head + json.dumps(entry, default=str)[1:] if entry else head[:-2] + "}"
                             for entry in many)
        line.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup(level: str = "INFO") -> None:
    """Send retracer's logs to stderr as JSON lines (for `serve`; other commands stay quiet)."""
    logger = logging.getLogger("retracer")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def quiet() -> None:
    """One-shot commands report through their own output; keep library logs out of it."""
    logger = logging.getLogger("retracer")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
        logger.propagate = False
