"""The real `retracer web` process, asked like curl would, on SQLite and PostgreSQL: its API answers what the
CLI prints, with JSON errors and the security headers, and the command starts, refuses and stops as an admin
expects."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from retracer import store
from retracer.store.models import STATES
from retracer.testing.instance import RETRACER, Instance
from retracer.testing.webworld import World, populate

from ..conftest import make_config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Web:
    """A `retracer web` process on a free loopback port, and its log."""

    def __init__(self, inst: Instance, log: Path) -> None:
        self.port = free_port()
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([*RETRACER, "web", "--port", str(self.port)],
                                         env=inst.env, stdout=out, stderr=out)
        inst.servers.append(self.proc)
        inst.wait_for("retracer web to listen", lambda: b'"msg": "listening on' in log.read_bytes(), timeout=30)

    def get(self, path: str) -> tuple[int, Message, Any]:
        """(status, headers (names in any case), JSON body) of GET path."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as answer:
                return answer.status, answer.headers, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, error.headers, json.loads(error.read())

    def json(self, path: str) -> Any:
        status, headers, body = self.get(path)
        assert status == 200, body
        assert headers["Content-Type"] == "application/json"
        return body

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]


@pytest.fixture
def world(tmp_path: Path, db_url: str) -> Iterator[tuple[Instance, World]]:
    """An instance with jobs in every state (some values hostile markup) and rejected events."""
    inst = Instance(tmp_path / "data", db_url)
    inst.set(WEB__PAGE_SIZE="4")
    made = populate(make_config(tmp_path / "data", db_url), store.session_factory(inst.engine))
    yield inst, made
    inst.close()


@pytest.fixture
def web(world: tuple[Instance, World], tmp_path: Path) -> Web:
    return Web(world[0], tmp_path / "web.log")


def without_elapsed(report: dict[str, Any]) -> dict[str, Any]:
    for job in report["retracing"]:
        assert isinstance(job.pop("elapsed_s"), int)
    return report


class TestAnswers:
    def test_status_is_the_cli_document(self, world: tuple[Instance, World], web: Web) -> None:
        inst, _ = world
        served = web.json("/api/status")
        assert without_elapsed(served) == without_elapsed(inst.json("status"))
        assert set(served["counts"]) == set(STATES) and all(served["counts"].values())

    def test_pages_of_jobs_are_the_cli_list(self, world: tuple[Instance, World], web: Web) -> None:
        """Following ``next`` from the first page gives `retracer jobs --json`, newest first, in pages of
        at most [web] page_size."""
        inst, _ = world
        for state in (None, *STATES):
            path: str | None = "/api/jobs" + (f"?state={state}" if state else "")
            jobs: list[dict[str, Any]] = []
            while path is not None:
                page = web.json(path)
                assert page["limit"] == 4 and len(page["jobs"]) <= 4
                jobs += page["jobs"]
                path = page["next"]
            assert jobs == inst.json("jobs", "--limit", "1000", *(["--state", state] if state else []))
            assert page["total"] == len(jobs)

    def test_each_job_is_show(self, world: tuple[Instance, World], web: Web) -> None:
        """/api/jobs/ID is `retracer show ID --json` for a job in each state (hostile values included)."""
        inst, made = world
        for name in ("pending", "waiting", "retracing", "fullybuilt", "failedtoupload", "held_admin", "hostile"):
            job = made.one(name)
            assert web.json(f"/api/jobs/{job}") == inst.json("show", str(job))

    def test_rejected_is_the_cli_list(self, world: tuple[Instance, World], web: Web) -> None:
        inst, _ = world
        expected = inst.json("rejected", "--all")
        assert expected
        page = web.json("/api/rejected?all=true&limit=4")
        assert page["rejected"] == expected[:4] and page["total"] == len(expected)


#: Bad requests, what they answer and how the reason starts.
REFUSALS = [
    ("/api/jobs/999999", 404, "job 999999 does not exist"),
    ("/api/jobs/abc", 422, "path.job_id: "),
    ("/api/jobs/-3", 422, "path.job_id: "),
    ("/api/jobs/2147483648", 422, "path.job_id: "),
    ("/api/jobs?state=nope", 422, "query.state: "),
    ("/api/jobs?limit=5", 422, "query.limit: "),
    ("/api/jobs?offset=-1", 422, "query.offset: "),
    ("/api/rejected?limit=0", 422, "query.limit: "),
    ("/api/nothing-here", 404, "Not Found"),
]


class TestRefusals:
    def test_json_errors(self, web: Web) -> None:
        """Each bad request gets a JSON {"error", "status"} saying what was wrong, with the security headers;
        none is a 500."""
        for path, status, start in REFUSALS:
            got, headers, body = web.get(path)
            assert (got, body["status"]) == (status, status), path
            assert body["error"].startswith(start) and set(body) == {"error", "status"}, body
            assert "default-src 'none'" in headers["Content-Security-Policy"]
            assert headers["X-Content-Type-Options"] == "nosniff"


class TestCommand:
    def test_logs_where_it_listens_and_stops_on_sigterm(self, world: tuple[Instance, World], web: Web) -> None:
        """One line says where it listens; SIGTERM ends it with status 0 and a line saying so."""
        inst, _ = world
        assert web.json("/api/status")
        assert inst.stop(web.proc, signal.SIGTERM) == 0
        lines = web.log_lines()
        assert [line["msg"] for line in lines] == [f"listening on http://127.0.0.1:{web.port}/", "stopped"]
        assert lines[-1]["signal"] == "SIGTERM"

    def test_port_in_use(self, world: tuple[Instance, World], web: Web) -> None:
        """A second server on the same port: a one-line error, exit status 1, the first one unharmed."""
        inst, _ = world
        second = inst.run("web", "--port", str(web.port), check=False)
        assert second.returncode == 1
        assert second.stderr.splitlines() == [
            f"Error: cannot listen on 127.0.0.1:{web.port}: Address already in use; another process is listening "
            f"there: stop it, or choose another port with --port or [web] port"]
        assert web.json("/api/status")

    @pytest.mark.postgres
    def test_database_down_is_503(self, pg_database: str, tmp_path: Path) -> None:
        """PostgreSQL refuses the web's connections (its own are cut): 503 with a reason; back when it is."""
        from ..conftest import truncate_all

        truncate_all(pg_database)
        inst = Instance(tmp_path / "data", pg_database)
        try:
            web = Web(inst, tmp_path / "web.log")
            assert web.json("/api/status")
            _pg_admin(f"ALTER DATABASE {_name(inst)} WITH ALLOW_CONNECTIONS false",
                      f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{_name(inst)}'")
            try:
                status, _, body = web.get("/api/status")
                assert (status, body["status"]) == (503, 503)
                assert body["error"].startswith("the database cannot be used right now (")
            finally:
                _pg_admin(f"ALTER DATABASE {_name(inst)} WITH ALLOW_CONNECTIONS true")
            assert web.json("/api/status")
            assert inst.stop(web.proc) == 0
        finally:
            inst.close()


def _name(inst: Instance) -> str:
    from sqlalchemy.engine import make_url

    name = make_url(inst.db_url).database
    assert name is not None
    return name


def _pg_admin(*statements: str) -> None:
    from sqlalchemy import create_engine, text

    from ..conftest import PG_ADMIN_URL

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for sql in statements:
            conn.execute(text(sql))
    admin.dispose()
