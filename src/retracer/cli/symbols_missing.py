"""`retracer symbols missing`: the build-ids jobs wait for, the most-waited-for first (retrace-server's
"Missing build-ids" statistics), with how many jobs and which; only jobs still waiting count."""

from __future__ import annotations

import click

from retracer import reports
from retracer.cli.context import AppContext, emit_json, json_option, pass_app, table, when
from retracer.cli.symbols import symbols
from retracer.symbols.missing import MAX_LIMIT

#: How many job ids a row of the plain table shows (--json gives up to the listing's own bound).
SHOWN_JOBS = 10


@symbols.command("missing")
@click.option("--limit", type=click.IntRange(1, MAX_LIMIT), default=50, show_default=True,
              help="How many build-ids to list.")
@json_option
@pass_app
def missing(app: AppContext, limit: int, as_json: bool) -> None:
    """The build-ids whose missing symbols failed jobs that still wait (queued for a retry, or held): each
    with its module, how many jobs wait for it and which. Import their debug packages (`retracer symbols
    import`) and the jobs waiting only for them are retried at once."""
    with app.transaction() as session:
        rows = reports.missing_symbols(session, limit)
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("no job waits for missing symbols")
        return
    click.echo(table(["BUILD-ID", "MODULE", "JOBS", "SINCE", "JOB IDS"], [
        [r["build_id"], r["module"], r["waiting"], when(r["since"]),
         " ".join(str(j) for j in r["jobs"][:SHOWN_JOBS]) + (" ..." if r["waiting"] > SHOWN_JOBS else "")]
        for r in rows]))
