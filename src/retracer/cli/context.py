"""What every subcommand shares: the configuration, the database, output helpers."""

from __future__ import annotations

import getpass
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar

import click
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from retracer import config as cfg
from retracer import reports, store
from retracer.errors import DatabaseNotReady
from retracer.store.engine import missing_database


class AppContext:
    """Loads the configuration and opens the database only when a command needs them."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._config: cfg.Config | None = None
        self._engine: Engine | None = None
        self._factory: sessionmaker[Session] | None = None

    @property
    def config(self) -> cfg.Config:
        if self._config is None:
            self._config = cfg.load(self.config_path)
        return self._config

    @property
    def engine(self) -> Engine:
        """The configured database; DatabaseNotReady, creating nothing, when its SQLite file does not exist
        (connecting would leave an empty database behind, and a typo in the data directory would go unseen)."""
        if self._engine is None:
            url = self.config.database_url
            missing = missing_database(url)
            if missing is not None:
                raise DatabaseNotReady(
                    f"there is no database at {missing}: create it with `retracer db upgrade` (if this is not "
                    f"where it should be, `retracer check-config` shows the data directory and database URL "
                    f"in use)")
            self._engine = store.make_engine(url)
        return self._engine

    @property
    def factory(self) -> sessionmaker[Session]:
        """Sessions on a database whose schema is current (else DatabaseNotReady says to upgrade)."""
        if self._factory is None:
            store.check_schema(self.engine)
            self._factory = store.session_factory(self.engine)
        return self._factory

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with store.transaction(self.factory) as session:
            yield session

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


pass_app = click.make_pass_decorator(AppContext)

#: Set in the context's shared meta once a command's --json is parsed: its errors are printed as JSON too.
JSON_META = "retracer.json"


def _remember_json(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta[JSON_META] = True
    return value


json_option = click.option("--json", "as_json", is_flag=True, callback=_remember_json,
                           help="Print JSON instead of text (errors too: {\"error\": ..., \"exit_code\": N}).")
dry_run_option = click.option("--dry-run", is_flag=True, help="Check and report; change nothing.")
#: The longest --as: "admin:" and the name is a submitted event's source, which may be 200 characters long.
MAX_ACTOR_NAME = 200 - len("admin:")


def _actor(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    if not value.strip() or len(value) > MAX_ACTOR_NAME or _CONTROL.search(value):
        raise click.BadParameter(f"must be a name of 1 to {MAX_ACTOR_NAME} characters without control "
                                 f"characters (it is kept in the record of what was done)")
    return value


actor_option = click.option("--as", "actor", default=None, metavar="NAME", callback=_actor,
                            help="Who is acting, for the record (default: your login name).")
reason_option = click.option("--reason", default=None, help="Why (kept with the record of what was done).")


F = TypeVar("F", bound=Callable[..., Any])


def lock_options(default_name: str) -> Callable[[F], F]:
    """--lock [FILE] (``lock_path``; default ``<data_dir>/default_name``) and --break-stale-lock, for the
    commands cron runs (retracer.ops.lock)."""
    lock = click.option("--lock", "lock_path", is_flag=False, flag_value="", default=None, metavar="[FILE]",
                        help=f"Run only if no other run holds FILE (default: <data_dir>/{default_name}); if one "
                             f"does, say so and exit 0.")
    stale = click.option("--break-stale-lock", is_flag=True,
                         help="With --lock: remove a lock left by a run that crashed, and go on.")
    return lambda command: lock(stale(command))


#: The largest id a row can have (ids are 32-bit INTEGER columns on PostgreSQL) and the largest --limit a
#: query is given: a bigger number on the command line is a usage error, never a driver's overflow.
MAX_ID = 2**31 - 1
ROW_ID = click.IntRange(1, MAX_ID)
ROW_LIMIT = click.IntRange(1, MAX_ID)


def actor_name(given: str | None) -> str:
    return f"admin:{given or getpass.getuser()}"


def emit_json(value: Any) -> None:
    click.echo(reports.to_json(value))


def when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def elapsed(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


#: What a terminal would act on instead of showing: C0 controls (ESC starts a sequence that can move the
#: cursor, retitle the window or rewrite what was printed), DEL, and C1 controls (0x9b is a one-byte CSI).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: The same, keeping newline and tab, for a field printed over several lines.
_CONTROL_IN_LINES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def printable(value: object, lines: bool = False) -> str:
    """``value`` as text safe to print on a terminal: every control character written as a visible escape
    (``\\x1b``, ``\\r``, ``\\x9b``); with ``lines``, newlines and tabs are kept (a multi-line field)."""
    pattern = _CONTROL_IN_LINES if lines else _CONTROL
    return pattern.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}"), str(value))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain left-aligned table; long cells are kept whole (this is for terminals and doctests), control
    characters in them escaped (a cell is one line)."""
    cells = [[printable(h) for h in headers]] + [["-" if c is None else printable(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)
