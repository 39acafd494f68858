"""The failure policy: which failures are transient, how long to wait before a retry, when to give up, and
what a transient-failure pattern may be. Its values come from the configuration's [policy] section alone.

Patterns are matched by RE2 (google-re2), whose matching time is linear in the text: a pattern cannot
backtrack, so no pattern and no error text can keep ``serve`` busy (it classifies a failure while it holds
the database's write lock). What RE2 cannot run in linear time (backreferences, lookaround) it refuses to
compile; such a pattern is refused when it is added, and skipped, with one log line, if it is already stored.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import re2  # type: ignore[import-untyped]  # google-re2 ships no type information

from retracer.errors import RetracerError

log = logging.getLogger("retracer.policy")

#: An admin's pattern longer than this is refused (it is searched in every failure's error text).
MAX_PATTERN = 500
#: A pattern whose compiled program has more instructions than this is refused: RE2's time is linear in the
#: text times the program's size, and large counted repetitions (``[^x]{400}``) make large programs. The
#: built-in patterns take 20 to 50, a Unicode class (\pL) about 1200; at this size a search of a
#: whole error text takes well under a second however the pattern and the text are made.
MAX_PROGRAM = 2000
#: Only this much of an error text is searched: the event contract's bound on ``retrace.failed``'s error.
MAX_ERROR_TEXT = 65536

_OPTIONS = re2.Options()
_OPTIONS.case_sensitive = False
_OPTIONS.log_errors = False  # a refused pattern is reported to whoever gave it, not by RE2 on stderr

#: Patterns already reported as unusable by this process: a policy is built for every batch, the line once.
_REPORTED: set[str] = set()


@dataclass(frozen=True)
class Verdict:
    """How a failure was classified, and the pattern that decided it (None when the worker's hint did)."""

    transient: bool
    pattern: str | None


class Pattern:
    """A transient-failure pattern compiled by RE2: case-insensitive, searched in at most MAX_ERROR_TEXT
    characters of an error text."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._regex: Any = _compile(text)

    def search(self, error: str) -> bool:
        # Bytes, with unencodable characters replaced, so that no error text can make the search raise.
        data = error[:MAX_ERROR_TEXT].encode("utf-8", "replace")
        return self._regex.search(data) is not None


def _compile(text: str) -> Any:
    """``text`` compiled by RE2, or RetracerError saying why it cannot be and what to write instead."""
    if not isinstance(text, str):
        raise RetracerError(f"{text!r} is not a regular expression: it must be a string")
    try:
        regex = re2.compile(text.encode("utf-8", "surrogatepass"), _OPTIONS)
    except re2.error as exc:
        raise RetracerError(_refusal(text, exc)) from None
    size = int(regex.programsize)
    if size > MAX_PROGRAM:
        raise RetracerError(f"{text!r} is too large once compiled ({size} steps, at most {MAX_PROGRAM}): "
                            f"write smaller counted repetitions ({{n,m}}) or a shorter alternation")
    return regex


def _refusal(text: str, exc: Exception) -> str:
    """Why RE2 refused ``text``: a syntax error (worded by Python's parser, which says where), or a feature
    that needs backtracking, with what to write instead."""
    try:
        re.compile(text, re.IGNORECASE)
    except re.error as syntax:
        return (f"{text!r} is not a regular expression: {syntax}; quote it for the shell and escape special "
                f"characters (e.g. \\. for a dot)")
    except (ValueError, TypeError, OverflowError, RecursionError) as other:
        return f"{text!r} is not a regular expression: {other}"
    why = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
    if "(?=" in why or "(?!" in why or "(?<" in why:
        what = ("lookahead and lookbehind ((?=...), (?!...), (?<=...), (?<!...)) are not supported; write the "
                "surrounding text as part of the pattern (e.g. 'fetch failed' for 'fetch(?= failed)')")
    elif ("invalid escape" in why and re.search(r"\\[1-9]", text)) or "(?P=" in text:
        what = ("backreferences (\\1, (?P=name)) are not supported; write the repeated text out, or match it "
                "with a class (e.g. '(\\w+) \\w+' for '(\\w+) \\1')")
    elif "bad repetition operator" in why:
        what = "possessive quantifiers (a++, a*+, a?+) are not supported; write a+, a* or a?"
    elif "repetition size" in why or "too large" in why or "too big" in why:
        what = "a counted repetition is too large; use a smaller {n,m} (at most 1000, and nested counts multiply)"
    elif "\\Z" in why:
        what = "\\Z is not supported; write \\z (or $) for the end of the text"
    else:
        what = f"{why}; write it without that construct"
    return (f"{text!r} cannot be matched in bounded time: {what} (patterns are matched by RE2, which never "
            f"backtracks)")


def pattern_problem(text: str) -> str | None:
    """Why ``text`` cannot be used as a transient-failure pattern, or None if it can."""
    try:
        _compile(text)
    except RetracerError as exc:
        return str(exc)
    return None


class FailurePolicy:
    """Built-in patterns from the config plus the admin-registered spurious-failure patterns."""

    def __init__(self, max_attempts: int, backoff_base_s: float, backoff_factor: float, backoff_max_s: float,
                 patterns: Iterable[str] = ()) -> None:
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_factor = backoff_factor
        self.backoff_max_s = backoff_max_s
        self.patterns: list[Pattern] = []
        #: Patterns that cannot be used (stored before they were refused), with why: skipped, never raised.
        self.unusable: list[tuple[str, str]] = []
        for text in patterns:
            try:
                self.patterns.append(Pattern(text))
            except RetracerError as exc:
                self.unusable.append((text, str(exc)))
                if text not in _REPORTED:
                    _REPORTED.add(text)
                    log.error("transient-failure pattern skipped: it cannot be used; remove it with "
                              "`retracer spurious remove` (see `retracer spurious list`)",
                              extra={"pattern": text, "problem": str(exc)})

    @classmethod
    def from_config(cls, section: dict[str, Any], extra_patterns: Iterable[str] = ()) -> FailurePolicy:
        """The policy of a configuration's [policy] section, with the admins' patterns after the built-in ones."""
        return cls(section["max_attempts"], section["backoff_base_s"], section["backoff_factor"],
                   section["backoff_max_s"], [*section["transient_patterns"], *extra_patterns])

    def classify(self, error: str, hint: object = None) -> Verdict:
        """A failure is transient if the worker says so or its text matches a pattern."""
        for pattern in self.patterns:
            if pattern.search(error):
                return Verdict(True, pattern.text)
        return Verdict(hint is True, None)

    def attempts_left(self, attempts: int) -> bool:
        """Whether an attempt may follow the ``attempts + 1``-th, which just failed."""
        return attempts + 1 < self.max_attempts

    def backoff(self, attempts: int) -> timedelta:
        """The wait before retry number ``attempts`` (1 for the first retry)."""
        seconds = self.backoff_base_s * self.backoff_factor ** max(attempts - 1, 0)
        return timedelta(seconds=min(seconds, self.backoff_max_s))

    def hold_reason(self, attempts: int, transient: bool, pattern: str | None, error: str) -> str:
        """Why a job whose attempt number ``attempts`` failed is held, for its history and the admins' mail."""
        quoted = first_line(error) or "no error text"
        if transient:
            why = f"retries exhausted after {attempts} of {self.max_attempts} attempts"
        else:
            why = f"permanent failure on attempt {attempts}"
        matched = f"; matched transient pattern {pattern!r}" if pattern else ""
        return f"{why}{matched}; last error: {quoted}"


#: A history reason quotes this much of an error's first line; the job keeps the whole error.
REASON_QUOTE = 300


def first_line(text: str) -> str:
    """The first line of ``text``, marked where it is cut (a reason ending mid-word reads as the whole)."""
    lines = text.strip().splitlines()
    if not lines:
        return ""
    line = lines[0]
    return line if len(line) <= REASON_QUOTE else line[:REASON_QUOTE].rstrip() + " [...]"


def check_pattern(pattern: str) -> None:
    """Refuse an admin's spurious-failure pattern that cannot be used, or would make every failure transient,
    with what to do."""
    if not pattern.strip() or len(pattern) > MAX_PATTERN:
        raise RetracerError(f"a pattern must be 1 to {MAX_PATTERN} characters")
    compiled = Pattern(pattern)
    if compiled.search(""):
        raise RetracerError(f"{pattern!r} matches the empty string, so it would make every failure transient")
