"""The workflow: states/workflow.toml loaded into one module-level `transitions` machine.

There is exactly one Machine for the process, built with ``model=None``; jobs are never added to it.
``fire(job, trigger, ctx)`` runs one trigger on one job through ``machine.events[trigger].trigger(job)``,
which reads and writes ``job.state`` only. A Machine per job would cost ~380 µs and leak (LIBRARY-NOTES).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from transitions import Machine, MachineError

from retracer.errors import TransitionRefused, WorkflowError
from retracer.events import TYPES
from retracer.store.models import Job, machine_writes
from retracer.workflow.guards import GUARDS, TriggerContext

# A job being created sits in this pseudo-state only in memory, before `submit` moves it to the initial
# state; the database's check constraint admits the five real states alone.
NEW = "_NEW_"
RECIPIENT_KINDS = ("admins", "creator")
TRANSITION_KEYS = {"trigger", "source", "dest", "guards", "event", "admin", "record", "description"}


@dataclass(frozen=True)
class StateSpec:
    """One state as the workflow file describes it."""

    name: str
    title: str
    description: str
    final: bool
    notify: tuple[str, ...]


@dataclass(frozen=True)
class TransitionSpec:
    """One transition as the workflow file describes it."""

    trigger: str
    source: tuple[str, ...]
    dest: str
    guards: tuple[str, ...]
    event: str | None
    admin: bool
    record: bool
    description: str

    @property
    def sources(self) -> tuple[str, ...]:
        """The states it leaves from; a creating transition leaves the in-memory NEW pseudo-state."""
        return self.source or (NEW,)

    def dest_from(self, source: str) -> str:
        return source if self.dest == "=" else self.dest


@dataclass(frozen=True)
class Change:
    """What a fired trigger did."""

    trigger: str
    source: str | None
    dest: str
    record: bool
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def moved(self) -> bool:
        return self.source != self.dest


@dataclass(frozen=True)
class Workflow:
    """The parsed workflow file and the machine built from it."""

    initial: str
    states: dict[str, StateSpec]
    transitions: tuple[TransitionSpec, ...]
    machine: Machine
    #: (trigger, state) -> the transitions it may take, in file order (looked up on every event).
    index: dict[tuple[str, str], list[TransitionSpec]] = field(default_factory=dict)

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
            raise TransitionRefused(job.id, source, trigger, why, self.allowed_from(source))
        taken = next(t for t in candidates if t.dest_from(source) == job.state)
        return Change(trigger, None if source == NEW else source, job.state, taken.record, dict(ctx.notes))

    def create(self, job: Job, ctx: TriggerContext, trigger: str = "submit") -> Change:
        """Bring a new, unsaved job into the workflow through the creating trigger."""
        with machine_writes():
            job.state = NEW
        return self.fire(job, trigger, ctx)


def _condition(name: str) -> Any:
    guard = GUARDS[name]

    def check(event_data: Any) -> bool:
        return guard(event_data.model, event_data.kwargs["ctx"])

    check.__name__ = name
    return check


def parse(text: str, origin: str = "workflow.toml") -> Workflow:
    """Parse and check a workflow file; every problem is a WorkflowError naming the file and the entry."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise WorkflowError(f"{origin}: not valid TOML: {exc}") from None
    states: dict[str, StateSpec] = {}
    for name, spec in (raw.get("states") or {}).items():
        if not isinstance(spec, dict) or not spec.get("title") or not spec.get("description"):
            raise WorkflowError(f"{origin}: state {name} needs a title and a description")
        notify = tuple(spec.get("notify", []))
        unknown = [n for n in notify if n not in RECIPIENT_KINDS]
        if unknown:
            raise WorkflowError(f"{origin}: state {name} notifies unknown recipients {unknown}; "
                                f"use {list(RECIPIENT_KINDS)}")
        states[name] = StateSpec(name, spec["title"], " ".join(spec["description"].split()),
                                 bool(spec.get("final", False)), notify)
    if not states:
        raise WorkflowError(f"{origin}: no [states.*] tables")
    initial = raw.get("initial")
    if initial not in states:
        raise WorkflowError(f"{origin}: initial state {initial!r} is not one of {sorted(states)}")
    transitions: list[TransitionSpec] = []
    for i, t in enumerate(raw.get("transitions") or [], start=1):
        where = f"{origin}: transition #{i} ({t.get('trigger', '?')})"
        unknown_keys = sorted(set(t) - TRANSITION_KEYS)
        if unknown_keys:
            raise WorkflowError(f"{where}: unknown keys {unknown_keys}; a transition has {sorted(TRANSITION_KEYS)}")
        if t.get("event") is not None and t["event"] not in TYPES:
            raise WorkflowError(f"{where}: event {t['event']!r} is not an event type; known: {sorted(TYPES)}")
        for key in ("trigger", "dest"):
            if not isinstance(t.get(key), str):
                raise WorkflowError(f"{where}: missing {key!r}")
        source = tuple(t.get("source", []))
        for s in [*source, t["dest"]]:
            if s != "=" and s not in states:
                raise WorkflowError(f"{where}: unknown state {s!r}")
        if t["dest"] == "=" and not source:
            raise WorkflowError(f"{where}: dest '=' needs a source")
        guards = tuple(t.get("guards", []))
        for g in guards:
            if g not in GUARDS:
                raise WorkflowError(f"{where}: unknown guard {g!r}; known guards: {sorted(GUARDS)}")
        finals = [s for s in source if states[s].final]
        if finals:
            raise WorkflowError(f"{where}: {finals} are final states and cannot be left")
        transitions.append(TransitionSpec(
            t["trigger"], source, t["dest"], guards, t.get("event"), bool(t.get("admin", False)),
            bool(t.get("record", True)), " ".join(str(t.get("description", "")).split())))
    machine = Machine(model=None, states=[*states, NEW], initial=None, auto_transitions=False,
                      send_event=True, ignore_invalid_triggers=False)
    for t in transitions:
        machine.add_transition(t.trigger, list(t.sources), t.dest,
                               conditions=[_condition(g) for g in t.guards])
    index: dict[tuple[str, str], list[TransitionSpec]] = {}
    for t in transitions:
        for s in t.sources:
            index.setdefault((t.trigger, s), []).append(t)
    return Workflow(initial, states, tuple(transitions), machine, index)


@cache
def load() -> Workflow:
    """The workflow shipped with retracer (states/workflow.toml), loaded once per process."""
    text = resources.files("retracer.states").joinpath("workflow.toml").read_text(encoding="utf-8")
    return parse(text, "states/workflow.toml")


def mermaid(wf: Workflow) -> str:
    """A Mermaid state diagram drawn from the workflow file."""
    lines = ["stateDiagram-v2"]
    for name, spec in wf.states.items():
        lines.append(f"    {name} : {spec.title}")
    for t in wf.transitions:
        label = t.trigger + (f" [{', '.join(t.guards)}]" if t.guards else "")
        for s in t.source or ("[*]",):
            lines.append(f"    {s} --> {t.dest_from(s)} : {label}")
    for name, spec in wf.states.items():
        if spec.final:
            lines.append(f"    {name} --> [*]")
    return "\n".join(lines)
