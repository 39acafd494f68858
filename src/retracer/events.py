"""The event contract: a JSON envelope, its types, and validation that names every problem.

Envelope: {"id", "type", "job", "occurred_at", "source", "data"}. Unknown data fields are kept (more are
welcome); known ones are checked for type and size so that nothing oversized or malformed reaches the
database or a mail header.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from retracer import addresses
from retracer.errors import InvalidEvent

MAX_BODY_BYTES = 2 * 1024 * 1024
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~:@-]*\Z")
HEX = re.compile(r"^[0-9a-fA-F]{8,128}\Z")
#: C0 controls (CR and LF split a mail header, ESC starts a terminal sequence), DEL, and C1 controls (0x9b
#: is a one-byte CSI on many terminals).
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

#: How deep objects and lists may nest in an event. Python's JSON reader fails at a depth that depends on how
#: deep the reading process's own stack already is, so without a fixed bound an event `publish` accepted
#: could be refused by `serve`.
MAX_DEPTH = 32

#: Event ids and sources beginning with this are the service's own (an upload's event, the watchdog's firing):
#: a publisher cannot claim one, so no published event can pre-empt or block what the service records.
RESERVED = "retracer:"

#: Job ids are 32-bit integers in the database (PostgreSQL INTEGER); a bigger one can name no job.
MAX_JOB_ID = 2**31 - 1

#: The routing key of the work requests that `serve` sends to workers.
WORK_REQUEST = "retrace.requested"


@dataclass(frozen=True)
class Event:
    """One validated event."""

    id: str
    type: str
    job: int | None
    occurred_at: datetime
    source: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "job": self.job,
                "occurred_at": self.occurred_at.isoformat().replace("+00:00", "Z"),
                "source": self.source, "data": self.data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


Check = Callable[[Any], str | None]


def _encodable(value: str) -> bool:
    """Lone surrogates pass json.loads but no database can store them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(max_len: int, *, single_line: bool = True, pattern: re.Pattern[str] | None = None,
          what: str = "") -> Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, str) or not value.strip():
            return "must be a non-empty string"
        if not _encodable(value):
            return "is not valid Unicode (lone surrogate escapes)"
        if len(value) > max_len:
            return f"is {len(value)} characters long, at most {max_len} allowed"
        if single_line and CONTROL.search(value):
            return "must not contain control characters (CR, LF, NUL, ...)"
        if pattern is not None and not pattern.match(value):
            return f"is not {what}"
        return None

    return check


def _long_text(max_len: int) -> Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, str) or not value.strip():
            return "must be a non-empty string"
        if not _encodable(value):
            return "is not valid Unicode (lone surrogate escapes)"
        if len(value) > max_len:
            return f"is {len(value)} characters long, at most {max_len} allowed"
        if "\x00" in value:
            return "must not contain NUL characters"
        return None

    return check


def _address(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return "must be a non-empty string"
    return addresses.problem(value)


def _bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def _priority(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return "must be an integer"
    return None if -1000 <= value <= 1000 else "must be between -1000 and 1000"


def _attempt(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return "must be an integer (the attempt the work request named)"
    return None if 1 <= value <= MAX_JOB_ID else f"must be between 1 and {MAX_JOB_ID}"


def _build_ids(value: Any) -> str | None:
    if not isinstance(value, list) or len(value) > 512:
        return "must be a list of at most 512 hex build-ids"
    bad = [v for v in value if not isinstance(v, str) or not HEX.match(v)]
    return f"has entries that are not hex build-ids: {bad[:3]!r}" if bad else None


#: How many modules a retrace.failed may name as missing symbols (as many as a crash may list build-ids).
MAX_MISSING = 512


def _missing(value: Any) -> str | None:
    """retrace.failed's ``missing``: the modules whose symbols the attempt lacked, as
    ``[{"build_id": hex, "module": path}]`` (other keys of an entry are ignored)."""
    if not isinstance(value, list) or len(value) > MAX_MISSING:
        return f"must be a list of at most {MAX_MISSING} objects {{\"build_id\": hex, \"module\": path}}"
    for i, entry in enumerate(value):
        if not isinstance(entry, dict):
            return f"entry {i} is not an object {{\"build_id\": hex, \"module\": path}}"
        build_id = entry.get("build_id")
        if not isinstance(build_id, str) or not HEX.match(build_id):
            return f"entry {i} has a build_id that is not a hex build-id: {str(build_id)[:80]!r}"
        if "module" in entry and entry["module"] is not None and (err := PATH(entry["module"])) is not None:
            return f"entry {i} has a module that {err}"
    return None


PATH = _text(4096)
NAME = _text(200)
LEAF = _text(255, pattern=SAFE_NAME, what="a plain directory name (letters, digits, . _ + ~ : @ -)")

#: type -> (needs a job id, required data fields, optional data fields)
TYPES: dict[str, tuple[bool, dict[str, Check], dict[str, Check]]] = {
    "crash.submitted": (False, {
        "crash_id": _text(200),
        "creator": _address,
        "package": NAME,
        "version": NAME,
        "architecture": _text(50, pattern=SAFE_NAME, what="an architecture name"),
        "release": _text(100),
        "core": PATH,
        "executable": PATH,
    }, {"build_ids": _build_ids, "priority": _priority}),
    "retrace.started": (True, {"worker": NAME}, {"attempt": _attempt}),
    "retrace.heartbeat": (True, {"worker": NAME}, {"attempt": _attempt}),
    "retrace.failed": (True, {"error": _long_text(65536)}, {"transient": _bool, "worker": NAME,
                                                          "attempt": _attempt, "missing": _missing}),
    "upload.accepted": (True, {"leaf": LEAF}, {"result": _long_text(1024 * 1024), "attempt": _attempt,
                                               "signature": _text(1024), "address_signature": _text(4096)}),
    "upload.failed": (True, {"leaf": LEAF, "upload_log": _long_text(1024 * 1024)}, {"attempt": _attempt}),
}


def parse_time(value: Any) -> datetime:
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 time string")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        raise ValueError("must carry a time zone (e.g. 2026-11-21T08:00:00Z)")
    try:
        return when.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of range (years 1 to 9999 in UTC)") from None


def _depth(value: Any) -> int:
    """How deeply ``value`` nests objects and lists (a scalar is 0), without recursion; stops counting past
    MAX_DEPTH + 1."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            level += 1
            deepest = max(deepest, level)
            if level > MAX_DEPTH:
                break
            stack.extend((child, level) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse(body: str | bytes | dict[str, Any], minted: bool = False) -> Event:  # noqa: C901  (every field checked in one pass, all problems named)
    """Validate one event; raise InvalidEvent listing every problem found.

    ``minted``: the service made this event itself, so its id and source may use the RESERVED prefix.
    """
    if isinstance(body, bytes | bytearray):
        if len(body) > MAX_BODY_BYTES:
            raise InvalidEvent(f"event is {len(body)} bytes, at most {MAX_BODY_BYTES} allowed")
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidEvent(f"event is not UTF-8: {exc}") from None
    if isinstance(body, str):
        if len(body) > MAX_BODY_BYTES:
            raise InvalidEvent(f"event is {len(body)} characters, at most {MAX_BODY_BYTES} allowed")
        try:
            raw = json.loads(body)
        except (ValueError, RecursionError) as exc:  # ValueError also covers integers past int_max_str_digits
            raise InvalidEvent(f"event is not JSON: {exc}") from None
    else:
        raw = body
    if not isinstance(raw, dict):
        raise InvalidEvent(f"event must be a JSON object, got {type(raw).__name__}")
    if _depth(raw) > MAX_DEPTH:
        raise InvalidEvent(f"event nests objects and lists more than {MAX_DEPTH} deep; flatten its data")
    problems: list[str] = []
    extra = sorted((set(raw) - {"id", "type", "job", "occurred_at", "source", "data"}), key=str)
    if extra:
        problems.append(f"unknown envelope fields {extra}; put extra information under data")
    event_id = raw.get("id")
    if (err := NAME(event_id)) is not None:
        problems.append(f"id {err}")
    elif not minted and isinstance(event_id, str) and event_id.startswith(RESERVED):
        problems.append(f"id {event_id[:60]!r} begins with {RESERVED!r}, which only the service's own events use; "
                        f"give the event another id (a UUID, for instance)")
    etype = raw.get("type")
    spec = TYPES.get(etype) if isinstance(etype, str) else None
    if spec is None:
        problems.append(f"type {etype!r} is unknown; known types: {', '.join(TYPES)}")
    job = raw.get("job")
    if spec is not None:
        if spec[0] and (isinstance(job, bool) or not isinstance(job, int) or job < 1):
            problems.append(f"job must be a positive integer job id for {etype}, got {job!r}")
        elif spec[0] and isinstance(job, int) and job > MAX_JOB_ID:
            problems.append(f"job {job} is larger than any job id can be (at most {MAX_JOB_ID})")
        if not spec[0] and job is not None:
            problems.append(f"job must be null for {etype} (the job does not exist yet), got {job!r}")
    occurred: datetime | None = None
    try:
        occurred = parse_time(raw.get("occurred_at"))
    except ValueError as exc:
        problems.append(f"occurred_at {exc}")
    source = raw.get("source")
    if (err := NAME(source)) is not None:
        problems.append(f"source {err}")
    elif not minted and isinstance(source, str) and source.startswith(RESERVED):
        problems.append(f"source {source[:60]!r} begins with {RESERVED!r}, which names the service itself; "
                        f"name the publisher (a host, a worker, a tool)")
    data = raw.get("data")
    if not isinstance(data, dict):
        problems.append("data must be a JSON object")
    elif spec is not None:
        for name, check in spec[1].items():
            if name not in data:
                problems.append(f"data.{name} is required for {etype}")
            elif (err := check(data[name])) is not None:
                problems.append(f"data.{name} {err}")
        for name, check in spec[2].items():
            if name in data and (err := check(data[name])) is not None:
                problems.append(f"data.{name} {err}")
    if problems:
        raise InvalidEvent("; ".join(problems))
    if occurred is None or not isinstance(data, dict):  # unreachable once no problem was found
        raise InvalidEvent("event could not be read")
    return Event(event_id, etype, job, occurred, raw["source"], data)  # type: ignore[arg-type]


def make(etype: str, job: int | None, data: dict[str, Any], source: str, event_id: str | None = None,
         occurred_at: datetime | None = None, minted: bool = False) -> Event:
    """Build and validate an event (for publishers, admin commands and tests; ``minted``: see parse)."""
    when = occurred_at or datetime.now(UTC)
    return parse({"id": event_id or str(uuid.uuid4()), "type": etype, "job": job,
                  "occurred_at": when.isoformat(), "source": source, "data": data}, minted=minted)


def storable(text: str | None) -> str | None:
    """Text as both databases can keep it: PostgreSQL refuses NUL characters, and neither stores lone
    surrogates. A rejected event's body is evidence, so these are escaped, never dropped."""
    if text is None:
        return None
    return text.replace("\x00", "\\u0000").encode("utf-8", "backslashreplace").decode("utf-8")


def peek(body: str | bytes | dict[str, Any]) -> dict[str, Any]:
    """Whatever id/type/job can be read from a body that failed validation, for the rejected list."""
    try:
        raw = json.loads(body) if isinstance(body, str | bytes) else body
    except (ValueError, RecursionError):
        return {}
    if not isinstance(raw, dict):
        return {}
    out: dict[str, Any] = {}
    if isinstance(raw.get("id"), str) and _encodable(raw["id"]):
        out["id"] = raw["id"][:200]
    if isinstance(raw.get("type"), str) and _encodable(raw["type"]):
        out["type"] = raw["type"][:100]
    if isinstance(raw.get("job"), int) and not isinstance(raw.get("job"), bool) and 0 < raw["job"] <= MAX_JOB_ID:
        out["job"] = raw["job"]
    return out
