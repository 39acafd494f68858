"""A run lock for batch runs (`serve --until-idle --lock`, `worker --once --lock`) started by cron or a timer.

The lock is a file created with O_CREAT|O_EXCL|O_NOFOLLOW holding JSON ``{pid, host, started}`` (and, on
Linux, the boot id and the process's start time, so that a pid reused after the holder died is not taken
for the holder). Every directory on its path is opened with O_NOFOLLOW|O_DIRECTORY from the root down: a
lock in a directory others can write must not be redirected through a symlink to a file of their choosing.

Three outcomes when the lock exists:

* held by a live run (this host and the pid alive, or another host, whose processes cannot be seen from
  here): :class:`Busy`, which the commands turn into one line and exit 0, so cron stays quiet;
* left by a run that is gone: :class:`StaleLock` (exit 1). A run removes its lock when it ends cleanly
  (signals included) and leaves it when it crashes, so a dead holder means a crash nobody has looked at
  yet; as with Apport's lock, the maintainer removes it after fixing the cause (or runs once with
  ``--break-stale-lock``), rather than every later run silently crashing the same way;
* the file is not a lock this module wrote, or is a symlink: refused (exit 1) with what to do.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from retracer.errors import RetracerError

#: A lock file younger than this whose content is not complete JSON is a run still writing it, not a wreck.
WRITING_GRACE_S = 10.0
#: A lock file is a few hundred bytes; more is not ours.
MAX_LOCK_BYTES = 4096


class LockError(RetracerError):
    """The lock cannot be taken: the message says why and what to do (exit 1)."""


class StaleLock(LockError):
    """The lock names a run that is gone: it crashed, and someone should look before the next run."""


class Busy(Exception):
    """Another run holds the lock: not an error (the command prints this one line and exits 0).

    Not a RetracerError on purpose: it is the normal outcome of a cron run overlapping the previous one.
    """


@dataclass(frozen=True)
class Holder:
    """Who wrote a lock file."""

    pid: int
    host: str
    started: str
    boot_id: str | None = None
    proc_start: str | None = None

    def describe(self) -> str:
        if self.pid == 0:
            return "a run starting now, still writing it"
        return f"pid {self.pid} on {self.host} since {self.started}"


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return None


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses itself.
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


def me() -> Holder:
    pid = os.getpid()
    return Holder(pid, socket.gethostname(), datetime.now(UTC).isoformat(timespec="seconds"), _boot_id(),
                  _proc_start(pid))


def alive(holder: Holder) -> bool:
    """Whether the run that wrote the lock may still be running (another host's: assumed so)."""
    if holder.host != socket.gethostname():
        return True
    if holder.boot_id and holder.boot_id != _boot_id():
        return False  # written before this machine last booted
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # a process of another user: it exists
    # A different start time: the pid was reused by a process started later.
    return not (holder.proc_start and _proc_start(holder.pid) not in (None, holder.proc_start))


def _open_dir(directory: Path) -> int:
    """An fd of ``directory``, reached from / without following any symlink."""
    parts = directory.parts
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i, part in enumerate(parts[1:], start=1):
            try:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                here = Path(*parts[:i + 1])
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(here):
                    raise LockError(f"the lock's directory {directory} goes through a symlink, {here} (-> "
                                    f"{os.readlink(here)}): a lock is never taken through a symlink; give "
                                    f"--lock a path made of real directories") from None
                raise LockError(f"the lock's directory {here} cannot be opened ({exc.strerror}); create it or "
                                f"give --lock another path") from None
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read(dir_fd: int, name: str, path: Path) -> Holder | None:
    """The holder written in the lock file, None if it vanished meanwhile; LockError if it is not a lock."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LockError(f"the lock {path} is a symlink (-> {os.readlink(name, dir_fd=dir_fd)}); a lock is "
                            f"never followed: remove the symlink (and find out who made it)") from None
        raise LockError(f"the lock {path} cannot be read ({exc.strerror}); remove it by hand") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        data = f.read(MAX_LOCK_BYTES + 1)
    try:
        raw: Any = json.loads(data) if len(data) <= MAX_LOCK_BYTES else None
        return Holder(int(raw["pid"]), str(raw["host"]), str(raw["started"]),
                      raw.get("boot_id"), raw.get("proc_start"))
    except (ValueError, TypeError, KeyError):
        if time.time() - info.st_mtime < WRITING_GRACE_S:
            return Holder(0, socket.gethostname(), "just now")  # being written by a run starting now
        raise LockError(f"{path} is not a retracer lock (no pid, host and start time in it); if no run uses "
                        f"it, remove it by hand") from None


def _create(dir_fd: int, name: str, holder: Holder) -> bool:
    """Create the lock holding ``holder``; False if a file (or symlink) is already there."""
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dir_fd)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"pid": holder.pid, "host": holder.host, "started": holder.started,
                   "boot_id": holder.boot_id, "proc_start": holder.proc_start}, f)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return True


def _stale_message(path: Path, holder: Holder) -> str:
    return (f"the lock {path} was left by {holder.describe()}, which is no longer running: that run crashed "
            f"(a run that ends cleanly, or is stopped by a signal, removes its lock). Look at the crash (the "
            f"mail to [mail] maintainers, the run's log on stderr), fix its cause, then remove {path} by hand, "
            f"or run once with --break-stale-lock")


def resolve(given: str | None, data_dir: Path, default_name: str) -> Path | None:
    """The lock a command's --lock names: None without --lock, ``data_dir/default_name`` for a bare --lock."""
    if given is None:
        return None
    return Path(os.path.expanduser(given)) if given else data_dir / default_name


#: The locks this process holds, for a process that must exit at once (os._exit skips every finally block).
_HELD: list[RunLock] = []


def release_all() -> None:
    """Release every lock this process holds: an exit on a second signal is a stop, not a crash."""
    for lock in list(_HELD):
        lock.release()


class RunLock:
    """The lock at ``path``: :meth:`acquire` it, :meth:`release` it when the run ends cleanly."""

    def __init__(self, path: Path) -> None:
        self.path = Path(os.path.abspath(path))
        self.holder: Holder | None = None

    def acquire(self, break_stale: bool = False) -> Holder:
        """Take the lock; Busy if a live run holds it, StaleLock (or LockError) if it cannot be taken."""
        dir_fd = _open_dir(self.path.parent)
        try:
            name = self.path.name
            mine = me()
            if _create(dir_fd, name, mine):
                self.holder = mine
                _HELD.append(self)
                return mine
            if break_stale:
                # Two runs breaking the same lock at once must not each remove the other's fresh lock.
                fcntl.flock(dir_fd, fcntl.LOCK_EX)
            holder = _read(dir_fd, name, self.path)
            if holder is None:  # removed meanwhile: one more try, then it is somebody else's
                if _create(dir_fd, name, mine):
                    self.holder = mine
                    _HELD.append(self)
                    return mine
                holder = _read(dir_fd, name, self.path) or Holder(0, socket.gethostname(), "just now")
            if holder.pid == 0 or alive(holder):
                raise Busy(f"another run holds {self.path} ({holder.describe()}); nothing to do")
            if not break_stale:
                raise StaleLock(_stale_message(self.path, holder))
            os.unlink(name, dir_fd=dir_fd)
            if not _create(dir_fd, name, mine):
                raise Busy(f"another run took {self.path} as the stale lock was removed; nothing to do")
            self.holder = mine
            _HELD.append(self)
            return mine
        finally:
            os.close(dir_fd)  # also drops the flock

    def release(self) -> None:
        """Remove the lock if it is still this run's (an admin may have removed it and another run taken it)."""
        if self.holder is None:
            return
        with suppress(OSError, LockError):
            dir_fd = _open_dir(self.path.parent)
            try:
                current = _read(dir_fd, self.path.name, self.path)
                if current is not None and current.pid == self.holder.pid and current.host == self.holder.host:
                    os.unlink(self.path.name, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
        self.holder = None
        if self in _HELD:
            _HELD.remove(self)


@contextmanager
def held(path: Path | None, break_stale: bool = False) -> Iterator[None]:
    """Hold the lock at ``path`` (None: no lock) for the block; Busy or LockError before it starts.

    Removed when the block ends normally, by SystemExit or KeyboardInterrupt, or by a RetracerError (a failure
    explained in its message: the next run may retry); kept when a bug escapes (a crash), see the module.
    """
    if path is None:
        yield
        return
    lock = RunLock(path)
    lock.acquire(break_stale)
    crashed = False
    try:
        yield
    except RetracerError:
        raise
    except Exception:
        crashed = True
        raise
    finally:
        if not crashed:
            lock.release()
