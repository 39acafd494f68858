"""Times as a person reads them on a status page: "12 min ago", "in 3 h", with the exact UTC time kept for
the hover title (a relative time alone cannot be quoted in a ticket)."""

from __future__ import annotations

from datetime import UTC, datetime

_UNITS = ((86400 * 365, "y"), (86400 * 30, "mo"), (86400 * 7, "w"), (86400, "d"), (3600, "h"), (60, "min"),
          (1, "s"))


def span(seconds: float) -> str:
    """A duration in its largest whole unit: ``45 s``, ``12 min``, ``3 h``, ``2 d``."""
    s = abs(int(seconds))
    for size, unit in _UNITS:
        if s >= size:
            return f"{s // size} {unit}"
    return "0 s"


def relative(when: datetime | None, now: datetime) -> str:
    """``12 min ago``, ``in 3 h``, ``just now``; ``never`` for no time."""
    if when is None:
        return "never"
    delta = (_aware(when) - now).total_seconds()
    if abs(delta) < 1:
        return "just now"
    return f"in {span(delta)}" if delta > 0 else f"{span(delta)} ago"


def exact(when: datetime | None) -> str:
    """The exact time in UTC, to the second: ``2026-12-02 10:25:10 UTC``."""
    if when is None:
        return ""
    return _aware(when).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _aware(when: datetime) -> datetime:
    # The database layer hands back aware UTC datetimes; a naive one from elsewhere is taken as UTC too.
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
