"""Text output never hands a terminal a control character: ESC, the other C0 controls, DEL and C1 controls in
error texts, upload logs and single-line fields are printed as visible escapes by show, status, jobs and
rejected (JSON output is escaped by json itself)."""

from __future__ import annotations

import json
import os
import re

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import update

from retracer import store
from retracer.cli import cli
from retracer.cli.context import printable, table
from retracer.store.models import Inbox, Job
from tests.unit.clirun import Retracer

#: Every character a terminal may act on: C0, DEL, C1.
CONTROLS = [chr(c) for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]]
FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: What may remain in a multi-line field: newline and tab, nothing else.
FORBIDDEN_IN_LINES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
HOSTILE = "\x1b[2J\x1b]0;owned\x07\x9b31m\x85\x7f\r\x01"

#: Text mixing ordinary characters with every control, the way hostile workers and publishers send it.
texts = st.text(alphabet=st.one_of(st.sampled_from(CONTROLS), st.characters(codec="utf-8")), max_size=60)


class TestPrintable:
    @given(texts)
    def test_no_control_character_survives(self, text: str) -> None:
        """Whatever the text, what is printed for a one-line field holds no control character at all."""
        assert not FORBIDDEN.search(printable(text))

    @given(texts)
    def test_lines_keep_only_newline_and_tab(self, text: str) -> None:
        """A multi-line field keeps its newlines and tabs, and nothing else a terminal acts on."""
        shown = printable(text, lines=True)
        assert not FORBIDDEN_IN_LINES.search(shown)
        assert shown.count("\n") == text.count("\n") and shown.count("\t") == text.count("\t")

    @given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cc"])))
    def test_ordinary_text_is_unchanged(self, text: str) -> None:
        """Text without control characters is printed exactly as it is."""
        assert printable(text) == text == printable(text, lines=True)

    @pytest.mark.parametrize("char", CONTROLS)
    def test_each_control_is_shown_by_its_code(self, char: str) -> None:
        """Each control character becomes a visible escape naming it (\\x1b, \\x9b, \\r, ...)."""
        named = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
        code = "\\x%02x" % ord(char)  # noqa: UP031  (a backslash cannot be in an f-string's expression)
        assert printable(f"a{char}b") == "a" + named.get(char, code) + "b"


class TestTable:
    @given(st.lists(st.lists(texts, min_size=3, max_size=3), max_size=5))
    def test_one_line_per_row_and_no_control(self, rows: list[list[str]]) -> None:
        """A table has a line per row whatever its cells hold, and hands the terminal no control character."""
        out = table(["A", "B", "C"], rows)
        assert len(out.split("\n")) == 1 + len(rows)
        assert not FORBIDDEN.search(out.replace("\n", ""))


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RETRACER"):
            monkeypatch.delenv(name)


def _clean(out: str) -> None:
    """Nothing but newlines (between lines) reaches the terminal."""
    assert not FORBIDDEN.search(out.replace("\n", "")), [c for c in out if FORBIDDEN.match(c) and c != "\n"]


class TestCommands:
    def test_error_text_in_show_status_and_jobs(self, rt: Retracer) -> None:
        """A worker's error full of escape sequences is printed escaped by show (last error, hold reason,
        history) and status (recent failures, on hold); its lines stay lines in show."""
        job = rt.submit("c1")
        rt.apply("retrace.started", job, worker="w1")
        rt.apply("retrace.failed", job, error=f"E: bad{HOSTILE}\nsecond\tline", transient=False)
        shown = rt.args("show", str(job))
        assert not FORBIDDEN_IN_LINES.search(shown)  # the error's tab stays: it is a multi-line field
        assert "\\x1b[2J\\x1b]0;owned\\x07\\x9b31m\\x85\\x7f\\r\\x01" in shown
        assert "\n              second\tline\n" in shown  # the error's second line, under the first
        status = rt.args("status")
        _clean(status)
        assert "\\x1b[2J" in status
        _clean(rt.args("jobs"))

    def test_upload_log_in_show(self, rt: Retracer) -> None:
        """An upload log with escape sequences is printed line by line, escaped."""
        job = rt.submit("c1")
        rt.apply("retrace.started", job, worker="w1")
        rt.apply("upload.failed", job, leaf="upload-1", upload_log=f"Rejected{HOSTILE}\nmore\x1b[1A")
        shown = rt.args("show", str(job))
        _clean(shown)
        assert "  Upload log:\n    Rejected\\x1b[2J" in shown and "\n    more\\x1b[1A\n" in shown

    def test_single_line_fields(self, rt: Retracer) -> None:
        """A C1 control in a single-line field (a one-byte CSI; events refuse it now, a row stored by an older
        version may still hold one) is escaped by jobs, show and status."""
        job = rt.submit("c1")
        with store.transaction(rt.factory) as session:
            session.execute(update(Job).where(Job.id == job).values(crash_id="c\x9b2J", package="cdr\x9b31mkit"))
        for out in (rt.args("jobs"), rt.args("show", str(job)), rt.args("status")):
            _clean(out)
            assert "cdr\\x9b31mkit" in out

    def test_rejected_events(self, rt: Retracer) -> None:
        """Events whose id or type carry escape sequences are rejected, and `rejected` prints them escaped;
        replaying one says so escaped too. --json keeps the text, escaped by JSON."""
        bodies = [{"id": "e\x1b[2J1", "type": "retrace.started", "job": 1, "occurred_at": "2024-01-01T00:00:00+00:00",
                   "source": "s", "data": {"worker": "w"}},
                  {"id": "e2", "type": "x\x1b]0;owned\x07", "job": 1, "occurred_at": "2024-01-01T00:00:00+00:00",
                   "source": "s", "data": {}}]
        with store.transaction(rt.factory) as session:
            session.add_all([Inbox(body=json.dumps(b)) for b in bodies])
        rt.args("serve", "--until-idle", "--log-level", "ERROR")
        out = rt.args("rejected")
        _clean(out)
        assert "e\\x1b[2J1" in out and "x\\x1b]0;owned\\x07" in out
        assert [r["type"] for r in json.loads(rt.args("rejected", "--json"))][1] == "x\x1b]0;owned\x07"
        replay = CliRunner().invoke(cli, ["rejected", "replay", "2"], env=rt.env, prog_name="retracer")
        assert replay.exit_code == 1 and "rejected again" in replay.output
        _clean(replay.output)

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(error=texts.filter(lambda t: t.strip() and "\x00" not in t))
    def test_any_error_text(self, rt: Retracer, error: str) -> None:
        """Whatever a worker's error holds, show and status hand the terminal only newlines and tabs."""
        job = rt.submit("c", " --allow-duplicate")
        rt.apply("retrace.started", job, worker="w1")
        rt.apply("retrace.failed", job, error=error, transient=False)
        for out in (rt.args("show", str(job)), rt.args("status")):
            assert not FORBIDDEN_IN_LINES.search(out)
