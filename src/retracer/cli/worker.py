"""The worker: `retracer worker`."""

from __future__ import annotations

import click

from retracer import logs
from retracer.cli import cli
from retracer.cli.context import AppContext, emit_json, json_option, lock_options, pass_app, printable
from retracer.ops import crashmail, lock
from retracer.worker.loop import Summary, Worker


@cli.command()
@click.option("--once", is_flag=True,
              help="Handle one work request and exit (exit 0 with \"no work requested\" if none is waiting).")
@click.option("--concurrency", type=click.IntRange(1, 64), default=None, metavar="N",
              help="Attempts side by side (default: [worker] concurrency).")
@lock_options("retracer-worker.lock")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@json_option
@pass_app
def worker(app: AppContext, once: bool, concurrency: int | None, lock_path: str | None, break_stale_lock: bool,
           log_level: str, as_json: bool) -> None:
    """Take work requests and retrace them: each ends as an upload in the spool or a retrace.failed.

    Embedded mode: requests come from the database's outbox (polled every [service] poll_interval_s). With a
    broker: from the work queue, each acknowledged only once its outcome is durable. SIGTERM or SIGINT: take
    nothing more, abandon the attempts in hand (each reported as a transient failure) and exit 0; a second
    signal exits at once. Exits 1 when the worker itself cannot go on (bus, database, spool). Logs are JSON
    lines on stderr; --json prints a summary of the attempts on standard output. A crash (a bug) prints its
    traceback, mails [mail] maintainers through the outbox and exits 1, leaving the --lock behind.
    """
    logs.setup(log_level)
    # Imported here: prometheus_client costs every other command ~15 ms of start-up.
    from retracer.worker.metrics import expose_worker

    with crashmail.reported(app, "worker"):
        # With a broker a worker needs no database (its host may hold broker credentials alone).
        factory = app.factory if app.config.embedded_bus else None
        runner = Worker(app.config, factory, concurrency=concurrency, once=once)
        try:
            with runner.signals(), lock.held(lock.resolve(lock_path, app.config.data_dir, "retracer-worker.lock"),
                                              break_stale_lock):
                runner.metrics, exporter = expose_worker(app.config, runner.concurrency)  # [worker] metrics_port
                try:
                    summary = runner.run()
                finally:
                    if exporter is not None:
                        exporter.close()
        except lock.Busy as busy:
            click.echo(str(busy))
            return
    if as_json:
        emit_json(summary.as_dict())
    else:
        click.echo(_describe(summary))


def _describe(summary: Summary) -> str:
    if summary.once and not summary.attempts:
        return "no work requested" + (f" ({summary.malformed} malformed request(s) dropped)"
                                      if summary.malformed else "")
    lines = []
    for r in summary.attempts:
        if r.outcome == "retraced":
            lines.append(f"job {r.request.job} attempt {r.request.attempt}: retraced, upload {r.upload}")
        else:
            first = (r.error or "").splitlines()[0] if r.error else ""
            kind = "transient" if r.transient else "permanent"
            lines.append(printable(f"job {r.request.job} attempt {r.request.attempt}: failed ({kind}): {first}"))
    if not summary.once or summary.stopped_by:
        stopped = f" (stopped by {summary.stopped_by})" if summary.stopped_by else ""
        lines.append(f"worker {printable(summary.worker)}: {summary.count('retraced')} retraced, "
                     f"{summary.count('failed')} failed, {summary.malformed} malformed{stopped}")
    return "\n".join(lines)
