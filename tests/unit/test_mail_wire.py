"""The wire form written directly (retracer.mail.mime) is byte for byte what aiosmtplib makes of the message
the email package builds: same headers, same folding, same body encodings, whatever the values."""

from __future__ import annotations

import email.policy
import email.quoprimime
import io
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiosmtplib.email import flatten_message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retracer.config import Config
from retracer.mail.mime import POLICY, encode_body, fold, quoted_printable
from retracer.mail.render import DIGEST, Notice, crash_title, render, wire
from retracer.mail.transports import Outgoing, mbox_entry, mbox_entry_from_wire, read_message_ids
from retracer.workflow import load_spec

from ..conftest import make_config
from .test_mail_render import context

ROLES = load_spec().roles
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
_BOUNDARY = re.compile(rb"={15}\d{19}==")
#: Text as events bring it: any Unicode, long words, runs of spaces, markup, encoded-word look-alikes.
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=200) | \
    st.sampled_from(["=?utf-8?q?x?=", "From here", "a" * 120, "é" * 90, "<b>&amp;</b>", " x  y ", ""])


def same_bytes(notice: Notice, config: Config) -> tuple[bytes, bytes]:
    """(what aiosmtplib sends for render(), what wire() writes), the random boundary made alike."""
    reference = flatten_message(render(notice, config, NOW))
    return _BOUNDARY.sub(b"BOUNDARY", reference), _BOUNDARY.sub(b"BOUNDARY", wire(notice, config, NOW))


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return make_config(tmp_path_factory.mktemp("wire"))


@pytest.mark.parametrize("state", [ROLES.rescuable, ROLES.held, ROLES.success])
def test_each_state_is_written_as_the_email_package_writes_it(cfg: Config, state: str) -> None:
    """Single-part and multipart mails of every notifying state, as they are usually made."""
    notice = Notice(12, 40, state, "mark@example.com", "Creator", context(state=state, hold_reason="held"), 5)
    reference, direct = same_bytes(notice, cfg)
    assert direct == reference


def test_a_digest_is_written_as_the_email_package_writes_it(cfg: Config) -> None:
    items = [{"job": n, "title": crash_title(context()), "state": ROLES.rescuable, "state_title": "x",
              "reason": "r"} for n in range(40)]
    digest = Notice(None, None, DIGEST, "celso@example.com", "Admin",
                    {"count": 40, "threshold": 2, "window_s": 3600, "items": items, "mails": list(range(40))}, 9)
    reference, direct = same_bytes(digest, cfg)
    assert direct == reference


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(package=TEXT, version=TEXT, release=TEXT, log=TEXT, worker=TEXT, creator=TEXT,
       lines=st.integers(min_value=0, max_value=30))
def test_hostile_values_give_the_same_bytes(cfg: Config, package: str, version: str, release: str, log: str,
                                            worker: str, creator: str, lines: int) -> None:
    """Whatever an event carries (non-ASCII, long words, long and many lines), the bytes are the same."""
    upload_log = "\n".join([log if log.strip() else "x"] * max(1, lines))
    values: dict[str, Any] = {"package": package, "version": version, "release": release, "worker": worker,
                              "creator": creator, "upload_log": upload_log}
    notice = Notice(12, 40, ROLES.rescuable, "mark@example.com", "Creator", context(**values), 5)
    reference, direct = same_bytes(notice, cfg)
    assert direct == reference


@settings(max_examples=500, deadline=None)
@given(name=st.sampled_from(["Subject", "X-Retracer-Rationale", "X-Creator-Recipient", "Auto-Submitted", "From",
                             "To", "Message-ID", "Date"]), value=TEXT)
def test_every_header_folds_as_the_email_package_folds_it(name: str, value: str) -> None:
    value = " ".join(value.split())  # values reach fold() cleaned: no line breaks
    try:
        parsed = POLICY.header_store_parse(name, value)[1]
        reference = email.policy.SMTP.fold_binary(name, parsed)
    except Exception as exc:
        with pytest.raises(type(exc)):
            fold(name, value)
        return
    assert fold(name, value) == reference


@settings(max_examples=500, deadline=None)
@given(body=st.text(st.characters(min_codepoint=0, max_codepoint=255), max_size=400),
       width=st.integers(min_value=4, max_value=100))
def test_quoted_printable_is_the_email_package_one(body: str, width: int) -> None:
    expected = email.quoprimime.body_encode(body, width)
    assert quoted_printable(body, width, eol="\n") == expected
    assert quoted_printable(body, width) == re.sub(r"\r\n|\r|\n", "\r\n", expected)


def test_body_encodings_follow_the_email_package_choice() -> None:
    """Short ASCII lines 7bit, short non-ASCII 8bit, long lines quoted-printable or base64."""
    assert encode_body("short\n")[0] == b"7bit"
    assert encode_body("é\n")[0] == b"8bit"
    assert encode_body("x" * 100 + "\n")[0] == b"quoted-printable"
    assert encode_body("é" * 100 + "\n")[0] == b"base64"


def test_the_mbox_form_of_wire_bytes_keeps_each_header_on_one_line(tmp_path: Path, cfg: Config) -> None:
    """The mbox transport writes wire bytes as it writes the message object: headers on one line each, so a
    Message-ID longer than a line is found when the file is read back."""
    long = make_config(tmp_path, RETRACER__MAIL__SENDER="retracer@" + "sub." * 16 + "example.com")
    notice = Notice(12, 40, ROLES.success, "mark@example.com", "Creator", context(), 5)
    item = Outgoing(5, "mark@example.com", "<x>", data=wire(notice, long, NOW))
    entry = mbox_entry_from_wire(item.data)
    message_id = str(render(notice, long, NOW)["Message-ID"])
    assert len("Message-ID: " + message_id) > 78
    ids: set[str] = set()
    read_message_ids(io.BytesIO(entry), ids)
    assert ids == {message_id}
    # After the From_ line, the same entry as the one written from the message object.
    assert entry.split(b"\n", 1)[1] == mbox_entry(render(notice, long, NOW)).split(b"\n", 1)[1]
