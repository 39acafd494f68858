"""The workflow drawn as a Mermaid state diagram (`retracer states --diagram`)."""

from __future__ import annotations

from retracer.workflow.machine import Workflow


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
