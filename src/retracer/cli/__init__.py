"""The `retracer` command: one group, a module per area of subcommands."""

from __future__ import annotations

import click
from sqlalchemy.exc import InterfaceError, OperationalError

from retracer import logs
from retracer.cli.context import AppContext
from retracer.errors import RetracerError


class RetracerGroup(click.Group):
    """Turns every RetracerError into a one-line error and exit status 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except RetracerError as exc:
            raise click.ClickException(str(exc)) from None
        except (OperationalError, InterfaceError) as exc:
            first = str(exc.orig or exc).strip().splitlines()[0]
            raise click.ClickException(
                f"the database cannot be used ({first}); nothing was changed. Check it (`retracer check-config` "
                f"shows which database this is: a read-only disk, a full disk, a server that is down) and "
                f"run the command again.") from None


@click.group(cls=RetracerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Configuration file (default: RETRACER_CONFIG, else the built-in embedded defaults).")
@click.version_option(package_name="retracer")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """retracer keeps crash-retrace jobs moving and tells people when they don't."""
    logs.quiet()
    ctx.obj = AppContext(config_path)
    ctx.call_on_close(ctx.obj.close)


def main() -> None:
    cli(prog_name="retracer")


from retracer.cli import admin, bus, jobs, mail, ops, policy  # noqa: E402,F401  (registers the subcommands on `cli`)
