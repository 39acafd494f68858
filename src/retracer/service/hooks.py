"""Hook points of the serve loop: subscribe to what the service does without editing it.

A subscriber subclasses :class:`Hooks` and overrides the hooks it wants; every hook is a no-op by default.
``service.hooks.add(subscriber)`` (or ``Service(..., hooks=[...])``) subscribes it. A subscriber that raises
is logged and the service goes on: counting must never stop the work being counted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from retracer.apply.applier import Outcome
    from retracer.mail.sender import DeliveryReport

log = logging.getLogger("retracer.serve")


class Hooks:
    """The hooks, each a no-op until a subscriber overrides it."""

    def before_batch(self, size: int) -> None:
        """Called before a batch of ``size`` events is applied (or handed to the apply workers)."""

    def after_batch(self, outcomes: Sequence[Outcome], seconds: float) -> None:
        """Called once a batch is committed, with what became of each event and how long it took."""

    def after_uploads(self, outcomes: Sequence[Outcome]) -> None:
        """Called after the uploads chore applied the spool's uploads as events (upload.accepted,
        upload.failed), with their outcomes: they are the service's own events, not a bus batch, so
        after_batch does not see them."""

    def before_chore(self, name: str) -> None:
        """Called before the chore ``name`` runs."""

    def after_chore(self, name: str, count: int, seconds: float) -> None:
        """Called after the chore ``name`` ran without error and did ``count`` things."""

    def after_mail(self, report: DeliveryReport) -> None:
        """Called after a round of mail delivery, with what it sent, failed, held back and digested."""

    def after_stop(self) -> None:
        """Called once when the service stops."""


class HookList(Hooks):
    """Every subscriber's hooks, called in the order they subscribed."""

    def __init__(self, subscribers: Sequence[Hooks] = ()) -> None:
        self.subscribers: list[Hooks] = list(subscribers)

    def add(self, subscriber: Hooks) -> None:
        """Subscribe ``subscriber`` to every hook it overrides."""
        self.subscribers.append(subscriber)

    def before_batch(self, size: int) -> None:
        for s in self.subscribers:
            _call(s, "before_batch", s.before_batch, size)

    def after_batch(self, outcomes: Sequence[Outcome], seconds: float) -> None:
        for s in self.subscribers:
            _call(s, "after_batch", s.after_batch, outcomes, seconds)

    def after_uploads(self, outcomes: Sequence[Outcome]) -> None:
        for s in self.subscribers:
            _call(s, "after_uploads", s.after_uploads, outcomes)

    def before_chore(self, name: str) -> None:
        for s in self.subscribers:
            _call(s, "before_chore", s.before_chore, name)

    def after_chore(self, name: str, count: int, seconds: float) -> None:
        for s in self.subscribers:
            _call(s, "after_chore", s.after_chore, name, count, seconds)

    def after_mail(self, report: DeliveryReport) -> None:
        for s in self.subscribers:
            _call(s, "after_mail", s.after_mail, report)

    def after_stop(self) -> None:
        for s in self.subscribers:
            _call(s, "after_stop", s.after_stop)


def _call(subscriber: Hooks, hook: str, method: object, *args: object) -> None:
    try:
        method(*args)  # type: ignore[operator]
    except Exception:
        log.exception("a hook subscriber failed; the service goes on",
                      extra={"hook": hook, "subscriber": type(subscriber).__name__})
