"""`retracer demo --json`: the story on standard error, one JSON object on standard output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_json(tmp_path: Path) -> None:
    """The JSON says where the instance is, how each job ended and whether the story ended as told, with the
    same exit status as the command; the narrative goes to standard error."""
    root = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "retracer", "demo", "--dir", str(root), "--json"],
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    shown = json.loads(proc.stdout)
    assert shown["exit_code"] == proc.returncode
    assert shown["ended_as_told"] == (proc.returncode == 0) == (shown["problems"] == [])
    assert (shown["directory"], shown["config"]) == (str(root), str(root / "retracer.toml"))
    assert [j["crash_id"] for j in shown["jobs"]] == ["LP-2071", "LP-2072", "LP-2073", "LP-2074"]
    assert all({"id", "package", "state", "attempts"} <= set(j) for j in shown["jobs"])
    assert "STAND-INS" in proc.stderr
