"""Running retracer: db upgrade, check-config."""

from __future__ import annotations

import click

from retracer import store
from retracer.cli import cli
from retracer.cli.context import AppContext, emit_json, json_option, pass_app


@cli.group("db")
def db_group() -> None:
    """The database schema."""


@db_group.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@pass_app
def db_upgrade(app: AppContext, revision: str) -> None:
    """Create or migrate the schema (alembic); safe to run again."""
    url = app.config.database_url
    store.upgrade(url, revision)
    click.echo(f"database {app.engine.url.render_as_string(hide_password=True)} is at revision "
               f"{store.head_revision() if revision == 'head' else revision}")


@cli.command("check-config")
@json_option
@pass_app
def check_config(app: AppContext, as_json: bool) -> None:
    """Validate the configuration and print the effective values (and where each came from)."""
    config = app.config
    shown = config.describe()
    if as_json:
        emit_json({"config_file": config.path, "effective": shown, "origin": config.origin})
        return
    click.echo(f"configuration OK (file: {config.path or 'built-in defaults only'})")
    for section, values in shown.items():
        click.echo(f"\n[{section}]")
        for key, value in values.items():
            origin = config.origin.get(f"{section}.{key}")
            note = f"  # {origin}" if origin and origin != "default" else ""
            click.echo(f"{key} = {value!r}{note}")


@cli.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=None,
              help="A fresh directory for the demo instance (default: ./retracer-demo-<time>).")
def demo(directory: str | None) -> None:
    """Play the whole story on the embedded default: submit, retrace, retry, hold, fail to upload, rescue."""
    from pathlib import Path

    from retracer import demo as story

    status = story.run(Path(directory) if directory else story.default_dir())
    raise SystemExit(status)
