"""Looking at jobs and creating them: submit, jobs, show, status, states."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import click
from sqlalchemy import func, select

from retracer import events as ev
from retracer.apply.applier import Applier, history_of
from retracer.cli import cli
from retracer.cli.context import AppContext, elapsed, emit_json, json_option, pass_app, table, when
from retracer.errors import InvalidEvent, JobNotFound, RetracerError
from retracer.service.chores.dispatch import queue_order
from retracer.store.models import STATES, History, Job, utcnow
from retracer.workflow import load, mermaid

JOB_FIELDS = ("id", "state", "crash_id", "creator", "package", "version", "architecture", "release", "core",
              "executable", "build_ids", "priority", "manual_priority", "attempts", "not_before",
              "dispatched_at", "last_heartbeat", "worker", "upload_leaf", "upload_log", "hold_reason",
              "last_error", "failure_pattern", "created_at", "started_at", "finished_at")


def job_dict(job: Job) -> dict[str, Any]:
    return {name: getattr(job, name) for name in JOB_FIELDS}


def history_dict(h: History) -> dict[str, Any]:
    return {"from": h.from_state, "to": h.to_state, "trigger": h.trigger, "by": h.actor,
            "event_id": h.event_id, "reason": h.reason, "at": h.at}


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
@json_option
@pass_app
def submit(app: AppContext, crash_id: str, creator: str, package: str, version_: str, architecture: str,
           release: str, core: str, executable: str, build_ids: tuple[str, ...], priority: int,
           as_json: bool) -> None:
    """Create a job from a crash (the same validation and apply path as a published crash.submitted)."""
    data: dict[str, Any] = {"crash_id": crash_id, "creator": creator, "package": package, "version": version_,
                            "architecture": architecture, "release": release, "core": core,
                            "executable": executable, "priority": priority}
    if build_ids:
        data["build_ids"] = list(build_ids)
    try:
        event = ev.make("crash.submitted", None, data, source="cli:submit")
    except InvalidEvent as exc:
        raise InvalidEvent(f"cannot submit: {exc}") from None
    with app.transaction() as session:
        (outcome,) = Applier(app.config).apply_batch(session, [event.to_dict()])
    if outcome.status != "applied":
        raise RetracerError(f"cannot submit: {outcome.reason}")
    emit_json({"id": outcome.job_id}) if as_json else click.echo(outcome.job_id)


@cli.command("jobs")
@click.option("--state", type=click.Choice(STATES), default=None, help="Only jobs in this state.")
@click.option("--limit", type=int, default=100, show_default=True)
@json_option
@pass_app
def jobs_cmd(app: AppContext, state: str | None, limit: int, as_json: bool) -> None:
    """List jobs, newest first."""
    with app.transaction() as session:
        stmt = select(Job).order_by(Job.id.desc()).limit(limit)
        if state:
            stmt = stmt.where(Job.state == state)
        found = list(session.scalars(stmt))
    if as_json:
        emit_json([job_dict(j) for j in found])
        return
    if not found:
        click.echo("no jobs" + (f" in {state}" if state else ""))
        return
    click.echo(table(["ID", "STATE", "CRASH", "PACKAGE", "VERSION", "ARCH", "PRIO", "TRIES"],
                     [[j.id, j.state, j.crash_id, j.package, j.version, j.architecture,
                       f"{j.priority}{'!' if j.manual_priority else ''}", j.attempts] for j in found]))


@cli.command()
@click.argument("job_id", type=int, metavar="JOB")
@json_option
@pass_app
def show(app: AppContext, job_id: int, as_json: bool) -> None:
    """Everything about one job, with its history."""
    with app.transaction() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFound(job_id)
        data = job_dict(job)
        data["history"] = [history_dict(h) for h in history_of(session, job_id)]
    if as_json:
        emit_json(data)
        return
    title = load().states[data["state"]].title
    click.echo(f"Job {job_id}: {data['package']} {data['version']} ({data['architecture']}, "
               f"{data['release']}), crash {data['crash_id']}")
    click.echo(f"  State:    {data['state']} ({title})")
    for label, key in [("Creator", "creator"), ("Core", "core"), ("Executable", "executable"),
                       ("Priority", "priority"), ("Attempts", "attempts"), ("Worker", "worker"),
                       ("Not before", "not_before"), ("Upload", "upload_leaf"), ("Hold reason", "hold_reason"),
                       ("Last error", "last_error"), ("Pattern", "failure_pattern")]:
        value = data[key]
        if key == "priority" and data["manual_priority"]:
            value = f"{value} (set by an admin, sticky)"
        if key == "not_before" and data["state"] != "PENDING":
            continue  # a retry time means nothing once the job has left the queue
        if value not in (None, "", []):
            click.echo(f"  {label + ':':<11} {when(value) if key == 'not_before' else value}")
    if data["build_ids"]:
        click.echo(f"  Build-ids:  {', '.join(data['build_ids'])}")
    if data["upload_log"]:
        click.echo("  Upload log:")
        for line in data["upload_log"].rstrip().splitlines():
            click.echo(f"    {line}")
    click.echo("History:")
    click.echo(table(["AT", "FROM", "TO", "TRIGGER", "BY", "REASON"],
                     [[when(h["at"]), h["from"] or "-", h["to"], h["trigger"], h["by"], h["reason"]]
                      for h in data["history"]]))


@cli.command()
@json_option
@pass_app
def status(app: AppContext, as_json: bool) -> None:
    """Counts per state, jobs retracing, the queue in dispatch order, recent failures, jobs on hold."""
    now = utcnow()
    with app.transaction() as session:
        counts = {s: 0 for s in STATES}
        counts.update({s: n for s, n in session.execute(select(Job.state, func.count()).group_by(Job.state))})
        retracing = list(session.scalars(select(Job).where(Job.state == "RETRACING").order_by(Job.started_at)))
        queue = queue_order(session, 20)
        failures = list(session.execute(
            select(History, Job.package).join(Job, Job.id == History.job_id)
            .where(History.trigger.in_(["retrace_failed", "heartbeat_lost", "upload_failed", "rescue_failed"]))
            .order_by(History.id.desc()).limit(10)).all())
        held = list(session.scalars(select(Job).where(Job.state == "ON_HOLD").order_by(Job.id)))
    report: dict[str, Any] = {
        "counts": counts,
        "retracing": [{"id": j.id, "package": j.package, "worker": j.worker,
                       "elapsed_s": int((now - j.started_at).total_seconds()) if j.started_at else None,
                       "last_heartbeat": j.last_heartbeat} for j in retracing],
        "queue": [{"id": j.id, "package": j.package, "priority": j.priority, "manual": j.manual_priority,
                   "not_before": j.not_before, "offered": j.dispatched_at is not None} for j in queue],
        "recent_failures": [{"job": h.job_id, "package": p, "trigger": h.trigger, "to": h.to_state,
                             "reason": h.reason, "at": h.at} for h, p in failures],
        "on_hold": [{"id": j.id, "package": j.package, "reason": j.hold_reason} for j in held],
    }
    if as_json:
        emit_json(report)
        return
    click.echo("Jobs per state: " + ", ".join(f"{s} {n}" for s, n in counts.items()))
    click.echo("\nRetracing:")
    click.echo(table(["JOB", "PACKAGE", "WORKER", "ELAPSED"],
                     [[r["id"], r["package"], r["worker"], elapsed(r["elapsed_s"])] for r in report["retracing"]])
               if retracing else "  none")
    click.echo("\nQueue (dispatch order):")
    if queue:
        click.echo(table(["JOB", "PACKAGE", "PRIORITY", "NOT BEFORE"],
                         [[q["id"], q["package"], f"{q['priority']}{' (manual)' if q['manual'] else ''}",
                           "now" if not q["not_before"] or q["not_before"] <= now
                           else f"in {elapsed((q['not_before'] - now) / timedelta(seconds=1))}"]
                          for q in report["queue"]]))
    else:
        click.echo("  empty")
    click.echo("\nRecent failures:")
    click.echo(table(["JOB", "PACKAGE", "WHAT", "NOW", "REASON"],
                     [[f["job"], f["package"], f["trigger"], f["to"], f["reason"]]
                      for f in report["recent_failures"]]) if failures else "  none")
    click.echo("\nOn hold:")
    click.echo(table(["JOB", "PACKAGE", "REASON"], [[h["id"], h["package"], h["reason"]] for h in report["on_hold"]])
               if held else "  none")


@cli.command()
@click.option("--diagram", is_flag=True, help="Print a Mermaid state diagram drawn from states/workflow.toml.")
@json_option
def states(diagram: bool, as_json: bool) -> None:
    """The workflow: states, what each means, and every transition (from states/workflow.toml)."""
    wf = load()
    if diagram:
        click.echo(mermaid(wf))
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
