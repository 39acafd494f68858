"""The permit to write a job's state: only the workflow machine holds it while it fires a trigger."""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

_machine_writing: contextvars.ContextVar[bool] = contextvars.ContextVar("machine_writing", default=False)


@contextmanager
def machine_writes() -> Iterator[None]:
    """Let the workflow machine (and nothing else) assign a job's state inside this block."""
    token = _machine_writing.set(True)
    try:
        yield
    finally:
        _machine_writing.reset(token)


def machine_is_writing() -> bool:
    """Whether the current code runs inside :func:`machine_writes`."""
    return _machine_writing.get()
