"""The workflow: states/workflow.toml loaded into one `transitions` machine, with its guards, effects and
failure policy."""

from retracer.workflow.machine import NEW, Change, StateSpec, TransitionSpec, Workflow, load, mermaid, parse

__all__ = ["NEW", "Change", "StateSpec", "TransitionSpec", "Workflow", "load", "mermaid", "parse"]
