"""One address rule: what an event's creator, the config's admins and sender, and a mail's To header accept is
the same set of addresses, and each of them arrives in the mail exactly as written."""

from __future__ import annotations

from email import message_from_bytes
from email.headerregistry import Address
from email.policy import SMTP
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retracer import addresses
from retracer import events as ev
from retracer.config import load as load_config
from retracer.errors import ConfigError, InvalidEvent, MailError
from retracer.mail.headers import address
from tests.unit.test_events import with_data

HOSTILE = {
    "comment": "mark(comment)@example.org",
    "quoted local part": '"mark smith"@example.org',
    "quoted at sign": '"a@b"@example.org',
    "IP literal": "mark@[127.0.0.1]",
    "IPv6 literal": "mark@[IPv6:::1]",
    "numeric domain": "mark@10.0.0.1",
    "zero-width space": "ma\u200brk@example.org",
    "right-to-left override": "mark@exa\u202emple.org",
    "empty label": "mark@example..org",
    "leading dot in domain": "mark@.example.org",
    "trailing dot": "mark@example.org.",
    "encoded word local part": "=?utf-8?q?m=C3=A4rk?=@example.org",
    "non-ASCII local part": "märk@example.org",
    "non-ASCII domain": "mark@exämple.org",
    "display name": "Mark <mark@example.org>",
    "two addresses": "a@example.org,b@example.org",
    "group syntax": "team:a@example.org;",
    "double dot local": "ma..rk@example.org",
    "leading dot local": ".mark@example.org",
    "hyphen label edge": "mark@-example.org",
    "C1 control": "mark\x85@example.org",
    "long local part": "m" * 65 + "@example.org",
    "long label": "mark@" + "l" * 64 + ".org",
    "newline": "mark@example.org\nBcc: x@example.org",
}


def event_problem(value: str) -> str | None:
    try:
        ev.parse(with_data("crash.submitted", creator=value))
    except InvalidEvent as exc:
        return str(exc)
    return None


def config_problem(value: str, tmp: Any) -> str | None:
    path = tmp / "retracer.toml"
    path.write_text(f"[mail]\nadmins = [{_toml(value)}]\nsender = {_toml(value)}\n", encoding="utf-8")
    try:
        load_config(str(path), environ={})
    except ConfigError as exc:
        return str(exc)
    return None


def mail_problem(value: str) -> str | None:
    try:
        address(value)
    except MailError as exc:
        return str(exc)
    return None


def _toml(value: str) -> str:
    return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}" for c in value) + '"'


@pytest.mark.parametrize("value", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_address_refused_everywhere(value: str, tmp_path: Any) -> None:
    """Each form refused by the rule is refused by the event contract, the configuration and the mail layer,
    each saying why."""
    why = addresses.problem(value)
    assert why is not None
    assert event_problem(value) == f"data.creator {why}"
    assert why in (config_problem(value, tmp_path) or "")
    assert why in (mail_problem(value) or "")


@pytest.mark.parametrize("value", ["mark@example.org", "root@localhost", "a.b+tag@mail.example.co.uk",
                                   "o'neil@example.org", "x@xn--exmple-cua.org", "UPPER@Example.ORG",
                                   "a@" + ".".join(["l" * 63] * 3) + "." + "l" * 57])
def test_plain_address_accepted_everywhere(value: str, tmp_path: Any) -> None:
    """An ordinary address (and one at every limit) passes the event contract, the configuration and the mail
    layer unchanged."""
    assert addresses.problem(value) is None
    assert ev.parse(with_data("crash.submitted", creator=value)).data["creator"] == value
    assert config_problem(value, tmp_path) is None
    assert address(value) == value


def test_non_ascii_domain_hint() -> None:
    """An international domain is refused with its ASCII spelling to use instead."""
    assert "(mark@xn--exmple-cua.org)" in (addresses.problem("mark@exämple.org") or "")


ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-"


@settings(max_examples=300)
@given(st.text(min_size=1, max_size=80))
def test_any_text_one_verdict(value: str) -> None:
    """For any text, the event contract and the mail layer agree with the rule: an address accepted at the
    door is never refused or changed when the mail is addressed."""
    why = addresses.problem(value)
    assert (event_problem(value) is None) == (why is None)
    assert (mail_problem(value) is None) == (why is None)


@settings(max_examples=300)
@given(st.lists(st.text(ATEXT, min_size=1, max_size=10), min_size=1, max_size=3),
       st.lists(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True), min_size=1, max_size=3))
def test_accepted_addresses_survive_the_mail_round_trip(local: list[str], labels: list[str]) -> None:
    """Every address the rule accepts is one address to Python's mail parser: written into a To header and
    read back, it is the same address, with nothing decoded out of it."""
    value = ".".join(local) + "@" + ".".join([*labels, "org"])
    if addresses.problem(value) is not None:
        return
    parsed = Address(addr_spec=value)
    assert parsed.addr_spec == value
    msg = message_from_bytes(f"To: {address(value)}\r\n\r\n".encode("ascii"), policy=SMTP)
    assert [a.addr_spec for a in msg["To"].addresses] == [value]


def test_creator_domains(tmp_path: Any) -> None:
    """[mail] creator_domains accepts domain names only, and matches a domain and its subdomains."""
    assert addresses.in_domains("a@crash.example.org", ["example.org"])
    assert addresses.in_domains("a@EXAMPLE.org", ["example.org"])
    assert not addresses.in_domains("a@badexample.org", ["example.org"])
    path = tmp_path / "retracer.toml"
    path.write_text('[mail]\ncreator_domains = ["example.org", "not a domain", "@x.org"]\n', encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        load_config(str(path), environ={})
    assert "'not a domain' is not a domain name" in str(exc.value)
    assert "'@x.org' is not a domain name" in str(exc.value)
