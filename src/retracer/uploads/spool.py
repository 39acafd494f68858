"""The upload spool: a worker's result arrives in ``incoming/<leaf>/`` and is checked (``checks``), stored
and filed away to ``accepted/`` or ``failed/`` (``files``).

This module knows no database: the caller describes the job it expects (``ExpectedJob``) and turns the
``UploadResult`` into an ``upload.accepted`` or ``upload.failed`` event.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from retracer.uploads.checks import (
    ExpectedJob,
    Inspection,
    Limits,
    check_job,
    fixed_job_id,
    inspect_upload,
    lstat_entry,
)
from retracer.uploads.files import (
    ACCEPTED,
    BACKTRACE,
    FAILED,
    INCOMING,
    ensure_layout,
    holds,
    incoming_leaves,
    is_plain_component,
    leaf_name_problem,
    move_away,
    open_dir,
    restore_failed,
    store_backtrace,
    write_upload,
)
from retracer.workflow import load_spec

__all__ = ["ExpectedJob", "Limits", "UploadResult", "ensure_layout", "file_away", "incoming_leaves", "process",
           "restore_failed", "write_upload"]

#: The events contract caps ``upload.accepted``'s ``result`` and ``upload.failed``'s ``upload_log`` at 1 MiB.
MAX_EVENT_TEXT = 1024 * 1024

Source = Literal["incoming", "failed"]


@dataclass(frozen=True)
class UploadResult:
    """The outcome of processing one upload (or, with ``dry_run``, what processing it would do)."""

    leaf: str
    job_id: int | None
    accepted: bool
    upload_log: str
    result: str | None
    moved_to: Path | None
    dry_run: bool
    #: An older upload of the same name that was (or would be) renamed out of the way of ``moved_to``.
    set_aside: Path | None = None
    #: Where the backtrace was (or would be) stored in the results directory.
    stored_at: Path | None = None
    #: sha256 of the manifest and backtrace: the same upload processed twice has the same digest, so the
    #: caller can derive an idempotent event id from it.
    digest: str | None = None
    #: The spool directory the upload was read from: incoming (a worker's upload) or failed (a rescue dry run).
    source: str = INCOMING
    #: Every problem found, one per line of ``upload_log`` (empty when accepted).
    problems: tuple[str, ...] = field(default=())
    #: There was no upload of that name to process: nothing was read, and there is nothing to file away.
    missing: bool = False
    #: The manifest's optional keys that passed their checks (attempt, signature, address_signature).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def event_type(self) -> str:
        """``upload.accepted`` or ``upload.failed``."""
        return "upload.accepted" if self.accepted else "upload.failed"

    def to_event_data(self) -> dict[str, Any]:
        """The ``data`` of the event that reports this outcome."""
        attempt = {"attempt": self.extra["attempt"]} if "attempt" in self.extra else {}
        if self.accepted:
            data: dict[str, Any] = {"leaf": self.leaf, **self.extra}
            if self.result:
                data["result"] = self.result
            return data
        return {"leaf": self.leaf, "upload_log": self.upload_log, **attempt}

    def summary(self) -> str:
        """One line saying what happened (or would happen) to the upload."""
        verdict = "accepted" if self.accepted else "refused"
        job = f"job {self.job_id}" if self.job_id is not None else "unknown job"
        if self.moved_to is None:
            where = "left where it is"
        else:
            where = f"{'would be ' if self.dry_run else ''}moved to {self.moved_to}"
        tail = " (dry run: nothing was changed)" if self.dry_run else ""
        return f"upload {self.leaf!r} for {job} {'would be ' if self.dry_run else ''}{verdict}, {where}{tail}"


def process(spool_dir: str | os.PathLike[str], leaf: str,
            expected: ExpectedJob | Callable[[int], ExpectedJob | None], limits: Limits,
            results_dir: str | os.PathLike[str] | None, dry_run: bool = False,
            source: Source = "incoming", *, move: bool = True) -> UploadResult:
    """Check one upload, store its backtrace and move it to accepted/ or failed/; collect every problem found."""
    if source not in (INCOMING, FAILED):
        raise ValueError(f"source must be {INCOMING!r} or {FAILED!r}, not {source!r}")
    root = Path(os.path.realpath(spool_dir))
    name_problem = leaf_name_problem(leaf)
    if name_problem is not None and not is_plain_component(leaf):
        # The name points elsewhere: nothing is looked at, nothing is moved.
        return UploadResult(leaf, None, False, name_problem, None, None, dry_run, source=source,
                            problems=(name_problem,))
    inspection = Inspection()
    with open_dir(root, source) as source_fd:
        if name_problem is None:
            inspect_upload(root, source, source_fd, leaf, limits, inspection)
        else:
            # Unsafe characters: its content is not read, but it is filed away so it is not retried forever.
            inspection.problems.append(name_problem)
            lstat_entry(source_fd, leaf, root / source, inspection)
    job = check_job(expected, inspection)
    job_id = None if name_problem else job.job_id if job is not None else fixed_job_id(expected)
    problems = inspection.problems
    if inspection.missing:
        return UploadResult(leaf, job_id, False, "\n".join(problems), None, None, dry_run, source=source,
                            problems=tuple(problems), missing=True)
    stored_at = Path(results_dir) / str(job.job_id) / BACKTRACE if results_dir is not None and job else None
    replayed = False
    roles = load_spec().roles
    # Only a job waiting for its result may take one (a worker's upload, or a rescue).
    if job is not None and job.state not in roles.takes_upload:
        # At-least-once: an upload already accepted may be processed again after a crash; same bytes, same verdict.
        replayed = (job.state == roles.success and inspection.raw is not None and stored_at is not None
                    and holds(stored_at, inspection.raw))
        if not replayed:
            problems.append(f"job {job.job_id} is {job.state}, not waiting for a result "
                            f"({' or '.join(roles.takes_upload)}); this upload is late or a duplicate: look at "
                            f"`retracer show {job.job_id}`")
    accepted = not problems and job is not None and inspection.text is not None
    result_text: str | None = None
    if accepted and job is not None and inspection.text is not None and inspection.raw is not None:
        if stored_at is not None and not dry_run and not replayed:
            try:
                store_backtrace(stored_at.parent, inspection.raw)
            except OSError as exc:
                problems.append(f"the backtrace could not be stored in {stored_at} ({exc}); fix the results "
                                f"directory (space, permissions), then rescue the job "
                                f"(retracer rescue {job.job_id})")
                accepted = False
        if accepted:
            result_text = _event_text(inspection.text, stored_at)
    if accepted:
        log = _success_log(job_id, inspection, stored_at, replayed)
    else:
        stored_at = None
        # The events contract requires a non-empty upload log; every refusal above records a problem.
        log = _cap("\n".join(problems) or "the upload was refused; process it again with --dry-run to see why")
    outcome = UploadResult(leaf, job_id, accepted, log, result_text, None, dry_run, source=source,
                           stored_at=stored_at, digest=inspection.digest, problems=tuple(problems),
                           extra=dict(inspection.extra))
    return file_away(root, outcome) if move else outcome


def file_away(spool_dir: str | os.PathLike[str], outcome: UploadResult) -> UploadResult:
    """Move a processed upload to accepted/ or failed/ per its outcome (for ``process(..., move=False)``)."""
    if outcome.missing or not is_plain_component(outcome.leaf):
        return outcome
    root = Path(os.path.realpath(spool_dir))
    dest = ACCEPTED if outcome.accepted else FAILED
    moved_to, set_aside = move_away(root, outcome.source, outcome.leaf, dest, outcome.dry_run)
    return replace(outcome, moved_to=moved_to, set_aside=set_aside)


def _cap(text: str) -> str:
    if len(text) <= MAX_EVENT_TEXT:
        return text
    return text[:MAX_EVENT_TEXT - 20].rsplit("\n", 1)[0] + "\n[log truncated]"


def _event_text(text: str, stored_at: Path | None) -> str:
    """The backtrace cut to the events contract's 1 MiB, at a line boundary, saying where the rest is."""
    if len(text) <= MAX_EVENT_TEXT:
        return text
    marker = f"\n[truncated to {MAX_EVENT_TEXT} characters; the whole backtrace is in {stored_at or 'the upload'}]\n"
    head = text[:MAX_EVENT_TEXT - len(marker)]
    if "\n" in head:
        head = head.rsplit("\n", 1)[0]
    return head + marker


def _success_log(job_id: int | None, inspection: Inspection, stored_at: Path | None, replayed: bool) -> str:
    if replayed:
        stored = f"; job {job_id} already holds this same backtrace in {stored_at} (a replayed upload)"
    else:
        stored = f"; backtrace stored in {stored_at}" if stored_at else ""
    return (f"accepted: job {job_id}, crash {inspection.crash_id}, worker {inspection.worker}, "
            f"{inspection.frames} frames{stored}")
