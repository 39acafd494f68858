"""The one rule for an email address, applied where an address comes in (an event's creator, the config's
admins and sender) and again where a mail is addressed.

An address is ``local@domain`` in plain ASCII: the local part a dot-atom (no quotes, comments or encoded
words), the domain host names of letters, digits and hyphens (no IP literal). Everything else that RFC 5322
allows is refused, because each form is a way to make one address mean two things: to a person reading a
mail (invisible and bidirectional characters, encoded words) or to the mail layer (comments, quoted parts).

email-validator applies a similar rule but refuses every special-use domain (localhost, .local, .test), and
site-local admin addresses such as root@localhost are common in a retrace service's configuration.
"""

from __future__ import annotations

import re
import unicodedata

MAX_ADDRESS = 254  # the longest forward-path SMTP carries, less its angle brackets
MAX_LOCAL = 64
MAX_LABEL = 63
MAX_DOMAIN = 253

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*\Z")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\Z")

HINT = "write it as user@example.org: plain ASCII, no name, quotes, comments or angle brackets"


def problem(value: object) -> str | None:  # noqa: C901  (one reason per rule, in the order a reader checks)
    """What is wrong with ``value`` as an email address, or None if it is one."""
    if not isinstance(value, str) or not value:
        return f"must be a text holding one email address ({HINT})"
    if len(value) > MAX_ADDRESS:
        return f"is {len(value)} characters long, at most {MAX_ADDRESS} allowed"
    for ch in value:
        if not ch.isascii():
            name = unicodedata.name(ch, "an unnamed character")
            return (f"contains {name} (U+{ord(ch):04X}): only ASCII addresses are accepted; write an "
                    f"international domain in its xn-- form{_idna_hint(value)}")
        if not ch.isprintable() or ch.isspace():
            return f"contains the control or space character {ch!r}; {HINT}"
    if value.count("@") != 1:
        return f"must hold exactly one @ between the local part and the domain; {HINT}"
    local, domain = value.split("@")
    if not local:
        return "has nothing before the @"
    if len(local) > MAX_LOCAL:
        return f"has a local part of {len(local)} characters, at most {MAX_LOCAL} allowed"
    if "=?" in local:
        return "has a local part that looks like an encoded word (=?...?=); give the address itself"
    if not _LOCAL.match(local):
        return ("has a local part with characters or dots an address may not use here (letters, digits and "
                "!#$%&'*+/=?^_`{|}~- separated by single dots; no quotes, comments or parentheses)")
    if not domain:
        return "has nothing after the @"
    if domain.startswith("["):
        return "has an IP literal as its domain; give the mail host's name"
    if len(domain) > MAX_DOMAIN:
        return f"has a domain of {len(domain)} characters, at most {MAX_DOMAIN} allowed"
    labels = domain.split(".")
    for label in labels:
        if not label:
            return f"has an empty label in its domain {domain!r} (two dots, or a dot at an end)"
        if len(label) > MAX_LABEL:
            return f"has a domain label of {len(label)} characters, at most {MAX_LABEL} allowed"
        if not _LABEL.match(label):
            return (f"has a domain label {label!r} that is not a host name (letters, digits and inner hyphens)")
    if labels[-1].isdigit():
        return "has a numeric address as its domain; give the mail host's name"
    return None


def _idna_hint(value: str) -> str:
    local, _, domain = value.rpartition("@")
    if not local or not domain or not local.isascii():
        return ""
    try:
        return f" ({local}@{domain.encode('idna').decode('ascii')})"
    except UnicodeError:
        return ""


def domain_of(address: str) -> str:
    """The domain of a valid address, in lower case (domains are case-insensitive)."""
    return address.rpartition("@")[2].lower()


def in_domains(address: str, domains: list[str] | tuple[str, ...]) -> bool:
    """Whether ``address``'s domain is one of ``domains`` or below one of them."""
    domain = domain_of(address)
    return any(domain == d or domain.endswith("." + d) for d in (d.lower().lstrip(".") for d in domains))
