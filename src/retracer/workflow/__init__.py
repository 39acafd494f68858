"""The workflow: states/workflow.toml (states, transitions, roles) loaded into one `transitions` machine,
with the guards, effects and failure policy it names. Nothing else decides what may follow what."""

from retracer.workflow.context import Change, TriggerContext
from retracer.workflow.diagram import mermaid
from retracer.workflow.machine import Workflow, build, load, parse
from retracer.workflow.policy import FailurePolicy, Verdict
from retracer.workflow.spec import NEW, Roles, Spec, StateSpec, TransitionSpec, load_spec, parse_spec
from retracer.workflow.writes import machine_is_writing, machine_writes

__all__ = ["NEW", "Change", "FailurePolicy", "Roles", "Spec", "StateSpec", "TransitionSpec", "TriggerContext",
           "Verdict", "Workflow", "build", "load", "load_spec", "machine_is_writing", "machine_writes", "mermaid",
           "parse", "parse_spec"]
