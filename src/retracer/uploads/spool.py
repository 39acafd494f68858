"""The upload spool: a worker's result arrives in ``incoming/<leaf>/`` and is checked, stored and filed away.

Layout (Launchpad's upload queue): ``<spool>/incoming/<leaf>/``, ``<spool>/accepted/<leaf>/`` and
``<spool>/failed/<leaf>/``. A worker writes into ``incoming/.tmp-<leaf>/`` and renames it to
``incoming/<leaf>/`` when finished, so a name starting with ``.`` is never a complete upload.

Uploads come from workers, which are not trusted: every path is opened relative to a directory descriptor
with O_NOFOLLOW, sizes are checked with lstat before anything is read, and nothing outside the spool and the
results directory is ever written, moved or deleted. This module knows no database: the caller describes the
job it expects (``ExpectedJob``) and turns the ``UploadResult`` into an ``upload.accepted`` or ``upload.failed``
event.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeGuard

from retracer.config import Config
from retracer.errors import ConfigError, UploadRejected
from retracer.events import HEX, SAFE_NAME
from retracer.workflow import load_spec

INCOMING = "incoming"
ACCEPTED = "accepted"
FAILED = "failed"
MANIFEST = "manifest.json"
BACKTRACE = "backtrace.txt"
WORKER_LOG = "worker.log"
ALLOWED_FILES = (MANIFEST, BACKTRACE, WORKER_LOG)
MANIFEST_KEYS = ("job", "crash_id", "build_ids", "worker")

#: A manifest is four short fields; anything bigger is not one (and json.loads must not chew on megabytes).
MAX_MANIFEST_BYTES = 64 * 1024
#: The events contract caps ``upload.accepted``'s ``result`` and ``upload.failed``'s ``upload_log`` at 1 MiB.
MAX_EVENT_TEXT = 1024 * 1024
#: A hostile upload can hold millions of entries; after this many the log stops listing them.
MAX_ENTRIES = 1000
MAX_NAME = 255

_FRAME = re.compile(r"^\s*#\d+\s")
# gdb prints "#0  0x00007f... in ?? ()", "#1  ?? ()" or "#2  0x... in ?? () from /lib/libc.so.6".
_UNKNOWN_FRAME = re.compile(r"^\s*#\d+\s+(?:0x[0-9a-fA-F]+\s+in\s+)?\?\?(?:\s|\(|$)")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: if a FIFO is swapped in after the lstat, opening it must not hang the processor.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

Source = Literal["incoming", "failed"]


@dataclass(frozen=True)
class Limits:
    """Size limits for one upload, in bytes."""

    max_file_bytes: int
    max_upload_bytes: int

    @classmethod
    def from_config(cls, config: Config) -> Limits:
        """The limits of the ``[spool]`` section."""
        return cls(int(config["spool"]["max_file_bytes"]), int(config["spool"]["max_upload_bytes"]))


@dataclass(frozen=True)
class ExpectedJob:
    """What the database says about the job an upload claims to be for."""

    job_id: int
    crash_id: str
    build_ids: Sequence[str] = ()
    state: str = field(default_factory=lambda: load_spec().roles.working)


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

    @property
    def event_type(self) -> str:
        """``upload.accepted`` or ``upload.failed``."""
        return "upload.accepted" if self.accepted else "upload.failed"

    def to_event_data(self) -> dict[str, Any]:
        """The ``data`` of the event that reports this outcome."""
        if self.accepted:
            data: dict[str, Any] = {"leaf": self.leaf}
            if self.result:
                data["result"] = self.result
            return data
        return {"leaf": self.leaf, "upload_log": self.upload_log}

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


def ensure_layout(spool_dir: str | os.PathLike[str]) -> None:
    """Create ``incoming/``, ``accepted/`` and ``failed/`` under the spool; refuse one that is not a directory."""
    root = Path(spool_dir)
    for sub in (INCOMING, ACCEPTED, FAILED):
        path = root / sub
        with suppress(FileExistsError):  # a file in the way: refused just below
            path.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or not path.is_dir():
            raise ConfigError(f"spool {path} must be a real directory, not a symlink or a file; "
                              f"move it away or change [spool] path")


def incoming_leaves(spool_dir: str | os.PathLike[str]) -> list[str]:
    """The complete uploads waiting in ``incoming/``, sorted (names starting with ``.`` are still being written)."""
    try:
        names = os.listdir(Path(spool_dir) / INCOMING)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if not n.startswith("."))


def process(spool_dir: str | os.PathLike[str], leaf: str,
            expected: ExpectedJob | Callable[[int], ExpectedJob | None], limits: Limits,
            results_dir: str | os.PathLike[str] | None, dry_run: bool = False,
            source: Source = "incoming", *, move: bool = True) -> UploadResult:
    """Check one upload, store its backtrace and move it to accepted/ or failed/; collect every problem found."""
    if source not in (INCOMING, FAILED):
        raise ValueError(f"source must be {INCOMING!r} or {FAILED!r}, not {source!r}")
    root = Path(os.path.realpath(spool_dir))
    name_problem = _leaf_name_problem(leaf)
    if name_problem is not None and not _is_plain_component(leaf):
        # The name points elsewhere: nothing is looked at, nothing is moved.
        return UploadResult(leaf, None, False, name_problem, None, None, dry_run, source=source,
                            problems=(name_problem,))
    inspection = _Inspection()
    with _open_dir(root, source) as source_fd:
        if name_problem is None:
            _inspect(root, source, source_fd, leaf, limits, inspection)
        else:
            # Unsafe characters: its content is not read, but it is filed away so it is not retried forever.
            inspection.problems.append(name_problem)
            _lstat_entry(source_fd, leaf, root / source, inspection)
    job = _check_job(expected, inspection)
    job_id = None if name_problem else job.job_id if job is not None else _fixed_job_id(expected)
    problems = inspection.problems
    if inspection.missing:
        return UploadResult(leaf, job_id, False, "\n".join(problems), None, None, dry_run, source=source,
                            problems=tuple(problems))
    stored_at = Path(results_dir) / str(job.job_id) / BACKTRACE if results_dir is not None and job else None
    replayed = False
    roles = load_spec().roles
    # Only a job waiting for its result may take one (a worker's upload, or a rescue).
    if job is not None and job.state not in roles.takes_upload:
        # At-least-once: an upload already accepted may be processed again after a crash; same bytes, same verdict.
        replayed = (job.state == roles.success and inspection.raw is not None and stored_at is not None
                    and _holds(stored_at, inspection.raw))
        if not replayed:
            problems.append(f"job {job.job_id} is {job.state}, not waiting for a result "
                            f"({' or '.join(roles.takes_upload)}); this upload is late or a duplicate: look at "
                            f"`retracer show {job.job_id}`")
    accepted = not problems and job is not None and inspection.text is not None
    result_text: str | None = None
    if accepted and job is not None and inspection.text is not None and inspection.raw is not None:
        if stored_at is not None and not dry_run and not replayed:
            try:
                _store(stored_at.parent, inspection.raw)
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
                           stored_at=stored_at, digest=inspection.digest, problems=tuple(problems))
    return file_away(root, outcome) if move else outcome


def file_away(spool_dir: str | os.PathLike[str], outcome: UploadResult) -> UploadResult:
    """Move a processed upload to accepted/ or failed/ per its outcome (for ``process(..., move=False)``)."""
    if not _is_plain_component(outcome.leaf):
        return outcome
    root = Path(os.path.realpath(spool_dir))
    dest = ACCEPTED if outcome.accepted else FAILED
    moved_to, set_aside = _file_away(root, outcome.source, outcome.leaf, dest, outcome.dry_run)
    return replace(outcome, moved_to=moved_to, set_aside=set_aside)


def restore_failed(spool_dir: str | os.PathLike[str], leaf: str, dry_run: bool = False) -> Path:
    """Move ``failed/<leaf>`` back to ``incoming/<leaf>`` for a rescue; return the incoming path."""
    problem = _leaf_name_problem(leaf)
    if problem is not None:
        raise UploadRejected(problem)
    root = Path(os.path.realpath(spool_dir))
    kept = root / FAILED / leaf
    target = root / INCOMING / leaf
    try:
        st = os.lstat(kept)
    except FileNotFoundError:
        raise UploadRejected(f"there is no kept upload {kept}: nothing to rescue (list {root / FAILED}; the "
                             f"job's upload leaf names the directory)") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UploadRejected(f"{kept} is not a directory (a symlink or a file): it cannot be an upload; "
                             f"inspect it by hand")
    if os.path.lexists(target):
        raise UploadRejected(f"{target} already exists: an upload of that name is waiting; let it be processed "
                             f"or move it away, then rescue again")
    if not dry_run:
        try:
            _rename_noreplace(kept, target)
        except FileExistsError:
            raise UploadRejected(f"{target} appeared while restoring {kept}; nothing was moved") from None
        _fsync_dirs(kept.parent, target.parent)
    return target


def write_upload(spool_dir: str | os.PathLike[str], leaf: str, manifest: dict[str, Any], backtrace: str,
                 worker_log: str) -> Path:
    """Write an upload the way a worker does (``incoming/.tmp-<leaf>``, then a rename); return its path."""
    problem = _leaf_name_problem(leaf)
    if problem is not None:
        raise UploadRejected(problem)
    incoming = Path(spool_dir) / INCOMING
    incoming.mkdir(parents=True, exist_ok=True)
    tmp = incoming / f".tmp-{leaf}"
    try:
        tmp.mkdir()
    except FileExistsError:
        raise UploadRejected(f"{tmp} already exists (an unfinished or crashed upload); remove it first") from None
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (tmp / BACKTRACE).write_text(backtrace, encoding="utf-8")
    (tmp / WORKER_LOG).write_text(worker_log, encoding="utf-8")
    target = incoming / leaf
    try:
        _rename_noreplace(tmp, target)
    except FileExistsError:
        raise UploadRejected(f"{target} already exists; the new upload stays in {tmp}") from None
    return target


# -- checks -------------------------------------------------------------------------------------------------


class _Inspection:
    """What was learnt about one upload while checking it."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.missing = False
        self.claimed_job: int | None = None
        self.crash_id: str | None = None
        self.build_ids: list[str] | None = None
        self.worker: str | None = None
        self.raw: bytes | None = None
        self.text: str | None = None
        self.frames = 0
        self.digest: str | None = None


def _is_plain_component(leaf: object) -> TypeGuard[str]:
    return (isinstance(leaf, str) and leaf not in ("", ".", "..") and "/" not in leaf and "\x00" not in leaf
            and not os.path.isabs(leaf))


def _leaf_name_problem(leaf: object) -> str | None:
    if _is_plain_component(leaf):
        if len(leaf) > MAX_NAME or not SAFE_NAME.match(leaf):
            return (f"upload name {leaf[:80]!r} is not allowed: use at most {MAX_NAME} letters, digits and "
                    f". _ + ~ : @ -, starting with a letter or digit")
        return None
    return (f"upload name {leaf!r} is not a plain directory name inside the spool (empty, '.', '..', a path "
            f"or absolute): refused without looking at it; a worker must name its upload after the job, "
            f"e.g. job-42-1")


@contextmanager
def _open_dir(root: Path, sub: str) -> Iterator[int]:
    """A directory descriptor for ``root/sub``, refusing a symlink in place of ``sub``."""
    try:
        root_fd = os.open(root, _DIR_FLAGS)
    except OSError as exc:
        raise ConfigError(f"spool {root} cannot be opened ({exc.strerror}); check [spool] path and create the "
                          f"layout (incoming/, accepted/, failed/)") from None
    try:
        fd = os.open(sub, _DIR_FLAGS, dir_fd=root_fd)
    except OSError as exc:
        raise ConfigError(f"spool directory {root / sub} cannot be opened ({exc.strerror}); it must be a real "
                          f"directory inside {root}, not a symlink") from None
    finally:
        os.close(root_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def _lstat_entry(source_fd: int, leaf: str, where: Path, inspection: _Inspection) -> os.stat_result | None:
    try:
        return os.lstat(leaf, dir_fd=source_fd)
    except FileNotFoundError:
        inspection.missing = True
        inspection.problems.append(f"there is no upload {leaf!r} in {where}: check the name (uploads waiting "
                                   f"there are listed by `ls {where}`)")
        return None


def _inspect(root: Path, source: str, source_fd: int, leaf: str, limits: Limits, inspection: _Inspection) -> None:
    where = root / source
    st = _lstat_entry(source_fd, leaf, where, inspection)
    if st is None:
        return
    real = os.path.realpath(where / leaf)
    if os.path.dirname(real) != str(where):
        inspection.problems.append(f"{leaf}: resolves to {real}, outside {where}: refused without following "
                                   f"it; an upload must be a real directory inside the spool")
    if stat.S_ISLNK(st.st_mode):
        inspection.problems.append(f"{leaf}: is a symlink, not a directory: refused without following it; "
                                   f"upload a real directory")
        return
    if not stat.S_ISDIR(st.st_mode):
        inspection.problems.append(f"{leaf}: is not a directory: an upload is a directory holding "
                                   f"{', '.join(ALLOWED_FILES)}")
        return
    try:
        fd = os.open(leaf, _DIR_FLAGS, dir_fd=source_fd)
    except OSError as exc:
        inspection.problems.append(f"{leaf}: cannot be opened as a directory ({exc.strerror}); upload a real "
                                   f"directory")
        return
    try:
        _inspect_files(fd, limits, inspection)
    finally:
        os.close(fd)


def _inspect_files(fd: int, limits: Limits, inspection: _Inspection) -> None:
    problems = inspection.problems
    files: dict[str, os.stat_result] = {}
    unknown: list[str] = []
    seen: set[str] = set()
    count = 0
    with os.scandir(fd) as entries:
        for entry in entries:
            count += 1
            if count > MAX_ENTRIES:
                problems.append(f"the upload holds more than {MAX_ENTRIES} entries; it must hold only "
                                f"{', '.join(ALLOWED_FILES)}")
                break
            name = entry.name
            seen.add(name)
            shown = repr(name[:80])
            try:
                est = os.lstat(name, dir_fd=fd)
            except OSError as exc:
                problems.append(f"{shown}: cannot be examined ({exc.strerror}); remove it from the upload")
                continue
            if stat.S_ISLNK(est.st_mode):
                problems.append(f"{shown}: is a symlink (to {_readlink(name, fd)!r}); it was not followed: upload "
                                f"plain files only, a symlink could expose files outside the upload")
            elif stat.S_ISDIR(est.st_mode):
                problems.append(f"{shown}: is a subdirectory; an upload holds only the files "
                                f"{', '.join(ALLOWED_FILES)}")
            elif not stat.S_ISREG(est.st_mode):
                problems.append(f"{shown}: is not a regular file (a device, FIFO or socket); upload plain files only")
            elif name not in ALLOWED_FILES:
                unknown.append(name)
            else:
                files[name] = est
    if unknown:
        listed = ", ".join(repr(n[:80]) for n in sorted(unknown)[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        problems.append(f"unknown files {listed}{more}: an upload holds only {', '.join(ALLOWED_FILES)}; "
                        f"remove the others")
    for name in ALLOWED_FILES:
        if name not in seen:
            problems.append(f"{name}: is missing; a worker must upload {', '.join(ALLOWED_FILES)}")
    readable: dict[str, os.stat_result] = {}
    for name, est in files.items():
        if est.st_nlink > 1:
            problems.append(f"{name}: is a hard link ({est.st_nlink} links) and could be another file's "
                            f"content; upload a plain copy")
        elif est.st_size > limits.max_file_bytes:
            problems.append(f"{name}: is {est.st_size} bytes, more than the {limits.max_file_bytes} allowed "
                            f"([spool] max_file_bytes); it was not read: trim it or raise the limit")
        else:
            readable[name] = est
    total = sum(est.st_size for est in files.values())
    if total > limits.max_upload_bytes:
        problems.append(f"the upload is {total} bytes, more than the {limits.max_upload_bytes} allowed "
                        f"([spool] max_upload_bytes); trim it or raise the limit")
    manifest_raw: bytes | None = None
    if MANIFEST in readable:
        manifest_raw = _read_manifest(fd, readable[MANIFEST], limits, inspection)
    if BACKTRACE in readable and total <= limits.max_upload_bytes:
        raw = _read_bounded(fd, BACKTRACE, readable[BACKTRACE], limits.max_file_bytes, problems)
        if raw is not None:
            _check_backtrace(raw, inspection)
            if manifest_raw is not None:
                inspection.digest = hashlib.sha256(manifest_raw + b"\x00" + raw).hexdigest()


def _readlink(name: str, fd: int) -> str:
    try:
        return os.readlink(name, dir_fd=fd)[:200]
    except OSError:
        return "?"


def _read_bounded(fd: int, name: str, est: os.stat_result, limit: int, problems: list[str]) -> bytes | None:
    """Read a file checked by lstat, refusing it if it was swapped or grew since; never more than limit + 1 bytes."""
    try:
        file_fd = os.open(name, _READ_FLAGS, dir_fd=fd)
    except OSError as exc:
        problems.append(f"{name}: cannot be opened ({exc.strerror}); upload a plain file")
        return None
    try:
        fst = os.fstat(file_fd)
        if (fst.st_dev, fst.st_ino) != (est.st_dev, est.st_ino) or not stat.S_ISREG(fst.st_mode):
            problems.append(f"{name}: was replaced while it was being checked; upload it again")
            return None
        chunks: list[bytes] = []
        left = limit + 1
        while left > 0:
            chunk = os.read(file_fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(file_fd)
    data = b"".join(chunks)
    if len(data) > limit:
        problems.append(f"{name}: grew beyond the {limit} bytes allowed while it was being read; upload it again "
                        f"when it is complete")
        return None
    return data


def _read_manifest(fd: int, est: os.stat_result, limits: Limits, inspection: _Inspection) -> bytes | None:
    problems = inspection.problems
    limit = min(limits.max_file_bytes, MAX_MANIFEST_BYTES)
    if est.st_size > limit:
        problems.append(f"{MANIFEST}: is {est.st_size} bytes, more than the {limit} a manifest may have; it was "
                        f"not read: a manifest holds only {', '.join(MANIFEST_KEYS)}")
        return None
    raw = _read_bounded(fd, MANIFEST, est, limit, problems)
    if raw is None:
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        problems.append(f"{MANIFEST}: is not UTF-8 ({exc.reason} at byte {exc.start}); write it as UTF-8 JSON")
        return raw
    except (json.JSONDecodeError, RecursionError) as exc:
        problems.append(f"{MANIFEST}: is not valid JSON ({str(exc)[:200]}); write a JSON object with "
                        f"{', '.join(MANIFEST_KEYS)}")
        return raw
    if not isinstance(data, dict):
        problems.append(f"{MANIFEST}: must be a JSON object, not {type(data).__name__}; write an object with "
                        f"{', '.join(MANIFEST_KEYS)}")
        return raw
    extra = sorted(str(k)[:80] for k in data if k not in MANIFEST_KEYS)
    if extra:
        problems.append(f"{MANIFEST}: unknown keys {extra[:10]}; a manifest holds only {', '.join(MANIFEST_KEYS)}")
    for key in MANIFEST_KEYS:
        if key not in data:
            problems.append(f"{MANIFEST}: {key} is missing; a manifest holds {', '.join(MANIFEST_KEYS)}")
    job = data.get("job")
    if "job" in data:
        if isinstance(job, bool) or not isinstance(job, int) or not 0 < job < 2**62:
            problems.append(f"{MANIFEST}: job is {_short(job)}, not a positive integer; write the job id the "
                            f"work request carried")
        else:
            inspection.claimed_job = job
    crash_id = data.get("crash_id")
    if "crash_id" in data:
        if not isinstance(crash_id, str) or not crash_id.strip() or len(crash_id) > 200:
            problems.append(f"{MANIFEST}: crash_id is {_short(crash_id)}, not a crash id (a non-empty string of "
                            f"at most 200 characters); copy it from the work request")
        else:
            inspection.crash_id = crash_id
    build_ids = data.get("build_ids")
    if "build_ids" in data:
        if (not isinstance(build_ids, list) or len(build_ids) > 512
                or not all(isinstance(b, str) and HEX.match(b) for b in build_ids)):
            problems.append(f"{MANIFEST}: build_ids is {_short(build_ids)}, not a list of at most 512 hex "
                            f"build-ids; list the build-ids the worker retraced with")
        else:
            inspection.build_ids = [b.lower() for b in build_ids]
    worker = data.get("worker")
    if "worker" in data:
        if not isinstance(worker, str) or not worker.strip() or len(worker) > 200 or _has_control(worker):
            problems.append(f"{MANIFEST}: worker is {_short(worker)}, not a worker name (one line, at most 200 "
                            f"characters); write the worker's name")
        else:
            inspection.worker = worker
    return raw


def _check_backtrace(raw: bytes, inspection: _Inspection) -> None:
    problems = inspection.problems
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.append(f"{BACKTRACE}: is not UTF-8 text ({exc.reason} at byte {exc.start}); the worker must "
                        f"write gdb's output as UTF-8")
        return
    if not text.strip():
        problems.append(f"{BACKTRACE}: is empty; the retrace produced nothing: read worker.log, then retry the "
                        f"job")
        return
    if "\x00" in text:
        problems.append(f"{BACKTRACE}: contains NUL characters, so it is not text; the worker must upload "
                        f"gdb's text output")
        return
    frames = [line for line in text.splitlines() if _FRAME.match(line)]
    if not frames:
        problems.append(f"{BACKTRACE}: has no frames (lines starting with #<n>); it is not a gdb backtrace: "
                        f"read worker.log, then retry the job")
        return
    if all(_UNKNOWN_FRAME.match(line) for line in frames):
        problems.append(f"{BACKTRACE}: every one of its {len(frames)} frames is ?? (no symbols), so it is "
                        f"useless; check the worker's debug symbols for the build-ids, then retry the job")
        return
    inspection.raw = raw
    inspection.text = text
    inspection.frames = len(frames)


def _fixed_job_id(expected: ExpectedJob | Callable[[int], ExpectedJob | None]) -> int | None:
    return None if callable(expected) else expected.job_id


def _check_job(expected: ExpectedJob | Callable[[int], ExpectedJob | None],
               inspection: _Inspection) -> ExpectedJob | None:
    """The job the upload is for, or None; adds a problem for every way the manifest disagrees with it."""
    problems = inspection.problems
    claimed = inspection.claimed_job
    if claimed is None:
        return None
    if callable(expected):
        job = expected(claimed)
        if job is None:
            problems.append(f"{MANIFEST}: job {claimed} does not exist; the upload is for no known job (list "
                            f"jobs with `retracer jobs`)")
            return None
    else:
        job = expected
        if claimed != job.job_id:
            problems.append(f"{MANIFEST}: job is {claimed}, but this upload was processed for job {job.job_id}; "
                            f"the upload belongs to another job: check the leaf name")
            return None
    if inspection.crash_id is not None and inspection.crash_id != job.crash_id:
        problems.append(f"{MANIFEST}: crash_id is {_short(inspection.crash_id)}, but job {job.job_id} retraces "
                        f"crash {_short(job.crash_id)}; the worker mixed up its jobs")
    expected_ids = {b.lower() for b in job.build_ids}
    if inspection.build_ids is not None and expected_ids:
        got = set(inspection.build_ids)
        if got != expected_ids:
            missing = sorted(expected_ids - got)[:3]
            unexpected = sorted(got - expected_ids)[:3]
            problems.append(f"{MANIFEST}: build_ids do not match job {job.job_id}'s (missing {missing}, "
                            f"unexpected {unexpected}); the worker retraced with other binaries")
    return job


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _has_control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


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


def _success_log(job_id: int | None, inspection: _Inspection, stored_at: Path | None, replayed: bool) -> str:
    if replayed:
        stored = f"; job {job_id} already holds this same backtrace in {stored_at} (a replayed upload)"
    else:
        stored = f"; backtrace stored in {stored_at}" if stored_at else ""
    return (f"accepted: job {job_id}, crash {inspection.crash_id}, worker {inspection.worker}, "
            f"{inspection.frames} frames{stored}")


# -- filesystem -----------------------------------------------------------------------------------------------


def _holds(path: Path, raw: bytes) -> bool:
    """Whether the stored file at path has exactly these bytes (read without following a symlink)."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError:
        return False
    try:
        return os.fstat(fd).st_size == len(raw) and os.read(fd, len(raw) + 1) == raw
    finally:
        os.close(fd)


def _store(job_dir: Path, raw: bytes) -> None:
    """Write ``<results>/<job>/backtrace.txt`` atomically (temp file, fsync, rename) without following symlinks."""
    job_dir.mkdir(parents=True, exist_ok=True)
    dir_fd = os.open(job_dir, _DIR_FLAGS)
    try:
        tmp = f".{BACKTRACE}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                     dir_fd=dir_fd)
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, BACKTRACE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _file_away(root: Path, source: str, leaf: str, dest: str, dry_run: bool) -> tuple[Path | None, Path | None]:
    """Move ``source/leaf`` to ``dest/leaf``, renaming an older ``dest/leaf`` aside; return (new, set aside)."""
    src = root / source / leaf
    target = root / dest / leaf
    if source == dest:
        return src, None
    aside: Path | None = None
    if os.path.lexists(target):
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        aside = root / dest / f"{leaf}.{stamp}"
        n = 1
        while os.path.lexists(aside):
            aside = root / dest / f"{leaf}.{stamp}-{n}"
            n += 1
    if dry_run:
        return target, aside
    if not os.path.lexists(src):
        raise UploadRejected(f"upload {src} disappeared while it was processed (another processor took it?); "
                             f"nothing was moved")
    try:
        if aside is not None:
            _rename_noreplace(target, aside)
        _rename_noreplace(src, target)
    except OSError as exc:
        raise UploadRejected(f"upload {src} could not be moved to {target}: {exc}; it stays where it is") from None
    _fsync_dirs(src.parent, target.parent)
    return target, aside


def _fsync_dirs(*dirs: Path) -> None:
    for path in dict.fromkeys(dirs):
        fd = os.open(path, _DIR_FLAGS)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename, raising FileExistsError if dst exists: os.rename would silently replace an empty directory."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        # NFS and some FUSE filesystems do not support RENAME_NOREPLACE: fall back to check-then-rename.
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(src), None, str(dst))
    os.rename(src, dst)
