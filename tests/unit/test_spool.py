"""The upload spool: good uploads are stored and accepted; hostile ones are refused and touch nothing outside."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from retracer import events
from retracer.errors import ConfigError, UploadRejected
from retracer.uploads import spool
from retracer.uploads.spool import ExpectedJob, Limits

LIMITS = Limits(max_file_bytes=64 * 1024, max_upload_bytes=100 * 1024)
BUILD_ID = "a3f5c0ffee0123456789abcdef0123456789abcd"
GOOD_BACKTRACE = (
    "#0  __GI_raise (sig=sig@entry=6) at ../sysdeps/unix/sysv/linux/raise.c:50\n"
    "#1  0x00007f2d8c1e3859 in __GI_abort () at abort.c:79\n"
    "#2  0x00007f2d8c1e4000 in ?? () from /lib/x86_64-linux-gnu/libc.so.6\n"
    "#3  0x000055d0c3a0113d in main () at crash.c:4\n"
)
USELESS_BACKTRACE = (
    "#0  0x00007f2d8c1e3859 in ?? ()\n"
    "#1  ?? ()\n"
    "#2  0x000055d0c3a0113d in ?? () from /lib/x86_64-linux-gnu/libc.so.6\n"
)
JOB = ExpectedJob(job_id=7, crash_id="crash-0007", build_ids=[BUILD_ID], state="RETRACING")
Snapshot = dict[str, tuple[Any, ...]]


def manifest(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"job": 7, "crash_id": "crash-0007", "build_ids": [BUILD_ID], "worker": "bob"}
    data.update(overrides)
    return data


def snapshot(root: Path) -> Snapshot:
    """Every path under root with its type, mode, mtime and content hash (symlinks are recorded, not followed)."""
    seen: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            if path.is_symlink():
                content: str = "link:" + os.readlink(path)
            elif path.is_file():
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                content = "dir"
            seen[str(path.relative_to(root))] = (st.st_mode, st.st_mtime_ns, st.st_size, content)
    return seen


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    path = tmp_path / "spool"
    spool.ensure_layout(path)
    return path


@pytest.fixture
def results(tmp_path: Path) -> Path:
    return tmp_path / "results"


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """A directory outside the spool holding a secret and a complete, valid-looking upload; it must never change."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret.txt").write_text("root:x:0:0:secret\n", encoding="utf-8")
    victim = path / "victim"
    victim.mkdir()
    (victim / "manifest.json").write_text(json.dumps(manifest()), encoding="utf-8")
    (victim / "backtrace.txt").write_text(GOOD_BACKTRACE, encoding="utf-8")
    (victim / "worker.log").write_text("ok\n", encoding="utf-8")
    before = snapshot(path)
    yield path
    assert snapshot(path) == before, "something outside the spool was touched"


@pytest.fixture
def upload(spool_dir: Path) -> Callable[..., Path]:
    """Write an upload into incoming/ the way a worker does; keyword arguments replace the good defaults."""

    def make(leaf: str = "job-7-1", backtrace: str = GOOD_BACKTRACE, **fields: Any) -> Path:
        return spool.write_upload(spool_dir, leaf, manifest(**fields), backtrace, "retraced with gdb\n")

    return make


@pytest.fixture
def read_from(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths of every os.read call made while the test runs."""
    paths: list[str] = []
    real_read = os.read

    def spy(fd: int, n: int) -> bytes:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", spy)
    return paths


def run(spool_dir: Path, leaf: str, results: Path, expected: Any = JOB, **kwargs: Any) -> spool.UploadResult:
    return spool.process(spool_dir, leaf, expected, LIMITS, results, **kwargs)


def assert_refused(result: spool.UploadResult, pattern: str, results: Path) -> None:
    """Refused with a log line matching pattern, no result, and nothing stored."""
    assert not result.accepted
    assert result.result is None
    assert re.search(pattern, result.upload_log), result.upload_log
    assert not results.exists() or not any(results.rglob("*")), "a refused upload stored something"


class TestGoodUpload:
    def test_accepted_stored_and_moved(self, spool_dir: Path, results: Path, upload: Callable[..., Path]) -> None:
        """A good upload is accepted, its backtrace stored in results/<job>/, and moved to accepted/."""
        upload()
        result = run(spool_dir, "job-7-1", results)
        assert result.accepted, result.upload_log
        assert result.job_id == 7
        assert result.result == GOOD_BACKTRACE
        assert (results / "7" / "backtrace.txt").read_text(encoding="utf-8") == GOOD_BACKTRACE
        assert result.stored_at == results / "7" / "backtrace.txt"
        assert result.moved_to == spool_dir.resolve() / "accepted" / "job-7-1"
        assert (spool_dir / "accepted" / "job-7-1" / "backtrace.txt").is_file()
        assert not (spool_dir / "incoming" / "job-7-1").exists()
        assert result.upload_log.startswith("accepted: job 7, crash crash-0007, worker bob, 4 frames")
        assert list((results / "7").iterdir()) == [results / "7" / "backtrace.txt"], "a temp file was left"

    def test_event_data_is_a_valid_upload_accepted(self, spool_dir: Path, results: Path,
                                                   upload: Callable[..., Path]) -> None:
        """The accepted outcome becomes a valid upload.accepted event carrying the leaf and the result."""
        upload()
        result = run(spool_dir, "job-7-1", results)
        event = events.make(result.event_type, result.job_id, result.to_event_data(), "test")
        assert event.type == "upload.accepted"
        assert event.data == {"leaf": "job-7-1", "result": GOOD_BACKTRACE}

    def test_lookup_by_manifest_job(self, spool_dir: Path, results: Path, upload: Callable[..., Path]) -> None:
        """With a lookup function, the job is the one the manifest names."""
        upload()
        asked: list[int] = []

        def lookup(job_id: int) -> ExpectedJob | None:
            asked.append(job_id)
            return JOB if job_id == 7 else None

        result = run(spool_dir, "job-7-1", results, lookup)
        assert asked == [7]
        assert result.accepted and result.job_id == 7

    def test_build_ids_compared_without_case(self, spool_dir: Path, results: Path,
                                             upload: Callable[..., Path]) -> None:
        """Build-ids match whatever the case of their hex digits."""
        upload(build_ids=[BUILD_ID.upper()])
        assert run(spool_dir, "job-7-1", results).accepted

    def test_failed_for_a_job_awaiting_rescue(self, spool_dir: Path, results: Path,
                                              upload: Callable[..., Path]) -> None:
        """A FAILEDTOUPLOAD job takes an upload too (that is what a rescue reprocesses)."""
        upload()
        job = ExpectedJob(7, "crash-0007", [BUILD_ID], "FAILEDTOUPLOAD")
        assert run(spool_dir, "job-7-1", results, job).accepted

    def test_long_result_truncated_for_the_event(self, spool_dir: Path, results: Path,
                                                 upload: Callable[..., Path]) -> None:
        """A backtrace over 1 MiB is stored whole, and cut at a line boundary to fit the event."""
        line = "#5  0x00007f2d8c1e3859 in some_function_with_a_long_name (argument=1) at file.c:79\n"
        backtrace = GOOD_BACKTRACE + line * (2 * 1024 * 1024 // len(line))
        upload(backtrace=backtrace)
        limits = Limits(max_file_bytes=4 * 1024 * 1024, max_upload_bytes=8 * 1024 * 1024)
        result = spool.process(spool_dir, "job-7-1", JOB, limits, results)
        assert result.accepted and result.result is not None
        assert len(result.result) <= events.MAX_BODY_BYTES // 2
        assert "[truncated to 1048576 characters; the whole backtrace is in" in result.result
        assert result.result.startswith(GOOD_BACKTRACE)
        assert (results / "7" / "backtrace.txt").read_text(encoding="utf-8") == backtrace
        events.make("upload.accepted", 7, result.to_event_data(), "test")

    def test_without_results_dir(self, spool_dir: Path, tmp_path: Path, upload: Callable[..., Path]) -> None:
        """With no results directory the result is only returned (for the database), nothing is stored."""
        upload()
        result = spool.process(spool_dir, "job-7-1", JOB, LIMITS, None)
        assert result.accepted and result.result == GOOD_BACKTRACE and result.stored_at is None
        assert sorted(p.name for p in tmp_path.iterdir()) == ["spool"]


class TestLeafNames:
    @pytest.mark.parametrize("leaf", ["../../outside/victim", "../failed", "..", ".", "", "a/b",
                                      "incoming/../../outside/victim"])
    def test_escaping_names_refused_untouched(self, spool_dir: Path, results: Path, outside: Path,
                                              leaf: str) -> None:
        """A leaf name that could leave the spool is refused without being looked at or moved."""
        result = run(spool_dir, leaf, results)
        assert_refused(result, r"not a plain directory name", results)
        assert result.moved_to is None and result.job_id is None

    def test_absolute_name_refused(self, spool_dir: Path, results: Path, outside: Path) -> None:
        """An absolute path to a valid upload outside the spool is refused and left alone."""
        result = run(spool_dir, str(outside / "victim"), results)
        assert_refused(result, r"not a plain directory name", results)
        assert result.moved_to is None

    def test_unsafe_characters_refused_and_filed(self, spool_dir: Path, results: Path) -> None:
        """A name with unsafe characters is refused unread and moved to failed/ so it is not retried forever."""
        leaf = "job 7\nBcc: x@example.com"
        (spool_dir / "incoming" / leaf).mkdir()
        result = run(spool_dir, leaf, results)
        assert_refused(result, r"is not allowed: use at most 255 letters", results)
        assert "\n" not in result.upload_log
        assert result.job_id is None
        assert (spool_dir / "failed" / leaf).is_dir()

    def test_missing_leaf(self, spool_dir: Path, results: Path) -> None:
        """A leaf that does not exist is reported, and nothing is moved."""
        result = run(spool_dir, "job-7-404", results)
        assert_refused(result, r"there is no upload 'job-7-404' in .*incoming", results)
        assert result.moved_to is None
        assert list((spool_dir / "failed").iterdir()) == []

    def test_leaf_symlink_to_outside_directory(self, spool_dir: Path, results: Path, outside: Path) -> None:
        """A leaf that is a symlink to a valid upload outside is refused without following it."""
        (spool_dir / "incoming" / "job-7-1").symlink_to(outside / "victim")
        result = run(spool_dir, "job-7-1", results)
        assert_refused(result, r"job-7-1: is a symlink, not a directory", results)
        assert re.search(r"resolves to '.*outside/victim', outside", result.upload_log)
        assert result.job_id == 7  # the job being processed, for the upload.failed event
        moved = spool_dir / "failed" / "job-7-1"
        assert moved.is_symlink(), "the link itself is filed away, never its target"

    def test_leaf_is_a_file(self, spool_dir: Path, results: Path) -> None:
        """A plain file in incoming/ is not an upload."""
        (spool_dir / "incoming" / "job-7-1").write_text("hello", encoding="utf-8")
        result = run(spool_dir, "job-7-1", results)
        assert_refused(result, r"job-7-1: is not a directory", results)
        assert (spool_dir / "failed" / "job-7-1").is_file()

    def test_incoming_symlink_refused(self, tmp_path: Path, results: Path, outside: Path) -> None:
        """A spool whose incoming/ is a symlink elsewhere is a configuration error, not followed."""
        root = tmp_path / "spool2"
        root.mkdir()
        (root / "incoming").symlink_to(outside)
        with pytest.raises(ConfigError, match=r"incoming cannot be opened .*not a symlink"):
            run(root, "victim", results)
        with pytest.raises(ConfigError, match=r"must be a real directory"):
            spool.ensure_layout(root)


class TestHostileContent:
    def test_symlink_inside_to_etc_passwd(self, spool_dir: Path, results: Path, upload: Callable[..., Path]) -> None:
        """A backtrace.txt that is a symlink to /etc/passwd is refused and never read."""
        path = upload()
        (path / "backtrace.txt").unlink()
        (path / "backtrace.txt").symlink_to("/etc/passwd")
        passwd = os.stat("/etc/passwd")
        result = run(spool_dir, "job-7-1", results)
        assert_refused(result, r"'backtrace.txt': is a symlink \(to '/etc/passwd'\); it was not followed", results)
        assert "backtrace.txt: is missing" not in result.upload_log
        assert os.stat("/etc/passwd").st_mtime_ns == passwd.st_mtime_ns
        assert (spool_dir / "failed" / "job-7-1" / "backtrace.txt").is_symlink()

    def test_symlinked_manifest_to_outside(self, spool_dir: Path, results: Path, outside: Path,
                                           upload: Callable[..., Path]) -> None:
        """A manifest.json that is a symlink to an outside file is refused; the outside file is untouched."""
        path = upload()
        (path / "manifest.json").unlink()
        (path / "manifest.json").symlink_to(outside / "victim" / "manifest.json")
        result = run(spool_dir, "job-7-1", results)
        assert_refused(result, r"'manifest.json': is a symlink", results)

    def test_hard_link_to_outside_file(self, spool_dir: Path, results: Path, outside: Path,
                                       upload: Callable[..., Path]) -> None:
        """A backtrace.txt hard-linked to another file is refused, so no foreign content is published."""
        path = upload()
        (path / "backtrace.txt").unlink()
        os.link(outside / "secret.txt", path / "backtrace.txt")
        result = run(spool_dir, "job-7-1", results)
        assert_refused(result, r"backtrace.txt: is a hard link \(2 links\)", results)
        assert "secret" not in result.upload_log

    def test_oversize_sparse_file_not_read(self, spool_dir: Path, results: Path, upload: Callable[..., Path],
                                           read_from: list[str]) -> None:
        """A sparse 8 GiB backtrace is refused from its size alone: not one byte of it is read."""
        path = upload()
        big = path / "backtrace.txt"
        os.truncate(big, 8 * 1024**3)
        result = run(spool_dir, "job-7-1", results)
        assert_refused(result, r"backtrace.txt: is 8589934592 bytes, more than the 65536 allowed "
                               r"\(\[spool\] max_file_bytes\); it was not read", results)
        assert not any(p.endswith("backtrace.txt") for p in read_from), read_from
        assert any(p.endswith("manifest.json") for p in read_from), "the spy saw nothing: the test is blind"
        assert result.job_id == 7

    def test_whole_upload_too_big(self, spool_dir: Path, results: Path, upload: Callable[..., Path],
                                  read_from: list[str]) -> None:
        """Files each under the per-file limit but together over the upload limit are refused, the backtrace unread."""
        path = upload()
        with open(path / "worker.log", "a", encoding="utf-8") as log:
            log.write("x" * 60 * 1024)
        with open(path / "backtrace.txt", "a", encoding="utf-8") as bt:
            bt.write("#9  main () at crash.c:4\n" * 2000)
        result = run(spool_dir, "job-7-1", results)
        assert_refused(result, r"the upload is \d+ bytes, more than the 102400 allowed \(\[spool\] "
                               r"max_upload_bytes\)", results)
        assert not any(p.endswith("backtrace.txt") for p in read_from), read_from
        assert result.job_id == 7, "the manifest is still read, to tie the failure to its job"

    def test_unknown_files_and_subdirectories(self, spool_dir: Path, results: Path,
                                              upload: Callable[..., Path]) -> None:
        """Extra files and subdirectories are refused, each named in the upload log."""
        path = upload()
        (path / "core").write_bytes(b"\x7fELF")
        (path / "notes.txt").write_text("hi", encoding="utf-8")
        (path / "debug").mkdir()
        result = run(spool_dir, "job-7-1", results)
        assert_refused(result, r"unknown files 'core', 'notes.txt': an upload holds only manifest.json, "
                               r"backtrace.txt, worker.log", results)
        assert "'debug': is a subdirectory" in result.upload_log
        assert len(result.upload_log.splitlines()) == 2

    def test_fifo_refused_without_hanging(self, spool_dir: Path, results: Path, upload: Callable[..., Path]) -> None:
        """A FIFO in place of backtrace.txt is refused (opening it for reading would block)."""
        path = upload()
        (path / "backtrace.txt").unlink()
        os.mkfifo(path / "backtrace.txt")
        result = run(spool_dir, "job-7-1", results)
        assert_refused(result, r"'backtrace.txt': is not a regular file", results)

    def test_missing_files(self, spool_dir: Path, results: Path, upload: Callable[..., Path]) -> None:
        """Each missing file is named."""
        path = upload()
        (path / "worker.log").unlink()
        (path / "backtrace.txt").unlink()
        result = run(spool_dir, "job-7-1", results)
        assert_refused(result, r"backtrace.txt: is missing", results)
        assert "worker.log: is missing" in result.upload_log

    def test_results_job_dir_symlink_not_followed(self, spool_dir: Path, results: Path, outside: Path,
                                                  upload: Callable[..., Path]) -> None:
        """If results/<job> is a symlink elsewhere the backtrace is not written through it; the upload fails."""
        results.mkdir()
        (results / "7").symlink_to(outside)
        upload()
        result = run(spool_dir, "job-7-1", results)
        assert not result.accepted and result.result is None
        assert "the backtrace could not be stored in" in result.upload_log
        assert "then rescue the job (retracer rescue 7)" in result.upload_log
        assert (spool_dir / "failed" / "job-7-1").is_dir()


class TestManifest:
    def test_manifest_for_another_job(self, spool_dir: Path, results: Path, upload: Callable[..., Path]) -> None:
        """A manifest naming another job is refused when processing job 7."""
        upload(job=8)
        result = run(spool_dir, "job-7-1", results)
        assert_refused(result, r"job is 8, but this upload was processed for job 7", results)
        assert result.job_id == 7
        assert (spool_dir / "failed" / "job-7-1").is_dir()

    def test_manifest_for_unknown_job(self, spool_dir: Path, results: Path, upload: Callable[..., Path]) -> None:
        """A manifest naming a job that does not exist is refused, tied to no job."""
        upload(job=99)
        result = run(spool_dir, "job-7-1", results, lambda job_id: None)
        assert_refused(result, r"job 99 does not exist", results)
        assert result.job_id is None

    def test_wrong_crash_id(self, spool_dir: Path, results: Path, upload: Callable[..., Path]) -> None:
        """A crash id other than the job's is refused."""
        upload(crash_id="crash-0666")
        result = run(spool_dir, "job-7-1", results)
        assert_refused(result, r"crash_id is 'crash-0666', but job 7 retraces crash 'crash-0007'", results)

    def test_wrong_build_ids(self, spool_dir: Path, results: Path, upload: Callable[..., Path]) -> None:
        """Build-ids other than the job's are refused, naming the missing and unexpected ones."""
        upload(build_ids=["deadbeefdeadbeef"])
        result = run(spool_dir, "job-7-1", results)
        assert_refused(result, rf"build_ids do not match job 7's \(missing \['{BUILD_ID}'\], unexpected "
                               r"\['deadbeefdeadbeef'\]\)", results)

    def test_invalid_json(self, spool_dir: Path, results: Path, upload: Callable[..., Path]) -> None:
        """A manifest that is not JSON is refused."""
        path = upload()
        (path / "manifest.json").write_text("{job: 7,", encoding="utf-8")
        result = run(spool_dir, "job-7-1", results)
        assert_refused(result, r"manifest.json: is not valid JSON", results)
        assert result.job_id == 7

    @pytest.mark.parametrize(("field", "value", "pattern"), [
        ("job", "7", r"job is '7', not a positive integer"),
        ("job", True, r"job is True, not a positive integer"),
        ("crash_id", 7, r"crash_id is 7, not a crash id"),
        ("build_ids", "a3f5c0ffee", r"build_ids is 'a3f5c0ffee', not a list"),
        ("build_ids", ["not hex!"], r"build_ids is \['not hex!'\], not a list"),
        ("worker", "bob\nBcc: x", r"worker is 'bob\\nBcc: x', not a worker name"),
    ])
    def test_wrong_types(self, spool_dir: Path, results: Path, upload: Callable[..., Path], field: str,
                         value: Any, pattern: str) -> None:
        """Each manifest field of the wrong type is named with what it should be."""
        upload(**{field: value})
        assert_refused(run(spool_dir, "job-7-1", results), pattern, results)

    def test_unknown_and_missing_keys(self, spool_dir: Path, results: Path, upload: Callable[..., Path]) -> None:
        """Unknown keys and missing keys are all reported at once."""
        path = upload()
        (path / "manifest.json").write_text(json.dumps({"job": 7, "extra": 1}), encoding="utf-8")
        result = run(spool_dir, "job-7-1", results)
        assert_refused(result, r"unknown keys \['extra'\]", results)
        for key in ("crash_id", "build_ids", "worker"):
            assert f"manifest.json: {key} is missing" in result.upload_log

    def test_not_an_object(self, spool_dir: Path, results: Path, upload: Callable[..., Path]) -> None:
        """A JSON manifest that is not an object is refused."""
        path = upload()
        (path / "manifest.json").write_text("[7]", encoding="utf-8")
        assert_refused(run(spool_dir, "job-7-1", results), r"must be a JSON object, not list", results)

    def test_job_not_waiting(self, spool_dir: Path, results: Path, upload: Callable[..., Path]) -> None:
        """An upload for a job that is not RETRACING or FAILEDTOUPLOAD is late: refused."""
        upload()
        job = ExpectedJob(7, "crash-0007", [BUILD_ID], "PENDING")
        result = run(spool_dir, "job-7-1", results, job)
        assert_refused(result, r"job 7 is PENDING, not waiting for a result", results)


class TestBacktrace:
    def test_all_unknown_frames(self, spool_dir: Path, results: Path, upload: Callable[..., Path]) -> None:
        """A backtrace whose every frame is ?? is useless: refused."""
        upload(backtrace=USELESS_BACKTRACE)
        result = run(spool_dir, "job-7-1", results)
        assert_refused(result, r"every one of its 3 frames is \?\? \(no symbols\)", results)
        assert (spool_dir / "failed" / "job-7-1").is_dir()

    def test_not_utf8(self, spool_dir: Path, results: Path, upload: Callable[..., Path]) -> None:
        """A backtrace that is not UTF-8 is refused."""
        path = upload()
        (path / "backtrace.txt").write_bytes(b"#0  main () at \xff\xfe.c:4\n")
        assert_refused(run(spool_dir, "job-7-1", results), r"backtrace.txt: is not UTF-8 text", results)

    @pytest.mark.parametrize(("text", "pattern"), [
        ("", r"backtrace.txt: is empty"),
        ("  \n\n", r"backtrace.txt: is empty"),
        ("gdb: no core file\n", r"has no frames"),
        ("#0  main () at crash.c:4\x00\n", r"contains NUL"),
    ])
    def test_not_a_backtrace(self, spool_dir: Path, results: Path, upload: Callable[..., Path], text: str,
                             pattern: str) -> None:
        """Empty text, text without frames and binary text are refused."""
        upload(backtrace=text)
        assert_refused(run(spool_dir, "job-7-1", results), pattern, results)


class TestUploadLog:
    def test_every_problem_one_line(self, spool_dir: Path, results: Path, upload: Callable[..., Path]) -> None:
        """All problems are collected, one line each, and the log is a valid upload.failed event."""
        path = upload(crash_id="crash-0666", backtrace=USELESS_BACKTRACE)
        (path / "extra.bin").write_bytes(b"x")
        result = run(spool_dir, "job-7-1", results)
        lines = result.upload_log.splitlines()
        assert len(lines) == 3, lines
        assert list(result.problems) == lines
        event = events.make(result.event_type, 7, result.to_event_data(), "test")
        assert event.type == "upload.failed"
        assert event.data == {"leaf": "job-7-1", "upload_log": result.upload_log}


class TestDryRun:
    def test_good_upload_dry_run_changes_nothing(self, tmp_path: Path, spool_dir: Path, results: Path,
                                                 upload: Callable[..., Path]) -> None:
        """A dry run of a good upload says where it would go and writes and moves nothing."""
        upload()
        before = snapshot(tmp_path)
        result = run(spool_dir, "job-7-1", results, dry_run=True)
        assert snapshot(tmp_path) == before
        assert result.dry_run and result.accepted and result.result == GOOD_BACKTRACE
        assert result.moved_to == spool_dir.resolve() / "accepted" / "job-7-1"
        assert result.stored_at == results / "7" / "backtrace.txt"
        assert result.summary() == (f"upload 'job-7-1' for job 7 would be accepted, would be moved to "
                                    f"{result.moved_to} (dry run: nothing was changed)")

    def test_bad_upload_dry_run_changes_nothing(self, tmp_path: Path, spool_dir: Path, results: Path,
                                                upload: Callable[..., Path]) -> None:
        """A dry run of a bad upload gives the same upload log as a real run, and moves nothing."""
        upload(backtrace=USELESS_BACKTRACE)
        (spool_dir / "failed" / "job-7-1").mkdir()
        before = snapshot(tmp_path)
        dry = run(spool_dir, "job-7-1", results, dry_run=True)
        assert snapshot(tmp_path) == before
        assert dry.moved_to == spool_dir.resolve() / "failed" / "job-7-1"
        assert dry.set_aside is not None and not dry.set_aside.exists()
        real = run(spool_dir, "job-7-1", results)
        assert real.upload_log == dry.upload_log and not real.dry_run

    def test_dry_run_from_failed(self, tmp_path: Path, spool_dir: Path, results: Path,
                                 upload: Callable[..., Path]) -> None:
        """A rescue's dry run checks the kept upload where it lies in failed/ and moves nothing."""
        upload()
        run(spool_dir, "job-7-1", results, ExpectedJob(7, "crash-0007", ["0000000000000000"], "RETRACING"))
        assert (spool_dir / "failed" / "job-7-1").is_dir()
        before = snapshot(tmp_path)
        fixed = ExpectedJob(7, "crash-0007", [BUILD_ID], "FAILEDTOUPLOAD")
        result = run(spool_dir, "job-7-1", results, fixed, dry_run=True, source="failed")
        assert snapshot(tmp_path) == before
        assert result.accepted and result.moved_to == spool_dir.resolve() / "accepted" / "job-7-1"


class TestFiling:
    def test_accepted_collision_sets_old_aside(self, spool_dir: Path, results: Path,
                                               upload: Callable[..., Path]) -> None:
        """A second upload with an accepted leaf name moves the old one aside with a timestamp, never over it."""
        upload()
        run(spool_dir, "job-7-1", results)
        (spool_dir / "accepted" / "job-7-1" / "worker.log").write_text("first\n", encoding="utf-8")
        upload()
        result = run(spool_dir, "job-7-1", results, ExpectedJob(7, "crash-0007", [BUILD_ID], "FAILEDTOUPLOAD"))
        assert result.accepted
        assert result.set_aside is not None
        assert re.fullmatch(r"job-7-1\.\d{8}T\d{6}\.\d{6}Z", result.set_aside.name)
        assert (result.set_aside / "worker.log").read_text(encoding="utf-8") == "first\n"
        assert (spool_dir / "accepted" / "job-7-1" / "worker.log").read_text(encoding="utf-8") != "first\n"

    def test_failed_collision_with_empty_directory(self, spool_dir: Path, results: Path,
                                                   upload: Callable[..., Path]) -> None:
        """An empty failed/<leaf> (which a plain rename would silently replace) is set aside too."""
        (spool_dir / "failed" / "job-7-1").mkdir()
        upload(backtrace=USELESS_BACKTRACE)
        result = run(spool_dir, "job-7-1", results)
        assert result.set_aside is not None and result.set_aside.is_dir()
        assert sorted(p.name for p in (spool_dir / "failed").iterdir()) == ["job-7-1", result.set_aside.name]

    def test_processing_twice_is_idempotent(self, spool_dir: Path, results: Path,
                                            upload: Callable[..., Path]) -> None:
        """The same upload processed again once its job is FULLYBUILT (a replay after a crash) is accepted again."""
        upload()
        first = run(spool_dir, "job-7-1", results, move=False)
        done = ExpectedJob(7, "crash-0007", [BUILD_ID], "FULLYBUILT")
        again = run(spool_dir, "job-7-1", results, done)
        assert again.accepted and again.digest == first.digest and again.digest is not None
        assert "a replayed upload" in again.upload_log

    def test_other_upload_for_a_done_job_refused(self, spool_dir: Path, results: Path,
                                                 upload: Callable[..., Path]) -> None:
        """A different upload for a FULLYBUILT job is refused as late."""
        upload()
        run(spool_dir, "job-7-1", results)
        upload(leaf="job-7-2", backtrace=GOOD_BACKTRACE + "#4  start () at x.c:1\n")
        done = ExpectedJob(7, "crash-0007", [BUILD_ID], "FULLYBUILT")
        result = run(spool_dir, "job-7-2", results, done)
        assert not result.accepted
        assert "job 7 is FULLYBUILT, not waiting for a result" in result.upload_log
        assert (results / "7" / "backtrace.txt").read_text(encoding="utf-8") == GOOD_BACKTRACE

    def test_move_later(self, spool_dir: Path, results: Path, upload: Callable[..., Path]) -> None:
        """With move=False the upload stays in incoming/ until file_away is called."""
        upload()
        result = run(spool_dir, "job-7-1", results, move=False)
        assert result.moved_to is None and (spool_dir / "incoming" / "job-7-1").is_dir()
        filed = spool.file_away(spool_dir, result)
        assert filed.moved_to == spool_dir.resolve() / "accepted" / "job-7-1"
        assert filed.moved_to.is_dir() and not (spool_dir / "incoming" / "job-7-1").exists()

    def test_never_there_is_not_filed(self, spool_dir: Path, results: Path) -> None:
        """An upload name with nothing behind it is reported as missing, and filing it away moves nothing and
        does not claim it disappeared while it was processed (it never existed)."""
        result = run(spool_dir, "job-7-9", results, move=False)
        assert result.missing and not result.accepted
        assert "there is no upload 'job-7-9'" in result.upload_log
        assert spool.file_away(spool_dir, result) == result
        assert all(not any((spool_dir / sub).iterdir()) for sub in ("incoming", "accepted", "failed"))

    def test_vanished_upload(self, spool_dir: Path, results: Path, upload: Callable[..., Path]) -> None:
        """An upload taken away between the checks and the move is reported, not invented."""
        path = upload()
        result = run(spool_dir, "job-7-1", results, move=False)
        path.rename(spool_dir / "incoming" / ".taken")
        with pytest.raises(UploadRejected, match=r"disappeared while it was processed"):
            spool.file_away(spool_dir, result)
        assert list((spool_dir / "accepted").iterdir()) == []


class TestRestoreFailed:
    def test_round_trip(self, spool_dir: Path, results: Path, upload: Callable[..., Path]) -> None:
        """A failed upload restored to incoming/ and reprocessed against the corrected job is accepted."""
        upload()
        stale = ExpectedJob(7, "crash-0007", ["0000000000000000"], "RETRACING")
        assert not run(spool_dir, "job-7-1", results, stale).accepted
        path = spool.restore_failed(spool_dir, "job-7-1")
        assert path == spool_dir.resolve() / "incoming" / "job-7-1"
        assert path.is_dir() and not (spool_dir / "failed" / "job-7-1").exists()
        assert spool.incoming_leaves(spool_dir) == ["job-7-1"]
        fixed = ExpectedJob(7, "crash-0007", [BUILD_ID], "FAILEDTOUPLOAD")
        result = run(spool_dir, "job-7-1", results, fixed)
        assert result.accepted and (spool_dir / "accepted" / "job-7-1").is_dir()

    def test_dry_run_moves_nothing(self, tmp_path: Path, spool_dir: Path, results: Path,
                                   upload: Callable[..., Path]) -> None:
        """restore_failed with dry_run says where it would go and moves nothing."""
        upload(backtrace=USELESS_BACKTRACE)
        run(spool_dir, "job-7-1", results)
        before = snapshot(tmp_path)
        assert spool.restore_failed(spool_dir, "job-7-1", dry_run=True) == spool_dir.resolve() / "incoming" / "job-7-1"
        assert snapshot(tmp_path) == before

    def test_missing(self, spool_dir: Path) -> None:
        """Restoring an upload that is not in failed/ is refused with where to look."""
        with pytest.raises(UploadRejected, match=r"there is no kept upload .*failed/job-7-1: nothing to rescue"):
            spool.restore_failed(spool_dir, "job-7-1")

    def test_incoming_taken(self, spool_dir: Path, results: Path, upload: Callable[..., Path]) -> None:
        """Restoring over a waiting upload of the same name is refused; both stay where they are."""
        upload(backtrace=USELESS_BACKTRACE)
        run(spool_dir, "job-7-1", results)
        upload()
        with pytest.raises(UploadRejected, match=r"incoming/job-7-1 already exists"):
            spool.restore_failed(spool_dir, "job-7-1")
        assert (spool_dir / "failed" / "job-7-1").is_dir() and (spool_dir / "incoming" / "job-7-1").is_dir()

    @pytest.mark.parametrize("leaf", ["../incoming/x", "..", "/etc", ""])
    def test_escaping_name(self, spool_dir: Path, outside: Path, leaf: str) -> None:
        """A leaf that could leave the spool is refused."""
        with pytest.raises(UploadRejected, match=r"not a plain directory name"):
            spool.restore_failed(spool_dir, leaf)

    def test_symlink_in_failed(self, spool_dir: Path, outside: Path) -> None:
        """A symlink kept in failed/ is not restored."""
        (spool_dir / "failed" / "job-7-1").symlink_to(outside / "victim")
        with pytest.raises(UploadRejected, match=r"is not a directory"):
            spool.restore_failed(spool_dir, "job-7-1")


class TestIncomingAndWrite:
    def test_incoming_leaves_skips_unfinished(self, spool_dir: Path, upload: Callable[..., Path]) -> None:
        """Only complete uploads are listed, sorted; .tmp-* directories are still being written."""
        upload(leaf="job-9-1")
        upload(leaf="job-10-1")
        (spool_dir / "incoming" / ".tmp-job-11-1").mkdir()
        assert spool.incoming_leaves(spool_dir) == ["job-10-1", "job-9-1"]

    def test_incoming_leaves_without_spool(self, tmp_path: Path) -> None:
        """A spool not created yet has nothing waiting."""
        assert spool.incoming_leaves(tmp_path / "nowhere") == []

    def test_write_upload_refuses_existing(self, spool_dir: Path, upload: Callable[..., Path]) -> None:
        """Writing an upload whose name is taken is refused and the waiting one is kept."""
        upload()
        with pytest.raises(UploadRejected, match=r"already exists"):
            upload(crash_id="crash-other")
        saved = json.loads((spool_dir / "incoming" / "job-7-1" / "manifest.json").read_text(encoding="utf-8"))
        assert saved["crash_id"] == "crash-0007"

    def test_write_upload_refuses_escaping_name(self, spool_dir: Path, outside: Path) -> None:
        """A worker stand-in cannot write outside the spool either."""
        with pytest.raises(UploadRejected, match=r"not a plain directory name"):
            spool.write_upload(spool_dir, "../../outside/x", manifest(), GOOD_BACKTRACE, "")

    def test_write_upload_refuses_unfinished(self, spool_dir: Path) -> None:
        """A leftover .tmp-<leaf> from a crashed writer is reported, not merged into."""
        (spool_dir / "incoming" / ".tmp-job-7-1").mkdir()
        with pytest.raises(UploadRejected, match=r"unfinished or crashed upload"):
            spool.write_upload(spool_dir, "job-7-1", manifest(), GOOD_BACKTRACE, "")

    def test_ensure_layout_refuses_a_file(self, tmp_path: Path) -> None:
        """A file where incoming/ should be is a configuration error."""
        (tmp_path / "spool").mkdir()
        (tmp_path / "spool" / "incoming").write_text("", encoding="utf-8")
        with pytest.raises(ConfigError, match=r"spool .*incoming must be a real directory"):
            spool.ensure_layout(tmp_path / "spool")

    def test_spool_path_may_be_a_symlink(self, tmp_path: Path, results: Path) -> None:
        """The admin's [spool] path may itself be a symlink: only what is inside the spool is refused as one."""
        (tmp_path / "real").mkdir()
        (tmp_path / "link").symlink_to(tmp_path / "real")
        spool.ensure_layout(tmp_path / "link")
        spool.write_upload(tmp_path / "link", "job-7-1", manifest(), GOOD_BACKTRACE, "")
        assert spool.incoming_leaves(tmp_path / "link") == ["job-7-1"]
        assert run(tmp_path / "link", "job-7-1", results).accepted
        assert (tmp_path / "real" / "accepted" / "job-7-1").is_dir()
