"""`retracer demo --json`: the story on standard error, one JSON object on standard output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from retracer import demo_crash

from .test_demo import PATH, real_crash_tools

pytestmark = pytest.mark.slow


def test_demo_json(tmp_path: Path) -> None:
    """The JSON says where the instance is, how each job ended and whether the story ended as told, with the
    same exit status as the command; the narrative goes to standard error."""
    root = tmp_path / "demo"
    real = real_crash_tools()
    proc = subprocess.run([sys.executable, "-m", "retracer", "demo", "--dir", str(root), "--json"],
                          capture_output=True, text=True, timeout=120, env={"PATH": PATH, "HOME": str(tmp_path)})
    shown = json.loads(proc.stdout)
    assert shown["exit_code"] == proc.returncode
    assert shown["ended_as_told"] == (proc.returncode == 0) == (shown["problems"] == [])
    assert (shown["directory"], shown["config"]) == (str(root), str(root / "retracer.toml"))
    assert [j["crash_id"] for j in shown["jobs"]] == ["LP-2071", "LP-2072", "LP-2073", "LP-2074"] + (
        [demo_crash.CRASH_ID] if real else [])
    assert all({"id", "package", "state", "attempts"} <= set(j) for j in shown["jobs"])
    assert "STAND-INS" in proc.stderr
    summary = demo_crash.summary(root)
    # `real_crash` is optional in the JSON; where it is given it must be what the instance holds.
    assert shown.get("real_crash", summary) == summary
    if real:
        assert shown["ended_as_told"], shown["problems"]
        assert shown["jobs"][-1]["state"] == "FULLYBUILT" and shown["jobs"][-1]["attempts"] == 0
        assert summary is not None and (summary["job"], summary["state"]) == (5, "FULLYBUILT")
        assert summary["signature"].endswith(":read_port:start_server:main"), summary
    else:
        assert summary is None
