"""`retracer demo` tells the whole story on the embedded default and says whether it ended as told."""

from __future__ import annotations

import mailbox
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_tells_the_story(tmp_path: Path) -> None:
    """The demo exits 0 within a minute, with every chapter shown and the instance left to explore."""
    root = tmp_path / "demo"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "retracer", "demo", "--dir", str(root)], capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    elapsed = time.monotonic() - started
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
                 "Jobs per state: PENDING 0, RETRACING 0, FAILEDTOUPLOAD 0, FULLYBUILT 3, ON_HOLD 1",
                 "The story ended as told"):
        assert line in out, f"missing {line!r} in:\n{out}"
    box = mailbox.mbox(str(root / "mail" / "outbox.mbox"))
    assert len(box) == 9  # 3 FULLYBUILT to creators, 3 FAILEDTOUPLOAD, 3 ON_HOLD (2 admins and the creator)
    assert (root / "retracer.toml").exists() and (root / "retracer.db").exists()


def test_demo_refuses_a_used_directory(tmp_path: Path) -> None:
    """A directory that is not empty is refused with a clear message; nothing in it is touched."""
    (tmp_path / "keep.txt").write_text("mine")
    proc = subprocess.run([sys.executable, "-m", "retracer", "demo", "--dir", str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert "is not empty; the demo needs a fresh directory" in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
