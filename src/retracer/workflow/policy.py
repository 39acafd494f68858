"""The failure policy: which failures are transient, how long to wait before a retry, when to give up."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any


@dataclass(frozen=True)
class Verdict:
    """How a failure was classified, and the pattern that decided it (None when the worker's hint did)."""

    transient: bool
    pattern: str | None


class FailurePolicy:
    """Built-in patterns from the config plus the admin-registered spurious-failure patterns."""

    def __init__(self, max_attempts: int = 3, backoff_base_s: float = 300, backoff_factor: float = 2.0,
                 backoff_max_s: float = 21600, patterns: Iterable[str] = ()) -> None:
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_factor = backoff_factor
        self.backoff_max_s = backoff_max_s
        self.patterns = [(p, re.compile(p, re.IGNORECASE)) for p in patterns]

    @classmethod
    def from_config(cls, section: dict[str, Any], extra_patterns: Iterable[str] = ()) -> FailurePolicy:
        return cls(section["max_attempts"], section["backoff_base_s"], section["backoff_factor"],
                   section["backoff_max_s"], [*section["transient_patterns"], *extra_patterns])

    def classify(self, error: str, hint: object = None) -> Verdict:
        """A failure is transient if the worker says so or its text matches a pattern."""
        for text, regex in self.patterns:
            if regex.search(error):
                return Verdict(True, text)
        return Verdict(hint is True, None)

    def backoff(self, attempts: int) -> timedelta:
        """The wait before retry number ``attempts`` (1 for the first retry)."""
        seconds = self.backoff_base_s * self.backoff_factor ** max(attempts - 1, 0)
        return timedelta(seconds=min(seconds, self.backoff_max_s))
