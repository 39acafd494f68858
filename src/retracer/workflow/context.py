"""What a trigger carries into the guards and effects, and what a fired trigger did."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from retracer.errors import WorkflowError

if TYPE_CHECKING:
    from retracer.workflow.policy import FailurePolicy


class TriggerContext:
    """What a trigger carries besides the job: the event's data, who fired it and why, and the failure policy.

    The policy is loaded only when a guard or effect asks for it (it reads the admins' patterns from the
    database): give it as ``policy``, or as ``load_policy`` to be called on first use.
    """

    def __init__(self, data: dict[str, Any] | None = None, by: str = "", reason: str | None = None,
                 event_id: str | None = None, policy: FailurePolicy | None = None,
                 load_policy: Callable[[], FailurePolicy] | None = None, offers_required: bool = True) -> None:
        self.data = data if data is not None else {}
        self.by = by
        self.reason = reason
        self.event_id = event_id
        self.load_policy = load_policy
        # [service] start_requires_offer: a worker may start only a job the dispatcher offered.
        self.offers_required = offers_required
        # Filled by guards that classify (is_transient) so effects and mails can say what matched.
        self.notes: dict[str, Any] = {}
        self._policy = policy

    @property
    def policy(self) -> FailurePolicy:
        """The failure policy; raises WorkflowError if the caller gave none (a bug, not bad input)."""
        if self._policy is None:
            if self.load_policy is None:
                raise WorkflowError("this transition needs the failure policy, and its trigger was fired without "
                                    "one (give TriggerContext a policy or load_policy)")
            self._policy = self.load_policy()
        return self._policy


@dataclass(frozen=True)
class Change:
    """What a fired trigger did: the transition taken and the effect the workflow file names for it."""

    trigger: str
    source: str | None
    dest: str
    record: bool
    effect: str
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def moved(self) -> bool:
        return self.source != self.dest
