"""The checks an upload must pass before its backtrace is stored: every problem found is collected, so the
upload log names them all. Uploads come from workers, which are not trusted: every path is opened relative
to a directory descriptor with O_NOFOLLOW, and sizes are checked with lstat before anything is read.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from retracer.config import Config
from retracer.uploads.files import ALLOWED_FILES, BACKTRACE, DIR_FLAGS, MANIFEST, READ_FLAGS
from retracer.uploads.manifest import MANIFEST_KEYS, MAX_MANIFEST_BYTES, parse_manifest, short
from retracer.workflow import load_spec

#: A hostile upload can hold millions of entries; after this many the log stops listing them.
MAX_ENTRIES = 1000

_FRAME = re.compile(r"^\s*#\d+\s")
# gdb prints "#0  0x00007f... in ?? ()", "#1  ?? ()" or "#2  0x... in ?? () from /lib/libc.so.6".
_UNKNOWN_FRAME = re.compile(r"^\s*#\d+\s+(?:0x[0-9a-fA-F]+\s+in\s+)?\?\?(?:\s|\(|$)")


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


class Inspection:
    """What was learnt about one upload while checking it."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.missing = False
        self.claimed_job: int | None = None
        self.crash_id: str | None = None
        self.build_ids: list[str] | None = None
        self.worker: str | None = None
        self.extra: dict[str, object] = {}
        self.raw: bytes | None = None
        self.text: str | None = None
        self.frames = 0
        self.digest: str | None = None


def lstat_entry(source_fd: int, leaf: str, where: Path, inspection: Inspection) -> os.stat_result | None:
    try:
        return os.lstat(leaf, dir_fd=source_fd)
    except FileNotFoundError:
        inspection.missing = True
        inspection.problems.append(f"there is no upload {leaf[:80]!r} in {where}: check the name (uploads "
                                   f"waiting there are listed by `ls {where}`)")
        return None
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            # It is there but cannot be looked at (its directory's permissions, an I/O error): refused with the
            # reason, so that it is filed away if it can be, instead of stopping every upload sorted after it.
            inspection.problems.append(f"{leaf[:80]!r}: cannot be examined ({exc.strerror}); check its owner and "
                                       f"permissions in {where}, then upload it again")
            return None
        # An admin's --leaf can be longer than the file system allows a name to be: no such upload can exist.
        inspection.missing = True
        inspection.problems.append(f"there is no upload {leaf[:80]!r}... in {where}: the name has {len(leaf)} "
                                   f"characters, more than a file name can have; check the name (uploads "
                                   f"waiting there are listed by `ls {where}`)")
        return None


def inspect_upload(root: Path, source: str, source_fd: int, leaf: str, limits: Limits,
                   inspection: Inspection) -> None:
    where = root / source
    st = lstat_entry(source_fd, leaf, where, inspection)
    if st is None:
        return
    if stat.S_ISLNK(st.st_mode):
        _refuse_link(source_fd, leaf, where, inspection)
        return
    if not stat.S_ISDIR(st.st_mode):
        inspection.problems.append(f"{leaf}: is not a directory: an upload is a directory holding "
                                   f"{', '.join(ALLOWED_FILES)}")
        return
    try:
        fd = os.open(leaf, DIR_FLAGS, dir_fd=source_fd)
    except OSError as exc:
        inspection.problems.append(f"{leaf}: cannot be opened as a directory ({exc.strerror}); upload a real "
                                   f"directory that the service's user may read")
        return
    try:
        _inspect_files(fd, limits, inspection)
    except OSError as exc:
        # Whatever the upload holds, reading it must not raise: an entry that cannot be listed or read is a
        # reason to refuse the upload, not to stop the spool.
        inspection.problems.append(f"{leaf}: could not be read ({exc.strerror}); check the owner and "
                                   f"permissions of its files, then upload it again")
    finally:
        os.close(fd)


def _refuse_link(source_fd: int, leaf: str, where: Path, inspection: Inspection) -> None:
    """Refuse a symlink in place of an upload, saying where it points without following it."""
    try:
        # Read through the directory descriptor, not a path: the entry may have been replaced since the lstat.
        target = os.readlink(leaf, dir_fd=source_fd)
    except OSError as exc:
        inspection.problems.append(f"{leaf}: was a symlink, then changed while it was being examined "
                                   f"({exc.strerror}); it was not followed: upload a real directory, once")
        return
    pointed = os.path.normpath(os.path.join(where, target))
    if os.path.dirname(pointed) != str(where):
        inspection.problems.append(f"{leaf}: resolves to {pointed[:300]!r}, outside {where}: refused without "
                                   f"following it; an upload must be a real directory inside the spool")
    inspection.problems.append(f"{leaf}: is a symlink, not a directory: refused without following it; "
                               f"upload a real directory")


def _inspect_files(fd: int, limits: Limits, inspection: Inspection) -> None:  # noqa: C901  (one check per entry kind, all reported)
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
        file_fd = os.open(name, READ_FLAGS, dir_fd=fd)
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
    except OSError as exc:
        problems.append(f"{name}: could not be read ({exc.strerror}); upload it again")
        return None
    finally:
        os.close(file_fd)
    data = b"".join(chunks)
    if len(data) > limit:
        problems.append(f"{name}: grew beyond the {limit} bytes allowed while it was being read; upload it again "
                        f"when it is complete")
        return None
    return data


def _read_manifest(fd: int, est: os.stat_result, limits: Limits, inspection: Inspection) -> bytes | None:
    problems = inspection.problems
    limit = min(limits.max_file_bytes, MAX_MANIFEST_BYTES)
    if est.st_size > limit:
        problems.append(f"{MANIFEST}: is {est.st_size} bytes, more than the {limit} a manifest may have; it was "
                        f"not read: a manifest holds only {', '.join(MANIFEST_KEYS)}")
        return None
    raw = _read_bounded(fd, MANIFEST, est, limit, problems)
    if raw is None:
        return None
    found = parse_manifest(raw, problems)
    inspection.claimed_job = found.job
    inspection.crash_id = found.crash_id
    inspection.build_ids = found.build_ids
    inspection.worker = found.worker
    inspection.extra = found.extra
    return raw


def _check_backtrace(raw: bytes, inspection: Inspection) -> None:
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


def fixed_job_id(expected: ExpectedJob | Callable[[int], ExpectedJob | None]) -> int | None:
    return None if callable(expected) else expected.job_id


def check_job(expected: ExpectedJob | Callable[[int], ExpectedJob | None],
               inspection: Inspection) -> ExpectedJob | None:
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
        problems.append(f"{MANIFEST}: crash_id is {short(inspection.crash_id)}, but job {job.job_id} retraces "
                        f"crash {short(job.crash_id)}; the worker mixed up its jobs")
    expected_ids = {b.lower() for b in job.build_ids}
    if inspection.build_ids is not None and expected_ids:
        got = set(inspection.build_ids)
        if got != expected_ids:
            missing = sorted(expected_ids - got)[:3]
            unexpected = sorted(got - expected_ids)[:3]
            problems.append(f"{MANIFEST}: build_ids do not match job {job.job_id}'s (missing {missing}, "
                            f"unexpected {unexpected}); the worker retraced with other binaries")
    return job
