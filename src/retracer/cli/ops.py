"""Running retracer: db upgrade, check-config."""

from __future__ import annotations

from pathlib import Path

import click
from sqlalchemy import select
from sqlalchemy.engine import make_url

from retracer import store
from retracer.cli import cli
from retracer.cli.context import AppContext, emit_json, json_option, pass_app
from retracer.store.engine import missing_database, sqlite_file


@cli.group("db")
def db_group() -> None:
    """The database schema."""


@db_group.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@json_option
@pass_app
def db_upgrade(app: AppContext, revision: str, as_json: bool) -> None:
    """Create or migrate the schema (alembic); safe to run again. The one command that creates a database."""
    url = app.config.database_url
    path = sqlite_file(url)
    created = path is not None and not path.exists()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    store.upgrade(url, revision)
    shown = make_url(url).render_as_string(hide_password=True)
    at = store.head_revision() if revision == "head" else revision
    if as_json:
        emit_json({"database": shown, "revision": at, "created": created})
    else:
        click.echo(f"database {shown} is at revision {at}")


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
@json_option
def demo(directory: str | None, as_json: bool) -> None:
    """Play the whole story on the embedded default: submit, retrace, retry, hold, fail to upload, rescue, then
    one real crash compiled here and retraced by `retracer worker` with gdb (where gcc and gdb exist).

    With --json the story is told on standard error and standard output gets one JSON object at the end:
    the instance's directory and configuration, how each job ended, the real crash (or null), the problems
    if the story diverged.
    """
    from retracer import demo as story
    from retracer import demo_crash

    root = (Path(directory) if directory else story.default_dir()).resolve()
    if not as_json:
        raise SystemExit(story.run(root))
    told: list[str] = []

    def out(line: str) -> None:
        told.append(line)
        click.echo(line, err=True)

    status = story.run(root, out=out)
    emit_json({"directory": str(root), "config": str(root / "retracer.toml"), "exit_code": status,
               "ended_as_told": status == 0, "jobs": _demo_jobs(root), "real_crash": demo_crash.summary(root),
               "problems": _demo_problems(told)})
    raise SystemExit(status)


def _demo_jobs(root: Path) -> list[dict[str, object]]:
    from retracer.store.models import Job

    url = f"sqlite:///{root / 'retracer.db'}"
    if missing_database(url) is not None:
        return []
    engine = store.make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(Job.id, Job.crash_id, Job.package, Job.state, Job.attempts).order_by(Job.id))
            return [{"id": i, "crash_id": c, "package": p, "state": s, "attempts": a} for i, c, p, s, a in rows]
    finally:
        engine.dispose()


def _demo_problems(told: list[str]) -> list[str]:
    """What the story said diverged: the demo lists each problem as "  - ..." after its DIVERGED line."""
    marker = next((i for i, line in enumerate(told) if "DIVERGED" in line), None)
    if marker is None:
        return []
    problems = []
    for line in told[marker + 1:]:
        if not line.startswith("  - "):
            break
        problems.append(line[4:])
    return problems
