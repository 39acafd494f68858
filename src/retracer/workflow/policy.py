"""The failure policy: which failures are transient, how long to wait before a retry, when to give up, and
what an admin-registered pattern may be. Its values come from the configuration's [policy] section alone."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from retracer.errors import RetracerError

#: An admin's pattern longer than this is refused (it is searched in every failure's error text).
MAX_PATTERN = 500


@dataclass(frozen=True)
class Verdict:
    """How a failure was classified, and the pattern that decided it (None when the worker's hint did)."""

    transient: bool
    pattern: str | None


class FailurePolicy:
    """Built-in patterns from the config plus the admin-registered spurious-failure patterns."""

    def __init__(self, max_attempts: int, backoff_base_s: float, backoff_factor: float, backoff_max_s: float,
                 patterns: Iterable[str] = ()) -> None:
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_factor = backoff_factor
        self.backoff_max_s = backoff_max_s
        self.patterns = [(p, re.compile(p, re.IGNORECASE)) for p in patterns]

    @classmethod
    def from_config(cls, section: dict[str, Any], extra_patterns: Iterable[str] = ()) -> FailurePolicy:
        """The policy of a configuration's [policy] section, with the admins' patterns after the built-in ones."""
        return cls(section["max_attempts"], section["backoff_base_s"], section["backoff_factor"],
                   section["backoff_max_s"], [*section["transient_patterns"], *extra_patterns])

    def classify(self, error: str, hint: object = None) -> Verdict:
        """A failure is transient if the worker says so or its text matches a pattern."""
        for text, regex in self.patterns:
            if regex.search(error):
                return Verdict(True, text)
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
        first_line = error.strip().splitlines()[0][:300] if error.strip() else "no error text"
        if transient:
            why = f"retries exhausted after {attempts} of {self.max_attempts} attempts"
        else:
            why = f"permanent failure on attempt {attempts}"
        matched = f"; matched transient pattern {pattern!r}" if pattern else ""
        return f"{why}{matched}; last error: {first_line}"


def check_pattern(pattern: str) -> None:
    """Refuse an admin's spurious-failure pattern that is not a usable regular expression, with what to do."""
    try:
        compiled = re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise RetracerError(f"{pattern!r} is not a regular expression: {exc}; quote it for the shell "
                            f"and escape special characters (e.g. \\. for a dot)") from None
    if not pattern.strip() or len(pattern) > MAX_PATTERN:
        raise RetracerError(f"a pattern must be 1 to {MAX_PATTERN} characters")
    if compiled.search(""):
        raise RetracerError(f"{pattern!r} matches the empty string, so it would make every failure transient")
