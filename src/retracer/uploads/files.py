"""The spool's directories and the file operations on them, none of which follows a symlink.

Layout (Launchpad's upload queue): ``<spool>/incoming/<leaf>/``, ``<spool>/accepted/<leaf>/`` and
``<spool>/failed/<leaf>/``. A worker writes into ``incoming/.tmp-<leaf>/`` and renames it to
``incoming/<leaf>/`` when finished, so a name starting with ``.`` is never a complete upload. Nothing outside
the spool and the results directory is ever written, moved or deleted.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeGuard

from retracer.errors import ConfigError, UploadRejected
from retracer.events import SAFE_NAME

INCOMING = "incoming"
ACCEPTED = "accepted"
FAILED = "failed"
MANIFEST = "manifest.json"
BACKTRACE = "backtrace.txt"
WORKER_LOG = "worker.log"
ALLOWED_FILES = (MANIFEST, BACKTRACE, WORKER_LOG)
MAX_NAME = 255

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: if a FIFO is swapped in after the lstat, opening it must not hang the processor.
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


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


def restore_failed(spool_dir: str | os.PathLike[str], leaf: str, dry_run: bool = False) -> Path:
    """Move ``failed/<leaf>`` back to ``incoming/<leaf>`` for a rescue; return the incoming path."""
    problem = leaf_name_problem(leaf)
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
            rename_noreplace(kept, target)
        except FileExistsError:
            raise UploadRejected(f"{target} appeared while restoring {kept}; nothing was moved") from None
        fsync_dirs(kept.parent, target.parent)
    return target


def write_upload(spool_dir: str | os.PathLike[str], leaf: str, manifest: dict[str, Any], backtrace: str,
                 worker_log: str) -> Path:
    """Write an upload the way a worker does (``incoming/.tmp-<leaf>``, then a rename); return its path."""
    problem = leaf_name_problem(leaf)
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
        rename_noreplace(tmp, target)
    except FileExistsError:
        raise UploadRejected(f"{target} already exists; the new upload stays in {tmp}") from None
    return target


def is_plain_component(leaf: object) -> TypeGuard[str]:
    return (isinstance(leaf, str) and leaf not in ("", ".", "..") and "/" not in leaf and "\x00" not in leaf
            and not os.path.isabs(leaf))


def leaf_name_problem(leaf: object) -> str | None:
    if is_plain_component(leaf):
        if len(leaf) > MAX_NAME or not SAFE_NAME.match(leaf):
            return (f"upload name {leaf[:80]!r} is not allowed: use at most {MAX_NAME} letters, digits and "
                    f". _ + ~ : @ -, starting with a letter or digit")
        return None
    return (f"upload name {leaf!r} is not a plain directory name inside the spool (empty, '.', '..', a path "
            f"or absolute): refused without looking at it; a worker must name its upload after the job, "
            f"e.g. job-42-1")


@contextmanager
def open_dir(root: Path, sub: str) -> Iterator[int]:
    """A directory descriptor for ``root/sub``, refusing a symlink in place of ``sub``."""
    try:
        root_fd = os.open(root, DIR_FLAGS)
    except OSError as exc:
        raise ConfigError(f"spool {root} cannot be opened ({exc.strerror}); check [spool] path and create the "
                          f"layout (incoming/, accepted/, failed/)") from None
    try:
        fd = os.open(sub, DIR_FLAGS, dir_fd=root_fd)
    except OSError as exc:
        raise ConfigError(f"spool directory {root / sub} cannot be opened ({exc.strerror}); it must be a real "
                          f"directory inside {root}, not a symlink") from None
    finally:
        os.close(root_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def holds(path: Path, raw: bytes) -> bool:
    """Whether the stored file at path has exactly these bytes (read without following a symlink)."""
    try:
        fd = os.open(path, READ_FLAGS)
    except OSError:
        return False
    try:
        return os.fstat(fd).st_size == len(raw) and os.read(fd, len(raw) + 1) == raw
    finally:
        os.close(fd)


def store_backtrace(job_dir: Path, raw: bytes) -> None:
    """Write ``<results>/<job>/backtrace.txt`` atomically (temp file, fsync, rename) without following symlinks."""
    job_dir.mkdir(parents=True, exist_ok=True)
    dir_fd = os.open(job_dir, DIR_FLAGS)
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


def move_away(root: Path, source: str, leaf: str, dest: str, dry_run: bool) -> tuple[Path | None, Path | None]:
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
            rename_noreplace(target, aside)
        rename_noreplace(src, target)
    except OSError as exc:
        raise UploadRejected(f"upload {src} could not be moved to {target}: {exc}; it stays where it is") from None
    fsync_dirs(src.parent, target.parent)
    return target, aside


def fsync_dirs(*dirs: Path) -> None:
    for path in dict.fromkeys(dirs):
        fd = os.open(path, DIR_FLAGS)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)


def rename_noreplace(src: Path, dst: Path) -> None:
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
