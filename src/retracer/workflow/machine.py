"""The machine: the workflow file's transitions loaded into one module-level `transitions` Machine.

There is exactly one Machine for the process, built with ``model=None``; jobs are never added to it.
``fire(job, trigger, ctx)`` runs one trigger on one job through ``machine.events[trigger].trigger(job)``,
which reads and writes ``job.state`` only. A Machine per job would cost ~380 µs and leak (measured).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

from transitions import Machine, MachineError

from retracer.errors import TransitionRefused, WorkflowError
from retracer.workflow.context import Change, TriggerContext
from retracer.workflow.guards import GUARDS
from retracer.workflow.spec import NEW, Roles, Spec, StateSpec, TransitionSpec, load_spec, parse_spec
from retracer.workflow.writes import machine_writes

if TYPE_CHECKING:
    from retracer.store.models import Job


@dataclass(frozen=True)
class Workflow:
    """The parsed workflow file and the machine built from it."""

    spec: Spec
    machine: Machine
    #: (trigger, state) -> the transitions it may take, in file order (looked up on every event).
    index: dict[tuple[str, str], list[TransitionSpec]] = field(default_factory=dict)

    @property
    def initial(self) -> str:
        return self.spec.initial

    @property
    def states(self) -> dict[str, StateSpec]:
        return self.spec.states

    @property
    def transitions(self) -> tuple[TransitionSpec, ...]:
        return self.spec.transitions

    @property
    def roles(self) -> Roles:
        return self.spec.roles

    def allowed_from(self, state: str) -> list[str]:
        seen: list[str] = []
        for t in self.transitions:
            if state in t.source and t.trigger not in seen:
                seen.append(t.trigger)
        return seen

    def triggers_for_event(self, event_type: str) -> list[str]:
        seen: list[str] = []
        for t in self.transitions:
            if t.event == event_type and t.trigger not in seen:
                seen.append(t.trigger)
        return seen

    def candidates(self, trigger: str, state: str) -> list[TransitionSpec]:
        return self.index.get((trigger, state), [])

    def fire(self, job: Job, trigger: str, ctx: TriggerContext) -> Change:
        """Run ``trigger`` on ``job``; raise TransitionRefused and leave the job unchanged if refused."""
        source = job.state
        event = self.machine.events.get(trigger)
        if event is None:
            raise WorkflowError(f"unknown trigger {trigger!r}; the workflow knows {sorted(self.machine.events)}")
        candidates = self.candidates(trigger, source)
        if not candidates:
            raise TransitionRefused(job.id, source, trigger, "not allowed from this state",
                                    self.allowed_from(source))
        with machine_writes():
            try:
                done = event.trigger(job, ctx=ctx)
            except MachineError as exc:  # pragma: no cover - candidates() already checked the source
                raise TransitionRefused(job.id, source, trigger, str(exc), self.allowed_from(source)) from None
        if not done:
            failed = [g for g in candidates[-1].guards if not GUARDS[g](job, ctx)]
            why = "; ".join(f"guard {g} not met: {(GUARDS[g].__doc__ or '').strip().rstrip('.')}" for g in failed)
            # The trigger just refused is not offered back as allowed: it would be refused again as it stands.
            raise TransitionRefused(job.id, source, trigger, why,
                                    [t for t in self.allowed_from(source) if t != trigger])
        taken = next(t for t in candidates if t.dest_from(source) == job.state)
        return Change(trigger, None if source == NEW else source, job.state, taken.record, taken.effect,
                      dict(ctx.notes))

    def create(self, job: Job, ctx: TriggerContext) -> Change:
        """Bring a new, unsaved job into the workflow through the creating trigger."""
        with machine_writes():
            job.state = NEW
        return self.fire(job, self.spec.creating.trigger, ctx)


def _condition(name: str) -> Any:
    guard = GUARDS[name]

    def check(event_data: Any) -> bool:
        return guard(event_data.model, event_data.kwargs["ctx"])

    check.__name__ = name
    return check


def build(spec: Spec) -> Workflow:
    """The machine for a parsed workflow file."""
    machine = Machine(model=None, states=[*spec.states, NEW], initial=None, auto_transitions=False,
                      send_event=True, ignore_invalid_triggers=False)
    for t in spec.transitions:
        machine.add_transition(t.trigger, list(t.sources), t.dest, conditions=[_condition(g) for g in t.guards])
    index: dict[tuple[str, str], list[TransitionSpec]] = {}
    for t in spec.transitions:
        for s in t.sources:
            index.setdefault((t.trigger, s), []).append(t)
    return Workflow(spec, machine, index)


def parse(text: str, origin: str = "workflow.toml") -> Workflow:
    """Parse and check a workflow file and build its machine; every problem is a WorkflowError."""
    return build(parse_spec(text, origin))


@cache
def load() -> Workflow:
    """The workflow shipped with retracer (states/workflow.toml), loaded once per process."""
    return build(load_spec())
