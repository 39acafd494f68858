"""The spool's directories and the file operations on them, none of which follows a symlink.

Layout (Launchpad's upload queue): ``<spool>/incoming/<leaf>/``, ``<spool>/accepted/<leaf>/`` and
``<spool>/failed/<leaf>/``, and the lock file ``<spool>/.lock``. A worker writes into ``incoming/.tmp-<leaf>/``
and renames it to ``incoming/<leaf>/`` when finished, so a name starting with ``.`` is never a complete upload.
Nothing outside the spool and the results directory is ever written, moved or deleted: whoever can write into
the spool can swap any of its entries for a symlink at any moment, so every one is reached from a directory
descriptor with O_NOFOLLOW, and a check made on a path is never trusted by a later operation.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeGuard

from retracer.errors import ConfigError, UploadRejected
from retracer.events import SAFE_NAME

INCOMING = "incoming"
ACCEPTED = "accepted"
FAILED = "failed"
LOCK = ".lock"
MANIFEST = "manifest.json"
BACKTRACE = "backtrace.txt"
WORKER_LOG = "worker.log"
ALLOWED_FILES = (MANIFEST, BACKTRACE, WORKER_LOG)
MAX_NAME = 255

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: if a FIFO is swapped in after the lstat, opening it must not hang the processor.
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def ensure_layout(spool_dir: str | os.PathLike[str]) -> None:
    """Create ``incoming/``, ``accepted/`` and ``failed/`` under the spool; refuse one that is not a directory."""
    root = Path(spool_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        pass  # a file in the way: refused when it is opened, just below
    except OSError as exc:
        raise ConfigError(f"spool {root} cannot be created ({exc.strerror}); create it or change [spool] path"
                          ) from None
    with _root_fd(root) as root_fd:
        for sub in (INCOMING, ACCEPTED, FAILED):
            try:
                os.mkdir(sub, dir_fd=root_fd)
            except FileExistsError:
                pass  # whatever is in the way is refused just below
            except OSError as exc:
                raise ConfigError(f"spool directory {root / sub} cannot be created ({exc.strerror}); create it "
                                  f"or give the service's user write permission on {root}") from None
            kind = _kind(root_fd, sub)
            if kind != _DIRECTORY:
                raise ConfigError(f"spool {root / sub} must be a real directory, not {kind}: nothing is followed "
                                  f"or written through it; move it away (the next round creates the directory) or "
                                  f"change [spool] path")


@contextmanager
def open_lock(spool_dir: str | os.PathLike[str]) -> Iterator[int]:
    """A descriptor of the spool's lock file, created if missing; a symlink or special file there is refused."""
    root = Path(spool_dir)
    path = root / LOCK
    with _root_fd(root) as root_fd:
        try:
            fd = os.open(LOCK, LOCK_FLAGS, 0o600, dir_fd=root_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ConfigError(f"spool lock {path} is {_kind(root_fd, LOCK)}: refused without following it, "
                                  f"so nothing outside the spool is created or locked; remove it (the next round "
                                  f"creates a plain file)") from None
            raise ConfigError(f"spool lock {path} cannot be opened ({exc.strerror}); it must be a plain file the "
                              f"service's user may write: remove it (the next round creates one) or fix its "
                              f"permissions") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"spool lock {path} is not a regular file; remove it (the next round creates a "
                              f"plain file)")
        yield fd
    finally:
        os.close(fd)


@contextmanager
def open_dir(root: Path, sub: str) -> Iterator[int]:
    """A directory descriptor for ``root/sub``, refusing a symlink in place of ``sub``."""
    with _root_fd(root) as root_fd:
        try:
            fd = os.open(sub, DIR_FLAGS, dir_fd=root_fd)
        except OSError as exc:
            kind = _kind(root_fd, sub)
            if kind == _DIRECTORY:
                why = f" ({exc.strerror}); give the service's user read and search permission on it"
            else:  # the error itself (ENOTDIR for a symlink) would only mislead
                why = (f" because it is {kind}; it must be a real directory inside {root}, not a symlink, so that "
                       f"nothing is moved or written outside the spool: move it away (the next round creates the "
                       f"directory) and find out who put it there")
            raise ConfigError(f"spool directory {root / sub} cannot be opened{why}") from None
    try:
        yield fd
    finally:
        os.close(fd)


@contextmanager
def _root_fd(root: Path) -> Iterator[int]:
    try:
        # Followed if it is a symlink: the root is the admin's [spool] path; only what is inside it is untrusted.
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"spool {root} cannot be opened ({exc.strerror}); check [spool] path and create the "
                          f"layout (incoming/, accepted/, failed/)") from None
    try:
        yield fd
    finally:
        os.close(fd)


_DIRECTORY = "a directory"


def _kind(dir_fd: int, name: str) -> str:
    """What ``name`` is, for a message: a symlink is named with its target, which is never followed."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
        if stat.S_ISLNK(st.st_mode):
            return f"a symlink (to {os.readlink(name, dir_fd=dir_fd)[:200]!r})"
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"not examinable ({exc.strerror})"
    return _DIRECTORY if stat.S_ISDIR(st.st_mode) else "a file or a special file"


def incoming_leaves(spool_dir: str | os.PathLike[str]) -> list[str]:
    """The complete uploads waiting in ``incoming/``, sorted (names starting with ``.`` are still being written)."""
    root = Path(spool_dir)
    if not os.path.lexists(root / INCOMING):
        return []
    with open_dir(root, INCOMING) as fd:
        names = os.listdir(fd)
    return sorted(n for n in names if not n.startswith("."))


def lexists_in(spool_dir: str | os.PathLike[str], sub: str, leaf: str) -> bool:
    """Whether ``sub/leaf`` exists in the spool (a symlink counts; ``sub`` itself must be a real directory)."""
    with open_dir(Path(spool_dir), sub) as fd:
        return _lexists(leaf, fd)


def _lexists(name: str, dir_fd: int) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
        return False
    return True


def restore_failed(spool_dir: str | os.PathLike[str], leaf: str, dry_run: bool = False) -> Path:
    """Move ``failed/<leaf>`` back to ``incoming/<leaf>`` for a rescue; return the incoming path."""
    problem = leaf_name_problem(leaf)
    if problem is not None:
        raise UploadRejected(problem)
    root = Path(os.path.realpath(spool_dir))
    kept = root / FAILED / leaf
    target = root / INCOMING / leaf
    with open_dir(root, FAILED) as failed_fd, open_dir(root, INCOMING) as incoming_fd:
        try:
            st = os.lstat(leaf, dir_fd=failed_fd)
        except FileNotFoundError:
            raise UploadRejected(f"there is no kept upload {kept}: nothing to rescue (list {root / FAILED}; the "
                                 f"job's upload leaf names the directory)") from None
        if not stat.S_ISDIR(st.st_mode):
            raise UploadRejected(f"{kept} is not a directory (a symlink or a file): it cannot be an upload; "
                                 f"inspect it by hand")
        if _lexists(leaf, incoming_fd):
            raise UploadRejected(f"{target} already exists: an upload of that name is waiting; let it be "
                                 f"processed or move it away, then rescue again")
        if not dry_run:
            try:
                rename_noreplace(leaf, leaf, failed_fd, incoming_fd)
            except FileExistsError:
                raise UploadRejected(f"{target} appeared while restoring {kept}; nothing was moved") from None
            except OSError as exc:
                raise UploadRejected(f"{kept} could not be moved back to {target} ({exc.strerror}); it stays "
                                     f"in {root / FAILED}: check its owner and permissions") from None
            os.fsync(failed_fd)
            os.fsync(incoming_fd)
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
        # fullmatch: SAFE_NAME ends in "$", which also matches before a final newline, and the events contract
        # refuses a leaf with one, so such an upload's event could never be made.
        if len(leaf) > MAX_NAME or not SAFE_NAME.fullmatch(leaf):
            return (f"upload name {leaf[:80]!r} is not allowed: use at most {MAX_NAME} letters, digits and "
                    f". _ + ~ : @ -, starting with a letter or digit")
        return None
    return (f"upload name {leaf!r} is not a plain directory name inside the spool (empty, '.', '..', a path "
            f"or absolute): refused without looking at it; a worker must name its upload after the job, "
            f"e.g. job-42-1")


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
    with open_dir(root, source) as src_fd, open_dir(root, dest) as dst_fd:
        aside: str | None = None
        if _lexists(leaf, dst_fd):
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            aside = f"{leaf}.{stamp}"
            n = 1
            while _lexists(aside, dst_fd):
                aside = f"{leaf}.{stamp}-{n}"
                n += 1
        aside_path = root / dest / aside if aside is not None else None
        if dry_run:
            return target, aside_path
        if not _lexists(leaf, src_fd):
            raise UploadRejected(f"upload {src} disappeared while it was processed (another processor took it?); "
                                 f"nothing was moved")
        try:
            if aside is not None:
                rename_noreplace(leaf, aside, dst_fd, dst_fd)
            rename_noreplace(leaf, leaf, src_fd, dst_fd)
        except OSError as exc:
            raise UploadRejected(f"upload {src} could not be moved to {target} ({exc.strerror}); it stays where "
                                 f"it is: check its owner and permissions (moving a directory needs write "
                                 f"permission on it), then fix or remove it by hand") from None
        os.fsync(src_fd)
        os.fsync(dst_fd)
    return target, aside_path


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)


def rename_noreplace(src: str | Path, dst: str | Path, src_dir_fd: int = _AT_FDCWD,
                     dst_dir_fd: int = _AT_FDCWD) -> None:
    """Rename (names relative to the directory descriptors, if given), raising FileExistsError if dst exists:
    os.rename would silently replace an empty directory."""
    if _renameat2 is not None:
        if _renameat2(src_dir_fd, os.fsencode(src), dst_dir_fd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        # NFS and some FUSE filesystems do not support RENAME_NOREPLACE: fall back to check-then-rename.
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    src_fd = None if src_dir_fd == _AT_FDCWD else src_dir_fd
    dst_fd = None if dst_dir_fd == _AT_FDCWD else dst_dir_fd
    exists = os.path.lexists(dst) if dst_fd is None else _lexists(os.fspath(dst), dst_fd)
    if exists:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(src), None, str(dst))
    os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
