"""The HTML pages over an instance with jobs in every state, on both databases: what an admin is shown
(counts, titles, the commands to paste, pagination, grouped failures), the error pages, and that values from
events come out as text, never as markup."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from markupsafe import escape
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from retracer import reports, store
from retracer.config import Config
from retracer.mail.render import Notice, render
from retracer.mail.rows import command
from retracer.store.models import Job, Mail
from retracer.testing import webworld
from retracer.testing.factories import event
from retracer.testing.webworld import HOSTILE_CRASH, HOSTILE_ERROR, HOSTILE_REASON, HOSTILE_SOURCE, World
from retracer.web import actions, diagram, humane
from retracer.web.app import create_app
from retracer.workflow import load_spec
from tests.conftest import make_config

SPEC = load_spec()
ROLES = SPEC.roles
BLOCKS = {"dt", "dd", "p", "li", "h1", "h2", "h3", "div", "pre", "summary"}
HOSTILE = (HOSTILE_CRASH, HOSTILE_ERROR, HOSTILE_REASON, HOSTILE_SOURCE, webworld.HOSTILE_MODULE, "<b>evil</b>")


# -- reading a page as a person would -------------------------------------------------------------------------


@dataclass
class Section:
    text: str = ""
    rows: list[list[str]] = field(default_factory=list)
    heads: list[list[str]] = field(default_factory=list)


class Page(HTMLParser):
    """A page's text per <section id>, its table rows, its links, and every tag and attribute it has."""

    def __init__(self, source: str) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: dict[str, Section] = {}
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.links: list[str] = []
        self._open: list[str] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._head = False
        self.text = ""
        self.feed(source)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "section":
            name = dict(attrs).get("id") or f"section-{len(self.sections)}"
            self.sections[name] = Section()
            self._open.append(name)
        elif tag == "a" and dict(attrs).get("href"):
            self.links.append(str(dict(attrs)["href"]))
        elif tag == "thead":
            self._head = True
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in BLOCKS:  # what a browser shows apart is read apart
            self.handle_data(" ")
        if tag == "section" and self._open:
            self._open.pop()
        elif tag == "thead":
            self._head = False
        elif tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._open:
                section = self.sections[self._open[-1]]
                (section.heads if self._head else section.rows).append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        self.text += data
        if self._open:
            self.sections[self._open[-1]].text += data
        if self._cell is not None:
            self._cell.append(data)

    def said(self, section: str) -> str:
        """A section's text with whitespace collapsed."""
        return " ".join(self.sections[section].text.split())

    def body_rows(self, section: str) -> list[list[str]]:
        return self.sections[section].rows


# -- the instance --------------------------------------------------------------------------------------------


@dataclass
class Site:
    client: TestClient
    world: World
    config: Config
    factory: sessionmaker[Session]

    def get(self, path: str, status: int = 200) -> Page:
        response = self.client.get(path)
        assert response.status_code == status, (path, response.status_code, response.text[:500])
        assert response.headers["content-type"].startswith("text/html")
        return Page(response.text)

    def raw(self, path: str) -> str:
        response = self.client.get(path)
        assert response.status_code == 200
        return str(response.text)


def _site(tmp_path: Path, db_url: str, **settings: str) -> Iterator[Site]:
    config = make_config(tmp_path / "data", db_url, **settings)
    engine = store.make_engine(config.database_url)
    factory = store.session_factory(engine)
    world = webworld.populate(config, factory)
    with TestClient(create_app(config, factory), raise_server_exceptions=False) as client:
        yield Site(client, world, config, factory)
    engine.dispose()


@pytest.fixture
def site(tmp_path: Path, db_url: str) -> Iterator[Site]:
    yield from _site(tmp_path, db_url)


@pytest.fixture
def small_pages(tmp_path: Path, db_url: str) -> Iterator[Site]:
    """Pages of two rows: pagination shows with a handful of jobs."""
    yield from _site(tmp_path, db_url, RETRACER__WEB__PAGE_SIZE="2")


def _counts(site: Site) -> dict[str, int]:
    with site.factory() as session:
        return {s: int(n) for s, n in session.execute(select(Job.state, func.count()).group_by(Job.state))}


# -- the overview --------------------------------------------------------------------------------------------


class TestOverview:
    def test_counts_every_state_with_its_title(self, site: Site) -> None:
        page = site.get("/")
        counts = _counts(site)
        assert set(counts) == set(SPEC.states), "the world must have a job in every state"
        cards = {}
        for name, spec in SPEC.states.items():
            match = re.search(rf"(\d+) {name} {re.escape(spec.title)}", page.said("counts"))
            assert match, f"no count card for {name} ({spec.title}) in: {page.said('counts')}"
            cards[name] = int(match.group(1))
        assert cards == counts
        assert f"{sum(counts.values())} in all" in page.said("counts")

    def test_retracing_jobs_show_worker_elapsed_time_and_heartbeat(self, site: Site) -> None:
        page = site.get("/")
        (row,) = page.body_rows("retracing")
        assert row[0] == f"#{site.world.one('retracing')}"
        assert row[1] == "firefox 120.0"
        assert row[2] == webworld.WORKER
        assert re.fullmatch(r"\d+ s", row[3]), row
        assert re.fullmatch(r"\d+ s ago|just now", row[4]), row

    def test_queue_is_in_dispatch_order(self, site: Site) -> None:
        page = site.get("/")
        shown = [int(r[1].lstrip("#")) for r in page.body_rows("queue")]
        with site.factory() as session:
            expected = [j.id for j in session.scalars(
                select(Job).where(Job.state == ROLES.queue, Job.not_before.is_(None))
                .order_by(Job.priority.desc(), Job.id))]
        assert shown == expected
        assert shown[0] == site.world.jobs["pending"][-1], "the admin's priority 50 goes first"
        assert "50 set" in page.body_rows("queue")[0][4]
        assert f"{len(expected)} ready" in page.said("queue")
        assert "and" not in page.said("queue").split("Showing")[0]

    def test_queue_pages_say_how_many_more(self, small_pages: Site) -> None:
        ready = len(small_pages.world.jobs["pending"])
        first = small_pages.get("/")
        assert len(first.body_rows("queue")) == 2
        assert f"and {ready - 2} more in the queue" in first.said("queue")
        assert "/?queue_page=2" in first.links
        second = small_pages.get("/?queue_page=2")
        assert [r[0] for r in second.body_rows("queue")] == ["3", "4"]
        assert "more in the queue" not in second.said("queue")
        assert "/?queue_page=1" in second.links and "/?queue_page=3" not in second.links
        beyond = small_pages.get("/?queue_page=9")
        assert f"no queue page 9: the queue has {ready} jobs" in beyond.said("queue")

    def test_waiting_jobs_show_when_they_are_retried(self, site: Site) -> None:
        page = site.get("/")
        (row,) = page.body_rows("waiting")
        assert row[0] == f"#{site.world.one('waiting')}"
        assert row[2] == "1"
        assert re.fullmatch(r"in \d+ (min|s)", row[3]), row

    def test_recent_failures_name_the_job_and_the_reason(self, site: Site) -> None:
        page = site.get("/")
        rows = page.body_rows("failures")
        permanent = site.world.one("held_permanent")
        (row,) = [r for r in rows if r[1] == f"#{permanent}"]
        assert row[3] == "retrace_failed" and row[4] == ROLES.held
        assert "no symbols for libgedit-46.so" in row[5]
        refused = [r for r in rows if r[1] == f"#{site.world.one('failedtoupload')}"]
        assert refused and refused[0][3] == "upload_failed"

    def test_failures_grouped_by_signature_and_by_pattern(self, site: Site) -> None:
        page = site.get("/")
        rows = page.body_rows("groups")
        failing = sum(n for s, n in _counts(site).items() if s in (ROLES.held, ROLES.rescuable))
        # No failed job has a signature (they come with an accepted upload): one group holds them all.
        assert ["no signature (no accepted upload)", str(failing), f"#{site.world.one('held_admin')}"] in rows
        assert ["Connection (timed out|refused|reset)", "1", f"#{site.world.one('held_pattern')}"] in rows
        assert ["no pattern matched", str(failing - 1), f"#{site.world.one('held_admin')}"] in rows

    def test_groups_count_the_largest_first(self, site: Site) -> None:
        with site.factory() as session:
            groups = reports.failure_groups(session, limit=1)
            recent = reports.failure_groups(session, scan=2)
        assert groups["failure_pattern"]["groups"][0]["key"] is None
        assert groups["failure_pattern"]["more_groups"] is True
        assert groups["scanned"] == sum(n for s, n in _counts(site).items() if s in (ROLES.held, ROLES.rescuable))
        assert groups["capped"] is False
        assert recent["scanned"] == 2 and recent["capped"] is True
        assert recent["signature"]["groups"] == [{"key": None, "count": 2, "latest": site.world.one("held_admin")}]

    def test_counts_past_the_cap_say_so(self, site: Site) -> None:
        with site.factory() as session:
            counts = reports.capped_counts(session, cap=3)
        exact = _counts(site)
        for state, (n, capped) in counts.items():
            assert (n, capped) == ((3, True) if exact.get(state, 0) >= 3 else (exact.get(state, 0), False))

    def test_queue_walk_is_the_dispatch_order(self, site: Site) -> None:
        d = webworld.Driver(site.config, site.factory)
        for priority in (7, -2, 7, 0, 3, -2, 7):
            d.submit(priority=priority)
        with site.factory() as session:
            expected = [j.id for j in reports.queue(session, limit=100)]
            assert [j.id for j in reports.dispatch_order(session, datetime.now(UTC), 0, 100)] == expected
            assert [j.id for j in reports.dispatch_order(session, datetime.now(UTC), 3, 4)] == expected[3:7]
            assert reports.dispatch_order(session, datetime.now(UTC), len(expected), 5) == []
            page = reports.queue_page(session, 2, 4)
        assert [j["id"] for j in page["jobs"]] == expected[4:8]
        assert page["total"] == len(expected) and page["more"] == len(expected) - 8

    def test_on_hold_shows_reasons_and_the_mails_commands(self, site: Site) -> None:
        page = site.get("/")
        rows = {r[0]: r for r in page.body_rows("on-hold")}
        held = site.world.one("held_admin")
        assert HOSTILE_REASON in rows[f"#{held}"][2]
        prefix = command(site.config)
        for job_id in (held, site.world.one("held_permanent")):
            assert f"{prefix} release {job_id}" in rows[f"#{job_id}"][3]
            assert f"{prefix} retry {job_id}" in rows[f"#{job_id}"][3]
            for line in _mail_commands(site, job_id):
                assert line in rows[f"#{job_id}"][3]
        assert page.said("on-hold").startswith(f"{SPEC.states[ROLES.held].title} {_counts(site)[ROLES.held]} ")

    def test_on_hold_pages_say_how_many_more(self, small_pages: Site) -> None:
        page = small_pages.get("/")
        held = _counts(small_pages)[ROLES.held]
        assert len(page.body_rows("on-hold")) == 2
        assert f"and {held - 2} more on hold" in page.said("on-hold")

    def test_missing_symbols_are_listed_with_their_jobs(self, site: Site) -> None:
        page = site.get("/")
        rows = {r[0]: r for r in page.body_rows("missing-symbols")}
        with site.factory() as session:
            missing = reports.missing_symbols(session)
        assert set(rows) == {m["build_id"] for m in missing}
        gedit = rows["5e1f0c9a0b6d4e2f8a7c3b1d9e0f2a4c6b8d0e1f"]
        assert gedit[1] == "/usr/lib/gedit/libgedit-46.so"
        assert gedit[2] == "1" and gedit[3] == f"#{site.world.one('held_permanent')}"
        assert rows["feedfacefeedfacefeedfacefeedfacefeedface"][1] == webworld.HOSTILE_MODULE

    def test_missing_symbols_past_the_window_say_so(self, site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
        """Only the newest reports are counted on the page (one view must stay fast); it says so."""
        assert "most recent reports" not in site.get("/").said("missing-symbols")
        monkeypatch.setattr(reports, "MISSING_SCAN", 1)
        page = site.get("/")
        assert "Counted over the 1 most recent reports" in page.said("missing-symbols")
        assert len(page.body_rows("missing-symbols")) == 1

    def test_no_missing_symbols_says_none(self, tmp_path: Path, sqlite_url: str) -> None:
        config = make_config(tmp_path / "data", sqlite_url)
        engine = store.make_engine(config.database_url)
        with TestClient(create_app(config, store.session_factory(engine))) as client:
            page = Page(client.get("/").text)
        engine.dispose()
        assert page.said("missing-symbols") == "Missing symbols none: every build-id asked for so far was found"
        assert page.said("queue").endswith("none: no job is waiting for a worker")

    def test_bad_queue_page_is_a_422_page(self, site: Site) -> None:
        for bad in ("0", "-1", "abc", "99999999999999999999"):
            page = site.get(f"/?queue_page={bad}", status=422)
            assert "queue_page" in page.text


def _mail_commands(site: Site, job_id: int) -> list[str]:
    """The command lines of the admins' mail actually queued for the job's current state."""
    with site.factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        mail = session.scalars(select(Mail).where(Mail.job_id == job_id, Mail.rationale == "Admin",
                                                  Mail.state == job.state).order_by(Mail.id.desc())).first()
        assert mail is not None
        body = render(Notice.from_mail(mail), site.config).get_body(("plain",))
        assert body is not None
        text = str(body.get_content())
    lines = [line.strip() for line in text.splitlines() if line.startswith("    " + command(site.config))]
    assert lines, text
    return lines


# -- one job -------------------------------------------------------------------------------------------------


class TestJobPage:
    def test_every_field_is_shown(self, site: Site) -> None:
        from retracer.reports import JOB_FIELDS
        job_id = site.world.one("fullybuilt")
        page = site.get(f"/jobs/{job_id}")
        names = [r[0] for r in page.sections["fields"].rows]
        assert names == list(JOB_FIELDS)
        values = dict((r[0], r[1]) for r in page.sections["fields"].rows)
        assert values["id"] == str(job_id)
        assert values["worker"] == webworld.WORKER
        assert values["signature"] == webworld.SIGNATURE
        assert values["build_ids"] == "none"

    def test_backtrace_signatures_and_duplicates(self, site: Site) -> None:
        original = site.world.one("fullybuilt")
        page = site.get(f"/jobs/{original}")
        assert "__GI_abort () at ./stdlib/abort.c:79" in page.said("backtrace")
        assert webworld.SIGNATURE in page.said("signatures")
        duplicates = [r[0] for r in page.body_rows("signatures")]
        assert duplicates == [f"#{j}" for j in reversed(site.world.jobs["duplicate"])]
        assert "Jobs recorded as duplicates of this one 2" in page.said("signatures")
        dup = site.get(f"/jobs/{site.world.jobs['duplicate'][0]}")
        assert f"Duplicate of #{original}" in dup.said("signatures")
        assert f"/jobs/{original}" in dup.links

    def test_missing_symbols_of_the_job(self, site: Site) -> None:
        page = site.get(f"/jobs/{site.world.one('held_permanent')}")
        assert [r[:2] for r in page.body_rows("missing")] == [
            ["0a9b8c7d6e5f40312233445566778899aabbccdd", "/usr/lib/libpeas-1.0.so.0"],
            ["5e1f0c9a0b6d4e2f8a7c3b1d9e0f2a4c6b8d0e1f", "/usr/lib/gedit/libgedit-46.so"]]
        assert site.get(f"/jobs/{site.world.one('fullybuilt')}").said("missing") == "Missing symbols none"

    def test_history_is_shown_oldest_first(self, site: Site) -> None:
        job_id = site.world.one("held_pattern")
        page = site.get(f"/jobs/{job_id}")
        rows = page.body_rows("history")
        triggers = [r[3] for r in rows]
        assert triggers[0] == "submit"
        assert triggers.count("retrace_failed") == int(site.config["policy"]["max_attempts"])
        assert rows[-1][2] == ROLES.held
        assert "retries exhausted" in rows[-1][5]
        assert "event:" in rows[0][4]

    def test_mails_and_their_status(self, site: Site) -> None:
        job_id = site.world.one("failedtoupload")
        page = site.get(f"/jobs/{job_id}")
        rows = page.body_rows("mails")
        with site.factory() as session:
            mails = list(session.scalars(select(Mail).where(Mail.job_id == job_id).order_by(Mail.id)))
        assert [(r[2], r[3], r[4]) for r in rows] == [(m.recipient, m.rationale, m.status) for m in mails]
        assert {r[1] for r in rows} == {ROLES.rescuable}
        assert all(r[6] == "not yet" for r in rows)

    def test_upload_log_and_the_rescue_commands_of_the_mail(self, site: Site) -> None:
        job_id = site.world.one("failedtoupload")
        page = site.get(f"/jobs/{job_id}")
        assert "Rejected: backtrace.txt has no frames" in page.said("upload-log")
        act = page.said("act")
        for line in _mail_commands(site, job_id):
            assert line in act
        assert f"{command(site.config)} show {job_id}" in act

    def test_held_job_shows_reason_and_commands(self, site: Site) -> None:
        job_id = site.world.one("held_admin")
        page = site.get(f"/jobs/{job_id}")
        assert HOSTILE_REASON in page.text
        act = page.said("act")
        assert f"{command(site.config)} release {job_id}" in act
        assert "Once the cause is understood, an admin lets the job go back to the queue with:" in act

    def test_a_job_without_action_offers_show_only(self, site: Site) -> None:
        job_id = site.world.one("retracing")
        page = site.get(f"/jobs/{job_id}")
        assert "Nothing needs an admin in this state" in page.said("act")
        assert [t for t, a in page.tags if t == "pre" and a.get("class") == "command"] == ["pre"]

    def test_unknown_job_is_a_404_page(self, site: Site) -> None:
        page = site.get("/jobs/999999", status=404)
        assert "There is no job 999999" in page.text
        assert "/" in page.links

    @pytest.mark.parametrize("bad", ["abc", "0", "-3", "1.5", "99999999999", "%3Cscript%3E"])
    def test_a_bad_id_is_a_422_page_not_a_500(self, site: Site, bad: str) -> None:
        response = site.client.get(f"/jobs/{bad}")
        assert response.status_code in (404, 422)
        assert response.headers["content-type"].startswith("text/html")
        assert "job_id" in response.text
        assert "<script>" not in response.text


# -- rejected events, the workflow, the stylesheet -----------------------------------------------------------


class TestOtherPages:
    def test_rejected_events_with_their_replay_command(self, site: Site) -> None:
        assert site.world.rejected == 1
        page = site.get("/rejected")
        (row,) = page.body_rows("events")
        assert row[0] == "1" and row[2] == "retrace.started" and row[3] == "#999999"
        assert "999999" in row[4], "the reason names the job that does not exist"
        assert HOSTILE_SOURCE in row[5], "the event's body is shown, as text"
        assert row[6] == f'{command(site.config)} rejected replay 1 --reason "..."'
        assert "1 not replayed" in " ".join(page.text.split())

    def test_rejected_pages(self, small_pages: Site) -> None:
        d = webworld.Driver(small_pages.config, small_pages.factory)
        for i in range(4):
            d.apply(event("retrace.started", 900_000 + i, source="x", worker="w"))
        first = " ".join(small_pages.get("/rejected").text.split())
        assert "5 not replayed" in first and "and 3 more rejected events" in first
        assert "replay 5 " in first and "replay 4 " in first and "replay 3 " not in first
        third = " ".join(small_pages.get("/rejected?page=3").text.split())
        assert "replay 1 " in third and "more rejected events" not in third
        small_pages.get("/rejected?page=0", status=422)

    def test_workflow_page_draws_every_state_and_transition(self, site: Site) -> None:
        raw = site.raw("/workflow")
        page = Page(raw)
        svg = raw[raw.index("<svg"):raw.index("</svg>")]
        for name, spec in SPEC.states.items():
            assert f">{name}</text>" in svg and html.escape(spec.title) in svg
        for t in SPEC.transitions:
            assert f">{t.trigger}" in svg, f"no arrow labelled {t.trigger}"
        transitions = page.body_rows("transitions")
        assert [r[0] for r in transitions] == [t.trigger for t in SPEC.transitions]
        assert [r[-1] for r in transitions] == [t.description for t in SPEC.transitions]
        states = page.body_rows("states")
        assert [r[1] for r in states] == [s.title for s in SPEC.states.values()]

    def test_stylesheet_is_served_from_the_app(self, site: Site) -> None:
        response = site.client.get("/static/retracer.css")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/css")
        assert ".badge" in response.text

    @pytest.mark.parametrize("path", ["/", "/jobs/{hostile}", "/jobs/{held_admin}", "/rejected", "/workflow",
                                      "/jobs/424242"])
    def test_no_script_no_inline_style(self, site: Site, path: str) -> None:
        url = path.format(hostile=site.world.one("hostile"), held_admin=site.world.one("held_admin"))
        response = site.client.get(url)
        page = Page(response.text)
        tags = [t for t, _ in page.tags]
        assert "script" not in tags and "style" not in tags
        assert not [a for _, a in page.tags if "style" in a or any(k.startswith("on") for k in a)]
        assert ("link", {"rel": "stylesheet", "href": "/static/retracer.css"}) in page.tags
        assert "script-src" not in response.headers["content-security-policy"]
        assert "default-src 'none'" in response.headers["content-security-policy"]


class TestErrorPage:
    @pytest.mark.parametrize(("status", "heading"), [(404, "404 · Not Found"), (422, "422 · Unprocessable Entity"),
                                                     (503, "503 · Service Unavailable"), (599, "599 · Error")])
    def test_heading_and_message(self, status: int, heading: str) -> None:
        from starlette.requests import Request

        from retracer.web import pages
        request = Request({"type": "http", "method": "GET", "path": "/x", "headers": [], "query_string": b""})
        response = pages.error_page(request, status, "the database <is> down; try again")
        page = Page(bytes(response.body).decode())
        assert response.status_code == status
        assert heading in " ".join(page.text.split())
        assert "the database <is> down; try again" in page.text and "<is>" not in bytes(response.body).decode()


class TestEscaping:
    @pytest.mark.parametrize("path", ["/", "/jobs/{hostile}", "/jobs/{held_admin}", "/rejected"])
    def test_values_from_events_come_out_as_text(self, site: Site, path: str) -> None:
        url = path.format(hostile=site.world.one("hostile"), held_admin=site.world.one("held_admin"))
        raw = site.raw(url)
        # A rejected event's body is shown as the JSON it was, where a quote reads \".
        forms = [form for v in HOSTILE for form in (v, json.dumps(v)[1:-1])]
        shown = [v for v in forms if str(escape(v)) in raw]
        assert shown, "the page shows none of the hostile values"
        for value in forms:
            assert value not in raw
        assert "<img" not in raw and "<svg onload" not in raw and "<b>evil" not in raw
        page = Page(raw)
        assert not [t for t, _ in page.tags if t in ("script", "img", "b")]
        for value in shown:
            assert value in page.text, "escaped once: the reader sees the value itself"

    def test_hostile_crash_id_is_shown_in_full(self, site: Site) -> None:
        page = site.get(f"/jobs/{site.world.one('hostile')}")
        assert page.body_rows("missing")[0][:2] == ["feedfacefeedfacefeedfacefeedfacefeedface", webworld.HOSTILE_MODULE]
        values = dict((r[0], r[1]) for r in page.sections["fields"].rows)
        assert values["crash_id"] == HOSTILE_CRASH
        assert HOSTILE_ERROR in values["last_error"]

    def test_an_error_page_escapes_what_was_asked(self, site: Site) -> None:
        response = site.client.get("/nowhere/%3Cscript%3Ealert(1)%3C%2Fscript%3E")
        assert response.status_code == 404
        assert "<script>" not in response.text and "&lt;script&gt;" in response.text


# -- the pieces ----------------------------------------------------------------------------------------------


class TestHumane:
    NOW = datetime(2026, 12, 2, 10, 0, 0, tzinfo=UTC)

    @pytest.mark.parametrize(("delta", "said"), [
        (timedelta(minutes=-12, seconds=-5), "12 min ago"), (timedelta(hours=3, minutes=10), "in 3 h"),
        (timedelta(seconds=-45), "45 s ago"), (timedelta(days=-2, hours=-5), "2 d ago"),
        (timedelta(milliseconds=300), "just now"), (timedelta(days=400), "in 1 y"),
    ])
    def test_relative(self, delta: timedelta, said: str) -> None:
        assert humane.relative(self.NOW + delta, self.NOW) == said

    def test_exact_and_none(self) -> None:
        assert humane.exact(self.NOW) == "2026-12-02 10:00:00 UTC"
        assert humane.relative(None, self.NOW) == "never"
        naive = datetime(2026, 12, 2, 9, 0, 0)  # a naive time is read as UTC
        assert humane.relative(naive, self.NOW) == "1 h ago"

    def test_times_carry_the_exact_utc_time_on_hover(self, site: Site) -> None:
        page = site.get("/")
        times = [a for t, a in page.tags if t == "time"]
        assert times and all(re.fullmatch(r"(started )?\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", str(a["title"]))
                             for a in times)


class TestDiagram:
    def test_every_transition_is_an_arrow(self) -> None:
        svg = diagram.svg(SPEC)
        pairs = {(s, t.dest_from(s)) for t in SPEC.transitions for s in t.sources}
        assert svg.count('<g class="edge') == len(pairs)
        assert svg.count('<g class="state') == len(SPEC.states)
        assert svg.count('class="state final"') == sum(s.final for s in SPEC.states.values())

    def test_columns_follow_the_distance_from_the_initial_state(self) -> None:
        columns = diagram.layers(SPEC)
        assert columns[0] == [SPEC.initial]
        assert sorted(s for c in columns for s in c) == sorted(SPEC.states)

    def test_titles_are_escaped(self) -> None:
        from dataclasses import replace
        evil = replace(SPEC, states={**SPEC.states, SPEC.initial: replace(SPEC.states[SPEC.initial],
                                                                          title="<script>x</script>")})
        svg = diagram.svg(evil)
        assert "<script>" not in svg and "&lt;script&gt;x&lt;/script&gt;" in svg


class TestCommands:
    def test_commands_in_a_mail_text(self) -> None:
        text = ("Intro.\n\nOnce fixed, run it\nwith:\n\n    rt release 4\n\nor with:\n\n    rt retry 4\n\n"
                "    not rt a command\n\n-- \nrt show 4\n")
        found = actions.commands_in(text, "rt")
        assert [(a.command, a.why) for a in found] == [("rt release 4", "Once fixed, run it with:"),
                                                      ("rt retry 4", "or with:")]

    def test_a_state_that_mails_nobody_offers_none(self, site: Site) -> None:
        with site.factory() as session:
            job = session.get(Job, site.world.one("retracing"))
            assert job is not None
            assert actions.for_job(site.config, job, None) == []

    def test_no_admins_configured_still_gives_the_commands(self, tmp_path: Path, sqlite_url: str) -> None:
        config = make_config(tmp_path / "data", sqlite_url, RETRACER__MAIL__ADMINS="")
        engine = store.make_engine(config.database_url)
        factory = store.session_factory(engine)
        world = webworld.populate(config, factory, queued=0)
        with factory() as session:
            job = session.get(Job, world.one("held_admin"))
            assert job is not None
            commands = [a.command for a in actions.for_job(config, job, None)]
        engine.dispose()
        assert f"{command(config)} release {job.id}" in commands

