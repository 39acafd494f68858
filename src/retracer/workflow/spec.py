"""states/workflow.toml as data: its states, transitions and roles, checked when the file is read.

Every problem is a WorkflowError naming the file and the entry. The code never writes a state or trigger
name of its own: it asks the roles (``spec.roles.queue``, ``spec.roles.watchdog`` ...) which the file names.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from functools import cache
from importlib import resources
from typing import Any

from retracer.errors import WorkflowError
from retracer.events import TYPES
from retracer.workflow.effects import EFFECTS
from retracer.workflow.guards import GUARDS

# A job being created sits in this pseudo-state only in memory, before the creating trigger moves it to the
# initial state; the database's check constraint admits the real states alone.
NEW = "_NEW_"
RECIPIENT_KINDS = ("admins", "creator")
TRANSITION_KEYS = {"trigger", "source", "dest", "guards", "effect", "event", "admin", "record", "description"}
SHIPPED = "states/workflow.toml"


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
    effect: str
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
class Roles:
    """The part each state and trigger plays for the code (the file's [roles] table)."""

    #: States.
    queue: str  # waiting for a worker: the dispatcher offers these jobs
    working: str  # a worker holds the job; the watchdog watches its heartbeats
    success: str  # retraced and uploaded
    held: str  # needs a human
    rescuable: str  # its upload was refused and is kept for an admin's rescue
    takes_upload: tuple[str, ...]  # a result may be uploaded for a job in these states
    #: Triggers.
    watchdog: str  # fired by the service when a worker's heartbeats stop
    rescue: str  # an admin's rescue whose upload was accepted
    rescue_failed: str  # an admin's rescue whose upload was refused again
    reprioritize: str  # an admin's sticky priority
    failures: tuple[str, ...]  # a retrace attempt or an upload failed (listed as recent failures)
    #: Optional roles (a workflow file without them lacks only what they enable).
    symbols_arrived: str | None = None  # an import brought every build-id a waiting or held job lacked

    @classmethod
    def state_keys(cls) -> tuple[str, ...]:
        return ("queue", "working", "success", "held", "rescuable", "takes_upload")


@dataclass(frozen=True)
class Spec:
    """The whole workflow file."""

    initial: str
    states: dict[str, StateSpec]
    transitions: tuple[TransitionSpec, ...]
    roles: Roles

    @property
    def creating(self) -> TransitionSpec:
        """The transition that brings a new job into the workflow (the one with no source)."""
        return next(t for t in self.transitions if not t.source)

    def triggers(self) -> list[str]:
        return list(dict.fromkeys(t.trigger for t in self.transitions))


def parse_spec(text: str, origin: str = "workflow.toml") -> Spec:
    """Parse and check a workflow file; every problem is a WorkflowError naming the file and the entry."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise WorkflowError(f"{origin}: not valid TOML: {exc}") from None
    states = _states(raw, origin)
    initial = raw.get("initial")
    if initial not in states:
        raise WorkflowError(f"{origin}: initial state {initial!r} is not one of {sorted(states)}")
    transitions = tuple(_transition(t, i, states, origin) for i, t in enumerate(raw.get("transitions") or [], 1))
    creating = [t for t in transitions if not t.source]
    if len(creating) != 1:
        raise WorkflowError(f"{origin}: exactly one transition must create a job (source = []), "
                            f"found {[t.trigger for t in creating]}")
    return Spec(initial, states, transitions, _roles(raw.get("roles"), states, transitions, origin))


def _states(raw: dict[str, Any], origin: str) -> dict[str, StateSpec]:
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
    return states


def _transition(t: dict[str, Any], i: int, states: dict[str, StateSpec], origin: str) -> TransitionSpec:
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
    effect = t.get("effect")
    if effect not in EFFECTS:
        said = "has no effect" if effect is None else f"names an unknown effect {effect!r}"
        raise WorkflowError(f"{where}: {said}; give it effect = one of {sorted(EFFECTS)}")
    finals = [s for s in source if states[s].final]
    if finals:
        raise WorkflowError(f"{where}: {finals} are final states and cannot be left")
    return TransitionSpec(t["trigger"], source, t["dest"], guards, effect, t.get("event"),
                          bool(t.get("admin", False)), bool(t.get("record", True)),
                          " ".join(str(t.get("description", "")).split()))


def _roles(raw: Any, states: dict[str, StateSpec], transitions: tuple[TransitionSpec, ...], origin: str) -> Roles:
    if not isinstance(raw, dict):
        raise WorkflowError(f"{origin}: no [roles] table; it names the state or trigger playing each of "
                            f"{[f.name for f in fields(Roles)]}")
    known = [f.name for f in fields(Roles)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise WorkflowError(f"{origin}: [roles] has unknown keys {unknown}; the roles are {known}")
    triggers = {t.trigger for t in transitions}
    values: dict[str, Any] = {}
    for f in fields(Roles):
        if f.name not in raw and f.default is None:
            values[f.name] = None
            continue
        if f.name not in raw:
            raise WorkflowError(f"{origin}: [roles] {f.name} is missing")
        value = raw[f.name]
        many = isinstance(value, list)
        names = value if many else [value]
        if not names or not all(isinstance(n, str) for n in names) or many != ("tuple" in str(f.type)):
            shape = "a list of names" if "tuple" in str(f.type) else "one name"
            raise WorkflowError(f"{origin}: [roles] {f.name} = {value!r} must be {shape}")
        if f.name in Roles.state_keys():
            wrong = [n for n in names if n not in states]
            if wrong:
                raise WorkflowError(f"{origin}: [roles] {f.name} = {value!r} names no state ({wrong}); "
                                    f"states: {sorted(states)}")
        else:
            wrong = [n for n in names if n not in triggers]
            if wrong:
                raise WorkflowError(f"{origin}: [roles] {f.name} = {value!r} names no trigger ({wrong}); "
                                    f"triggers: {sorted(triggers)}")
        values[f.name] = tuple(value) if many else value
    return Roles(**values)


@cache
def load_spec() -> Spec:
    """The workflow file shipped with retracer (states/workflow.toml), read once per process."""
    text = resources.files("retracer.states").joinpath("workflow.toml").read_text(encoding="utf-8")
    return parse_spec(text, SHIPPED)
