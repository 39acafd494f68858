"""The log records retracer emits inside a block, for tests that assert on them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def captured_logs(level: int = logging.INFO) -> Iterator[list[logging.LogRecord]]:
    """The records retracer's loggers emit inside the block, each once, whatever propagation other code set."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("retracer")
    handler, before = Keep(level), logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level, before) if before else level)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)
