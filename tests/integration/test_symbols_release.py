"""Missing symbols end to end, in both modes: a real gdb retrace of a real core whose executable is stripped and
whose debug file is nowhere yet fails transiently, naming the build-id; `retracer symbols missing` lists it
with the job; the admin puts the debug file in the worker's debug directory and imports it with `retracer
symbols import`, which releases the job at once (its history says the import did it); the next attempt finds
the symbols and the job ends retraced, waiting for nothing."""

from __future__ import annotations

import json
from pathlib import Path

from retracer.testing.instance import Instance
from retracer.workflow import load

from .conftest import crashed_program

ROLES = load().roles


def state_of(inst: Instance, job: int) -> str:
    return str(inst.scalar("SELECT state FROM job WHERE id = :id", id=job))


def test_an_import_releases_the_job_its_missing_symbols_held(instance: Instance, tmp_path: Path) -> None:
    program, core = crashed_program(tmp_path / "crash")
    debug_dir = tmp_path / "debug"  # the worker looks here; empty until the admin installs the debug file
    debug_dir.mkdir()
    inst = instance
    scaled = "RETRACER__BROKER__URL" in inst.env
    inst.set(WORKER__DEBUG_DIRS=json.dumps([str(debug_dir)]), WORKER__NAME="symbols-worker",
             SERVICE__START_REQUIRES_OFFER="true")
    serve = inst.serve()
    out = inst.run("submit", "--crash-id", "missing-1", "--creator", "mark@example.com", "--package", "crash",
                   "--version", "1.0", "--architecture", "amd64", "--release", "noble", "--core", str(core),
                   "--executable", str(program.executable), "--build-id", program.build_id).stdout
    job = int(out)
    sent = "SELECT count(*) FROM outbox" + (" WHERE sent_at IS NOT NULL" if scaled else "")
    inst.wait_for("the work request", lambda: inst.scalar(sent) >= 1)
    attempt = inst.run("worker", "--once").stdout
    assert attempt.startswith(f"job {job} attempt 1: failed (transient)"), attempt
    inst.wait_for("the failure applied", lambda: inst.scalar("SELECT attempts FROM job WHERE id = :id", id=job) == 1)
    shown = inst.json("show", str(job))
    assert shown["state"] == ROLES.queue and shown["not_before"] is not None

    (row,) = inst.json("symbols", "missing")
    assert (row["build_id"], row["module"], row["waiting"], row["jobs"]) == (
        program.build_id, str(program.executable), 1, [job])
    table = inst.run("symbols", "missing").stdout
    assert program.build_id in table and str(job) in table

    program.install_debug(debug_dir)
    report = inst.json("symbols", "import", "--as", "celso", str(debug_dir))
    assert json.dumps(report).count(program.build_id) >= 1, report
    shown = inst.json("show", str(job))
    assert (shown["state"], shown["not_before"], shown["attempts"]) == (ROLES.queue, None, 0)
    last = shown["history"][-1]
    assert (last["trigger"], last["by"]) == (ROLES.symbols_arrived, "import:admin:celso")
    assert program.build_id in last["reason"]
    assert inst.json("symbols", "missing") == []

    inst.wait_for("the second work request", lambda: inst.scalar(sent) >= 2)
    attempt = inst.run("worker", "--once").stdout
    assert attempt.startswith(f"job {job} attempt 1: retraced"), attempt
    inst.wait_for("the upload's verdict", lambda: state_of(inst, job) != ROLES.working)
    assert state_of(inst, job) == ROLES.success, inst.json("show", str(job))
    assert inst.scalar("SELECT count(*) FROM missing_symbol") == 0
    assert inst.stop(serve) == 0
