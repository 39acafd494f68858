"""Fault injection for the reliability suite (tests/faults, bench/soak.py).

``RETRACER_FAULTS="apply.after_commit=0.02,mail.after_send=0.05"`` makes the process SIGKILL itself at
the named points with those probabilities, so a test can kill it exactly between a commit and an ack, or
between an SMTP server's acceptance and the database's "sent" mark. Unset, as in any real deployment,
``point()`` is one dict lookup.

Points: ``apply.before_commit``, ``apply.after_commit`` (before the ack), ``ack.after``,
``mail.after_send`` (accepted by the server, not yet marked sent), ``mail.mid_flush`` (between mails).
"""

from __future__ import annotations

import os
import random
import signal

POINTS = ("apply.before_commit", "apply.after_commit", "ack.after", "mail.after_send", "mail.mid_flush")


def _parse(text: str) -> dict[str, float]:
    chosen: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, probability = item.partition("=")
        if name not in POINTS:
            raise ValueError(f"RETRACER_FAULTS: unknown point {name!r}; known points: {', '.join(POINTS)}")
        chosen[name] = float(probability or 1)
    return chosen


_chosen = _parse(os.environ.get("RETRACER_FAULTS", ""))
_also: int | None = None


def take_down(pid: int) -> None:
    """An apply worker (parallel.py) dies with its `serve`: a fault point in it kills ``pid`` first, so the
    suite sees `serve` itself killed at that point, as it would without workers."""
    global _also
    _also = pid


def point(name: str) -> None:
    """Die here (SIGKILL, no cleanup) if the environment asked for it."""
    probability = _chosen.get(name)
    if probability and random.random() < probability:  # noqa: S311  (the odds of a fault, not a secret)
        if _also is not None:
            os.kill(_also, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
