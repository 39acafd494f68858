"""`retracer demo` tells the whole story on the embedded default and says whether it ended as told."""

from __future__ import annotations

import mailbox
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retracer import demo_crash

from ..conftest import IN_CI

pytestmark = pytest.mark.slow

PATH = "/usr/bin:/bin"


def real_crash_tools() -> bool:
    """gcc, gdb, objcopy and strip where the demo's PATH finds them; CI installs them, so there they must be."""
    missing = [t for t in demo_crash.TOOLS if shutil.which(t, path=PATH) is None]
    assert not (missing and IN_CI), f"missing {', '.join(missing)} (.ci/run installs them)"
    return not missing


def run_demo(root: Path, path: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "retracer", "demo", "--dir", str(root)], capture_output=True,
                          text=True, timeout=120, env={"PATH": path, "HOME": str(root.parent)})
    return proc, time.monotonic() - started


def test_demo_tells_the_story(tmp_path: Path) -> None:
    """The demo exits 0 within a minute, with every chapter shown and the instance left to explore; where the
    tools are, the real crash ends FULLYBUILT with a backtrace naming the line that dereferences NULL."""
    root = tmp_path / "demo"
    real = real_crash_tools()
    proc, elapsed = run_demo(root, PATH)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert elapsed < 60
    assert "STAND-INS" in out
    for line in ("RETRACING -> FULLYBUILT [upload_accepted",
                 "RETRACING -> PENDING [retrace_failed",
                 "RETRACING -> ON_HOLD [retrace_failed",
                 "RETRACING -> FAILEDTOUPLOAD [upload_failed",
                 "FAILEDTOUPLOAD -> FULLYBUILT [rescue, by admin:ada]",
                 "retracer rescue 4 --dry-run",
                 f"Jobs per state: PENDING 0, RETRACING 0, FAILEDTOUPLOAD 0, FULLYBUILT {3 + real}, ON_HOLD 1",
                 "The story ended as told"):
        assert line in out, f"missing {line!r} in:\n{out}"
    box = mailbox.mbox(str(root / "mail" / "outbox.mbox"))
    # 3 FULLYBUILT to creators, 3 FAILEDTOUPLOAD, 3 ON_HOLD (2 admins and the creator), the real crash's FULLYBUILT
    assert len(box) == 9 + real
    assert (root / "retracer.toml").exists() and (root / "retracer.db").exists()
    if not real:
        assert "No real crash this time" in out
        return
    where = f"{demo_crash.SOURCE}:{demo_crash.CRASH_LINE}"
    for line in ("real-crash/crash.submitted.jsonl, is published",
                 f"retracer publish {root / 'real-crash' / 'crash.submitted.jsonl'}",
                 "job 5 demo-crash: new -> PENDING [submit, by event:demo:reporter]",
                 "retracer worker --once",
                 "job 5 attempt 1: retraced, upload",
                 "job 5 demo-crash: PENDING -> RETRACING [start, by event:demo-worker]",
                 "job 5 demo-crash: RETRACING -> FULLYBUILT [upload_accepted",
                 f"in read_port (c=0x0) at {where}",
                 "its crash signature (`retracer show 5 --json`): ",
                 "retracer show 5     # the real crash"):
        assert line in out, f"missing {line!r} in:\n{out}"
    stored = (root / "results" / "5" / "backtrace.txt").read_text()
    assert "read_port" in stored and where in stored and "start_server" in stored, stored
    assert sorted(p.name for p in (root / "real-crash").iterdir()) == [
        "core", "crash", "crash.c", "crash.submitted.jsonl", "debug"]


def test_demo_without_gcc(tmp_path: Path) -> None:
    """No gcc on PATH: one line says the real crash is left out and why, the stand-in stories end as told."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("gdb", "objcopy", "strip"):
        if (found := shutil.which(tool, path=PATH)) is not None:
            (bin_dir / tool).symlink_to(found)
    root = tmp_path / "demo"
    proc, _ = run_demo(root, str(bin_dir))
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    said = [line for line in out.splitlines() if "No real crash this time" in line]
    assert len(said) == 1 and "gcc" in said[0] and "install gcc, gdb and binutils" in said[0], out
    for line in ("Jobs per state: PENDING 0, RETRACING 0, FAILEDTOUPLOAD 0, FULLYBUILT 3, ON_HOLD 1",
                 "The story ended as told"):
        assert line in out, f"missing {line!r} in:\n{out}"
    assert "retracer worker" not in out and not (root / "real-crash").exists()
    assert len(mailbox.mbox(str(root / "mail" / "outbox.mbox"))) == 9
    assert "debug_dirs = []" in (root / "retracer.toml").read_text()


def test_demo_refuses_a_used_directory(tmp_path: Path) -> None:
    """A directory that is not empty is refused with a clear message; nothing in it is touched."""
    (tmp_path / "keep.txt").write_text("mine")
    proc = subprocess.run([sys.executable, "-m", "retracer", "demo", "--dir", str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert "is not empty; the demo needs a fresh directory" in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
