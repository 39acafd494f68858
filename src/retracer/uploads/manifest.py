"""What an upload's manifest.json must hold: four fields, and may hold three more (the attempt and the crash's
signatures, which `retracer worker` writes), each checked, every problem named.

The manifest is written by a worker, which is not trusted: any JSON value can stand in any field, and none of
them may make the check raise. A value is quoted back in the upload log only escaped and cut short.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from retracer.events import HEX, MAX_JOB_ID
from retracer.uploads.files import MANIFEST

MANIFEST_KEYS = ("job", "crash_id", "build_ids", "worker")
#: Optional: the attempt the work request named, and the crash's symbolic and address signatures.
OPTIONAL_KEYS = ("attempt", "signature", "address_signature")
#: The longest signatures kept (the event contract's limits for upload.accepted).
MAX_SIGNATURE = 1024
MAX_ADDRESS_SIGNATURE = 4096
#: A manifest is four short fields; anything bigger is not one (and json.loads must not chew on megabytes).
MAX_MANIFEST_BYTES = 64 * 1024


@dataclass
class Manifest:
    """The fields of a manifest that passed their checks (None: missing or refused)."""

    job: int | None = None
    crash_id: str | None = None
    build_ids: list[str] | None = None
    worker: str | None = None
    #: The optional keys that passed their checks.
    extra: dict[str, object] = field(default_factory=dict)


def parse_manifest(raw: bytes, problems: list[str]) -> Manifest:
    """The fields of the manifest ``raw`` that pass their checks; a problem is added for each that does not."""
    found = Manifest()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        problems.append(f"{MANIFEST}: is not UTF-8 ({exc.reason} at byte {exc.start}); write it as UTF-8 JSON")
        return found
    except (ValueError, RecursionError) as exc:
        # ValueError: besides bad syntax, a number longer than Python's int_max_str_digits.
        problems.append(f"{MANIFEST}: is not valid JSON ({str(exc)[:200]}); write a JSON object with "
                        f"{', '.join(MANIFEST_KEYS)}")
        return found
    if not isinstance(data, dict):
        problems.append(f"{MANIFEST}: must be a JSON object, not {type(data).__name__}; write an object with "
                        f"{', '.join(MANIFEST_KEYS)}")
        return found
    extra = sorted(str(k)[:80] for k in data if k not in MANIFEST_KEYS and k not in OPTIONAL_KEYS)
    if extra:
        problems.append(f"{MANIFEST}: unknown keys {extra[:10]}; a manifest holds only "
                        f"{', '.join(MANIFEST_KEYS + OPTIONAL_KEYS)}")
    _optional(data, found, problems)
    for key in MANIFEST_KEYS:
        if key not in data:
            problems.append(f"{MANIFEST}: {key} is missing; a manifest holds {', '.join(MANIFEST_KEYS)}")
    job = data.get("job")
    if "job" in data:
        if isinstance(job, bool) or not isinstance(job, int) or not 0 < job <= MAX_JOB_ID:
            # A bigger id names no job, and is never looked up: the database may refuse it as a parameter.
            problems.append(f"{MANIFEST}: job is {short(job)}, not a positive integer of at most {MAX_JOB_ID} "
                            f"(a job id); write the job id the work request carried")
        else:
            found.job = job
    crash_id = data.get("crash_id")
    if "crash_id" in data:
        if not isinstance(crash_id, str) or not crash_id.strip() or len(crash_id) > 200:
            problems.append(f"{MANIFEST}: crash_id is {short(crash_id)}, not a crash id (a non-empty string of "
                            f"at most 200 characters); copy it from the work request")
        else:
            found.crash_id = crash_id
    build_ids = data.get("build_ids")
    if "build_ids" in data:
        if (not isinstance(build_ids, list) or len(build_ids) > 512
                or not all(isinstance(b, str) and HEX.match(b) for b in build_ids)):
            problems.append(f"{MANIFEST}: build_ids is {short(build_ids)}, not a list of at most 512 hex "
                            f"build-ids; list the build-ids the worker retraced with")
        else:
            found.build_ids = [b.lower() for b in build_ids]
    worker = data.get("worker")
    if "worker" in data:
        if not isinstance(worker, str) or not worker.strip() or len(worker) > 200 or _has_control(worker):
            problems.append(f"{MANIFEST}: worker is {short(worker)}, not a worker name (one line, at most 200 "
                            f"characters); write the worker's name")
        else:
            found.worker = worker
    return found


def _optional(data: dict[str, object], found: Manifest, problems: list[str]) -> None:
    attempt = data.get("attempt")
    if "attempt" in data:
        if isinstance(attempt, bool) or not isinstance(attempt, int) or not 0 < attempt <= MAX_JOB_ID:
            problems.append(f"{MANIFEST}: attempt is {short(attempt)}, not a positive integer; write the attempt "
                            f"the work request carried")
        else:
            found.extra["attempt"] = attempt
    for key, limit in (("signature", MAX_SIGNATURE), ("address_signature", MAX_ADDRESS_SIGNATURE)):
        value = data.get(key)
        if key not in data or value is None:
            continue
        if not isinstance(value, str) or not value.strip() or len(value) > limit or _has_control(value):
            problems.append(f"{MANIFEST}: {key} is {short(value)}, not a signature (one line of at most {limit} "
                            f"characters); write it as `retracer worker` does, or leave it out")
        else:
            found.extra[key] = value


def short(value: object) -> str:
    """A value for an upload log: escaped (one line, no lone surrogate) and at most 80 characters."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # nested deeper than the stack allows; an int of too many digits
        return f"a {type(value).__name__} too big to show"
    return text if len(text) <= 80 else text[:77] + "..."


def _has_control(text: str) -> bool:
    return any(ord(c) < 32 or 127 <= ord(c) <= 159 for c in text)
