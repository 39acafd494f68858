"""Header safety: no value that came from an event can add a header to a notification."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtplib.email import flatten_message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retracer.config import Config
from retracer.errors import MailError
from retracer.mail.headers import MAX_HEADER_VALUE, address, clean
from retracer.mail.render import Notice, render

from ..conftest import make_config
from .test_mail_render import context

INJECTION = "A =?UTF-8?Q?=0A?=Bcc: x@example.com"
EXPECTED = ["From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted", "X-Retracer-Rationale",
            "X-Retracer-Job", "X-Retracer-Job-State", "X-Creator-Recipient", "MIME-Version", "Content-Type"]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return make_config(tmp_path_factory.mktemp("mail"))


def wire_forms(msg: EmailMessage) -> list[bytes]:
    """The message as aiosmtplib puts it on the wire (8bit and 7bit servers) and as the mbox stores it."""
    return [flatten_message(msg, cte_type="8bit"), flatten_message(msg, cte_type="7bit"),
            msg.as_bytes(policy=email.policy.default)]


def header_names(raw: bytes) -> list[str]:
    return list(email.message_from_bytes(raw, policy=email.policy.default).keys())


def failed_upload(**values: Any) -> Notice:
    return Notice(job_id=1, history_id=3, state="FAILEDTOUPLOAD", recipient="celso@example.com",
                  rationale="Admin", context=context(**values), mail_id=1)


class TestClean:
    @pytest.mark.parametrize("raw", ["a\r\nBcc: x@example.com", "a\nBcc: x", "a\rBcc: x", "a\x00b", "a\x0bb",
                                     "a\x0cb", "a\x1cb", "a\x85b", "a\u2028b", "a\u2029b", "a\u202eb", "a\u200bb"])
    def test_control_and_line_characters_become_spaces(self, raw: str) -> None:
        """CR, LF, other C0/C1 controls, Unicode line separators and format characters are all removed."""
        cleaned = clean(raw)
        assert cleaned.startswith("a") and all(ch.isprintable() for ch in cleaned)
        assert "\r" not in cleaned and "\n" not in cleaned

    @pytest.mark.parametrize("raw", [INJECTION, "=?utf-8?b?Cg==?=", "==??", "=?=?x?q?y?=?=", "=\n?x"])
    def test_encoded_words_are_neutralised(self, raw: str) -> None:
        """No "=?" survives, so no RFC 2047 encoded word can be decoded out of the value."""
        assert "=?" not in clean(raw)

    def test_ordinary_values_are_kept(self) -> None:
        """Cleaning leaves the values we expect alone (a version with an epoch, a dotted package)."""
        for value in ["cdrkit", "1:2.30-1ubuntu0.1", "python3.11", "breezy-autotest", "crash-0001"]:
            assert clean(value) == value

    def test_whitespace_runs_collapse_and_length_is_bounded(self) -> None:
        """A header is one readable line of bounded length."""
        assert clean("  a \t\t b  ") == "a b"
        assert len(clean("x" * 5000)) == MAX_HEADER_VALUE


class TestAddress:
    @pytest.mark.parametrize("raw", ["Mark <mark@example.com>", "a@example.com, b@example.com",
                                     "a@example.com\r\nBcc: b@example.com", "=?utf-8?q?a?=@example.com",
                                     "no-at-sign", "a b@example.com"])
    def test_anything_but_a_bare_address_is_refused(self, raw: str) -> None:
        """To and From take one bare address; a name, a list or a trick is an error saying so."""
        with pytest.raises(MailError, match="fix it where it was given"):
            address(raw)

    def test_a_bare_address_is_kept(self) -> None:
        """Ordinary addresses pass unchanged."""
        assert address("foo.bar+retrace@example.com") == "foo.bar+retrace@example.com"


class TestInjection:
    def test_unclean_value_would_inject_on_this_python(self) -> None:
        """Why cleaning exists: this Python's email package turns the encoded word into a Bcc header."""
        msg = EmailMessage()
        msg["Subject"] = INJECTION
        msg.set_content("x")
        if "Bcc" not in header_names(msg.as_bytes(policy=email.policy.SMTP)):
            pytest.skip("this Python has the CVE-2024-6923 fix; cleaning is defence in depth here")
        assert "Bcc" in header_names(msg.as_bytes(policy=email.policy.SMTP))

    @pytest.mark.parametrize("field", ["package", "version", "release", "crash_id", "architecture", "creator"])
    def test_no_bcc_from_any_event_value(self, cfg: Config, field: str) -> None:
        """The issue's test: the injection string in any event field adds no header, in any wire form."""
        msg = render(failed_upload(**{field: INJECTION}), cfg)
        for raw in wire_forms(msg):
            names = header_names(raw)
            assert "Bcc" not in names
            assert sorted(names) == sorted(EXPECTED)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.one_of(
        st.sampled_from(["\r", "\n", "\r\n", "=?", "?=", "=?UTF-8?Q?", "=0A", "=0D", "?b?", "Cg==", "Bcc:",
                         "=?UTF-8?Q?=0A?=", "=?utf-8?b?DQo=?=", "Bcc: x@example.com", "To: y@example.com",
                         "\x85", "\u2028", "\x00", "\t", " ", ":", "="]),
        st.text(max_size=8)), min_size=1, max_size=12).map("".join))
    def test_no_value_can_add_a_header(self, cfg: Config, value: str) -> None:
        """Property: whatever text reaches the headers, the parsed message has exactly our headers, once."""
        msg = render(failed_upload(package=value, version=value, release=value, creator=value), cfg)
        for raw in wire_forms(msg):
            assert sorted(header_names(raw)) == sorted(EXPECTED)


def test_header_cleaning_does_not_touch_the_body(cfg: Config) -> None:
    """The body shows an event's text as it was: cleaning is for headers only."""
    msg = render(failed_upload(package=INJECTION, upload_log="line 1\nline 2\r\n=?x?q?y?="), cfg)
    part = msg.get_body(("plain",))
    assert part is not None
    body = part.get_content()
    assert f" * Package: {INJECTION}" in body
    assert "line 1\nline 2\n=?x?q?y?=" in body
