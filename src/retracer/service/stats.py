"""The counters a running service keeps and logs when it stops: a hook subscriber like any other."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from retracer.service.hooks import Hooks

if TYPE_CHECKING:
    from retracer.apply.applier import Outcome


@dataclass
class Stats(Hooks):
    """Events applied, duplicate, rejected and stale (from an attempt no longer current), batches, and what
    each chore did."""

    applied: int = 0
    duplicate: int = 0
    rejected: int = 0
    stale: int = 0
    batches: int = 0
    chores: dict[str, int] = field(default_factory=dict)

    def after_batch(self, outcomes: Sequence[Outcome], seconds: float) -> None:
        if outcomes:
            self.batches += 1
        for o in outcomes:
            setattr(self, o.status, getattr(self, o.status) + 1)

    def after_chore(self, name: str, count: int, seconds: float) -> None:
        if count:
            self.chores[name] = self.chores.get(name, 0) + count

    def as_dict(self) -> dict[str, object]:
        return {"applied": self.applied, "duplicate": self.duplicate, "rejected": self.rejected,
                "stale": self.stale, "batches": self.batches, "chores": dict(self.chores)}
