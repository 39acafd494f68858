"""The mail outbox: mail flush (deliver now, for cron), mail list (what waits, what went, what fails)."""

from __future__ import annotations

import json
from typing import Any

import click
from sqlalchemy import and_, or_, select

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
    pass_app,
    reason_option,
    table,
    when,
)
from retracer.mail.sender import STATUSES, DeliveryReport, deliver_pending
from retracer.mail.stale import stale_reasons
from retracer.store.models import Audit, Job, Mail, utcnow


@cli.group("mail")
def mail_group() -> None:
    """The mail outbox: notifications to admins and crash creators."""


def _summary(report: DeliveryReport) -> str:
    if not (report.sent or report.failed or report.digests or report.deferred):
        return f"no mails due (destination: {report.destination})"
    parts = [f"sent {report.sent} mail{'' if report.sent == 1 else 's'} to {report.destination}"]
    if report.digests:
        parts.append(f"{report.digested} folded into {report.digests} digest{'' if report.digests == 1 else 's'} "
                     f"by flood control")
    if report.deferred:
        parts.append(f"{report.deferred} held back by flood control until the window has room")
    if report.failed:
        parts.append(f"{report.failed} failed (see `retracer mail list --status failing` and --status failed)")
    return "; ".join(parts)


@mail_group.command("flush", short_help="Deliver the mails that are due now (for cron).")
@click.option("--limit", type=ROW_LIMIT, default=500, show_default=True,
              help="Deliver at most this many mails in this run.")
@reason_option
@actor_option
@dry_run_option
@json_option
@pass_app
@click.pass_context
def flush(ctx: click.Context, app: AppContext, limit: int, reason: str | None, actor: str | None, dry_run: bool,
          as_json: bool) -> None:
    """Deliver the mails that are due now (for cron; `serve` does it on its own).

    Exits 1 when a mail failed; failing mails are retried later with backoff. --dry-run lists the mails
    that are due and sends nothing; with --reason, what was delivered is also kept in `retracer audit` with
    --as and the reason.
    """
    if dry_run:
        due, stale = _due(app, limit)
        if as_json:
            emit_json({"due": [{**mail_dict(m), "stale": stale.get(m.id)} for m in due], "dry_run": True})
        elif not due:
            click.echo("dry run: no mails due")
        else:
            click.echo(f"dry run: {len(due)} mail{'' if len(due) == 1 else 's'} due, nothing was sent "
                       f"(flood control may fold some into digests when they are):")
            click.echo(table(["ID", "JOB", "STATE", "TO", "WHY", "STATUS", "TRIES"],
                             [[m.id, m.job_id if m.job_id is not None else "-", m.state, m.recipient, m.rationale,
                               f"{m.status}, would be stale" if m.id in stale else m.status, m.attempts]
                              for m in due]))
        return
    report = deliver_pending(app.factory, app.config, limit)
    if reason is not None and (report.sent or report.failed or report.digests or report.deferred):
        with app.transaction() as session:
            session.add(Audit(actor=actor_name(actor), action="mail.flush",
                              detail=json.dumps({**report.to_dict(), "reason": reason})))
    if as_json:
        emit_json(report.to_dict())
    else:
        click.echo(_summary(report))
    if report.failed:
        ctx.exit(1)


def _due(app: AppContext, limit: int) -> tuple[list[Mail], dict[int, str]]:
    """The mails a flush would try now, oldest first (the sender's choice before flood control), and why each
    that a flush would find stale is (it would not be sent)."""
    now = utcnow()
    with app.transaction() as session:
        due = list(session.scalars(
            select(Mail)
            .where(or_(and_(Mail.status.in_(("pending", "failing")),
                            or_(Mail.next_attempt_at.is_(None), Mail.next_attempt_at <= now)),
                       and_(Mail.status == "sending", Mail.next_attempt_at <= now)))
            .order_by(Mail.id).limit(limit)))
        return due, stale_reasons(session, ((m.id, m.job_id, m.history_id, m.state) for m in due))


def mail_dict(mail: Mail) -> dict[str, Any]:
    return {"id": mail.id, "job": mail.job_id, "state": mail.state, "recipient": mail.recipient,
            "rationale": mail.rationale, "status": mail.status, "attempts": mail.attempts,
            "last_error": mail.last_error, "next_attempt_at": mail.next_attempt_at, "message_id": mail.message_id,
            "digest_of": mail.digest_of, "created_at": mail.created_at, "sent_at": mail.sent_at}


@mail_group.command("list", short_help="Pending, sent and failing mails, with their last error.")
@click.option("--status", type=click.Choice(STATUSES), default=None, help="Only mails with this status.")
@click.option("--job", "job_id", type=ROW_ID, default=None, help="Only mails about this job.")
@click.option("--limit", type=ROW_LIMIT, default=100, show_default=True,
              help="Show the most recent this many.")
@json_option
@pass_app
def list_cmd(app: AppContext, status: str | None, job_id: int | None, limit: int, as_json: bool) -> None:
    """Mails in the outbox, oldest first: pending, sending, sent, failing (with the last error), failed,
    digested (replaced by a flood-control digest), stale (not sent: the job left the state the mail
    announced; the job's state now is shown)."""
    with app.transaction() as session:
        stmt = select(Mail).order_by(Mail.id.desc()).limit(limit)
        if status:
            stmt = stmt.where(Mail.status == status)
        if job_id is not None:
            stmt = stmt.where(Mail.job_id == job_id)
        found = list(reversed(session.scalars(stmt).all()))
        jobs = sorted({m.job_id for m in found if m.job_id is not None})
        now = {job: state for job, state in session.execute(select(Job.id, Job.state).where(Job.id.in_(jobs)))}
    if as_json:
        emit_json([{**mail_dict(m), "job_state_now": now.get(m.job_id) if m.job_id is not None else None}
                   for m in found])
        return
    if not found:
        click.echo("no mails" + (f" with status {status}" if status else "") +
                   (f" about job {job_id}" if job_id is not None else ""))
        return
    click.echo(table(
        ["ID", "JOB", "STATE", "TO", "WHY", "STATUS", "TRIES", "NEXT TRY", "LAST ERROR"],
        [[m.id, m.job_id if m.job_id is not None else "-", m.state, m.recipient, m.rationale,
          _status(m, now), m.attempts,
          when(m.next_attempt_at) if m.status in ("pending", "failing") else "-",
          (m.last_error or "-") if m.status != "sent" else "-"] for m in found]))


def _status(mail: Mail, job_states: dict[int, str]) -> str:
    """The status as `mail list` shows it: with the digest that replaced the mail, or the job's state now
    for a stale one (why it was not sent)."""
    if mail.status == "digested":
        return f"digested (#{mail.digest_of})"
    if mail.status == "stale" and mail.job_id is not None:
        return f"stale (job now {job_states.get(mail.job_id, 'gone')})"
    return mail.status
