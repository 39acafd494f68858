"""An embedded instance driven through the real command line, for the CLI tests."""

from __future__ import annotations

import json
import shlex
from typing import Any

from click.testing import CliRunner, Result

from retracer import config as cfg
from retracer import store
from retracer.apply.applier import Applier
from retracer.cli import cli
from retracer.testing.factories import event

SUBMIT = ("submit --crash-id {crash} --creator mark@example.com --package cdrkit --version 1.0 "
          "--architecture i386 --release breezy --core /srv/crashes/{crash}/core --executable /usr/bin/cdrecord")


class Retracer:
    """One embedded instance: runs command lines through CliRunner and drives jobs through the apply path."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.config = cfg.load(environ=env)
        self.engine = store.make_engine(self.config.database_url)
        self.factory = store.session_factory(self.engine)

    def run(self, line: str) -> Result:
        return CliRunner().invoke(cli, shlex.split(line), env=self.env, prog_name="retracer")

    def ok(self, line: str) -> str:
        result = self.run(line)
        assert result.exit_code == 0, (line, result.output)
        return result.output

    def json(self, line: str) -> Any:
        return json.loads(self.ok(line + " --json"))

    def submit(self, crash: str, extra: str = "", package: str | None = None) -> int:
        """Submit a crash (with ``package`` instead of cdrkit, passed as one argument whatever it holds)."""
        args = [package if package is not None and a == "cdrkit" else a
                for a in shlex.split(SUBMIT.format(crash="CRASH") + extra)]
        return int(self.args(*[a.replace("CRASH", crash) for a in args]))

    def args(self, *args: str) -> str:
        """Run a command given as its arguments (no shell quoting to get past), which must succeed."""
        result = CliRunner().invoke(cli, list(args), env=self.env, prog_name="retracer")
        assert result.exit_code == 0, (args, result.output)
        return result.output

    def apply(self, etype: str, job: int, **data: Any) -> None:
        with store.transaction(self.factory) as session:
            (outcome,) = Applier(self.config).apply_batch(session, [event(etype, job, source="w", **data)])
        assert outcome.status == "applied", outcome

    def fire(self, job: int, trigger: str, **kwargs: Any) -> None:
        with store.transaction(self.factory) as session:
            Applier(self.config).fire(session, job, trigger, by="admin:celso", **kwargs)
