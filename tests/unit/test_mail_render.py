"""Rendering a mail row: templates from the package, subject, headers, body, Message-ID."""

from __future__ import annotations

import tomllib
from email.message import EmailMessage
from fnmatch import fnmatch
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from jinja2 import PackageLoader

from retracer.config import Config
from retracer.errors import MailError
from retracer.mail.render import DIGEST, Notice, crash_title, duration, environment, message_id, render
from retracer.workflow import load

from ..conftest import make_config

ROOT = Path(__file__).resolve().parents[2]


def context(**overrides: Any) -> dict[str, Any]:
    """A snapshot as retracer.notify.snapshot writes it, for a job that failed to upload."""
    data: dict[str, Any] = {
        "job": 22, "crash_id": "crash-0001", "creator": "mark@example.com", "package": "cdrkit",
        "version": "1.0", "architecture": "i386", "release": "breezy-autotest", "state": "FAILEDTOUPLOAD",
        "state_title": "Failed to upload", "from_state": "RETRACING", "trigger": "upload_failed",
        "actor": "event:test", "reason": "upload failed: ANY OUTPUT", "duration_s": 75, "worker": "bob",
        "attempts": 0, "upload_leaf": "upload-22", "upload_log": "ANY OUTPUT", "hold_reason": None,
        "failure_pattern": None, "last_error": None, "at": "2026-01-01T00:00:00+00:00",
    }
    data.update(overrides)
    return data


def notice(state: str = "FAILEDTOUPLOAD", recipient: str = "celso@example.com", rationale: str = "Admin",
           history_id: int = 7, **overrides: Any) -> Notice:
    return Notice(job_id=22, history_id=history_id, state=state, recipient=recipient, rationale=rationale,
                  context=context(state=state, **overrides), mail_id=1)


def plain(msg: EmailMessage) -> str:
    part = msg.get_body(("plain",))
    assert part is not None
    return str(part.get_content())


def html(msg: EmailMessage) -> str | None:
    part = msg.get_body(("html",))
    return None if part is None else str(part.get_content())


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return make_config(tmp_path, RETRACER__MAIL__SENDER="retracer@retrace.example.com")


class TestHeaders:
    def test_subject_names_the_job_and_the_crash_title(self, cfg: Config) -> None:
        """The subject is Launchpad's: [Retrace #job] and the crash title."""
        msg = render(notice(), cfg)
        assert msg["Subject"] == "[Retrace #22] i386 retrace of cdrkit 1.0 in breezy-autotest (crash crash-0001)"

    def test_state_rationale_and_creator_headers(self, cfg: Config) -> None:
        """Filters can sort on the job, its state, why this recipient gets it, and whose crash it is."""
        msg = render(notice(recipient="mark@example.com", rationale="Creator"), cfg)
        assert msg["X-Retracer-Job"] == "22"
        assert msg["X-Retracer-Job-State"] == "FAILEDTOUPLOAD"
        assert msg["X-Retracer-Rationale"] == "Creator"
        assert msg["X-Creator-Recipient"] == "mark@example.com"
        assert msg["From"] == "retracer@retrace.example.com"
        assert msg["To"] == "mark@example.com"
        assert msg["Auto-Submitted"] == "auto-generated"
        assert msg["Date"]

    def test_message_id_is_the_same_each_time(self, cfg: Config) -> None:
        """Rendering the same mail twice gives the same Message-ID, so a resend is recognisable."""
        first, second = render(notice(), cfg), render(notice(), cfg)
        assert first["Message-ID"] == second["Message-ID"]
        assert first["Message-ID"].endswith("@retrace.example.com>")

    def test_message_id_differs_per_recipient_and_transition(self, cfg: Config) -> None:
        """Another recipient or another transition of the same job is another message."""
        sender = cfg["mail"]["sender"]
        ids = {message_id(notice(), sender), message_id(notice(recipient="foo.bar@example.com"), sender),
               message_id(notice(history_id=8), sender)}
        assert len(ids) == 3
        assert message_id(notice(recipient="Celso@Example.com"), sender) == message_id(notice(), sender)

    def test_a_recipient_that_is_not_an_address_is_refused(self, cfg: Config) -> None:
        """A To that could carry a display name or a second address is refused, not sent."""
        with pytest.raises(MailError, match="no name, quotes, comments or angle brackets"):
            render(notice(recipient="Mark <mark@example.com>, x@example.com"), cfg)


class TestFailedToUpload:
    def test_body_has_the_facts_the_log_and_the_rescue_command(self, cfg: Config) -> None:
        """An admin can act from the mail alone: what, where, the log, and the exact command."""
        body = plain(render(notice(), cfg))
        for line in [" * Crash: crash-0001", " * Package: cdrkit", " * Version: 1.0", " * Architecture: i386",
                     " * Release: breezy-autotest", " * State: Failed to upload", " * Duration: 1 minute",
                     " * Worker: bob", " * Failed attempts: 0", "Upload log:\nANY OUTPUT",
                     '    retracer rescue 22 --reason "..."']:
            assert line in body

    @pytest.mark.parametrize("log", [None, "", "   \n"])
    def test_refused_without_an_upload_log(self, cfg: Config, log: str | None) -> None:
        """As Launchpad asserts: no FAILEDTOUPLOAD notification without the upload log."""
        with pytest.raises(MailError, match="An upload log is required for FAILEDTOUPLOAD notifications"):
            render(notice(upload_log=log), cfg)

    def test_html_alternative_escapes_event_values(self, cfg: Config) -> None:
        """Markup in a package name or a log is shown in the HTML part, never interpreted."""
        msg = render(notice(package="<script>alert(1)</script>", upload_log="<b>bold</b> & more"), cfg)
        page = html(msg)
        assert page is not None
        assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert "&lt;b&gt;bold&lt;/b&gt; &amp; more" in page
        assert "<script>alert(1)</script>" in plain(msg)  # text/plain is not HTML: shown as written


class TestOnHold:
    def test_body_has_reason_pattern_and_release_command(self, cfg: Config) -> None:
        """A held job's mail says why, which failure pattern matched, and how to release it."""
        body = plain(render(notice("ON_HOLD", hold_reason="retries exhausted after 3 of 3 attempts",
                                   failure_pattern="GPG error", last_error="GPG error: bad signature",
                                   state_title="On hold for review"), cfg))
        assert "The job is on hold for review:\nretries exhausted after 3 of 3 attempts" in body
        assert "matched the transient-failure pattern: GPG error" in body
        assert "Last error:\nGPG error: bad signature" in body
        assert "    retracer release 22" in body and "    retracer retry 22" in body

    def test_no_pattern_line_when_none_matched(self, cfg: Config) -> None:
        """A permanent failure matched no pattern; the mail does not pretend one did."""
        body = plain(render(notice("ON_HOLD", hold_reason="permanent failure on attempt 1"), cfg))
        assert "pattern" not in body


class TestFooter:
    def test_admin_footer(self, cfg: Config) -> None:
        """An admin is told it is because they administer this instance."""
        assert "because you are an admin of this retracer\ninstance" in plain(render(notice(), cfg))

    def test_creator_footer(self, cfg: Config) -> None:
        """The creator is told it is because of their crash."""
        body = plain(render(notice("FULLYBUILT", recipient="mark@example.com", rationale="Creator"), cfg))
        assert "because you are the creator of crash\ncrash-0001" in body
        assert "admin of this retracer\ninstance" not in body


class TestTemplates:
    @pytest.mark.parametrize("state", [s.name for s in load().states.values() if s.notify])
    def test_every_notifying_state_has_a_template(self, cfg: Config, state: str) -> None:
        """Each state that mails someone (states/workflow.toml) renders, with its title."""
        title = load().states[state].title
        msg = render(notice(state, state_title=title, hold_reason="held"), cfg)
        assert f" * State: {title}" in plain(msg)

    def test_a_value_missing_from_the_snapshot_is_an_error_not_a_blank(self, cfg: Config) -> None:
        """StrictUndefined: a template using a value the snapshot lacks fails, naming the template."""
        broken = notice()
        broken = Notice(broken.job_id, broken.history_id, broken.state, broken.recipient, broken.rationale,
                        {k: v for k, v in broken.context.items() if k != "worker"})
        with pytest.raises(MailError, match=r"template _header\.txt line 9 uses a value .*worker"):
            render(broken, cfg)

    def test_unknown_state_has_no_template(self, cfg: Config) -> None:
        """A state nobody wrote a template for is a clear error saying which file to add."""
        with pytest.raises(MailError, match=r"add templates/email/RETRACING\.txt"):
            render(notice("RETRACING"), cfg)

    @pytest.mark.parametrize("state", ["../etc/passwd", "failedtoupload", "X" * 40])
    def test_state_must_be_a_state_name(self, cfg: Config, state: str) -> None:
        """The template name comes from a database row: anything but a state name is refused."""
        with pytest.raises(MailError, match="is not a state name"):
            render(notice(state), cfg)

    def test_templates_come_from_the_package(self) -> None:
        """The loader reads retracer.email_templates only, never the working directory."""
        env = environment()
        assert isinstance(env.loader, PackageLoader)
        assert "FAILEDTOUPLOAD.txt" in env.list_templates()
        shipped = {p.name for p in resources.files("retracer.email_templates").iterdir()}
        assert {"FAILEDTOUPLOAD.txt", "ON_HOLD.txt", "FULLYBUILT.txt", "digest.txt"} <= shipped

    def test_every_template_is_covered_by_package_data(self) -> None:
        """A template named outside the package-data patterns (say .j2) would be missing from a wheel."""
        pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
        patterns = pyproject["tool"]["setuptools"]["package-data"]["retracer.email_templates"]
        for path in (ROOT / "templates" / "email").iterdir():
            if path.is_file() and path.name != "__init__.py":
                assert any(fnmatch(path.name, p) for p in patterns), f"{path.name} would not be shipped"

    def test_html_templates_are_autoescaped_and_text_ones_are_not(self) -> None:
        """select_autoescape looks at the last extension: .html escapes, .txt does not."""
        env = environment()
        assert callable(env.autoescape)
        assert env.autoescape("FAILEDTOUPLOAD.html") is True
        assert env.autoescape("FAILEDTOUPLOAD.txt") is False


class TestDigest:
    def test_digest_lists_the_jobs(self, cfg: Config) -> None:
        """A flood-control digest names every job it stands for, in subject and body."""
        items = [{"job": n, "title": crash_title(context(crash_id=f"crash-{n}")), "state": "FAILEDTOUPLOAD",
                  "state_title": "Failed to upload", "reason": "upload failed: x"} for n in (4, 5, 6)]
        digest = Notice(None, None, DIGEST, "celso@example.com", "Admin",
                        {"count": 3, "threshold": 2, "window_s": 3600, "items": items, "mails": [1, 2, 3]}, 99)
        msg = render(digest, cfg)
        assert msg["Subject"] == "[Retrace digest] 3 notifications: jobs 4, 5, 6"
        assert msg["X-Retracer-Digest"] == "3"
        assert msg["X-Retracer-Job"] is None
        body = plain(msg)
        assert "More than 2 notifications for you came due within 1 hour." in body
        for n in (4, 5, 6):
            assert f" * Job {n}: i386 retrace of cdrkit 1.0 in breezy-autotest (crash crash-{n})" in body


@pytest.mark.parametrize(("seconds", "text"), [
    (None, "unknown"), (0, "0 seconds"), (1, "1 second"), (59, "59 seconds"), (60, "1 minute"),
    (150, "2 minutes"), (3600, "1 hour"), (3660, "1 hour 1 minute"), (7500, "2 hours 5 minutes"),
])
def test_duration(seconds: int | None, text: str) -> None:
    """Durations read like Launchpad's: coarse and in words."""
    assert duration(seconds) == text
