"""Looking at jobs and creating them: submit, jobs, show, status, states."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import click
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from retracer import events as ev
from retracer import reports
from retracer.apply.applier import Applier
from retracer.cli import cli
from retracer.cli.context import (
    ROW_ID,
    ROW_LIMIT,
    AppContext,
    actor_name,
    actor_option,
    dry_run_option,
    elapsed,
    emit_json,
    json_option,
    pass_app,
    printable,
    reason_option,
    table,
    when,
)
from retracer.errors import InvalidEvent, RetracerError
from retracer.store.models import STATES, History, Job, utcnow
from retracer.worker.submission import UNREADABLE
from retracer.workflow import load, load_spec, mermaid


@cli.command()
@click.option("--crash-id", required=True, help="The crash report's id.")
@click.option("--creator", required=True, help="Email of the crash's creator (mailed on some states).")
@click.option("--package", required=True)
@click.option("--version", "version_", required=True, metavar="VERSION")
@click.option("--architecture", required=True)
@click.option("--release", required=True)
@click.option("--core", required=True, help="Where the core dump is.")
@click.option("--executable", required=True, help="Path of the crashed executable.")
@click.option("--build-id", "build_ids", multiple=True, help="A GNU build-id (hex); repeatable.")
@click.option("--priority", type=int, default=0, show_default=True)
@click.option("--allow-duplicate", is_flag=True,
              help="Make a job even if the crash already has one (by default that is refused).")
@reason_option
@actor_option
@dry_run_option
@json_option
@pass_app
def submit(app: AppContext, crash_id: str, creator: str, package: str, version_: str, architecture: str,
           release: str, core: str, executable: str, build_ids: tuple[str, ...], priority: int,
           allow_duplicate: bool, reason: str | None, actor: str | None, dry_run: bool, as_json: bool) -> None:
    """Create a job from a crash (the same validation and apply path as a published crash.submitted).

    The event's source is the admin (--as), so the job's history says who submitted it, with --reason.
    A crash that already has a job is refused, naming the job, unless --allow-duplicate. --dry-run checks
    everything and creates nothing.
    """
    data: dict[str, Any] = {"crash_id": crash_id, "creator": creator, "package": package, "version": version_,
                            "architecture": architecture, "release": release, "core": core,
                            "executable": executable, "priority": priority}
    if build_ids:
        data["build_ids"] = list(build_ids)
    who = actor_name(actor)
    try:
        event = ev.make("crash.submitted", None, data, source=who)
    except InvalidEvent as exc:
        raise InvalidEvent(f"cannot submit: {exc}") from None
    with app.factory() as session, session.begin():
        if not allow_duplicate:
            _refuse_duplicate(session, crash_id)
        (outcome,) = Applier(app.config).apply_batch(session, [event.to_dict()])
        if outcome.status == "applied" and reason:
            # An event carries no reason of its own: the admin's goes on the history row it wrote.
            session.execute(update(History).where(History.event_id == event.id,
                                                  History.job_id == outcome.job_id).values(reason=reason))
        if dry_run:
            session.rollback()
    if outcome.status != "applied":
        raise RetracerError(f"cannot submit: {outcome.reason}")
    if as_json:
        emit_json({"id": None, "dry_run": True} if dry_run else {"id": outcome.job_id})
    elif dry_run:
        click.echo(f"dry run: crash {crash_id} would become a new {outcome.dest} job; nothing was created")
    else:
        click.echo(outcome.job_id)


def _refuse_duplicate(session: Session, crash_id: str) -> None:
    found = session.execute(select(Job.id, Job.state).where(Job.crash_id == crash_id).order_by(Job.id)).all()
    if found:
        jobs = ", ".join(f"job {i} ({s})" for i, s in found)
        first = found[-1][0]
        raise RetracerError(
            f"cannot submit: crash {crash_id} already has {jobs}; see `retracer show {first}` (`retracer retry "
            f"{first}` sends a failed or held job back to the queue), or pass --allow-duplicate to make another "
            f"job for the same crash")


@cli.command("jobs")
@click.option("--state", type=click.Choice(STATES), default=None, help="Only jobs in this state.")
@click.option("--duplicates-of", type=ROW_ID, default=None, metavar="JOB",
              help="Only the jobs recorded as duplicates of JOB (the same crash signature).")
@click.option("--limit", type=ROW_LIMIT, default=100, show_default=True)
@json_option
@pass_app
def jobs_cmd(app: AppContext, state: str | None, duplicates_of: int | None, limit: int, as_json: bool) -> None:
    """List jobs, newest first."""
    with app.transaction() as session:
        found = reports.jobs(session, state, limit, duplicates_of)
    if as_json:
        emit_json(found)
        return
    if not found:
        click.echo("no jobs" + (f" in {state}" if state else "")
                   + (f" recorded as duplicates of job {duplicates_of}" if duplicates_of else ""))
        return
    click.echo(table(["ID", "STATE", "CRASH", "PACKAGE", "VERSION", "ARCH", "PRIO", "TRIES"],
                     [[j["id"], j["state"], j["crash_id"], j["package"], j["version"], j["architecture"],
                       f"{j['priority']}{'!' if j['manual_priority'] else ''}", j["attempts"]] for j in found]))


@cli.command()
@click.argument("job_id", type=ROW_ID, metavar="JOB")
@click.option("--backtrace", is_flag=True, help="Print the job's stored backtrace instead (--json: {\"job\", "
              "\"backtrace\"}); exit 1 if it has none yet.")
@json_option
@pass_app
def show(app: AppContext, job_id: int, backtrace: bool, as_json: bool) -> None:
    """Everything about one job, with its history."""
    with app.transaction() as session:
        data = reports.job_detail(session, job_id)
        stored = session.get(Job, job_id)
        result = stored.result if stored is not None else None
    if backtrace:
        _show_backtrace(job_id, data["state"], result, as_json)
        return
    if as_json:
        emit_json(data)
        return
    spec = load_spec()
    title = spec.states[data["state"]].title
    click.echo(printable(f"Job {job_id}: {data['package']} {data['version']} ({data['architecture']}, "
                         f"{data['release']}), crash {data['crash_id']}"))
    click.echo(f"  State:    {data['state']} ({title})")
    for label, key in [("Creator", "creator"), ("Core", "core"), ("Executable", "executable"),
                       ("Priority", "priority"), ("Attempts", "attempts"), ("Worker", "worker"),
                       ("Not before", "not_before"), ("Upload", "upload_leaf"), ("Hold reason", "hold_reason"),
                       ("Last error", "last_error"), ("Pattern", "failure_pattern"), ("Signature", "signature"),
                       ("Duplicate", "duplicate_of")]:
        value = data[key]
        if key == "priority" and data["manual_priority"]:
            value = f"{value} (set by an admin, sticky)"
        if key == "not_before" and data["state"] != spec.roles.queue:
            continue  # a retry time means nothing once the job has left the queue
        if key == "core" and data["core_check"] == UNREADABLE:
            value = f"{value} (not readable where it was submitted: build-ids as submitted)"
        if key == "duplicate_of" and value is not None:
            value = f"of job {value} (the same crash signature)"
        if value not in (None, "", []):
            shown = when(value) if key == "not_before" else str(value)
            # A worker's error is several lines: they stay lines, under the first; any other field is one.
            shown = printable(shown, lines=True).replace("\n", "\n" + " " * 14) if key == "last_error" else (
                printable(shown))
            click.echo(f"  {label + ':':<11} {shown}")
    if data["build_ids"]:
        click.echo(f"  Build-ids:  {printable(', '.join(data['build_ids']))}")
    if data["upload_log"]:
        click.echo("  Upload log:")
        for line in printable(data["upload_log"].rstrip(), lines=True).splitlines():
            click.echo(f"    {line}")
    click.echo("History:")
    click.echo(table(["AT", "EVENT", "FROM", "TO", "TRIGGER", "BY", "REASON"],
                     [[when(h["at"]), h["event_id"], h["from"] or "-", h["to"], h["trigger"], h["by"], h["reason"]]
                      for h in data["history"]]))


def _show_backtrace(job_id: int, state: str, result: str | None, as_json: bool) -> None:
    if not result:
        raise RetracerError(f"job {job_id} has no backtrace yet (it is {state}: a job has one once its upload "
                            f"was accepted); `retracer show {job_id}` tells where it is")
    if as_json:
        emit_json({"job": job_id, "backtrace": result})
    else:
        click.echo(printable(result.rstrip("\n"), lines=True))


@cli.command()
@json_option
@pass_app
def status(app: AppContext, as_json: bool) -> None:
    """Counts per state, jobs retracing, the queue in dispatch order, recent failures, jobs on hold."""
    now = utcnow()
    with app.transaction() as session:
        report = reports.status(session, now)
    if as_json:
        emit_json(report)
        return
    click.echo("Jobs per state: " + ", ".join(f"{s} {n}" for s, n in report["counts"].items()))
    click.echo("\nRetracing:")
    click.echo(table(["JOB", "PACKAGE", "WORKER", "ELAPSED"],
                     [[r["id"], r["package"], r["worker"], elapsed(r["elapsed_s"])] for r in report["retracing"]])
               if report["retracing"] else "  none")
    click.echo("\nQueue (dispatch order):")
    if report["queue"]:
        click.echo(table(["JOB", "PACKAGE", "PRIORITY", "OFFERED"],
                         [[q["id"], q["package"], f"{q['priority']}{' (manual)' if q['manual'] else ''}",
                           "yes" if q["offered"] else "no"] for q in report["queue"]]))
        _more(len(report["queue"]), report["queue_total"], "queued jobs", "--state PENDING")
    else:
        click.echo("  empty")
    click.echo("\nWaiting for their retry time:")
    if report["waiting"]:
        click.echo(table(["JOB", "PACKAGE", "PRIORITY", "FAILED", "RETRY"],
                         [[w["id"], w["package"], f"{w['priority']}{' (manual)' if w['manual'] else ''}",
                           w["attempts"], f"in {elapsed((w['not_before'] - now) / timedelta(seconds=1))}"]
                          for w in report["waiting"]]))
        _more(len(report["waiting"]), report["waiting_total"], "waiting jobs", "--state PENDING")
    else:
        click.echo("  none")
    click.echo("\nRecent failures:")
    click.echo(table(["JOB", "PACKAGE", "WHAT", "NOW", "REASON"],
                     [[f["job"], f["package"], f["trigger"], f["to"], f["reason"]]
                      for f in report["recent_failures"]]) if report["recent_failures"] else "  none")
    click.echo("\nOn hold:")
    click.echo(table(["JOB", "PACKAGE", "REASON"], [[h["id"], h["package"], h["reason"]] for h in report["on_hold"]])
               if report["on_hold"] else "  none")
    _more(len(report["on_hold"]), report["on_hold_total"], "jobs on hold", "--state ON_HOLD")


def _more(shown: int, total: int, what: str, filter_: str) -> None:
    if total > shown:
        click.echo(f"  ... and {total - shown} more {what} (all {total}: `retracer status --json`, "
                   f"`retracer jobs {filter_}`)")


@cli.command()
@click.option("--diagram", is_flag=True, help="Print a Mermaid state diagram drawn from states/workflow.toml.")
@json_option
def states(diagram: bool, as_json: bool) -> None:
    """The workflow: states, what each means, and every transition (from states/workflow.toml)."""
    wf = load()
    if diagram:
        emit_json({"mermaid": mermaid(wf)}) if as_json else click.echo(mermaid(wf))
        return
    if as_json:
        emit_json({
            "initial": wf.initial,
            "states": [{"name": s.name, "title": s.title, "description": s.description, "final": s.final,
                        "notify": list(s.notify)} for s in wf.states.values()],
            "transitions": [{"trigger": t.trigger, "source": list(t.source), "dest": t.dest,
                             "guards": list(t.guards), "event": t.event, "admin": t.admin,
                             "description": t.description} for t in wf.transitions],
        })
        return
    click.echo(table(["STATE", "TITLE", "MAILS"],
                     [[s.name, s.title, ", ".join(s.notify) or "-"] for s in wf.states.values()]))
    click.echo("")
    click.echo(table(["TRIGGER", "FROM", "TO", "GUARDS", "FIRED BY"],
                     [[t.trigger, ", ".join(t.source) or "(new job)", t.dest if t.dest != "=" else "(same)",
                       ", ".join(t.guards) or "-", t.event or ("admin" if t.admin else "service")]
                      for t in wf.transitions]))
