"""Whoever can write into the upload spool cannot stop, stall or redirect it.

Each hostile upload sorts before a good one (``a-...`` before ``z-good``): one round of the uploads chore must
still accept the good one. The hostile one is filed away to failed/ with its reason, or, when it cannot even be
moved, left in incoming/ with one log line saying why. Nothing outside the spool is ever written or moved,
whatever the spool's entries have been swapped for.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session, sessionmaker

from retracer import config as cfg
from retracer import events, store
from retracer.apply.applier import Applier
from retracer.errors import ConfigError
from retracer.service import Service
from retracer.store.models import Job
from retracer.testing.factories import crash_data, event, submit
from retracer.testing.logcapture import captured_logs
from retracer.uploads import files, intake, spool
from retracer.uploads.intake import spool_lock, upload_event
from retracer.uploads.spool import ExpectedJob, Limits
from retracer.workflow import load_spec
from tests.unit.test_spool import GOOD_BACKTRACE, snapshot

LIMITS = Limits(max_file_bytes=64 * 1024, max_upload_bytes=100 * 1024)
GOOD = "z-good"
BAD = "a-hostile"
ROOT = os.geteuid() == 0


class Spool:
    """A service's spool with jobs waiting for their results, and one round of its uploads chore."""

    def __init__(self, config: cfg.Config, factory: sessionmaker[Session]) -> None:
        self.config = config
        self.factory = factory
        self.root = config.spool_dir
        spool.ensure_layout(self.root)

    def job(self) -> tuple[int, str]:
        """A job waiting for its upload, and its crash id."""
        applier = Applier(self.config)
        data = crash_data()
        with store.transaction(self.factory) as session:
            job = submit(applier, session, **data)
            applier.apply_batch(session, [event("retrace.started", job, source="w", worker="w")])
        return job, data["crash_id"]

    def upload(self, leaf: str, job: int, crash_id: str) -> Path:
        """A good upload for the job, written as a worker does and renamed to ``leaf`` (any name at all)."""
        manifest = {"job": job, "crash_id": crash_id, "build_ids": [], "worker": "w"}
        path = spool.write_upload(self.root, "writing", manifest, GOOD_BACKTRACE, "retraced\n")
        os.rename(path, self.root / "incoming" / leaf)
        return self.root / "incoming" / leaf

    def round(self) -> int:
        """One round of the service's uploads chore."""
        return dict(Service(self.config, self.factory).chores)["uploads"]()

    def state(self, job: int) -> str:
        with self.factory() as session:
            found = session.get(Job, job)
            assert found is not None
            return found.state

    def entries(self, sub: str) -> list[str]:
        return sorted(os.listdir(self.root / sub))


@pytest.fixture(autouse=True)
def fresh_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the service said already about each upload is this process's memory: each test starts without it."""
    monkeypatch.setattr(intake, "_told", type(intake._told)())


@pytest.fixture
def spool_of(config: cfg.Config, factory: sessionmaker[Session]) -> Spool:
    return Spool(config, factory)


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """A directory outside the spool with a file and a complete upload in it; it must never change."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret.txt").write_text("root:x:0:0:secret\n", encoding="utf-8")
    victim = path / "victim"
    victim.mkdir()
    (victim / "worker.log").write_text("ok\n", encoding="utf-8")
    before = snapshot(path)
    yield path
    assert snapshot(path) == before, "something outside the spool was touched"


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def manifest_text(spool_of: Spool, text: str) -> Callable[[int, str], None]:
    def make(job: int, crash_id: str) -> None:
        (spool_of.upload(BAD, job, crash_id) / "manifest.json").write_text(text, encoding="utf-8")

    return make


def refuse_os_call(monkeypatch: pytest.MonkeyPatch, name: str, error: int, hit: Callable[..., bool]) -> None:
    """Make ``os.<name>`` fail with ``error`` whenever ``hit(*args, **kwargs)``: an upload that serve's user may
    not read, as root (whom chmod does not stop) sees it."""
    real = getattr(os, name)

    def refused(*args: Any, **kwargs: Any) -> Any:
        if hit(*args, **kwargs):
            raise OSError(error, os.strerror(error), str(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, refused)


def refuse_moving(monkeypatch: pytest.MonkeyPatch, leaf: str, error: int = errno.EACCES) -> None:
    """Make the rename of ``leaf`` fail (EACCES: a directory serve's user may not write; EPERM: another user's
    entry in a sticky directory)."""
    real = files._renameat2
    assert real is not None

    def renameat2(src_fd: int, src: bytes, dst_fd: int, dst: bytes, flags: int) -> int:
        if os.path.basename(src) == os.fsencode(leaf):
            ctypes.set_errno(error)
            return -1
        return int(real(src_fd, src, dst_fd, dst, flags))

    monkeypatch.setattr(files, "_renameat2", renameat2)


def unreadable_directory(spool_of: Spool, monkeypatch: pytest.MonkeyPatch) -> Callable[[int, str], None]:
    def make(job: int, crash_id: str) -> None:
        spool_of.upload(BAD, job, crash_id)
        refuse_os_call(monkeypatch, "open", errno.EACCES,
                       lambda path, *a, **k: path == BAD and k.get("dir_fd") is not None)
        refuse_moving(monkeypatch, BAD)

    return make


def unlistable_directory(spool_of: Spool, monkeypatch: pytest.MonkeyPatch) -> Callable[[int, str], None]:
    def make(job: int, crash_id: str) -> None:
        spool_of.upload(BAD, job, crash_id)
        refuse_os_call(monkeypatch, "scandir", errno.EACCES,
                       lambda target=None: isinstance(target, int) and fd_path(target).endswith("/" + BAD))

    return make


def unreadable_manifest(spool_of: Spool, monkeypatch: pytest.MonkeyPatch) -> Callable[[int, str], None]:
    def make(job: int, crash_id: str) -> None:
        spool_of.upload(BAD, job, crash_id)
        refuse_os_call(monkeypatch, "read", errno.EIO,
                       lambda fd, n: fd_path(fd).endswith(f"/{BAD}/manifest.json"))

    return make


def unexaminable_entry(spool_of: Spool, monkeypatch: pytest.MonkeyPatch) -> Callable[[int, str], None]:
    def make(job: int, crash_id: str) -> None:
        spool_of.upload(BAD, job, crash_id)
        refuse_os_call(monkeypatch, "lstat", errno.EACCES,
                       lambda path, *a, **k: os.path.basename(os.fsdecode(path)) == BAD)

    return make


def hostile_kinds(spool_of: Spool, monkeypatch: pytest.MonkeyPatch, kind: str) -> Callable[[int, str], object]:
    incoming = spool_of.root / "incoming"
    kinds: dict[str, Callable[[int, str], object]] = {
        "number past int_max_str_digits": manifest_text(spool_of, '{"job": ' + "9" * 5000 + "}"),
        # "$" in the name pattern matches before a final newline; the events contract refuses the name.
        "leaf with a final newline": lambda job, crash: spool_of.upload(BAD + "\n", job, crash),
        "upload directory serve may not read": unreadable_directory(spool_of, monkeypatch),
        "upload directory serve may not list": unlistable_directory(spool_of, monkeypatch),
        "manifest that fails to read": unreadable_manifest(spool_of, monkeypatch),
        "entry serve may not examine": unexaminable_entry(spool_of, monkeypatch),
        "another user's FIFO": unmovable(monkeypatch, lambda: os.mkfifo(incoming / BAD)),
        "another user's socket": unmovable(monkeypatch, lambda: bound_socket(incoming / BAD)),
        "another user's dangling symlink": unmovable(monkeypatch, lambda: os.symlink("/nonexistent", incoming / BAD)),
    }
    return kinds[kind]


def bound_socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))


def unmovable(monkeypatch: pytest.MonkeyPatch, make: Callable[[], object]) -> Callable[[int, str], None]:
    """An entry of another user in a shared incoming/ (mode 1777, as a spool that workers write into often is):
    the sticky bit lets no one else move it, so it cannot be filed away."""

    def made(job: int, crash_id: str) -> None:
        make()
        refuse_moving(monkeypatch, BAD, errno.EPERM)

    return made


class TestOneBadUploadDoesNotStopTheSpool:
    @pytest.mark.parametrize("kind", [
        "number past int_max_str_digits", "leaf with a final newline", "upload directory serve may not read",
        "upload directory serve may not list", "manifest that fails to read", "entry serve may not examine",
        "another user's FIFO", "another user's socket", "another user's dangling symlink"])
    def test_the_good_upload_after_it_is_accepted(self, spool_of: Spool, monkeypatch: pytest.MonkeyPatch,
                                                   kind: str) -> None:
        """A hostile upload sorted before a good one: one round accepts the good one, and the hostile one is
        filed to failed/ or left in incoming/ with a log line."""
        hostile_job, hostile_crash = spool_of.job()
        job, crash = spool_of.job()
        hostile_kinds(spool_of, monkeypatch, kind)(hostile_job, hostile_crash)
        spool_of.upload(GOOD, job, crash)
        with captured_logs() as records:
            spool_of.round()
        assert GOOD in spool_of.entries("accepted")
        assert spool_of.state(job) == load_spec().roles.success
        filed = any(name.startswith(BAD) for name in spool_of.entries("failed"))
        told = [r for r in records if r.getMessage() == "upload left in incoming/"]
        assert filed or told, "the hostile upload was neither filed away nor reported"
        assert spool_of.state(hostile_job) in (load_spec().roles.working, load_spec().roles.rescuable)

    def test_an_upload_that_cannot_be_moved_is_said_once(self, spool_of: Spool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
        """An upload serve cannot move stays in incoming/, said in one log line naming it and what to do, not
        once every round; the next uploads flow on both rounds."""
        hostile_job, hostile_crash = spool_of.job()
        unreadable_directory(spool_of, monkeypatch)(hostile_job, hostile_crash)
        with captured_logs() as records:
            for n in range(2):
                job, crash = spool_of.job()
                spool_of.upload(f"{GOOD}-{n}", job, crash)
                spool_of.round()
                assert spool_of.state(job) == load_spec().roles.success
        told = [r for r in records if r.getMessage() == "upload left in incoming/"]
        assert len(told) == 1, [r.__dict__ for r in told]
        said = told[0].__dict__
        assert said["leaf"] == BAD and "could not be moved" in said["error"] and "permissions" in said["error"]
        assert spool_of.entries("incoming") == [BAD]

    @pytest.mark.skipif(ROOT, reason="chmod does not stop root; the monkeypatched cases stand in for it")
    def test_a_directory_serve_may_not_read(self, spool_of: Spool) -> None:
        """An upload directory with mode 000 (another user's, as serve sees it) does not hold up the next one."""
        hostile_job, hostile_crash = spool_of.job()
        job, crash = spool_of.job()
        hostile = spool_of.upload(BAD, hostile_job, hostile_crash)
        spool_of.upload(GOOD, job, crash)
        hostile.chmod(0)
        try:
            spool_of.round()
        finally:
            hostile.chmod(0o755)
        assert spool_of.state(job) == load_spec().roles.success


MANIFEST_VALUES = st.one_of(
    st.integers(), st.integers(min_value=2**31 - 3, max_value=2**64), st.floats(), st.booleans(), st.none(),
    st.text(max_size=30), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers()),
).map(lambda value: json.dumps(value))
RAW_NUMBERS = st.sampled_from(["9" * 4301, "-" + "9" * 5000, "1" + "0" * 400, "1e999", "-1e999", "NaN", "Infinity",
                               "-Infinity", "-0", "0.0", "2147483648", "18446744073709551616", "1.5e9"])


class TestHostileManifests:
    @settings(max_examples=150, deadline=None)
    @given(key=st.sampled_from(["job", "crash_id", "build_ids", "worker"]),
           value=st.one_of(MANIFEST_VALUES, RAW_NUMBERS))
    @example(key="job", value="9" * 5000)
    @example(key="job", value="2147483648")
    def test_any_value_is_refused_or_taken_never_raised(self, key: str, value: str) -> None:
        """Whatever a manifest field holds (huge, negative, fractional, NaN, a string), the upload is checked
        without raising; only a job id the database can hold is ever looked up; the outcome is a valid event."""
        fields = {"job": "7", "crash_id": '"crash-0007"', "build_ids": "[]", "worker": '"bob"', key: value}
        looked_up: list[int] = []

        def lookup(job_id: int) -> ExpectedJob | None:
            looked_up.append(job_id)
            return ExpectedJob(7, "crash-0007", [], load_spec().roles.working) if job_id == 7 else None

        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "spool"
            spool.ensure_layout(root)
            path = spool.write_upload(root, "job-7-1", {}, GOOD_BACKTRACE, "")
            (path / "manifest.json").write_text("{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}",
                                                encoding="utf-8")
            result = spool.process(root, "job-7-1", lookup, LIMITS, Path(tmp) / "results")
            assert (root / ("accepted" if result.accepted else "failed") / "job-7-1").is_dir()
        assert all(0 < job_id <= events.MAX_JOB_ID for job_id in looked_up), looked_up
        assert result.accepted or "manifest.json" in result.upload_log or "job 7 " in result.upload_log
        if result.job_id is not None:
            events.parse(upload_event(result), minted=True)

    def test_a_job_id_past_the_database_is_never_looked_up(self, tmp_path: Path) -> None:
        """A manifest naming job 2**31 (past PostgreSQL's INTEGER) is refused as naming no job, before any query."""
        root = tmp_path / "spool"
        spool.ensure_layout(root)
        manifest = {"job": 2**31, "crash_id": "crash-0007", "build_ids": [], "worker": "w"}
        spool.write_upload(root, "job-7-1", manifest, GOOD_BACKTRACE, "")
        asked: list[int] = []
        result = spool.process(root, "job-7-1", lambda job_id: asked.append(job_id), LIMITS, None)
        assert asked == [] and not result.accepted and result.job_id is None
        assert "job is 2147483648, not a positive integer of at most 2147483647" in result.upload_log
        assert (root / "failed" / "job-7-1").is_dir()

SAFE_LEAVES = st.from_regex(events.SAFE_NAME).filter(lambda leaf: len(leaf) <= files.MAX_NAME)


class TestLeafNames:
    @settings(max_examples=200, deadline=None)
    @given(leaf=st.one_of(SAFE_LEAVES, st.integers(1, files.MAX_NAME).map(lambda n: "j" * n)),
           accepted=st.booleans())
    @example(leaf="job-7-1\n", accepted=True)
    @example(leaf="j" * 255, accepted=False)
    def test_every_allowed_leaf_makes_a_valid_event(self, leaf: str, accepted: bool) -> None:
        """Any name the spool takes as an upload's gives a valid event (an id of at most 200 characters, a leaf
        the events contract accepts); any other name is refused before it could need one."""
        if files.leaf_name_problem(leaf) is not None:
            return
        result = spool.UploadResult(leaf, 7, accepted, "accepted: job 7" if accepted else "refused: why", None,
                                    None, False, digest="ab" * 32)
        parsed = events.parse(upload_event(result), minted=True)
        assert len(parsed.id) <= 200 and parsed.data["leaf"] == leaf


class TestNothingOutsideTheSpool:
    @pytest.mark.parametrize("dest", ["failed", "accepted"])
    def test_a_destination_swapped_for_a_symlink_after_the_checks(self, tmp_path: Path, outside: Path,
                                                                   dest: str) -> None:
        """failed/ or accepted/ replaced by a symlink to a directory outside, between the checks and the move: the
        upload stays in incoming/ and the error names the path and what to do."""
        root = tmp_path / "spool"
        spool.ensure_layout(root)
        job = ExpectedJob(7, "crash-0007", [], load_spec().roles.working)
        crash = "crash-0007" if dest == "accepted" else "another crash"
        manifest: dict[str, Any] = {"job": 7, "crash_id": crash, "build_ids": [], "worker": "w"}
        spool.write_upload(root, "job-7-1", manifest, GOOD_BACKTRACE, "")
        result = spool.process(root, "job-7-1", job, LIMITS, None, move=False)
        assert result.accepted == (dest == "accepted")
        (root / dest).rmdir()
        (root / dest).symlink_to(outside)
        refused = rf"spool directory .*/{dest} cannot be opened because it is a symlink \(to '.*outside'\); "
        with pytest.raises(ConfigError, match=refused + r"it must be a real directory .*move it away"):
            spool.file_away(root, result)
        assert (root / "incoming" / "job-7-1").is_dir()

    def test_failed_swapped_during_a_round(self, spool_of: Spool, outside: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
        """A round whose failed/ becomes a symlink after its layout check stops with that error: the refused
        upload is not moved through the link."""
        job, _ = spool_of.job()
        spool_of.upload(BAD, job, "another crash")
        real = spool.file_away

        def swapped_first(spool_dir: Any, outcome: spool.UploadResult) -> spool.UploadResult:
            (spool_of.root / "failed").rmdir()
            (spool_of.root / "failed").symlink_to(outside)
            return real(spool_dir, outcome)

        monkeypatch.setattr(spool, "file_away", swapped_first)
        with pytest.raises(ConfigError, match=r"failed cannot be opened .*a symlink"):
            spool_of.round()
        assert spool_of.entries("incoming") == [BAD]

    def test_a_lock_file_symlink_is_not_followed(self, spool_of: Spool, outside: Path) -> None:
        """A .lock that is a symlink to a file outside is refused, naming it: nothing is created outside."""
        (spool_of.root / ".lock").symlink_to(outside / "created-through-the-lock")
        refused = r"spool lock .*\.lock is a symlink \(to '.*created-through-the-lock'\): refused without following it"
        with pytest.raises(ConfigError, match=refused + r".*remove it"), spool_lock(spool_of.config):
            pass

    def test_a_kept_upload_is_not_restored_through_a_symlinked_failed(self, tmp_path: Path, outside: Path) -> None:
        """restore_failed with failed/ a symlink to outside refuses; the directory outside is not moved in."""
        root = tmp_path / "spool"
        spool.ensure_layout(root)
        (root / "failed").rmdir()
        (root / "failed").symlink_to(outside)
        with pytest.raises(ConfigError, match=r"failed cannot be opened"):
            spool.restore_failed(root, "victim")
        assert not (root / "incoming" / "victim").exists()

    def test_incoming_swapped_for_a_symlink_is_not_listed(self, tmp_path: Path, outside: Path) -> None:
        """An incoming/ that is a symlink to outside is refused, naming it, not listed."""
        root = tmp_path / "spool"
        root.mkdir()
        (root / "incoming").symlink_to(outside)
        with pytest.raises(ConfigError, match=r"incoming cannot be opened .*a symlink"):
            spool.incoming_leaves(root)


class TestEntryChangingWhileExamined:
    @staticmethod
    def swap_before_readlink(monkeypatch: pytest.MonkeyPatch, entry: Path,
                             replace: Callable[[Path], object]) -> None:
        """The entry (a symlink when it was lstat-ed) is replaced just before its link is read."""
        real = os.readlink

        def readlink(path: Any, *args: Any, **kwargs: Any) -> Any:
            if os.path.basename(os.fsdecode(path)) == entry.name and entry.is_symlink():
                entry.unlink()
                replace(entry)
            return real(path, *args, **kwargs)

        monkeypatch.setattr(os, "readlink", readlink)

    def test_a_symlink_upload_turned_into_a_directory(self, spool_of: Spool, outside: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
        """A symlink in incoming/ swapped for a directory between lstat and readlink is refused with that reason
        and filed away; the good upload after it is accepted in the same round."""
        job, crash = spool_of.job()
        hostile = spool_of.root / "incoming" / BAD
        hostile.symlink_to(outside / "victim")
        self.swap_before_readlink(monkeypatch, hostile, Path.mkdir)
        spool_of.upload(GOOD, job, crash)
        spool_of.round()
        assert spool_of.state(job) == load_spec().roles.success
        assert (spool_of.root / "failed" / BAD).is_dir() and not (spool_of.root / "failed" / BAD).is_symlink()

    def test_the_reason_is_in_the_upload_log(self, tmp_path: Path, outside: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
        """The refusal says the entry changed while it was examined, and that nothing was followed."""
        root = tmp_path / "spool"
        spool.ensure_layout(root)
        hostile = root / "incoming" / "job-7-1"
        hostile.symlink_to(outside / "victim")
        self.swap_before_readlink(monkeypatch, hostile, lambda path: path.write_text("now a file"))
        result = spool.process(root, "job-7-1", ExpectedJob(7, "crash-0007"), LIMITS, None)
        assert not result.accepted and result.job_id == 7
        assert "job-7-1: was a symlink, then changed while it was being examined" in result.upload_log
        events.parse(upload_event(result), minted=True)

