"""The web app: `retracer web`."""

from __future__ import annotations

import logging
import signal
import socket

import click

from retracer import logs, store
from retracer.cli import cli
from retracer.cli.context import AppContext, pass_app
from retracer.errors import RetracerError

log = logging.getLogger("retracer.web")


@cli.command()
@click.option("--host", default=None, help="Address to listen on (default: [web] host, loopback).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Port (default: [web] port).")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@pass_app
def web(app: AppContext, host: str | None, port: int | None, log_level: str) -> None:
    """Serve the status pages, the JSON API (/api/...), /metrics and the symbol routes over HTTP.

    Read-only: nothing it serves changes a job. Binds to [web] host (loopback by default). Logs one line
    saying where it listens; SIGTERM or Ctrl-C finishes the requests in hand and exits 0."""
    import uvicorn

    from retracer.web.app import create_app

    logs.setup(log_level)
    config = app.config
    app.factory  # noqa: B018  (checks the schema first: an old or missing one is a one-line error)
    # Its own engine: read-only, and on SQLite a deferred BEGIN, so that a page being read never holds up
    # serve's writes (every other command's transactions start with BEGIN IMMEDIATE).
    engine = store.make_engine(config.database_url, read_only=True)
    host = host or config["web"]["host"]
    port = port or config["web"]["port"]
    sock = listen(host, port)
    server = uvicorn.Server(uvicorn.Config(
        create_app(config, store.session_factory(engine)), log_config=None, access_log=False,
        server_header=False, lifespan="off", log_level="debug" if log_level == "DEBUG" else "warning"))
    _log_uvicorn_as_json()
    # uvicorn re-raises the signal that stopped it once it is done: with these handlers that is a no-op,
    # and the command ends with status 0 instead of being killed by its own SIGTERM.
    stops: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, frame: stops.append(number))
    log.info("listening on %s", url(sock), extra={"url": url(sock)})
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        engine.dispose()
    log.info("stopped", extra={"signal": signal.Signals(stops[0]).name if stops else None})


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port; RetracerError saying what to do when that address cannot be had."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise RetracerError(f"cannot listen on {host}:{port}: {host!r} is not an address of this machine "
                            f"({exc.strerror}); give an address with --host or [web] host") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait for TIME_WAIT
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        hint = ("another process is listening there: stop it, or choose another port with --port or "
                "[web] port") if exc.errno == 98 else "choose another address with --host or [web] host"
        raise RetracerError(f"cannot listen on {host}:{port}: {exc.strerror}; {hint}") from None
    sock.set_inheritable(True)
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def _log_uvicorn_as_json() -> None:
    """uvicorn's own warnings and errors (an exception in a route, with its traceback) as retracer's JSON
    lines; its start-up chatter stays out (the one "listening" line says it all)."""
    ours = logging.getLogger("retracer").handlers
    for name in ("uvicorn", "uvicorn.error", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        logger.handlers = list(ours)
        logger.propagate = False
