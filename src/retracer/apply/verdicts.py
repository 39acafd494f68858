"""What the apply path decides about an event besides its transition: whether it comes from an attempt no
longer current, which earlier job its result duplicates, what it says (a digest that tells a reused id from a
redelivery), and how much of it a rejection keeps."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from retracer import events as ev
from retracer.store.models import MAX_REJECTED_BODY, Job
from retracer.workflow import TriggerContext, load_spec

#: The event a worker starts an attempt with.
START = "retrace.started"


def note_duplicate(session: Session, job: Job, ctx: TriggerContext, accepted: dict[str, int]) -> None:
    """For a result carrying a signature: note the job it duplicates (the first job with that signature that
    is no duplicate itself), for the effect to record. ``accepted``: the signatures taken earlier in the same
    batch, whose jobs are not written yet."""
    signature = ctx.data.get("signature")
    if not isinstance(signature, str) or not signature:
        return
    original = accepted.get(signature)
    if original is None:
        original = session.scalar(select(func.min(Job.id)).where(
            Job.signature == signature, Job.duplicate_of.is_(None), Job.id != job.id))
    if original is not None and original != job.id:
        ctx.notes["duplicate_of"] = original
    else:
        accepted.setdefault(signature, job.id)


def is_stale(event: ev.Event, job: Job) -> str | None:
    """Why ``event`` comes from an attempt that is no longer ``job``'s current one (a worker presumed dead that
    woke up, an upload of an abandoned attempt), or None. Such an event changes nothing and is no error: its
    marker says "stale", and serve logs and counts it."""
    attempt = event.data.get("attempt")
    if attempt is None:
        return None
    if attempt != job.attempts + 1:
        return (f"attempt {attempt} of job {job.id} is not its current attempt ({job.attempts + 1}): "
                f"this event changes nothing")
    if event.type == START and job.state == load_spec().roles.working:
        # A work request redelivered after its worker died: the next worker starts the same attempt again,
        # and its heartbeats and upload carry the attempt on.
        return (f"attempt {attempt} of job {job.id} was already started (by {job.worker or 'another worker'}); "
                f"this event changes nothing, the attempt goes on with the worker that sends its heartbeats")
    return None


def digest(event: ev.Event) -> str:
    """What ``event`` says, as a digest of its canonical form (the same for a copy serialized otherwise)."""
    return hashlib.sha256(event.to_json().encode("utf-8", "surrogatepass")).hexdigest()


def kept_body(body: Any) -> dict[str, Any]:
    """The columns of a rejected event's body: whole when short, else its first MAX_REJECTED_BODY characters,
    with the whole body's size in bytes and its SHA-256 either way."""
    if isinstance(body, bytes | bytearray):
        raw = bytes(body)
        text = raw[:MAX_REJECTED_BODY * 4].decode("utf-8", "replace")
    else:
        text = body if isinstance(body, str) else json.dumps(body, default=str)
        raw = text.encode("utf-8", "surrogatepass")
    truncated = len(text) > MAX_REJECTED_BODY or len(raw) > MAX_REJECTED_BODY * 4
    return {"body": ev.storable(text[:MAX_REJECTED_BODY]), "body_bytes": len(raw),
            "body_sha256": hashlib.sha256(raw).hexdigest(), "truncated": truncated}
