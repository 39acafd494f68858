"""The web app: `retracer web`."""

from __future__ import annotations

import click

from retracer import logs
from retracer.cli import cli
from retracer.cli.context import AppContext, pass_app


@cli.command()
@click.option("--host", default=None, help="Address to listen on (default: [web] host, loopback).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Port (default: [web] port).")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@pass_app
def web(app: AppContext, host: str | None, port: int | None, log_level: str) -> None:
    """Serve the status pages, the JSON API (/api/...), /metrics and the symbol routes over HTTP.

    Read-only: nothing it serves changes a job. Binds to [web] host (loopback by default)."""
    import uvicorn

    from retracer.web.app import create_app

    logs.setup(log_level)
    asgi = create_app(app.config, app.factory)
    uvicorn.run(asgi, host=host or app.config["web"]["host"], port=port or app.config["web"]["port"],
                log_level=log_level.lower(), access_log=False, server_header=False)
