"""Admin commands that move jobs: one per admin trigger of the workflow file (retry, hold, release), plus
priority, rescue and process-upload.

Each is audited in the job's history with who ran it (--as, default the login name) and --reason, and
each has --dry-run: the transition runs inside a transaction that is rolled back, so every guard and
effect is checked and nothing changes, no mail is queued.
"""

from __future__ import annotations

from typing import Any

import click

from retracer.apply.applier import Applier, Outcome
from retracer.apply.runner import Runner
from retracer.cli import cli
from retracer.cli.context import (
    ROW_ID,
    AppContext,
    actor_name,
    actor_option,
    dry_run_option,
    emit_json,
    json_option,
    pass_app,
)
from retracer.store.models import Job
from retracer.uploads.intake import Admin, process_incoming
from retracer.uploads.rescue import rescue as rescue_upload
from retracer.uploads.spool import UploadResult
from retracer.workflow import Change, load

reason_option = click.option("--reason", default=None, help="Why (kept in the job's history).")
no_mail_option = click.option("--no-mail", is_flag=True,
                              help="Queue none of the mails the transition would send (the history says so).")


def run_admin_trigger(app: AppContext, job_id: int, trigger: str, actor: str | None, reason: str | None,
                      dry_run: bool, data: dict[str, Any] | None = None) -> tuple[Change, dict[str, Any]]:
    """Fire ``trigger`` on a job for an admin; commit unless it is a dry run. Refusals raise."""
    who = actor_name(actor)
    with app.factory() as session:
        session.begin()
        try:
            change = Applier(app.config).fire(session, job_id, trigger, by=who, reason=reason, data=data)
            job = session.get(Job, job_id)
            snapshot = {"attempts": job.attempts, "priority": job.priority, "hold_reason": job.hold_reason} \
                if job else {}
        except BaseException:
            session.rollback()
            raise
        if dry_run:
            session.rollback()
        else:
            session.commit()
    return change, snapshot


def report(job_id: int, change: Change, by: str, dry_run: bool, as_json: bool, extra: dict[str, Any],
           reason: str | None = None) -> None:
    if as_json:
        emit_json({"job": job_id, "trigger": change.trigger, "from": change.source, "to": change.dest, "by": by,
                   "reason": reason, "dry_run": dry_run, **extra})
        return
    verb = "would go" if dry_run else "is now"
    moved = f"{change.source} -> {change.dest}" if change.moved else f"stays {change.dest}"
    click.echo(f"job {job_id} {verb} {change.dest} ({change.trigger}: {moved}, by {by})"
               + ("; dry run: nothing changed" if dry_run else ""))


def _admin_command(trigger: str, help_text: str, needs_reason: bool = False) -> None:
    @cli.command(trigger, help=help_text)
    @click.argument("job_id", type=ROW_ID, metavar="JOB")
    @click.option("--reason", required=needs_reason, help="Why (kept in the job's history).")
    @actor_option
    @dry_run_option
    @json_option
    @pass_app
    def command(app: AppContext, job_id: int, reason: str | None, actor: str | None, dry_run: bool,
                as_json: bool) -> None:
        change, snap = run_admin_trigger(app, job_id, trigger, actor, reason, dry_run)
        report(job_id, change, actor_name(actor), dry_run, as_json, snap, reason)


def _register_admin_commands() -> None:
    """A command per admin trigger of the workflow file, named after it, with the file's description and the
    states it applies to as help; --reason is required where a guard asks for one. Rescue and priority take
    more than a job and are written out below."""
    wf = load()
    written = {wf.roles.rescue, wf.roles.rescue_failed, wf.roles.reprioritize}
    for trigger in dict.fromkeys(t.trigger for t in wf.transitions if t.admin and t.trigger not in written):
        taken = [t for t in wf.transitions if t.trigger == trigger]
        sources = [s for s in wf.states if any(s in t.source for t in taken)]
        needs_reason = any(g in REASON_GUARDS for t in taken for g in t.guards)
        help_text = f"{taken[0].description} From {', '.join(sources)}." + (" Needs --reason." if needs_reason else "")
        _admin_command(trigger, help_text, needs_reason)


#: Guards that refuse a trigger fired without a reason.
REASON_GUARDS = ("has_reason",)
_register_admin_commands()


# ignore_unknown_options: a negative PRIORITY ("-5") is not an option the parser does not know.
@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("job_id", type=ROW_ID, metavar="JOB")
@click.argument("priority", type=click.IntRange(-1000, 1000))
@reason_option
@actor_option
@dry_run_option
@json_option
@pass_app
def priority(app: AppContext, job_id: int, priority: int, reason: str | None, actor: str | None, dry_run: bool,
             as_json: bool) -> None:
    """Set a job's priority; it becomes sticky (dispatched before automatic priorities, never overridden)."""
    why = f"priority set to {priority}" + (f": {reason}" if reason else "")
    trigger = load().roles.reprioritize
    change, snap = run_admin_trigger(app, job_id, trigger, actor, why, dry_run, data={"priority": priority})
    report(job_id, change, actor_name(actor), dry_run, as_json, snap, why)


@cli.command()
@click.argument("job_id", type=ROW_ID, metavar="JOB")
@reason_option
@actor_option
@no_mail_option
@dry_run_option
@json_option
@pass_app
def rescue(app: AppContext, job_id: int, reason: str | None, actor: str | None, no_mail: bool, dry_run: bool,
           as_json: bool) -> None:
    """Reprocess a FAILEDTOUPLOAD job's kept upload (spool failed/ -> incoming/ -> accepted/).

    Accepted: the job becomes FULLYBUILT and its upload log is cleared. Refused again: it stays FAILEDTOUPLOAD
    with the new upload log, and the command exits 1. An upload moved back to incoming/ by hand is rescued from
    there. --no-mail sends no mail about it (the history says so); --dry-run runs every check and changes nothing.
    """
    who = actor_name(actor)
    done = rescue_upload(app.config, app.factory, job_id, who, reason, dry_run, mail=not no_mail)
    if as_json:
        emit_json({**done.to_dict(), "by": who})
    else:
        would = "would be" if dry_run else "was"
        if done.succeeded:
            click.echo(f"upload {done.leaf} {would} accepted: job {job_id} "
                       f"{'would go' if dry_run else 'is now'} {done.change.dest} "
                       f"({done.change.source} -> {done.change.dest}, by {who})")
            if done.upload.stored_at:
                click.echo(f"backtrace {'would be ' if dry_run else ''}stored in {done.upload.stored_at}")
        else:
            click.echo(f"upload {done.leaf} {would} refused again: job {job_id} stays {done.change.dest} "
                       f"with this upload log:")
            for line in done.upload.upload_log.splitlines():
                click.echo(f"  {line}")
        if dry_run:
            click.echo("dry run: nothing was moved, stored or changed")
    if not done.succeeded:
        raise SystemExit(1)


@cli.command("process-upload")
@click.option("--leaf", default=None, help="Process this upload only (a directory name in spool/incoming/).")
@reason_option
@actor_option
@no_mail_option
@dry_run_option
@json_option
@pass_app
def process_upload(app: AppContext, leaf: str | None, reason: str | None, actor: str | None, no_mail: bool,
                   dry_run: bool, as_json: bool) -> None:
    """Process the spool's incoming uploads now (what `serve` does on each round), as an admin.

    Each upload is checked, its backtrace stored, its job moved on (recorded in its history under your name),
    and it is moved to accepted/ or failed/. An upload for a FAILEDTOUPLOAD job (moved back from failed/ by
    hand) rescues the job as `retracer rescue` does. Exits 1 if an upload was refused or its job could not
    take it. --no-mail sends no mail about it (the history says so); --dry-run runs every check and reports;
    nothing is stored or moved.
    """
    who = actor_name(actor)
    admin = Admin(who, reason, mail=not no_mail)
    done = process_incoming(app.config, app.factory, Runner(app.config, app.factory).apply, leaf=leaf,
                            dry_run=dry_run, admin=admin)
    failed = [r for r, o in done if not r.accepted or (o is not None and o.status == "rejected")]
    if as_json:
        emit_json([{"leaf": r.leaf, "job": r.job_id, "accepted": r.accepted, "upload_log": r.upload_log,
                    "moved_to": str(r.moved_to) if r.moved_to else None, "dry_run": dry_run, "by": who,
                    "mail": not no_mail, "event": o.to_dict() if o else None} for r, o in done])
    else:
        if not done:
            click.echo("no uploads waiting in " + str(app.config.spool_dir / "incoming"))
        for result, outcome in done:
            _report_upload(result, outcome, who)
    if failed:
        raise SystemExit(1)


def _report_upload(result: UploadResult, outcome: Outcome | None, by: str) -> None:
    click.echo(result.summary())
    if not result.accepted:
        for line in result.upload_log.splitlines():
            click.echo(f"  {line}")
    if outcome is None:
        return
    if outcome.status == "applied" and outcome.dest:
        moved = f"{outcome.source} -> {outcome.dest}" if outcome.source != outcome.dest else f"stays {outcome.dest}"
        click.echo(f"  job {outcome.job_id} is now {outcome.dest} ({outcome.trigger}: {moved}, by {by})")
    elif outcome.status == "duplicate":
        click.echo(f"  job {outcome.job_id} unchanged: this upload was processed before (event {outcome.event_id})")
    else:
        click.echo(f"  job {outcome.job_id} unchanged: event {outcome.event_type} rejected: {outcome.reason}; "
                   f"it is kept in `retracer rejected`")
