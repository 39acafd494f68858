"""The `retracer` command: one group, a module per area of subcommands."""

from __future__ import annotations

import json

import click
from sqlalchemy.exc import InterfaceError, OperationalError

from retracer import logs
from retracer.cli.context import JSON_META, AppContext
from retracer.errors import RetracerError

_TOKENS_META = "retracer.tokens"


class JsonError(click.ClickException):
    """An error of a command run with --json: one JSON object on standard output, so that a script reading
    the output always gets JSON, with the message and the exit status."""

    def show(self, file: object = None) -> None:
        click.echo(json.dumps({"error": self.format_message(), "exit_code": self.exit_code}, indent=2))


def json_error(message: str, exit_code: int) -> JsonError:
    """A JsonError that exits with ``exit_code`` (click reads the status from the class)."""
    kind = type(f"JsonError{exit_code}", (JsonError,), {"exit_code": exit_code})
    error: JsonError = kind(message)
    return error


class RetracerGroup(click.Group):
    """Turns every RetracerError into a one-line error and exit status 1, never a traceback; under --json,
    every error (usage errors too) into a JSON object."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[_TOKENS_META] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except RetracerError as exc:
            raise _error(ctx, str(exc), 1) from None
        except (OperationalError, InterfaceError) as exc:
            first = str(exc.orig or exc).strip().splitlines()[0]
            raise _error(ctx,
                f"the database cannot be used ({first}); nothing was changed. Check it (`retracer check-config` "
                f"shows which database this is: a read-only disk, a full disk, a server that is down) and "
                f"run the command again.", 1) from None
        except click.ClickException as exc:
            if not isinstance(exc, JsonError) and _wants_json(ctx):
                raise json_error(exc.format_message() if not isinstance(exc, click.UsageError)
                                 else _usage_message(exc), exc.exit_code) from None
            raise


def _wants_json(ctx: click.Context) -> bool:
    """Whether the command line asked for JSON: its --json was parsed, or (a usage error stopped the parsing
    before it was) it is among the words before a ``--``."""
    if ctx.meta.get(JSON_META):
        return True
    tokens: list[str] = ctx.meta.get(_TOKENS_META, [])
    return "--json" in (tokens[:tokens.index("--")] if "--" in tokens else tokens)


def _usage_message(exc: click.UsageError) -> str:
    hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
    return exc.format_message() + hint


def _error(ctx: click.Context, message: str, exit_code: int) -> click.ClickException:
    if _wants_json(ctx):
        return json_error(message, exit_code)
    return click.ClickException(message)


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


from retracer.cli import admin, backup, bus, gc, jobs, mail, ops, policy, symbols, symbols_missing, web, worker  # noqa: E402,F401  (registers the subcommands on `cli`)
