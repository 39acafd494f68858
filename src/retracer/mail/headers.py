"""Cleaning values that came from events before they reach a mail header.

Python 3.11.7's email package decodes an RFC 2047 encoded word while parsing a header value and writes
what it decoded back out unquoted (CVE-2024-6923): a package named ``A =?UTF-8?Q?=0A?=Bcc: x@example.com``
becomes a real Bcc header. Events are validated against raw CR/LF, but not against encoded words or the
Unicode line and format characters, so every event-derived header value goes through :func:`clean`.
"""

from __future__ import annotations

import re
import unicodedata

from retracer import addresses
from retracer.errors import MailError

# Control, format (bidi overrides, zero-width), line/paragraph separators; surrogates cannot be encoded.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_SPACES = re.compile(r"\s+")

#: Longer values are cut: a header is for reading at a glance; the body carries the whole text.
MAX_HEADER_VALUE = 400


def clean(value: object, max_length: int = MAX_HEADER_VALUE) -> str:
    """``value`` as one safe header line: no control characters, no encoded-word syntax, one space runs."""
    text = str(value)
    # Printable ASCII has none of the unsafe categories: only other text needs the look at each character
    # (~40 µs a mail for the headers of one notification, measured).
    if not (text.isascii() and text.isprintable()):
        text = "".join(" " if unicodedata.category(ch) in _UNSAFE_CATEGORIES else ch for ch in text)
    text = _SPACES.sub(" ", text).strip()
    # An encoded word must start with "=?" and cannot contain a space, so "= ?" can never be decoded;
    # the replacement cannot create a new "=?" across its own edges, so one pass is enough.
    text = text.replace("=?", "= ?")
    if len(text) > max_length:
        text = text[: max_length - 3].rstrip() + "..."
    return text


def address(value: object, what: str = "recipient") -> str:
    """A bare email address for To/From, or MailError saying what was wrong with it.

    The rule is the one events and the configuration apply at the door (retracer.addresses): an address
    stored before that rule, or given another way, is refused here rather than sent garbled.
    """
    why = addresses.problem(value)
    if why is not None:
        raise MailError(f"the {what} {str(value)[:100]!r} {why}; fix it where it was given")
    return str(value)
