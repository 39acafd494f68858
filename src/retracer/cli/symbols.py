"""The symbol index: `retracer symbols import|lookup|package|missing` (placeholder: filled in by its owner)."""

from __future__ import annotations

from retracer.cli import cli


@cli.group()
def symbols() -> None:
    """The symbol index: import packages, look up build-ids, list the build-ids jobs are missing."""
