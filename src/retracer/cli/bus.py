"""The bus: serve, publish, rejected, work."""

from __future__ import annotations

import json
import sys
from typing import TextIO

import click
from sqlalchemy import delete
from sqlalchemy.exc import InterfaceError, OperationalError

from retracer import events as ev
from retracer import logs, reports
from retracer.apply.applier import Applier
from retracer.bus import embedded
from retracer.bus.connect import open_bus
from retracer.cli import cli
from retracer.cli.context import AppContext, actor_name, actor_option, emit_json, json_option, pass_app, table, when
from retracer.errors import DatabaseUnavailable, InvalidEvent, RetracerError
from retracer.service import Service
from retracer.store.models import Audit, ProcessedEvent, Rejected, utcnow


@cli.command()
@click.option("--until-idle", is_flag=True, help="Embedded mode: stop when no event or chore is left.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@pass_app
def serve(app: AppContext, until_idle: bool, log_level: str) -> None:
    """Apply events, dispatch work, watch heartbeats, process uploads and send mail until stopped.

    SIGTERM or SIGINT finishes the batch in hand and exits 0. Logs are JSON lines on stderr.
    """
    logs.setup(log_level)
    service = Service(app.config, app.factory)
    service.install_signal_handlers()
    try:
        service.run(until_idle=until_idle)  # the last log line ("stopped") carries the counters
    except (OperationalError, InterfaceError, DatabaseUnavailable) as exc:
        # Nothing is lost: events are acknowledged (or removed from the inbox) only with their commit.
        orig = getattr(exc, "orig", None)
        raise RetracerError(
            f"the database cannot be used ({str(orig).strip().splitlines()[0] if orig else exc}); "
            f"serve stopped without acknowledging anything it had not committed. Check the database "
            f"({app.engine.url.render_as_string(hide_password=True)}) and start `retracer serve` again.") from None


def _read_events(stream: TextIO, name: str) -> list[ev.Event]:
    """Every line must be a valid event; all problems are reported before anything is sent."""
    good: list[ev.Event] = []
    problems: list[str] = []
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            good.append(ev.parse(line))
        except InvalidEvent as exc:
            problems.append(f"{name}:{number}: {exc}")
    if problems:
        raise InvalidEvent(f"{len(problems)} bad event(s), nothing was published:\n" + "\n".join(problems))
    return good


@cli.command()
@click.argument("source", type=click.File("r", encoding="utf-8"), default="-")
@json_option
@pass_app
def publish(app: AppContext, source: TextIO, as_json: bool) -> None:
    """Publish events from SOURCE (a file of JSON lines, or - for standard input).

    Every line is validated first; one bad line and nothing is sent. In the embedded mode events go to the
    inbox table that `serve` drains; with a broker URL they go to the RabbitMQ exchange with confirms.
    """
    name = "<stdin>" if source is sys.stdin or getattr(source, "name", "-") in ("-", "<stdin>") else source.name
    found = _read_events(source, name)
    bus = open_bus(app.config, app.factory)
    publisher = bus.publisher()
    try:
        publisher.publish_all([(e.type, e.to_json(), e.id) for e in found])
    finally:
        publisher.close()
    where = bus.describe()
    if as_json:
        emit_json({"published": len(found), "ids": [e.id for e in found]})
    else:
        click.echo(f"published {len(found)} event(s) to {where}")


@cli.group(invoke_without_command=True)
@click.option("--all", "show_all", is_flag=True, help="Include events already replayed.")
@json_option
@click.pass_context
def rejected(ctx: click.Context, show_all: bool, as_json: bool) -> None:
    """Events that could not be applied, with the reason; `rejected replay ID` applies one again."""
    if ctx.invoked_subcommand is not None:
        return
    app: AppContext = ctx.obj
    with app.transaction() as session:
        rows = reports.rejected(session, include_replayed=show_all)
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("no rejected events")
        return
    click.echo(table(["ID", "AT", "EVENT", "TYPE", "JOB", "REASON"],
                     [[r["id"], when(r["at"]), r["event_id"], r["type"], r["job"], r["reason"]] for r in rows]))


@rejected.command("replay")
@click.argument("rejected_id", type=int, metavar="ID")
@actor_option
@click.option("--reason", default=None, help="Why it is replayed (kept in the audit log).")
@json_option
@pass_app
def rejected_replay(app: AppContext, rejected_id: int, actor: str | None, reason: str | None,
                    as_json: bool) -> None:
    """Apply a rejected event again, after its cause was fixed (it may be rejected again, with a new reason)."""
    who = actor_name(actor)
    with app.transaction() as session:
        row = session.get(Rejected, rejected_id)
        if row is None:
            raise RetracerError(f"no rejected event {rejected_id} (see `retracer rejected --all`)")
        if row.replayed_at is not None:
            raise RetracerError(f"rejected event {rejected_id} was already replayed at {when(row.replayed_at)}")
        if row.event_id:
            session.execute(delete(ProcessedEvent).where(ProcessedEvent.event_id == row.event_id,
                                                         ProcessedEvent.outcome == "rejected"))
        (outcome,) = Applier(app.config).apply_batch(session, [row.body])
        row.replayed_at = utcnow()
        session.add(Audit(actor=who, action="replay", detail=json.dumps(
            {"rejected": rejected_id, "event_id": row.event_id, "outcome": outcome.status, "reason": reason})))
    if as_json:
        emit_json(outcome.to_dict())
    elif outcome.status == "rejected":
        click.echo(f"event {outcome.event_id} rejected again: {outcome.reason}")
    else:
        click.echo(f"event {outcome.event_id} {outcome.status}: job {outcome.job_id} "
                   f"{outcome.source or '-'} -> {outcome.dest}")
    if outcome.status == "rejected":
        raise SystemExit(1)


@cli.group()
def work() -> None:
    """Work requests for workers (embedded mode; with RabbitMQ they are on the work queue)."""


@work.command("take")
@click.option("--limit", type=int, default=1, show_default=True)
@json_option
@pass_app
def work_take(app: AppContext, limit: int, as_json: bool) -> None:
    """Take the oldest work requests (retrace.requested) that `serve` has dispatched."""
    if open_bus(app.config, app.factory).relays_outbox:
        raise RetracerError(f"with a broker, workers consume queue {app.config['broker']['work_queue']!r}")
    with app.transaction() as session:
        requests = embedded.take_work(session, limit)
    if as_json:
        emit_json(requests)
    elif not requests:
        click.echo("no work requested")
    else:
        for r in requests:
            click.echo(f"job {r['job']}: {r['data']['package']} {r['data']['version']} "
                       f"({r['data']['architecture']}) core {r['data']['core']} attempt {r['data']['attempt']}")
