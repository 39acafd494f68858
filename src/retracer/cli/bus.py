"""The bus: serve, publish, rejected, work."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import BinaryIO

import click
from sqlalchemy import delete
from sqlalchemy.exc import InterfaceError, OperationalError

from retracer import events as ev
from retracer import logs, reports
from retracer.apply.applier import Applier
from retracer.bus import embedded
from retracer.bus.connect import open_bus
from retracer.cli import cli
from retracer.cli.context import (
    ROW_ID,
    ROW_LIMIT,
    AppContext,
    actor_name,
    actor_option,
    dry_run_option,
    emit_json,
    json_option,
    lock_options,
    pass_app,
    printable,
    reason_option,
    table,
    when,
)
from retracer.errors import DatabaseUnavailable, InvalidEvent, RetracerError
from retracer.ops import crashmail, lock
from retracer.service import Service
from retracer.store.models import Audit, ProcessedEvent, Rejected, utcnow


@cli.command()
@click.option("--until-idle", is_flag=True,
              help="Batch run: exit 0 once no event is queued (inbox or events queue) and a round of chores did "
                   "nothing.")
@lock_options("retracer-serve.lock")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@json_option
@pass_app
def serve(app: AppContext, until_idle: bool, lock_path: str | None, break_stale_lock: bool, log_level: str,
          as_json: bool) -> None:
    """Apply events, dispatch work, watch heartbeats, process uploads and send mail until stopped.

    SIGTERM or SIGINT finishes the batch in hand and exits 0. Logs are JSON lines on stderr; with --json the
    final counters (events applied, duplicate, rejected, batches, what each chore did) are printed on
    standard output as one JSON object when it stops. A crash (a bug) prints its traceback, mails [mail]
    maintainers through the outbox and exits 1, leaving the --lock behind for a human to look.
    """
    logs.setup(log_level)
    with crashmail.reported(app, "serve"):
        try:
            with lock.held(lock.resolve(lock_path, app.config.data_dir, "retracer-serve.lock"), break_stale_lock):
                _serve(app, until_idle, as_json)
        except lock.Busy as busy:
            click.echo(str(busy))


def _serve(app: AppContext, until_idle: bool, as_json: bool) -> None:
    # Imported here: prometheus_client costs every other command ~18 ms of start-up.
    from retracer.service.metrics import expose_service

    service = Service(app.config, app.factory)
    exporter = expose_service(service)  # [service] metrics_port; None when 0
    service.install_signal_handlers()
    try:
        stats = service.run(until_idle=until_idle)  # the last log line ("stopped") carries the counters too
    except (OperationalError, InterfaceError, DatabaseUnavailable) as exc:
        # Nothing is lost: events are acknowledged (or removed from the inbox) only with their commit.
        orig = getattr(exc, "orig", None)
        raise RetracerError(
            f"the database cannot be used ({str(orig).strip().splitlines()[0] if orig else exc}); "
            f"serve stopped without acknowledging anything it had not committed. Check the database "
            f"({app.engine.url.render_as_string(hide_password=True)}) and start `retracer serve` again.") from None
    finally:
        if exporter is not None:
            exporter.close()
    if as_json:
        emit_json(stats.as_dict())


#: How many problems a refused file lists (the count is always given): a file of a million bad lines must
#: not become a million-line error.
MAX_LISTED_PROBLEMS = 50


def _read_events(stream: BinaryIO, name: str) -> list[ev.Event]:
    """Every line must be a valid event; all problems are reported before anything is sent.

    Lines are read as bytes and each decoded on its own, so that a line that is not UTF-8 is reported with
    its number like any other bad line.
    """
    good: list[ev.Event] = []
    problems: list[str] = []
    for number, line in enumerate(_lines(stream), start=1):
        if line is None:
            problems.append(f"{name}:{number}: line is longer than an event may be ({ev.MAX_BODY_BYTES} bytes)")
            continue
        if not line.strip():
            continue
        try:
            good.append(ev.parse(line))
        except InvalidEvent as exc:
            problems.append(f"{name}:{number}: {exc}")
    if problems:
        listed = problems[:MAX_LISTED_PROBLEMS]
        if len(problems) > MAX_LISTED_PROBLEMS:
            listed.append(f"... and {len(problems) - MAX_LISTED_PROBLEMS} more")
        raise InvalidEvent(f"{len(problems)} bad event(s), nothing was published:\n" + "\n".join(listed))
    return good


def _lines(stream: BinaryIO) -> Iterator[bytes | None]:
    """The lines of ``stream``, each read with a bound: None for a line longer than an event may be (its rest
    is skipped in bounded pieces), so a file without newlines (/dev/zero) cannot fill memory."""
    while True:
        line = stream.readline(ev.MAX_BODY_BYTES + 2)
        if not line:
            return
        if len(line) == ev.MAX_BODY_BYTES + 2 and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = stream.readline(1024 * 1024)
            yield None
        else:
            yield line


@cli.command()
@click.argument("source", type=click.File("rb"), default="-")
@reason_option
@actor_option
@dry_run_option
@json_option
@pass_app
def publish(app: AppContext, source: BinaryIO, reason: str | None, actor: str | None, dry_run: bool,
            as_json: bool) -> None:
    """Publish events from SOURCE (a file of JSON lines, or - for standard input).

    Every line is validated first; one bad line and nothing is sent. In the embedded mode events go to the
    inbox table that `serve` drains; with a broker URL they go to the RabbitMQ exchange with confirms.
    Each event says who sent it (its source); with --reason the publication is also kept in `retracer audit`
    with --as and the reason. --dry-run validates and sends nothing.
    """
    name = getattr(source, "name", "-")
    name = "<stdin>" if not isinstance(name, str) or name in ("-", "<stdin>") else name
    found = _read_events(source, name)
    who = actor_name(actor)
    # With a broker, publishing needs no database (a worker's host may hold broker credentials alone).
    bus = open_bus(app.config, app.factory if app.config.embedded_bus else None)
    where = bus.describe()
    if not dry_run:
        publisher = bus.publisher()
        try:
            publisher.publish_all([(e.type, e.to_json(), e.id) for e in found])
        finally:
            publisher.close()
        if reason is not None:
            _audit(app, who, "publish", {"events": len(found), "ids": [e.id for e in found][:AUDITED_IDS],
                                         "to": where, "reason": reason})
    if as_json:
        emit_json({"published": 0 if dry_run else len(found), "valid": len(found), "ids": [e.id for e in found],
                   "to": where, "dry_run": dry_run})
    elif dry_run:
        click.echo(f"dry run: {len(found)} valid event(s), nothing was published to {where}")
    else:
        click.echo(f"published {len(found)} event(s) to {where}")


#: How many event ids an audit row of a publication keeps (the count is always there).
AUDITED_IDS = 100


def _audit(app: AppContext, who: str, action: str, detail: dict[str, object]) -> None:
    with app.transaction() as session:
        session.add(Audit(actor=who, action=action, detail=json.dumps(detail)))


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
@click.argument("rejected_id", type=ROW_ID, metavar="ID")
@actor_option
@click.option("--reason", default=None, help="Why it is replayed (kept in the audit log).")
@dry_run_option
@json_option
@pass_app
def rejected_replay(app: AppContext, rejected_id: int, actor: str | None, reason: str | None, dry_run: bool,
                    as_json: bool) -> None:
    """Apply a rejected event again, after its cause was fixed (it may be rejected again, with a new reason).

    --dry-run applies it in a transaction that is rolled back: it says what would become of the event, and
    nothing changes.
    """
    who = actor_name(actor)
    with app.factory() as session, session.begin():
        row = session.get(Rejected, rejected_id)
        if row is None:
            raise RetracerError(f"no rejected event {rejected_id} (see `retracer rejected --all`)")
        if row.replayed_at is not None:
            raise RetracerError(f"rejected event {rejected_id} was already replayed at {when(row.replayed_at)} "
                                f"(see `retracer rejected --all`; publish a new event to try again)")
        if row.truncated:
            raise RetracerError(
                f"rejected event {rejected_id} was {row.body_bytes} bytes, past what an event may be; only its "
                f"start was kept (sha256 {row.body_sha256}), so it cannot be applied: ask its publisher to "
                f"send a valid event")
        if row.event_id:
            session.execute(delete(ProcessedEvent).where(ProcessedEvent.event_id == row.event_id,
                                                         ProcessedEvent.outcome == "rejected"))
        (outcome,) = Applier(app.config).apply_batch(session, [row.body], minted=row.minted)
        row.replayed_at = utcnow()
        session.add(Audit(actor=who, action="replay", detail=json.dumps(
            {"rejected": rejected_id, "event_id": row.event_id, "outcome": outcome.status, "reason": reason})))
        if dry_run:
            session.rollback()
    if as_json:
        emit_json({**outcome.to_dict(), "by": who, "dry_run": dry_run})
    elif outcome.status == "rejected":
        # The event's id and the reason quote what a publisher sent: escaped like the table's cells.
        click.echo(printable(f"event {outcome.event_id} {'would be' if dry_run else 'was'} rejected again: "
                             f"{outcome.reason}"))
    else:
        click.echo(printable(f"event {outcome.event_id} {'would be ' if dry_run else ''}{outcome.status}: job "
                             f"{outcome.job_id} {outcome.source or '-'} -> {outcome.dest}"))
    if dry_run and not as_json:
        click.echo("dry run: nothing changed")
    if outcome.status == "rejected":
        raise SystemExit(1)


@cli.group()
def work() -> None:
    """Work requests for workers (embedded mode; with RabbitMQ they are on the work queue)."""


@work.command("take")
@click.option("--limit", type=ROW_LIMIT, default=1, show_default=True)
@reason_option
@actor_option
@dry_run_option
@json_option
@pass_app
def work_take(app: AppContext, limit: int, reason: str | None, actor: str | None, dry_run: bool,
              as_json: bool) -> None:
    """Take the oldest work requests (retrace.requested) that `serve` has dispatched.

    A taken request is handed out once. --dry-run shows what would be taken and leaves it there; with
    --reason, what was taken is also kept in `retracer audit` with --as and the reason.
    """
    if open_bus(app.config, app.factory).relays_outbox:
        raise RetracerError(f"with a broker, workers consume queue {app.config['broker']['work_queue']!r}; "
                            f"`retracer work take` is for the embedded mode only")
    who = actor_name(actor)
    with app.factory() as session, session.begin():
        requests = embedded.take_work(session, limit)
        if dry_run:
            session.rollback()
        elif reason is not None and requests:
            session.add(Audit(actor=who, action="work.take", detail=json.dumps(
                {"jobs": [r["job"] for r in requests], "requests": [r["id"] for r in requests], "reason": reason})))
    if as_json:
        emit_json(requests)
    elif not requests:
        click.echo("no work requested")
    else:
        for r in requests:
            click.echo(f"job {r['job']}: {r['data']['package']} {r['data']['version']} "
                       f"({r['data']['architecture']}) core {r['data']['core']} attempt {r['data']['attempt']}")
        if dry_run:
            click.echo("dry run: nothing was taken")
