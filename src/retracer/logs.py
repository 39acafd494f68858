"""Structured logs: one JSON object per line, with the job and event id when there is one."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats a record and its ``extra`` fields as one JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "at": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
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
    logging.Formatter.converter = __import__("time").gmtime
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def quiet() -> None:
    """One-shot commands report through their own output; keep library logs out of it."""
    logger = logging.getLogger("retracer")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
        logger.propagate = False
