"""`retracer db backup` and `retracer db check`: a backup restored by the README's procedure gives back the same
instance, rotation removes only old backups, and every failure is a clear error."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from retracer.ops import backup as ops
from tests.unit.clirun import Retracer

from ..conftest import PG_ADMIN_URL, require_server


def retracer(data_dir: Path, url: str) -> Retracer:
    return Retracer({"RETRACER__SERVICE__DATA_DIR": str(data_dir), "RETRACER__DATABASE__URL": url,
                     "RETRACER__MAIL__ADMINS": "celso@example.com",
                     # Jobs are started with events directly, without serve's offers.
                     "RETRACER__SERVICE__START_REQUIRES_OFFER": "false"})


@pytest.fixture
def rt(tmp_path: Path, db_url: str) -> Iterator[Retracer]:
    instance = retracer(tmp_path / "data", db_url)
    yield instance
    instance.engine.dispose()


def populate(rt: Retracer) -> None:
    """Jobs in several states: queued, retracing, waiting for a retry, failed, failed to upload, held, done."""
    ids = {name: rt.submit(f"crash-{name}") for name in
           ("queued", "running", "flaky", "broken", "badupload", "held", "done")}
    for name in ("running", "flaky", "broken", "badupload", "done"):
        rt.apply("retrace.started", ids[name], worker="w1")
    rt.apply("retrace.failed", ids["flaky"], error="E: Failed to fetch http://archive/x", transient=True)
    rt.apply("retrace.failed", ids["broken"], error="gdb crashed")
    rt.apply("upload.failed", ids["badupload"], leaf="up-1", upload_log="bad checksum")
    rt.apply("upload.accepted", ids["done"], leaf="up-2")
    rt.fire(ids["held"], "hold", reason="core file looks truncated")


def comparable(status: dict[str, Any]) -> dict[str, Any]:
    """status --json without what moves with the clock (how long a job has been retracing)."""
    for job in status["retracing"]:
        job.pop("elapsed_s")
    return status


@pytest.fixture
def fresh_pg() -> Iterator[tuple[str, str]]:
    """A name for a new PostgreSQL database (created by the test, as the README says) and its URL; dropped."""
    require_server("PostgreSQL", "127.0.0.1", 5432)
    name = f"retracer_restore_{uuid.uuid4().hex[:10]}"
    yield name, make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def pg_client(tool: str, *args: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed (apt-get install postgresql-client)")
    admin = make_url(PG_ADMIN_URL)
    conn = ["-h", admin.host or "127.0.0.1", "-p", str(admin.port or 5432), "-U", admin.username or "postgres"]
    subprocess.run([tool, *conn, *args], check=True, capture_output=True, timeout=120)


def test_backup_restores_the_same_instance(rt: Retracer, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    populate(rt)
    original = comparable(rt.json("status"))
    dest = tmp_path / "backups"
    dest.mkdir()
    made = rt.json(f"db backup {dest}")
    backup = Path(made["backup"])
    assert made["verified"] and made["removed"] == [] and made["bytes"] == backup.stat().st_size > 0
    assert ops.NAME.match(backup.name) and backup.parent == dest
    assert sorted(p.name for p in dest.iterdir()) == [backup.name]  # no temporary file left behind

    if rt.config.database_url.startswith("sqlite"):
        assert backup.suffix == ".sqlite3"
        # The README: serve stopped, the backup copied over the database file, then `retracer db check`.
        restored_dir = tmp_path / "restored"
        restored_dir.mkdir()
        shutil.copyfile(backup, restored_dir / "retracer.db")
        url = f"sqlite:///{restored_dir / 'retracer.db'}"
    else:
        assert backup.suffix == ".pgdump"
        name, url = request.getfixturevalue("fresh_pg")
        # The README: createdb a fresh database, pg_restore -d it, point [database] url at it.
        pg_client("createdb", name)
        pg_client("pg_restore", "-d", name, str(backup))
    again = retracer(tmp_path / "restored-data", url)
    try:
        checked = again.json("db check")
        assert checked["ok"] and checked["problems"] == [] and checked["tables"]["job"] == 7
        assert "ok:" in again.ok("db check")
        assert comparable(again.json("status")) == original
    finally:
        again.engine.dispose()


def test_rotation_keeps_the_newest_and_nothing_else(tmp_path: Path, sqlite_url: str) -> None:
    rt = retracer(tmp_path / "data", sqlite_url)
    dest = tmp_path / "backups"
    dest.mkdir()
    old = [dest / f"retracer-2020010{d}T000000Z.sqlite3" for d in range(1, 6)]
    outside = tmp_path / "outside.sqlite3"
    outside.write_text("not ours")
    foreign = {"notes.txt": "keep me", "retracer-20190101T000000Z.sqlite3.bak": "a copy someone made",
               "retracer-20190101T000000Z.pgdump": "the other database's backup", "retracer-2019.sqlite3": "x"}
    for name, content in foreign.items():
        (dest / name).write_text(content)
    for path in old:
        path.write_text("old backup")
    link = dest / "retracer-20180101T000000Z.sqlite3"
    link.symlink_to(outside)
    made = rt.json(f"db backup {dest} --keep 3")
    assert made["removed"] == [str(p) for p in old[:3]]
    kept = sorted(p.name for p in dest.glob("retracer-*Z.sqlite3") if not p.is_symlink())
    assert kept == [old[3].name, old[4].name, Path(made["backup"]).name]
    for name, content in foreign.items():
        assert (dest / name).read_text() == content
    assert link.is_symlink() and outside.read_text() == "not ours"


def test_rotation_default_comes_from_the_config(tmp_path: Path, sqlite_url: str) -> None:
    rt = retracer(tmp_path / "data", sqlite_url)
    rt.env["RETRACER__BACKUP__KEEP"] = "2"
    dest = tmp_path / "backups"
    dest.mkdir()
    for d in range(1, 4):
        (dest / f"retracer-2020010{d}T000000Z.sqlite3").write_text("old")
    made = rt.json(f"db backup {dest}")
    assert len(made["removed"]) == 2 and len(list(dest.iterdir())) == 2
    text_line = rt.ok(f"db backup {dest} --keep 1")
    assert text_line.startswith("backed up ") and "verified, removed 2 older" in text_line
    assert len(text_line.strip().splitlines()) == 1 and len(list(dest.iterdir())) == 1


def test_a_copy_failing_integrity_check_is_removed_and_reported(tmp_path: Path, sqlite_url: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    rt = retracer(tmp_path / "data", sqlite_url)
    dest = tmp_path / "backups"
    dest.mkdir()
    monkeypatch.setattr(ops, "sqlite_integrity", lambda path, foreign_keys=False: [
        "integrity_check: *** in database main *** Page 5: btreeInitPage() returns error code 11"])
    result = rt.run(f"db backup {dest}")
    assert result.exit_code == 1
    assert "failed PRAGMA integrity_check" in result.output and "Page 5" in result.output
    assert "retracer db check" in result.output
    assert list(dest.iterdir()) == []
    as_json = rt.run(f"db backup {dest} --json")
    assert as_json.exit_code == 1 and "integrity_check" in as_json.output and '"exit_code": 1' in as_json.output


def test_db_check_reports_a_damaged_sqlite_file(tmp_path: Path, sqlite_url: str) -> None:
    rt = retracer(tmp_path / "data", sqlite_url)
    populate(rt)
    dest = tmp_path / "backups"
    dest.mkdir()
    backup = Path(rt.json(f"db backup {dest}")["backup"])
    damaged = tmp_path / "damaged" / "retracer.db"
    damaged.parent.mkdir()
    data = bytearray(backup.read_bytes())
    page = 4096
    assert len(data) >= 4 * page
    data[2 * page:4 * page] = b"\xff" * (2 * page)  # two b-tree pages, not the header: the file still opens
    damaged.write_bytes(bytes(data))
    broken = retracer(tmp_path / "damaged-data", f"sqlite:///{damaged}")
    try:
        result = broken.run("db check")
        assert result.exit_code == 1 and "has problems" in result.output and "integrity_check" in result.output
        report = broken.run("db check --json")
        assert report.exit_code == 1
        assert '"ok": false' in report.output
    finally:
        broken.engine.dispose()


def test_db_check_reports_a_missing_sqlite_file(tmp_path: Path) -> None:
    rt = retracer(tmp_path / "data", f"sqlite:///{tmp_path / 'nowhere.db'}")
    result = rt.run("db check")
    assert result.exit_code == 1 and "there is no database at" in result.output
    assert not (tmp_path / "nowhere.db").exists()


def test_destination_must_be_a_writable_directory(tmp_path: Path, sqlite_url: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    rt = retracer(tmp_path / "data", sqlite_url)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for dest, what in ((a_file, "is not a directory"), (tmp_path / "missing", "does not exist")):
        result = rt.run(f"db backup {dest}")
        assert result.exit_code == 1 and what in result.output and "Traceback" not in result.output
        as_json = rt.run(f"db backup {dest} --json")
        assert as_json.exit_code == 1 and what in as_json.output
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        if os.geteuid() == 0:
            # root writes whatever the mode says: stand for the disk refusing the write instead.
            def refuse(*args: object, **kwargs: object) -> str:
                raise PermissionError(13, "Permission denied")

            monkeypatch.setattr("tempfile.mkdtemp", refuse)
        result = rt.run(f"db backup {read_only}")
        assert result.exit_code == 1, result.output
        assert "not writable" in result.output or "cannot write in the backup destination" in result.output
        assert list(read_only.iterdir()) == []
    finally:
        read_only.chmod(0o700)


def test_an_existing_name_is_never_followed_or_replaced(tmp_path: Path, sqlite_url: str) -> None:
    dest = tmp_path / "backups"
    dest.mkdir()
    now = datetime(2026, 12, 2, 8, 15, tzinfo=UTC)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (dest / "retracer-20261202T081500Z.sqlite3").symlink_to(victim)
    with pytest.raises(ops.BackupError, match="already exists"):
        ops.backup(sqlite_url, dest, 3, now=now)
    assert victim.read_text() == "precious"
    assert [p.name for p in dest.iterdir()] == ["retracer-20261202T081500Z.sqlite3"]


def test_missing_pg_dump_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    rt = retracer(tmp_path / "data", "postgresql+psycopg://nobody@127.0.0.1:1/nothing")
    dest = tmp_path / "backups"
    dest.mkdir()
    result = rt.run(f"db backup {dest}")
    assert result.exit_code == 1 and "pg_dump is not installed" in result.output
    assert "postgresql-client" in result.output
    assert list(dest.iterdir()) == []


def test_the_password_goes_in_the_environment_only() -> None:
    args, env = ops.pg_args("postgresql+psycopg://alice:s3cr%40t@db.example:6543/retracer?sslmode=require")
    assert args == ["--host", "db.example", "--port", "6543", "--username", "alice", "--dbname", "retracer"]
    assert env["PGPASSWORD"] == "s3cr@t" and env["PGSSLMODE"] == "require"
    assert not any("s3cr" in a for a in args)


@pytest.mark.postgres
def test_a_failing_pg_dump_leaves_nothing(tmp_path: Path) -> None:
    require_server("PostgreSQL", "127.0.0.1", 5432)
    url = make_url(PG_ADMIN_URL).set(database=f"absent_{uuid.uuid4().hex[:8]}").render_as_string(
        hide_password=False)
    rt = retracer(tmp_path / "data", url)
    dest = tmp_path / "backups"
    dest.mkdir()
    result = rt.run(f"db backup {dest}")
    assert result.exit_code == 1 and "pg_dump failed" in result.output and "does not exist" in result.output
    assert list(dest.iterdir()) == []
    checked = rt.run("db check --json")
    assert checked.exit_code == 1 and '"ok": false' in checked.output
