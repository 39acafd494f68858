"""Rescue and retry go through `serve` in both modes; hostile uploads never touch anything outside the spool."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from retracer.testing.factories import crash_data, event
from retracer.testing.instance import Instance
from retracer.uploads import spool

# Each test drives `retracer serve` and the spool as real processes for seconds: the full suite runs them.
pytestmark = pytest.mark.slow

GOOD = "#0  0x0000555555555149 in main () at crash.c:4\n#1  0x00007ffff7df0d90 in __libc_start_call_main ()\n"
USELESS = "#0  0x0000555555555149 in ?? ()\n#1  0x00007ffff7df0d90 in ?? ()\n"


def state_of(inst: Instance, job: int) -> str:
    return str(inst.scalar("SELECT state FROM job WHERE id = :id", id=job))


def upload(inst: Instance, job: int, leaf: str, backtrace: str, crash_id: str) -> None:
    spool_dir = inst.data_dir / "spool"
    spool.ensure_layout(spool_dir)
    spool.write_upload(spool_dir, leaf, {"job": job, "crash_id": crash_id, "build_ids": [], "worker": "bob"},
                       backtrace, "retraced in 3s\n")


def test_failed_upload_is_rescued(instance: Instance) -> None:
    """An upload refused by the spool leaves the job FAILEDTOUPLOAD; fixed and rescued, it is FULLYBUILT."""
    inst = instance
    serve = inst.serve()
    inst.publish(event("crash.submitted", **crash_data(crash_id="r-1")), event("retrace.started", 1, worker="bob"))
    inst.wait_for("RETRACING", lambda: state_of(inst, 1) == "RETRACING")
    upload(inst, 1, "upload-1", USELESS, "r-1")
    inst.wait_for("FAILEDTOUPLOAD", lambda: state_of(inst, 1) == "FAILEDTOUPLOAD")
    kept = inst.data_dir / "spool" / "failed" / "upload-1"
    assert kept.is_dir()
    assert "every one of its 2 frames is ??" in inst.json("show", "1")["upload_log"]

    dry = inst.run("rescue", "1", "--dry-run", check=False)
    assert dry.returncode == 1 and "would be refused again" in dry.stdout
    assert kept.is_dir() and state_of(inst, 1) == "FAILEDTOUPLOAD"

    (kept / "backtrace.txt").write_text(GOOD)
    dry = inst.json("rescue", "1", "--dry-run")
    assert dry["accepted"] and dry["to"] == "FULLYBUILT" and dry["dry_run"]
    assert kept.is_dir() and state_of(inst, 1) == "FAILEDTOUPLOAD"

    done = inst.json("rescue", "1", "--as", "alice", "--reason", "symbols fixed")
    assert done["accepted"] and done["to"] == "FULLYBUILT"
    shown = inst.json("show", "1")
    assert shown["state"] == "FULLYBUILT" and shown["upload_log"] is None
    assert shown["history"][-1]["by"] == "admin:alice" and shown["history"][-1]["reason"] == "symbols fixed"
    assert (inst.data_dir / "spool" / "accepted" / "upload-1").is_dir()
    assert (inst.data_dir / "results" / "1" / "backtrace.txt").read_text() == GOOD
    assert inst.stop(serve) == 0


def failed_upload(inst: Instance, job: int, leaf: str, crash_id: str, backtrace: str = USELESS) -> Path:
    """Job ``job`` retraced by bob and its upload refused by the running `serve`; returns the kept upload."""
    inst.publish(event("crash.submitted", **crash_data(crash_id=crash_id)), event("retrace.started", job, worker="bob"))
    inst.wait_for("RETRACING", lambda: state_of(inst, job) == "RETRACING")
    upload(inst, job, leaf, backtrace, crash_id)
    inst.wait_for("FAILEDTOUPLOAD", lambda: state_of(inst, job) == "FAILEDTOUPLOAD")
    kept = inst.data_dir / "spool" / "failed" / leaf
    assert kept.is_dir()
    return kept


def test_manual_rescue_the_launchpad_way(instance: Instance) -> None:
    """Moving the refused upload back to incoming/ by hand and running `process-upload --leaf` (Launchpad's manual
    procedure) rescues the job as `retracer rescue` does: FULLYBUILT, log cleared, the admin in the history.
    `serve`, running all along, leaves the moved upload to the admin instead of processing it itself."""
    inst = instance
    serve = inst.serve()
    kept = failed_upload(inst, 1, "upload-1", "m-1")
    (kept / "backtrace.txt").write_text(GOOD)
    incoming = inst.data_dir / "spool" / "incoming" / "upload-1"
    kept.rename(incoming)
    log = inst.data_dir / "serve-0.log"
    inst.wait_for("serve to leave the upload to an admin", lambda: b"upload left for an admin" in log.read_bytes(),
                  timeout=15)
    assert incoming.is_dir() and state_of(inst, 1) == "FAILEDTOUPLOAD"
    assert not (inst.data_dir / "results" / "1").exists()

    done = inst.run("process-upload", "--leaf", "upload-1", "--as", "alice", "--reason", "symbols fixed")
    assert "job 1 is now FULLYBUILT (rescue: FAILEDTOUPLOAD -> FULLYBUILT, by admin:alice)" in done.stdout
    shown = inst.json("show", "1")
    assert shown["state"] == "FULLYBUILT" and shown["upload_log"] is None
    last = shown["history"][-1]
    assert (last["trigger"], last["by"], last["reason"]) == ("rescue", "admin:alice", "symbols fixed")
    assert (inst.data_dir / "spool" / "accepted" / "upload-1").is_dir() and not incoming.exists()
    assert (inst.data_dir / "results" / "1" / "backtrace.txt").read_text() == GOOD
    inst.wait_for("the creator's mail", lambda: inst.scalar(
        "SELECT count(*) FROM mail WHERE job_id = 1 AND state = 'FULLYBUILT'") == 1)
    assert inst.stop(serve) == 0
    assert inst.rows("SELECT event_id FROM rejected") == []


def test_rescue_of_an_upload_moved_by_hand_without_mail(embedded: Instance) -> None:
    """`retracer rescue` finds an upload an admin already moved back to incoming/; --no-mail queues no mail and
    the history says whose decision that was."""
    inst = embedded
    serve = inst.serve()
    kept = failed_upload(inst, 1, "upload-1", "n-1")
    (kept / "backtrace.txt").write_text(GOOD)
    kept.rename(inst.data_dir / "spool" / "incoming" / "upload-1")
    assert inst.stop(serve) == 0

    done = inst.json("rescue", "1", "--no-mail", "--as", "alice", "--reason", "symbols fixed")
    assert done["accepted"] and done["to"] == "FULLYBUILT" and done["mail"] is False
    last = inst.json("show", "1")["history"][-1]
    assert last["by"] == "admin:alice"
    assert last["reason"] == f"symbols fixed; mail to {crash_data()['creator']} suppressed by admin:alice"
    assert inst.scalar("SELECT count(*) FROM mail WHERE job_id = 1 AND state = 'FULLYBUILT'") == 0
    assert (inst.data_dir / "spool" / "accepted" / "upload-1").is_dir()


def test_same_bytes_accepted_after_a_refusal(instance: Instance) -> None:
    """An upload refused for a cause outside its bytes (its job was on hold when it arrived) is accepted when the
    same bytes come again once the job is retracing: the acceptance is not a duplicate of the refusal."""
    inst = instance
    serve = inst.serve()
    inst.publish(event("crash.submitted", **crash_data(crash_id="s-1")), event("retrace.started", 1, worker="bob"))
    inst.wait_for("RETRACING", lambda: state_of(inst, 1) == "RETRACING")
    inst.run("hold", "1", "--as", "alice", "--reason", "disk being replaced")
    upload(inst, 1, "upload-1", GOOD, "s-1")
    failed = inst.data_dir / "spool" / "failed" / "upload-1"
    inst.wait_for("the refusal", lambda: failed.is_dir())
    assert inst.scalar("SELECT count(*) FROM rejected") == 1
    inst.run("release", "1", "--as", "alice", "--reason", "disk replaced")
    inst.publish(event("retrace.started", 1, worker="bob"))
    inst.wait_for("RETRACING", lambda: state_of(inst, 1) == "RETRACING")
    upload(inst, 1, "upload-1", GOOD, "s-1")
    inst.wait_for("FULLYBUILT", lambda: state_of(inst, 1) == "FULLYBUILT", timeout=20)
    assert inst.stop(serve) == 0


def test_process_upload_exit_status(embedded: Instance) -> None:
    """process-upload exits 1 when it refuses an upload, says so, and names a missing upload as missing."""
    inst = embedded
    escaping = inst.run("process-upload", "--leaf", "../../etc", check=False)
    assert escaping.returncode == 1 and "not a plain directory name" in escaping.stdout
    missing = inst.run("process-upload", "--leaf", "never-there", check=False)
    assert missing.returncode == 1 and "there is no upload 'never-there'" in missing.stdout
    assert "disappeared" not in missing.stdout + missing.stderr

    inst.publish(event("crash.submitted", **crash_data(crash_id="x-1")), event("retrace.started", 1, worker="bob"))
    inst.run("serve", "--until-idle")
    upload(inst, 1, "upload-1", USELESS, "x-1")
    refused = inst.run("process-upload", "--as", "carol", "--reason", "checking bob", check=False)
    assert refused.returncode == 1 and "every one of its 2 frames is ??" in refused.stdout
    assert "job 1 is now FAILEDTOUPLOAD (upload_failed: RETRACING -> FAILEDTOUPLOAD, by admin:carol)" in refused.stdout
    last = inst.json("show", "1")["history"][-1]
    assert (last["trigger"], last["by"], last["reason"]) == ("upload_failed", "admin:carol", "checking bob")


def test_retried_job_goes_round_again(instance: Instance) -> None:
    """A job held after a permanent failure is retried by an admin, dispatched again and finishes."""
    inst = instance
    serve = inst.serve()
    inst.publish(event("crash.submitted", **crash_data(crash_id="r-2")), event("retrace.started", 1, worker="bob"),
                 event("retrace.failed", 1, error="gdb: core file truncated", transient=False))
    inst.wait_for("ON_HOLD", lambda: state_of(inst, 1) == "ON_HOLD")
    refused = inst.run("release", "1", "--dry-run", "--json")
    assert '"to": "PENDING"' in refused.stdout and state_of(inst, 1) == "ON_HOLD"
    offers = inst.scalar("SELECT count(*) FROM outbox")
    out = inst.run("retry", "1", "--reason", "core re-uploaded", "--as", "alice")
    assert "job 1 is now PENDING (retry: ON_HOLD -> PENDING, by admin:alice)" in out.stdout
    inst.wait_for("a new offer", lambda: inst.scalar("SELECT count(*) FROM outbox") == offers + 1)
    inst.publish(event("retrace.started", 1, worker="carol"))
    inst.wait_for("RETRACING", lambda: state_of(inst, 1) == "RETRACING")
    upload(inst, 1, "upload-2", GOOD, "r-2")
    inst.wait_for("FULLYBUILT", lambda: state_of(inst, 1) == "FULLYBUILT")
    shown = inst.json("show", "1")
    assert shown["attempts"] == 0 and shown["hold_reason"] is None
    assert [h["trigger"] for h in shown["history"]] == [
        "submit", "start", "retrace_failed", "retry", "start", "upload_accepted"]
    assert inst.stop(serve) == 0


def test_wrong_state_is_refused_with_what_is_allowed(embedded: Instance) -> None:
    """rescue on a PENDING job names the job, its state and the allowed triggers, and changes nothing."""
    inst = embedded
    args = [part for k, v in crash_data().items() for part in (f"--{k.replace('_', '-')}", str(v))]
    inst.run("submit", *args)
    out = inst.run("rescue", "1", check=False)
    assert out.returncode == 1
    assert "job 1 is PENDING: 'rescue' refused" in out.stderr and "allowed from PENDING: start, hold" in out.stderr
    assert state_of(inst, 1) == "PENDING"


def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p): (p.lstat().st_mtime_ns, p.read_bytes() if p.is_file() and not p.is_symlink() else b"")
            for p in sorted(root.rglob("*"))}


def test_hostile_uploads_through_serve(embedded: Instance, tmp_path: Path) -> None:
    """Symlinks out of the spool and uploads for another job are refused; nothing outside is touched."""
    inst = embedded
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("keep me")
    before = _snapshot(outside)
    serve = inst.serve()
    inst.publish(event("crash.submitted", **crash_data(crash_id="h-1")), event("retrace.started", 1, worker="bob"),
                 event("crash.submitted", **crash_data(crash_id="h-2")), event("retrace.started", 2, worker="bob"))
    inst.wait_for("RETRACING", lambda: state_of(inst, 2) == "RETRACING")
    incoming = inst.data_dir / "spool" / "incoming"
    upload(inst, 1, "evil-1", GOOD, "h-1")
    os.remove(incoming / "evil-1" / "backtrace.txt")
    os.symlink(outside / "secret", incoming / "evil-1" / "backtrace.txt")
    upload(inst, 2, "evil-2", GOOD, "h-1")  # a manifest claiming another crash
    os.symlink(outside, incoming / "evil-3")  # a leaf that is a symlink out of the spool
    inst.wait_for("both refused", lambda: state_of(inst, 1) == state_of(inst, 2) == "FAILEDTOUPLOAD")
    assert "symlink" in inst.json("show", "1")["upload_log"]
    assert "crash" in inst.json("show", "2")["upload_log"]
    assert inst.stop(serve) == 0
    assert _snapshot(outside) == before
    assert not (inst.data_dir / "results").exists() or not any((inst.data_dir / "results").iterdir())
