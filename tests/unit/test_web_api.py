"""The JSON API (/api) over an instance with jobs in every state, on SQLite and PostgreSQL: it answers with
the documents the CLI's --json prints, a page at a time, and with a JSON reason for every bad request."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from retracer import store
from retracer.apply.applier import Applier
from retracer.cli.web import listen
from retracer.store.models import STATES
from retracer.testing.factories import event
from retracer.web import api
from retracer.web.app import create_app
from tests.unit.clirun import Retracer

PAGE_SIZE = 3


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No RETRACER_CONFIG or RETRACER__* from the developer's shell leaks into these tests."""
    for name in list(os.environ):
        if name.startswith("RETRACER"):
            monkeypatch.delenv(name)


@pytest.fixture
def rt(tmp_path: Path, db_url: str) -> Iterator[Retracer]:
    """An instance on either database, with pages of PAGE_SIZE rows."""
    instance = Retracer({"RETRACER__SERVICE__DATA_DIR": str(tmp_path / "data"),
                         "RETRACER__DATABASE__URL": db_url,
                         "RETRACER__MAIL__ADMINS": "celso@example.com",
                         "RETRACER__SERVICE__START_REQUIRES_OFFER": "false",
                         "RETRACER__WEB__PAGE_SIZE": str(PAGE_SIZE)})
    yield instance
    instance.engine.dispose()


@pytest.fixture
def busy(rt: Retracer) -> dict[str, int]:
    """Jobs in every state (two queued, one waiting for its retry time), failures, rejected events."""
    ids = {name: rt.submit(name, extra) for name, extra in [
        ("old", ""), ("urgent", " --priority 10"), ("running", ""), ("flaky", ""), ("held", ""), ("broken", ""),
        ("badupload", ""), ("done", ""), ("dup", "")]}
    for name in ("running", "flaky", "broken", "badupload", "done", "dup"):
        rt.apply("retrace.started", ids[name], worker=f"w-{name}")
    rt.apply("retrace.failed", ids["flaky"], error="E: Failed to fetch http://archive/x", transient=True)
    rt.apply("retrace.failed", ids["broken"], error="gdb crashed\nSegmentation fault")
    rt.apply("upload.failed", ids["badupload"], leaf="up-1", upload_log="bad checksum")
    rt.apply("upload.accepted", ids["done"], leaf="up-2")
    rt.fire(ids["held"], "hold", reason="core file looks truncated")
    with store.transaction(rt.factory) as session:
        # Heartbeats for jobs nobody is retracing: rejected, with a reason; one of them replayed later.
        Applier(rt.config).apply_batch(session, [event("retrace.heartbeat", ids["old"], source="w", worker="w"),
                                                 event("retrace.heartbeat", ids["urgent"], source="w", worker="w")])
    (urgent,) = [r["id"] for r in rt.json("rejected") if r["job"] == ids["urgent"]]
    rt.apply("retrace.started", ids["urgent"], worker="w-urgent")
    rt.ok(f"rejected replay {urgent} --as celso")
    return ids


@pytest.fixture
def client(rt: Retracer) -> Iterator[TestClient]:
    engine = store.make_engine(rt.config.database_url, read_only=True)
    with TestClient(create_app(rt.config, store.session_factory(engine))) as test_client:
        yield test_client
    engine.dispose()


def get(client: TestClient, path: str, model: type[BaseModel] | None = None, status: int = 200) -> Any:
    """GET path, which must answer ``status`` with JSON (conforming to ``model``, if given)."""
    response = client.get(path)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert "default-src 'none'" in response.headers["content-security-policy"]
    if model is not None:
        model.model_validate_json(response.text)
    return response.json()


def without_elapsed(report: dict[str, Any]) -> dict[str, Any]:
    """The status without the seconds a job has been retracing (the clock may tick between two reads)."""
    for job in report["retracing"]:
        assert isinstance(job.pop("elapsed_s"), int)
    return report


def all_pages(client: TestClient, path: str, key: str) -> list[Any]:
    """Every row behind a paginated route, following its ``next`` links."""
    rows: list[Any] = []
    url: str | None = path
    while url is not None:
        page = get(client, url)
        assert len(page[key]) <= page["limit"] <= PAGE_SIZE
        rows += page[key]
        url = page["next"]
    return rows


class TestSameAsTheCli:
    def test_status(self, rt: Retracer, busy: dict[str, int], client: TestClient) -> None:
        """/api/status is the document `retracer status --json` prints, datetimes written the same way."""
        served = get(client, "/api/status", api.Status)
        assert without_elapsed(served) == without_elapsed(rt.json("status"))
        assert served["counts"] == {"PENDING": 2, "RETRACING": 3, "FAILEDTOUPLOAD": 1, "FULLYBUILT": 1,
                                    "ON_HOLD": 2}
        assert served["waiting"][0]["not_before"].endswith("+00:00")

    def test_status_lists_the_first_held_jobs(self, rt: Retracer, busy: dict[str, int]) -> None:
        """Jobs on hold are listed up to a bound, oldest first, with how many there are in all."""
        from retracer import reports

        with rt.factory() as session:
            report = reports.status(session, held_limit=1)
        assert [h["id"] for h in report["on_hold"]] == [busy["held"]]
        assert report["on_hold_total"] == 2

    @pytest.mark.parametrize("state", [None, *STATES])
    def test_jobs(self, rt: Retracer, busy: dict[str, int], client: TestClient, state: str | None) -> None:
        """/api/jobs, page after page, holds what `retracer jobs --json` lists, newest first, for each state."""
        query = f"?state={state}" if state else ""
        expected = rt.json(f"jobs --limit 1000{' --state ' + state if state else ''}")
        assert all_pages(client, f"/api/jobs{query}", "jobs") == expected
        first = get(client, f"/api/jobs{query}", api.JobPage)
        assert first["total"] == len(expected) and first["offset"] == 0 and first["limit"] == PAGE_SIZE
        assert [j["state"] for j in expected] == ([state] * len(expected) if state else [j["state"] for j in expected])

    def test_job_pages_link_to_the_next(self, busy: dict[str, int], client: TestClient) -> None:
        """A page says how many jobs there are in all and where the next page is; the last has no next."""
        page = get(client, "/api/jobs?state=RETRACING&limit=2")
        assert (page["total"], page["offset"], page["limit"]) == (3, 0, 2)
        assert page["next"] == "/api/jobs?state=RETRACING&limit=2&offset=2"
        last = get(client, page["next"], api.JobPage)
        assert (len(last["jobs"]), last["offset"], last["next"]) == (1, 2, None)
        beyond = get(client, "/api/jobs?offset=1000", api.JobPage)
        assert (beyond["jobs"], beyond["total"], beyond["next"]) == ([], len(busy), None)

    def test_job_detail(self, rt: Retracer, busy: dict[str, int], client: TestClient) -> None:
        """/api/jobs/ID is `retracer show ID --json`, history included, for a job in every state."""
        for job in busy.values():
            assert get(client, f"/api/jobs/{job}", api.JobDetail) == rt.json(f"show {job}")
        broken = get(client, f"/api/jobs/{busy['broken']}")
        assert [(h["from"], h["to"]) for h in broken["history"]] == [
            (None, "PENDING"), ("PENDING", "RETRACING"), ("RETRACING", "ON_HOLD")]

    @pytest.mark.parametrize(("query", "cli"), [("", "rejected"), ("?all=true", "rejected --all")])
    def test_rejected(self, rt: Retracer, busy: dict[str, int], client: TestClient, query: str, cli: str) -> None:
        """/api/rejected holds what `retracer rejected --json` lists (with all=true, --all)."""
        expected = rt.json(cli)
        assert len(expected) == (2 if query else 1)
        assert all_pages(client, f"/api/rejected{query}", "rejected") == expected
        assert get(client, f"/api/rejected{query}", api.RejectedPage)["total"] == len(expected)

    def test_empty_instance(self, rt: Retracer, client: TestClient) -> None:
        """A new instance: every count zero, no jobs, no next page."""
        assert get(client, "/api/status", api.Status) == rt.json("status")
        assert get(client, "/api/jobs", api.JobPage) == {"jobs": [], "total": 0, "offset": 0,
                                                         "limit": PAGE_SIZE, "next": None}
        assert get(client, "/api/rejected", api.RejectedPage)["rejected"] == []


class TestRefusals:
    """Every bad request gets a JSON {"error", "status"} saying what was wrong; none is a 500."""

    def test_unknown_job(self, client: TestClient) -> None:
        assert get(client, "/api/jobs/99", api.Error, 404) == {
            "error": "job 99 does not exist (GET /api/jobs lists the jobs)", "status": 404}

    @pytest.mark.parametrize("job", ["abc", "-1", "0", "1.5", "2147483648", "9" * 40, "%00", "1%20OR%201=1"])
    def test_bad_job_id(self, client: TestClient, job: str) -> None:
        answer = get(client, f"/api/jobs/{job}", api.Error, 422)
        assert answer["status"] == 422 and answer["error"].startswith("path.job_id: ")

    def test_biggest_job_id_is_only_not_found(self, client: TestClient) -> None:
        assert get(client, "/api/jobs/2147483647", api.Error, 404)["status"] == 404

    def test_unknown_state_names_the_known_ones(self, client: TestClient) -> None:
        answer = get(client, "/api/jobs?state=DONE", api.Error, 422)
        assert answer["error"].startswith("query.state: ")
        assert all(state in answer["error"] for state in STATES)

    @pytest.mark.parametrize(("query", "name"), [
        ("limit=0", "limit"), (f"limit={PAGE_SIZE + 1}", "limit"), ("limit=x", "limit"), ("offset=-1", "offset"),
        ("offset=2147483648", "offset"), ("offset=1e3", "offset")])
    @pytest.mark.parametrize("route", ["/api/jobs", "/api/rejected"])
    def test_bad_page(self, client: TestClient, route: str, query: str, name: str) -> None:
        answer = get(client, f"{route}?{query}", api.Error, 422)
        assert answer["error"].startswith(f"query.{name}: ")

    def test_page_size_is_the_largest_limit(self, client: TestClient) -> None:
        refused = get(client, f"/api/jobs?limit={PAGE_SIZE + 1}", status=422)
        assert f"less than or equal to {PAGE_SIZE}" in refused["error"]
        assert get(client, f"/api/jobs?limit={PAGE_SIZE}", api.JobPage)["limit"] == PAGE_SIZE


class TestDatabaseDown:
    @pytest.mark.parametrize("down", ["postgresql-refused", "sqlite-no-file", "sqlite-not-a-database"])
    @pytest.mark.parametrize("path", ["/api/status", "/api/jobs", "/api/jobs/1", "/api/rejected"])
    def test_503_with_a_reason(self, rt: Retracer, tmp_path: Path, down: str, path: str) -> None:
        """A database that cannot be reached or read gives 503 and says so, never a 500 or a traceback."""
        damaged = tmp_path / "damaged.db"
        damaged.write_bytes(b"this is not a database, whatever its name says\n" * 200)
        url = {"postgresql-refused": "postgresql+psycopg://postgres@127.0.0.1:1/nothing",
               "sqlite-no-file": "sqlite:////nonexistent-dir/retracer.db",
               "sqlite-not-a-database": f"sqlite:///{damaged}"}[down]
        engine = store.make_engine(url, read_only=True)
        client = TestClient(create_app(rt.config, store.session_factory(engine)), raise_server_exceptions=False)
        answer = get(client, path, api.Error, 503)
        assert answer["error"].startswith("the database cannot be used right now (")
        assert "try again" in answer["error"]
        engine.dispose()


class TestReadOnly:
    def test_the_web_engine_refuses_writes(self, rt: Retracer) -> None:
        """The app's sessions cannot change the database, whatever a route did by mistake."""
        from sqlalchemy import text
        from sqlalchemy.exc import DBAPIError

        engine = store.make_engine(rt.config.database_url, read_only=True)
        with pytest.raises(DBAPIError), engine.begin() as conn:
            conn.execute(text("DELETE FROM job"))
        engine.dispose()


class TestOpenApi:
    def test_every_answer_is_described(self, client: TestClient) -> None:
        """/openapi.json describes each /api route's answers, errors as {"error", "status"}."""
        spec = client.get("/openapi.json").json()
        for path, codes in [("/api/status", {"200", "422", "503"}), ("/api/jobs", {"200", "422", "503"}),
                            ("/api/jobs/{job_id}", {"200", "404", "422", "503"}),
                            ("/api/rejected", {"200", "422", "503"})]:
            responses = spec["paths"][path]["get"]["responses"]
            assert set(responses) == codes, path
            for code in codes - {"200"}:
                assert responses[code]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/Error"}
        state = spec["components"]["schemas"]["State"]
        assert state["enum"] == list(STATES)
        limit = next(p for p in spec["paths"]["/api/jobs"]["get"]["parameters"] if p["name"] == "limit")
        assert (limit["schema"]["minimum"], limit["schema"]["maximum"]) == (1, PAGE_SIZE)


class TestWebCommand:
    def test_port_in_use(self, rt: Retracer) -> None:
        """A port another process listens on: a one-line error saying what to do, exit status 1."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = rt.run(f"web --port {port}")
        assert result.exit_code == 1
        assert result.output == (f"Error: cannot listen on 127.0.0.1:{port}: Address already in use; another "
                                 f"process is listening there: stop it, or choose another port with --port or "
                                 f"[web] port\n")

    def test_not_an_address(self) -> None:
        from retracer.errors import RetracerError

        with pytest.raises(RetracerError, match=r"'no\.such\.host\.invalid' is not an address of this machine"):
            listen("no.such.host.invalid", 8080)

    def test_listens_where_told(self) -> None:
        sock = listen("127.0.0.1", 0)
        try:
            assert sock.getsockname()[0] == "127.0.0.1"
        finally:
            sock.close()
