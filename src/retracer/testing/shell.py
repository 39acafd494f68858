"""Runs `retracer ...` command lines in-process, as the specs (tests/doctests/) show them."""

from __future__ import annotations

import shlex

from click.testing import CliRunner

from retracer.cli import cli


class Shell:
    """Runs `retracer ...` command lines in-process, printing what a terminal would show.

    Used by the doctests (tests/doctests/), so the specs read like an admin's session. A non-zero exit is
    printed as ``[exit N]`` after the output.
    """

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = dict(env or {})

    def __call__(self, command_line: str) -> None:
        args = shlex.split(command_line)
        if args and args[0] == "retracer":
            args = args[1:]
        result = CliRunner().invoke(cli, args, env=self.env, catch_exceptions=False, prog_name="retracer")
        out = result.output.rstrip("\n")
        if out:
            print(out)
        if result.exit_code:
            print(f"[exit {result.exit_code}]")
