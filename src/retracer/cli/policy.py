"""Spurious-failure patterns: errors an admin has recognised as transient, and the audit log of admin actions."""

from __future__ import annotations

import json

import click
from sqlalchemy import select

from retracer.cli import cli
from retracer.cli.context import (
    AppContext,
    actor_name,
    actor_option,
    dry_run_option,
    emit_json,
    json_option,
    pass_app,
    table,
    when,
)
from retracer.errors import RetracerError
from retracer.store.models import Audit, SpuriousPattern
from retracer.workflow.policy import check_pattern, pattern_problem


@cli.group()
def spurious() -> None:
    """Patterns that make a matching retrace failure transient (retried with backoff instead of held)."""


@spurious.command("add")
@click.argument("pattern")
@click.option("--reason", required=True, help="Why failures like this are transient.")
@actor_option
@dry_run_option
@json_option
@pass_app
def spurious_add(app: AppContext, pattern: str, reason: str, actor: str | None, dry_run: bool,
                 as_json: bool) -> None:
    """Register PATTERN, a case-insensitive regular expression searched in a failure's error text."""
    check_pattern(pattern)
    who = actor_name(actor)
    with app.transaction() as session:
        if session.scalar(select(SpuriousPattern).where(SpuriousPattern.pattern == pattern)) is not None:
            raise RetracerError(f"pattern {pattern!r} is already registered (see `retracer spurious list`)")
        row = SpuriousPattern(pattern=pattern, reason=reason, added_by=who)
        if not dry_run:
            session.add(row)
            session.add(Audit(actor=who, action="spurious.add", detail=json.dumps({"pattern": pattern,
                                                                                  "reason": reason})))
            session.flush()
    if as_json:
        emit_json({"id": row.id, "pattern": pattern, "reason": reason, "by": who, "dry_run": dry_run})
    else:
        click.echo(("dry run: would add" if dry_run else f"added #{row.id}:") + f" {pattern!r} ({reason})")


@spurious.command("list")
@json_option
@pass_app
def spurious_list(app: AppContext, as_json: bool) -> None:
    """The registered patterns (the built-in ones are in the config: [policy] transient_patterns)."""
    with app.transaction() as session:
        rows = list(session.scalars(select(SpuriousPattern).order_by(SpuriousPattern.id)))
    # A pattern stored before the matcher refused its kind (backreferences, lookaround) is skipped by serve:
    # say so here, where an admin looks, with why.
    problems = {r.id: pattern_problem(r.pattern) for r in rows}
    if as_json:
        emit_json([{"id": r.id, "pattern": r.pattern, "reason": r.reason, "by": r.added_by, "at": r.added_at,
                    "usable": problems[r.id] is None, "problem": problems[r.id]} for r in rows])
    elif not rows:
        click.echo("no spurious-failure patterns registered")
    else:
        click.echo(table(["ID", "PATTERN", "REASON", "BY", "AT"],
                         [[r.id, r.pattern, r.reason, r.added_by, when(r.added_at)] for r in rows]))
        for pattern_id, problem in problems.items():
            if problem is not None:
                click.echo(f"#{pattern_id} is unusable and skipped when failures are classified: {problem}; "
                           f"remove it with `retracer spurious remove {pattern_id}` and add what it should be")


@spurious.command("remove")
@click.argument("pattern_id", type=int, metavar="ID")
@click.option("--reason", default=None, help="Why it is removed (kept in the audit log).")
@actor_option
@dry_run_option
@json_option
@pass_app
def spurious_remove(app: AppContext, pattern_id: int, reason: str | None, actor: str | None, dry_run: bool,
                    as_json: bool) -> None:
    """Remove a registered pattern by its id."""
    who = actor_name(actor)
    with app.transaction() as session:
        row = session.get(SpuriousPattern, pattern_id)
        if row is None:
            raise RetracerError(f"no spurious-failure pattern #{pattern_id} (see `retracer spurious list`)")
        pattern = row.pattern
        if not dry_run:
            session.delete(row)
            session.add(Audit(actor=who, action="spurious.remove",
                              detail=json.dumps({"pattern": pattern, "reason": reason})))
    if as_json:
        emit_json({"id": pattern_id, "pattern": pattern, "removed": not dry_run, "by": who})
    else:
        click.echo(("dry run: would remove" if dry_run else "removed") + f" #{pattern_id} {pattern!r}")


@cli.command()
@click.option("--limit", type=int, default=50, show_default=True)
@json_option
@pass_app
def audit(app: AppContext, limit: int, as_json: bool) -> None:
    """Admin actions that are not job transitions (spurious patterns, replays), newest first."""
    with app.transaction() as session:
        rows = list(session.scalars(select(Audit).order_by(Audit.id.desc()).limit(limit)))
    if as_json:
        emit_json([{"id": r.id, "at": r.at, "by": r.actor, "action": r.action, "detail": json.loads(r.detail)}
                   for r in rows])
    elif not rows:
        click.echo("no admin actions recorded")
    else:
        click.echo(table(["AT", "BY", "ACTION", "DETAIL"], [[when(r.at), r.actor, r.action, r.detail] for r in rows]))
