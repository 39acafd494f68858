"""The workflow file (states/workflow.toml), its parser, its diagram, and the one module-level machine."""

from __future__ import annotations

import gc
import re
import tomllib
import weakref
from importlib import resources

import pytest

from retracer.errors import TransitionRefused, WorkflowError
from retracer.events import TYPES
from retracer.store.models import STATES, Job
from retracer.workflow import TriggerContext, Workflow, load, mermaid, parse
from retracer.workflow.effects import EFFECTS
from retracer.workflow.guards import GUARDS
from retracer.workflow.policy import REASON_QUOTE, first_line

SHIPPED = resources.files("retracer.states").joinpath("workflow.toml").read_text(encoding="utf-8")

# A small, valid workflow that each parse() test breaks in one place.
MINIMAL = """
initial = "A"

[states.A]
title = "State A"
description = "The first state."

[states.B]
title = "State B"
description = "The last state."
final = true

[[transitions]]
trigger = "make"
source = []
dest = "A"
effect = "create"

[[transitions]]
trigger = "finish"
source = ["A"]
dest = "B"
guards = ["has_reason"]
effect = "uploaded"

[roles]
queue = "A"
working = "A"
success = "B"
held = "A"
rescuable = "A"
takes_upload = ["A"]
watchdog = "finish"
rescue = "finish"
rescue_failed = "finish"
reprioritize = "finish"
failures = ["finish"]
"""


def broken(old: str, new: str) -> str:
    """MINIMAL with one piece of text replaced (the replacement must happen)."""
    assert old in MINIMAL
    return MINIMAL.replace(old, new, 1)


class TestShippedFile:
    def test_loads(self) -> None:
        """The shipped workflow file parses into a Workflow with PENDING as the initial state."""
        wf = load()
        assert isinstance(wf, Workflow)
        assert wf.initial == "PENDING"

    def test_has_the_five_states_of_the_card(self) -> None:
        """The file defines exactly the five states the database admits, FULLYBUILT alone being final."""
        wf = load()
        assert set(wf.states) == set(STATES)
        assert [name for name, spec in wf.states.items() if spec.final] == ["FULLYBUILT"]

    def test_every_state_has_a_title_and_a_description(self) -> None:
        """Each state carries the human title and one-paragraph description that mails and pages reuse."""
        for spec in load().states.values():
            assert spec.title.strip() and len(spec.description.split()) >= 8, spec.name

    def test_transitions_required_by_the_issue(self) -> None:
        """The transitions the core issue lists are all in the file, with the right sources and destinations."""
        wf = load()
        pairs = {(t.trigger, s, t.dest_from(s)) for t in wf.transitions for s in t.source}
        required = {
            ("start", "PENDING", "RETRACING"), ("heartbeat", "RETRACING", "RETRACING"),
            ("upload_accepted", "RETRACING", "FULLYBUILT"), ("upload_failed", "RETRACING", "FAILEDTOUPLOAD"),
            ("retrace_failed", "RETRACING", "PENDING"), ("retrace_failed", "RETRACING", "ON_HOLD"),
            ("rescue", "FAILEDTOUPLOAD", "FULLYBUILT"), ("retry", "FAILEDTOUPLOAD", "PENDING"),
            ("retry", "ON_HOLD", "PENDING"), ("hold", "PENDING", "ON_HOLD"), ("hold", "RETRACING", "ON_HOLD"),
            ("hold", "FAILEDTOUPLOAD", "ON_HOLD"), ("release", "ON_HOLD", "PENDING"),
        }
        assert required <= pairs
        submit = [t for t in wf.transitions if t.trigger == "submit"]
        assert [(t.source, t.dest) for t in submit] == [((), "PENDING")]
        assert "has_upload_log" in next(t for t in wf.transitions if t.trigger == "upload_failed").guards

    def test_nothing_leaves_a_final_state(self) -> None:
        """No transition in the file starts from FULLYBUILT."""
        assert load().allowed_from("FULLYBUILT") == []

    def test_every_trigger_has_an_effect(self) -> None:
        """Every transition in the file names an effect function, so applying it cannot fail on a missing key."""
        assert all(t.effect for t in load().transitions)
        assert {t.effect for t in load().transitions} <= set(EFFECTS)

    def test_every_event_named_is_a_known_event_type(self) -> None:
        """Every bus event the file names is a type the event contract validates."""
        named = {t.event for t in load().transitions if t.event}
        assert named and named <= set(TYPES)

    def test_every_guard_named_exists(self) -> None:
        """Every guard the file names is a function in retracer.guards."""
        assert {g for t in load().transitions for g in t.guards} <= set(GUARDS)


class TestParseRejects:
    def test_minimal_file_is_valid(self) -> None:
        """The base text the other tests break is itself accepted (so each failure is due to the break)."""
        wf = parse(MINIMAL, "mini.toml")
        assert list(wf.states) == ["A", "B"] and [t.trigger for t in wf.transitions] == ["make", "finish"]

    def test_bad_toml(self) -> None:
        """Text that is not TOML is refused with the file name and the parser's position."""
        with pytest.raises(WorkflowError, match=r"^mini\.toml: not valid TOML: .*line \d+"):
            parse(MINIMAL + "\n[[transitions]\ntrigger = ", "mini.toml")

    def test_unknown_destination_state(self) -> None:
        """A transition to a state that is not defined is refused, naming the transition and the state."""
        with pytest.raises(WorkflowError, match=r"mini\.toml: transition #2 \(finish\): unknown state 'DONE'"):
            parse(broken('dest = "B"', 'dest = "DONE"'), "mini.toml")

    def test_unknown_source_state(self) -> None:
        """A transition from a state that is not defined is refused, naming the state."""
        with pytest.raises(WorkflowError, match=r"transition #2 \(finish\): unknown state 'Z'"):
            parse(broken('source = ["A"]', 'source = ["A", "Z"]'), "mini.toml")

    def test_unknown_guard(self) -> None:
        """A guard that retracer.guards does not define is refused at load time, listing the known ones."""
        with pytest.raises(WorkflowError, match=r"unknown guard 'has_raisin'; known guards: \[.*'has_reason'"):
            parse(broken('"has_reason"', '"has_raisin"'), "mini.toml")

    def test_transition_without_an_effect(self) -> None:
        """A transition that names no effect, or an unknown one, is refused naming the file and the entry."""
        with pytest.raises(WorkflowError, match=r"mini\.toml: transition #2 \(finish\): has no effect; give it "
                                                r"effect = one of \[.*'uploaded'"):
            parse(broken('effect = "uploaded"\n', ""), "mini.toml")
        with pytest.raises(WorkflowError, match=r"transition #2 \(finish\): names an unknown effect 'upload'"):
            parse(broken('effect = "uploaded"', 'effect = "upload"'), "mini.toml")

    def test_role_naming_no_state_or_trigger(self) -> None:
        """A role must name a state (or trigger) of the file; the error names the file and the key."""
        with pytest.raises(WorkflowError, match=r"mini\.toml: \[roles\] queue = 'Q' names no state \(\['Q'\]\)"):
            parse(broken('queue = "A"', 'queue = "Q"'), "mini.toml")
        with pytest.raises(WorkflowError, match=r"\[roles\] watchdog = 'finnish' names no trigger"):
            parse(broken('watchdog = "finish"', 'watchdog = "finnish"'), "mini.toml")
        with pytest.raises(WorkflowError, match=r"\[roles\] takes_upload = 'A' must be a list of names"):
            parse(broken('takes_upload = ["A"]', 'takes_upload = "A"'), "mini.toml")

    def test_missing_or_unknown_role(self) -> None:
        """Every role the code reads must be named, and no other."""
        with pytest.raises(WorkflowError, match=r"mini\.toml: \[roles\] held is missing"):
            parse(broken('held = "A"\n', ""), "mini.toml")
        with pytest.raises(WorkflowError, match=r"\[roles\] has unknown keys \['janitor'\]"):
            parse(broken('held = "A"\n', 'held = "A"\njanitor = "A"\n'), "mini.toml")

    def test_leaving_a_final_state(self) -> None:
        """A transition whose source is a final state is refused."""
        text = MINIMAL + '\n[[transitions]]\ntrigger = "undo"\nsource = ["B"]\ndest = "A"\neffect = "unpark"\n'
        with pytest.raises(WorkflowError, match=r"transition #3 \(undo\): \['B'\] are final states and cannot be left"):
            parse(text, "mini.toml")

    def test_missing_title(self) -> None:
        """A state without a title is refused, naming the state."""
        with pytest.raises(WorkflowError, match=r"state B needs a title and a description"):
            parse(broken('title = "State B"\n', ""), "mini.toml")

    def test_missing_description(self) -> None:
        """A state without a description is refused, naming the state."""
        with pytest.raises(WorkflowError, match=r"state A needs a title and a description"):
            parse(broken('description = "The first state."\n', ""), "mini.toml")

    def test_no_states(self) -> None:
        """A file with transitions but no [states.*] tables is refused."""
        with pytest.raises(WorkflowError, match=r"no \[states\.\*\] tables"):
            parse('initial = "A"\n', "mini.toml")

    def test_unknown_initial_state(self) -> None:
        """An initial state that is not defined is refused, listing the states."""
        with pytest.raises(WorkflowError, match=r"initial state 'Q' is not one of \['A', 'B'\]"):
            parse(broken('initial = "A"', 'initial = "Q"'), "mini.toml")

    def test_unknown_recipient_kind(self) -> None:
        """A state that notifies an unknown kind of recipient is refused, naming the valid kinds."""
        with pytest.raises(WorkflowError, match=r"state A notifies unknown recipients \['everyone'\]"):
            parse(broken('description = "The first state."', 'description = "x y"\nnotify = ["everyone"]'),
                  "mini.toml")

    def test_missing_trigger(self) -> None:
        """A transition without a trigger is refused."""
        with pytest.raises(WorkflowError, match=r"transition #2 \(\?\): missing 'trigger'"):
            parse(broken('trigger = "finish"\n', ""), "mini.toml")

    def test_missing_dest(self) -> None:
        """A transition without a destination is refused."""
        with pytest.raises(WorkflowError, match=r"transition #2 \(finish\): missing 'dest'"):
            parse(broken('dest = "B"\n', ""), "mini.toml")

    def test_stay_without_source(self) -> None:
        """dest "=" (stay) on a creating transition, which has no source to stay in, is refused."""
        with pytest.raises(WorkflowError, match=r"dest '=' needs a source"):
            parse(broken('dest = "A"', 'dest = "="'), "mini.toml")

    def test_misspelt_transition_key(self) -> None:
        """A misspelt key in a transition (guard for guards) is refused instead of silently dropping the guard."""
        text = broken("guards = [", "guard = [")
        with pytest.raises(WorkflowError, match=r"unknown keys \['guard'\]"):
            parse(text, "mini.toml")

    def test_unknown_event_type(self) -> None:
        """A transition naming a bus event type the contract does not know is refused at load time."""
        text = broken('dest = "B"', 'dest = "B"\nevent = "upload.acepted"')
        with pytest.raises(WorkflowError, match=r"event 'upload\.acepted' is not an event type"):
            parse(text, "mini.toml")


class TestMermaid:
    def test_every_transition_is_drawn(self) -> None:
        """The diagram has one arrow per (source, transition) in the file, labelled with the trigger."""
        wf = load()
        lines = mermaid(wf).splitlines()
        assert lines[0] == "stateDiagram-v2"
        for t in wf.transitions:
            for source in t.source or ("[*]",):
                dest = t.dest_from(source) if t.source else t.dest
                wanted = f"    {source} --> {dest} : {t.trigger}"
                assert any(line == wanted or line.startswith(wanted + " [") for line in lines), wanted

    def test_arrows_match_the_file_exactly(self) -> None:
        """The diagram draws no arrow that the file does not have (besides final states' exit)."""
        wf = load()
        arrows = [line for line in mermaid(wf).splitlines() if "-->" in line]
        expected = sum(len(t.source or ("[*]",)) for t in wf.transitions)
        finals = sum(1 for s in wf.states.values() if s.final)
        assert len(arrows) == expected + finals

    def test_states_have_titles_and_guards_are_shown(self) -> None:
        """Each state is labelled with its title and guarded arrows list their guards."""
        wf = load()
        text = mermaid(wf)
        for name, spec in wf.states.items():
            assert f"    {name} : {spec.title}" in text
        assert "RETRACING --> FAILEDTOUPLOAD : upload_failed [has_upload_log]" in text
        assert "FULLYBUILT --> [*]" in text


class TestOneMachine:
    def test_load_returns_the_same_workflow(self) -> None:
        """load() builds the workflow once per process and hands back the same object every time."""
        assert load() is load()
        assert load().machine is load().machine

    def test_file_in_package_is_the_repository_file(self) -> None:
        """The workflow shipped in the package is states/workflow.toml (nothing else decides the workflow)."""
        assert tomllib.loads(SHIPPED)["initial"] == load().initial
        assert len(tomllib.loads(SHIPPED)["transitions"]) == len(load().transitions)

    def test_firing_on_many_jobs_does_not_grow_the_machine(self) -> None:
        """Firing triggers on 1,000 jobs adds no model to the machine and keeps no reference to any job."""
        wf = load()
        before = list(wf.machine.models)
        refs = []
        for _ in range(1000):
            job = Job()
            wf.create(job, TriggerContext())
            wf.fire(job, "start", TriggerContext(data={"worker": "w"}, offers_required=False))
            wf.fire(job, "heartbeat", TriggerContext())
            assert job.state == "RETRACING"
            refs.append(weakref.ref(job))
        del job
        gc.collect()
        assert wf.machine.models == before == []
        assert sum(1 for r in refs if r() is not None) == 0

    def test_fire_moves_only_the_given_job(self) -> None:
        """Two in-memory jobs fired through the one machine keep their own states."""
        wf = load()
        a, b = Job(), Job()
        wf.create(a, TriggerContext())
        wf.create(b, TriggerContext())
        wf.fire(a, "start", TriggerContext(offers_required=False))
        assert (a.state, b.state) == ("RETRACING", "PENDING")

    def test_refused_trigger_leaves_the_job(self) -> None:
        """The bare machine refuses an illegal trigger with TransitionRefused and does not change the state."""
        wf = load()
        job = Job()
        wf.create(job, TriggerContext())
        with pytest.raises(TransitionRefused, match=re.escape("job None is PENDING: 'release' refused")):
            wf.fire(job, "release", TriggerContext())
        assert job.state == "PENDING"

    def test_unknown_trigger(self) -> None:
        """A trigger the file does not define is a WorkflowError listing the known triggers."""
        job = Job()
        load().create(job, TriggerContext())
        with pytest.raises(WorkflowError, match=r"unknown trigger 'explode'.*'start'"):
            load().fire(job, "explode", TriggerContext())


class TestReasonQuotes:
    """A history reason quotes an error's first line; where it is cut, it says so."""

    def test_a_short_line_is_quoted_whole(self) -> None:
        assert first_line("  gdb died\nsecond line") == "gdb died"
        assert first_line("\n \n") == ""

    def test_a_long_line_is_cut_with_a_mark(self) -> None:
        quoted = first_line("word " * 200)
        assert quoted.endswith(" [...]") and len(quoted) <= REASON_QUOTE + len(" [...]")
        assert quoted.removesuffix(" [...]") == ("word " * 200)[:REASON_QUOTE].rstrip()
