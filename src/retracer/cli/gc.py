"""`retracer gc`."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click
from rich.progress import Progress as Bar

from retracer.cli import cli
from retracer.cli.context import (
    AppContext,
    actor_name,
    actor_option,
    dry_run_option,
    emit_json,
    json_option,
    pass_app,
    reason_option,
    table,
)
from retracer.ops.gc import KINDS, Counts, Progress, collect

_LABELS = {"jobs": "jobs", "history": "history rows", "mails": "mail rows", "outbox": "outbox rows",
           "markers": "processed-event markers", "rejected": "rejected events", "results_dirs": "result directories",
           "accepted_uploads": "accepted uploads", "failed_uploads": "failed uploads"}


@cli.command("gc", short_help="Delete old finished jobs, markers, mails, rejected events and uploads.")
@reason_option
@actor_option
@dry_run_option
@json_option
@pass_app
def gc(app: AppContext, reason: str | None, actor: str | None, dry_run: bool, as_json: bool) -> None:
    """Delete what the [gc] retention says is old enough: FULLYBUILT jobs (with their history, mails, results
    and accepted uploads), failed uploads (not those of a job still waiting for a rescue), processed-event
    markers, sent and stale mails, sent outbox rows and rejected events. A job in a state that is not final
    is never deleted. Rows go in small transactions, so `serve` can keep running.

    --dry-run counts what would go and deletes nothing. What was deleted is kept in `retracer audit`
    (with --as and --reason).
    """
    show_bar = not as_json and sys.stdout.isatty()
    with _bar(app, show_bar) as tick:
        counts = collect(app.factory, app.config, dry_run=dry_run, actor=actor_name(actor), reason=reason,
                         progress=tick, audit_always=True)
    if as_json:
        emit_json(counts.to_dict())
        return
    click.echo(_text(counts))


@contextmanager
def _bar(app: AppContext, show: bool) -> Iterator[Progress | None]:
    """A progress bar over what a dry run counts first (only on a terminal: a log or a pipe gets the table)."""
    if not show:
        yield None
        return
    planned = collect(app.factory, app.config, dry_run=True).to_dict()
    with Bar(transient=True) as bar:
        tasks = {kind: bar.add_task(_LABELS[kind], total=planned[kind] or 1)
                 for kind in KINDS if kind not in ("history", "mails", "results_dirs", "accepted_uploads")}
        yield lambda kind, n: bar.advance(tasks[kind], n) if kind in tasks else None


def _text(counts: Counts) -> str:
    values = counts.to_dict()
    head = "dry run: would delete (nothing was deleted)" if counts.dry_run else "deleted"
    return head + ":\n" + table(["WHAT", "COUNT"], [[_LABELS[k], values[k]] for k in KINDS])
