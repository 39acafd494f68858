"""`retracer db backup` and `retracer db check`."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from retracer.cli.context import AppContext, emit_json, json_option, pass_app
from retracer.cli.ops import db_group
from retracer.ops import backup as ops


@db_group.command("backup")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--keep", type=click.IntRange(1, 1000), default=None,
              help="Backups DEST keeps, the newest (default: [backup] keep).")
@json_option
@pass_app
def db_backup(app: AppContext, dest: Path, keep: int | None, as_json: bool) -> None:
    """Back the database up into the directory DEST, verify the copy, then remove the oldest backups past
    --keep. SQLite: the online backup API (serve may keep running) and PRAGMA integrity_check; PostgreSQL:
    pg_dump -Fc and pg_restore --list. Files: retracer-<UTC time>.sqlite3 or .pgdump."""
    config = app.config
    count = keep if keep is not None else int(config["backup"]["keep"])
    with _progress(enabled=not as_json and sys.stdout.isatty()) as progress:
        result = ops.backup(config.database_url, dest, count, progress)
    if as_json:
        emit_json(result.as_dict())
        return
    removed = f", removed {len(result.removed)} older" if result.removed else ""
    click.echo(f"backed up {result.database} to {result.backup} ({result.bytes} bytes in {result.seconds:.1f}s, "
               f"verified{removed})")


@contextmanager
def _progress(enabled: bool) -> Iterator[ops.Progress | None]:
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("backing up"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                  transient=True) as bar:
        task = bar.add_task("backup", total=None)

        def update(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@db_group.command("check")
@json_option
@pass_app
def db_check(app: AppContext, as_json: bool) -> None:
    """Verify the live database: SQLite's integrity and foreign keys, the schema at the current revision,
    every table readable. Exit status 1 with the problems found."""
    result = ops.check(app.config.database_url)
    if as_json:
        emit_json(result.as_dict())
    elif result.ok:
        rows = sum(result.tables.values())
        click.echo(f"ok: {result.database} at revision {result.revision}, {len(result.tables)} tables, "
                   f"{rows} rows")
    else:
        click.echo(f"{result.database} has problems:")
        for problem in result.problems:
            click.echo(f"  - {problem}")
    if not result.ok:
        raise SystemExit(1)
