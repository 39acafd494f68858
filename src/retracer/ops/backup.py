"""Backups of the database (SQLite's online backup, PostgreSQL's pg_dump), verified before they are kept, and
the check of a live database that a restore ends with."""

from __future__ import annotations

import errno
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import DBAPIError

from retracer import store
from retracer.errors import DatabaseNotReady, RetracerError
from retracer.store.engine import sqlite_file

#: What a backup file is named: only files matching it are ever removed by the rotation.
NAME = re.compile(r"^retracer-\d{8}T\d{6}Z\.(sqlite3|pgdump)$")
#: Pages copied per step of SQLite's backup: small steps let writers in between and report progress.
PAGES_PER_STEP = 1024
PG_TIMEOUT_S = 6 * 3600

#: Called with (done, total) as a backup advances; total is None when it is not known (pg_dump).
Progress = Callable[[int, int | None], None]


class BackupError(RetracerError):
    """Raised when a backup cannot be made or does not pass its verification; no partial file is left."""


@dataclass(frozen=True)
class BackupResult:
    database: str
    backup: Path
    bytes: int
    seconds: float
    verified: bool
    removed: list[Path] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"database": self.database, "backup": str(self.backup), "bytes": self.bytes,
                "seconds": round(self.seconds, 3), "verified": self.verified,
                "removed": [str(p) for p in self.removed]}


@dataclass
class CheckResult:
    database: str
    problems: list[str] = field(default_factory=list)
    revision: str | None = None
    tables: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"database": self.database, "ok": self.ok, "problems": self.problems, "revision": self.revision,
                "tables": self.tables}


def shown(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def backup_name(now: datetime, suffix: str) -> str:
    return f"retracer-{now.astimezone(UTC).strftime('%Y%m%dT%H%M%SZ')}.{suffix}"


def backup(url: str, dest: Path, keep: int, progress: Progress | None = None,
           now: datetime | None = None) -> BackupResult:
    """Back the database up into ``dest``, verify the copy, then keep the newest ``keep`` backups there."""
    _check_dest(dest)
    is_sqlite = url.startswith("sqlite")
    if not is_sqlite and not url.startswith("postgresql"):
        raise BackupError(f"cannot back up {shown(url)}: only SQLite and PostgreSQL databases are supported")
    suffix = "sqlite3" if is_sqlite else "pgdump"
    final = _free_name(dest, suffix, now)
    started = time.monotonic()
    # A private directory (mode 0700, a name of its own) for the unverified copy: nobody else can plant a
    # symbolic link where the copy is written, and a failed copy is removed with it.
    try:
        work = Path(tempfile.mkdtemp(prefix=".retracer-backup-", dir=dest))
    except OSError as exc:
        # access() says yes to root whatever the mode; a read-only or full disk shows only here.
        raise BackupError(f"cannot write in the backup destination {dest} ({exc.strerror}): fix its "
                          f"permissions or free space, or give another directory") from None
    try:
        partial = work / final.name
        if is_sqlite:
            _sqlite_backup(url, partial, progress)
        else:
            _pg_backup(url, partial, progress)
        # Only the owner may read a backup, whatever the umask: it holds every job and address.
        partial.chmod(0o600)
        _fsync(partial)
        _publish(partial, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _fsync(dest)
    removed = rotate(dest, suffix, keep, protect=final)
    return BackupResult(shown(url), final, final.stat().st_size, time.monotonic() - started, True, removed)


def _free_name(dest: Path, suffix: str, now: datetime | None) -> Path:
    """The backup's name; a backup made in the same second as the last one waits for the next second (the
    name has whole seconds, and an existing file is never replaced)."""
    for _ in range(3):
        final = dest / backup_name(now or datetime.now(UTC), suffix)
        if not os.path.lexists(final):
            return final
        if now is not None:
            break
        time.sleep(1.05 - time.time() % 1)
    raise BackupError(f"{final} already exists: nothing was written; move it away or run the command again")


def _check_dest(dest: Path) -> None:
    if not dest.is_dir():
        what = "does not exist" if not os.path.lexists(dest) else "is not a directory"
        raise BackupError(f"the backup destination {dest} {what}: give an existing directory (create it with "
                          f"`mkdir -p {dest}`)")
    if not os.access(dest, os.W_OK | os.X_OK):
        raise BackupError(f"the backup destination {dest} is not writable by this user: fix its permissions or "
                          f"give another directory")


def _publish(partial: Path, final: Path) -> None:
    """Give the verified copy its name, never replacing a file (or following a link) already there."""
    try:
        os.link(partial, final)
    except FileExistsError:
        raise BackupError(f"{final} appeared while the backup ran: nothing was replaced; run the command "
                          f"again") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise BackupError(f"cannot write {final}: {exc.strerror}") from None
        # A file system without hard links: O_EXCL still refuses a name that exists, a symbolic link too.
        fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out, open(partial, "rb") as src:
            shutil.copyfileobj(src, out)
            out.flush()
            os.fsync(out.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sqlite_source(url: str) -> Path:
    path = sqlite_file(url)
    if path is None:
        raise BackupError(f"cannot back up {shown(url)}: an in-memory database has nothing to keep")
    if not path.is_file():
        raise BackupError(f"there is no database at {path}: `retracer check-config` shows the database in use")
    return path


def _sqlite_backup(url: str, partial: Path, progress: Progress | None) -> None:
    source = _sqlite_source(url)
    # mode=rw: a database that vanished is an error, never a new empty file to back up.
    src = sqlite3.connect(f"file:{source}?mode=rw", uri=True, timeout=30)
    try:
        dst = sqlite3.connect(partial)
        try:
            def step(status: int, remaining: int, total: int) -> None:
                if progress is not None:
                    progress(total - remaining, total)

            src.backup(dst, pages=PAGES_PER_STEP, progress=step)
            # The copy is one self-contained file (the source's WAL mode would want -wal/-shm files with it).
            dst.execute("PRAGMA journal_mode=DELETE")
        finally:
            dst.close()
    except sqlite3.Error as exc:
        raise BackupError(f"SQLite could not back up {source}: {exc}; nothing was kept") from None
    finally:
        src.close()
    problems = sqlite_integrity(partial)
    if problems:
        raise BackupError(f"the copy of {source} failed PRAGMA integrity_check ({'; '.join(problems[:5])}); it "
                          f"was removed. Run `retracer db check`: the database itself may be damaged")


def sqlite_integrity(path: Path, foreign_keys: bool = False) -> list[str]:
    """What PRAGMA integrity_check (and foreign_key_check) find wrong in the SQLite file ``path``."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=30)
    except sqlite3.Error as exc:
        return [f"cannot open {path}: {exc}"]
    try:
        rows = [str(r[0]) for r in conn.execute("PRAGMA integrity_check")]
        problems = [] if rows == ["ok"] else [f"integrity_check: {r}" for r in rows]
        if foreign_keys and not problems:
            problems += [f"foreign_key_check: table {t} row {rowid} refers to a missing row of {parent}"
                         for t, rowid, parent, _ in conn.execute("PRAGMA foreign_key_check")]
        return problems
    except sqlite3.Error as exc:
        return [f"integrity_check could not read {path}: {exc}"]
    finally:
        conn.close()


def pg_args(url: str) -> tuple[list[str], dict[str, str]]:
    """Connection options for pg_dump/pg_restore and their environment: the password only in PGPASSWORD
    (a command line is visible to every user of the machine)."""
    parsed: URL = make_url(url)
    args = []
    if parsed.host:
        args += ["--host", parsed.host]
    if parsed.port:
        args += ["--port", str(parsed.port)]
    if parsed.username:
        args += ["--username", parsed.username]
    env = dict(os.environ)
    if parsed.password is not None:
        env["PGPASSWORD"] = str(parsed.password)
    # What the URL's query gives libpq (a socket directory as host, TLS): the same libpq settings as env.
    for key, value in parsed.query.items():
        name = _LIBPQ_ENV.get(key)
        if name is not None and isinstance(value, str):
            env[name] = value
    database = parsed.database or "postgres"
    # pg_dump reads a --dbname holding "=" as a connection string: such a name is passed quoted, as one.
    if "=" in database or "://" in database:
        database = "dbname='" + database.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return [*args, "--dbname", database], env


_LIBPQ_ENV = {"host": "PGHOST", "port": "PGPORT", "sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT",
              "sslcert": "PGSSLCERT", "sslkey": "PGSSLKEY", "application_name": "PGAPPNAME"}


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise BackupError(f"{name} is not installed: install the PostgreSQL client tools (Debian/Ubuntu: "
                          f"`apt-get install postgresql-client`, of the server's major version or newer)")
    return found


def _pg_backup(url: str, partial: Path, progress: Progress | None) -> None:
    dump, restore = _tool("pg_dump"), _tool("pg_restore")
    args, env = pg_args(url)
    # --no-password: a missing password fails at once instead of waiting for someone to type it.
    _run([dump, "--format=custom", "--no-password", "--file", str(partial), *args], env, "pg_dump")
    if progress is not None:
        size = partial.stat().st_size
        progress(size, size)
    _run([restore, "--list", str(partial)], env, "pg_restore --list (the dump's verification)")


def _run(cmd: list[str], env: dict[str, str], what: str) -> None:
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=PG_TIMEOUT_S,  # noqa: S603
                              check=False)
    except subprocess.TimeoutExpired:
        raise BackupError(f"{what} did not finish within {PG_TIMEOUT_S} s; nothing was kept") from None
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip() or "no message").splitlines()[-1]
        raise BackupError(f"{what} failed (exit {proc.returncode}: {detail}); nothing was kept. Check the "
                          f"[database] url and that the server is up")


def rotate(dest: Path, suffix: str, keep: int, protect: Path | None = None) -> list[Path]:
    """Remove all but the newest ``keep`` backups of this kind in ``dest``: regular files named as a backup
    only, oldest first (the UTC time in the name sorts as text). ``protect``, the backup just made, counts
    among those kept even if a clock set back made it sort older."""
    ours = sorted(p for p in dest.iterdir()
                  if NAME.match(p.name) and p.name.endswith(f".{suffix}") and p.is_file() and not p.is_symlink()
                  and p != protect)
    keep -= 1 if protect is not None and protect.is_file() else 0
    removed = []
    for old in ours[:max(len(ours) - keep, 0)]:
        old.unlink()
        removed.append(old)
    return removed


def check(url: str) -> CheckResult:
    """The live database's health: SQLite's integrity and foreign keys, the schema at the shipped revision,
    and every table readable (its rows counted)."""
    result = CheckResult(shown(url))
    path = sqlite_file(url)
    if url.startswith("sqlite"):
        if path is None or not path.is_file():
            result.problems.append(f"there is no database at {path or url}: `retracer check-config` shows "
                                   f"the database in use")
            return result
        result.problems += sqlite_integrity(path, foreign_keys=True)
        if result.problems:
            return result
    engine = store.make_engine(url)
    try:
        _check_schema_and_tables(engine, result)
    finally:
        engine.dispose()
    return result


def _check_schema_and_tables(engine: Engine, result: CheckResult) -> None:
    from alembic.runtime.migration import MigrationContext

    from retracer.store.models import Base

    try:
        store.check_schema(engine)
    except DatabaseNotReady as exc:
        result.problems.append(str(exc))
        return
    try:
        with engine.connect() as conn:
            result.revision = MigrationContext.configure(conn).get_current_revision()
            for table in Base.metadata.sorted_tables:
                result.tables[table.name] = int(conn.execute(select(func.count()).select_from(table)).scalar_one())
    except DBAPIError as exc:
        first = str(exc.orig or exc).strip().splitlines()[0]
        result.problems.append(f"cannot read the tables: {first}")
