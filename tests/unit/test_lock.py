"""The run lock of batch runs (retracer.ops.lock)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from retracer.errors import RetracerError
from retracer.ops import lock


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def write(path: Path, **fields: object) -> None:
    path.write_text(json.dumps({"host": socket.gethostname(), "started": "2024-05-01T10:00:00+00:00", **fields}))


class TestLock:
    def test_taken_holds_who_and_is_removed_on_a_clean_end(self, tmp_path: Path) -> None:
        path = tmp_path / "run.lock"
        with lock.held(path):
            held = json.loads(path.read_text())
            assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["started"]
        assert not path.exists()

    def test_a_live_holder_makes_the_next_run_busy(self, tmp_path: Path) -> None:
        path = tmp_path / "run.lock"
        with lock.held(path), pytest.raises(lock.Busy, match=rf"another run holds {path} \(pid {os.getpid()} "), \
                lock.held(path):
            pass
        assert not path.exists()

    def test_another_hosts_holder_is_taken_as_live(self, tmp_path: Path) -> None:
        path = tmp_path / "run.lock"
        write(path, pid=dead_pid(), host="elsewhere.example")
        with pytest.raises(lock.Busy), lock.held(path):
            pass

    def test_a_dead_holder_is_refused_saying_who_and_what_to_do(self, tmp_path: Path) -> None:
        path = tmp_path / "run.lock"
        pid = dead_pid()
        write(path, pid=pid)
        with pytest.raises(lock.StaleLock) as refused, lock.held(path):
            pass
        message = str(refused.value)
        assert isinstance(refused.value, RetracerError)
        for part in (f"pid {pid}", socket.gethostname(), "2024-05-01T10:00:00", "crashed", "remove", str(path),
                     "--break-stale-lock"):
            assert part in message
        assert path.exists()

    def test_break_stale_takes_it(self, tmp_path: Path) -> None:
        path = tmp_path / "run.lock"
        write(path, pid=dead_pid())
        with lock.held(path, break_stale=True):
            assert json.loads(path.read_text())["pid"] == os.getpid()
        assert not path.exists()

    def test_break_stale_leaves_a_live_holder_alone(self, tmp_path: Path) -> None:
        path = tmp_path / "run.lock"
        write(path, pid=os.getpid())
        with pytest.raises(lock.Busy), lock.held(path, break_stale=True):
            pass
        assert path.exists()

    def test_a_reused_pid_is_not_the_holder(self, tmp_path: Path) -> None:
        path = tmp_path / "run.lock"
        write(path, pid=os.getpid(), proc_start="1")  # this pid, but a process started at another time
        with pytest.raises(lock.StaleLock):
            lock.RunLock(path).acquire()

    def test_left_behind_by_a_crash_removed_by_an_explained_failure(self, tmp_path: Path) -> None:
        path = tmp_path / "run.lock"
        with pytest.raises(ZeroDivisionError), lock.held(path):
            1 / 0  # noqa: B018
        assert path.exists()
        path.unlink()
        with pytest.raises(RetracerError), lock.held(path):
            raise RetracerError("the database is down")
        assert not path.exists()
        with pytest.raises(SystemExit), lock.held(path):
            raise SystemExit(0)
        assert not path.exists()

    def test_a_symlinked_lock_is_refused(self, tmp_path: Path) -> None:
        target = tmp_path / "target"
        path = tmp_path / "run.lock"
        path.symlink_to(target)
        with pytest.raises(lock.LockError, match="is a symlink"), lock.held(path):
            pass
        assert not target.exists()

    def test_a_symlinked_directory_is_refused(self, tmp_path: Path) -> None:
        (tmp_path / "real").mkdir()
        (tmp_path / "link").symlink_to(tmp_path / "real")
        with pytest.raises(lock.LockError, match="goes through a symlink"), lock.held(tmp_path / "link" / "x.lock"):
            pass
        assert not (tmp_path / "real" / "x.lock").exists()

    def test_a_file_that_is_not_a_lock_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "run.lock"
        path.write_text("hello")
        os.utime(path, (0, 0))
        with pytest.raises(lock.LockError, match="not a retracer lock"), lock.held(path):
            pass

    def test_a_lock_being_written_is_busy(self, tmp_path: Path) -> None:
        path = tmp_path / "run.lock"
        path.write_text("")
        with pytest.raises(lock.Busy, match="starting now"), lock.held(path):
            pass

    def test_a_missing_directory_says_so(self, tmp_path: Path) -> None:
        with pytest.raises(lock.LockError, match="cannot be opened"), lock.held(tmp_path / "nope" / "x.lock"):
            pass

    def test_resolve(self, tmp_path: Path) -> None:
        assert lock.resolve(None, tmp_path, "a.lock") is None
        assert lock.resolve("", tmp_path, "a.lock") == tmp_path / "a.lock"
        assert lock.resolve("/x/b.lock", tmp_path, "a.lock") == Path("/x/b.lock")
        assert lock.held(None) is not None
