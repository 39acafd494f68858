"""Retrace cost: `retracer worker` and its engine against bare gdb, build-ids against eu-unstrip, and retraces
per minute by --concurrency, measured in one run on this machine.

    python bench/worker.py [--rounds N] [--many-rounds N] [--cli-rounds K] [--id-rounds N] [--jobs M] [--quick]

Two crashes, each a C program compiled with -g that dereferences NULL five calls deep, its debug information
split into a ``.build-id/xx/rest.debug`` tree and the executable stripped, with a real core written by gdb:
"small" (libc only, 4 modules) and "many" (the same program after dlopen() of every library mapped in the
core of step 2, about 110 modules, the libraries without symbols). Then:

  1. per retrace    bare: ``gdb -nx -batch`` with the engine's own command line and environment (built by
                    ``gdb.invocation``, ``symbols.gdb_settings`` and ``symbols.gdb_environment`` as ``retrace``
                    builds them, and checked against the command line the engine logs), output to a file, timed
                    as a subprocess. attempt: ``retracer.worker.retrace.retrace()`` called in-process in a fresh
                    work directory: the work one attempt does inside a running `retracer worker` (checks,
                    build-ids, symbol survey, gdb, parsing), with gdb's own run timed apart. N rounds of each,
                    interleaved, median. The target (per retrace <= 1.1x bare gdb) applies to the attempt.
                    CLI (small): `retracer worker --once --json` as a subprocess on a job that `serve --until-idle`
                    dispatched in an embedded instance, over K rounds; reported apart, with the attempt's time
                    as the worker measured it and the start-up of `python -m retracer --help`.
  2. build-ids      a core of this Python interpreter with every extension module of its standard library
                    imported, read by ``coredump.build_ids`` in-process and as a ``python -c`` subprocess, against
                    ``eu-unstrip -n --core`` (elfutils), N rounds, median; the two lists of build-ids are compared.
                    Target <= 2x eu-unstrip.
  3. retraces/min   per core and per --concurrency C in 1, 2, 4: a fresh embedded instance (SQLite, [service]
                    max_parallel 8, poll_interval_s 0.05), M jobs on the same core published as crash.submitted,
                    `retracer serve` running with its first offers made; `retracer worker --concurrency C` is
                    started and the clock runs from its "worker started" log line (its start-up is timed apart) to
                    the last job's FULLYBUILT: M / elapsed * 60. Both processes get SIGTERM at the end. Baseline:
                    M bare gdb runs, C at a time.

Progress goes to stderr; the figures and the summary table to stdout, the last line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retracer import config as cfg
from retracer import store
from retracer.events import WORK_REQUEST
from retracer.testing import crashes
from retracer.testing.factories import crash_data, event
from retracer.testing.instance import RETRACER, Instance
from retracer.worker import coredump, gdb, symbols
from retracer.worker.request import Request, Retraced
from retracer.worker.retrace import retrace

TARGETS = {"attempt_vs_gdb": 1.1, "build_ids_vs_eu_unstrip": 2.0}
CONCURRENCIES = (1, 2, 4)
MAX_PARALLEL = 8
POLL_S = 0.05
#: How often the bench looks at the jobs' states while it times a rate.
RATE_POLL_S = 0.02
#: Where a retrace may take this long at most before the bench gives up on it.
JOB_DEADLINE_S = 300.0

#: The same crash after dlopen()ing every library named on the command line: a core with many modules.
MANY_LIBS_SOURCE = """\
#include <dlfcn.h>
#include <stdio.h>
struct thing { int value; };
int read_value(struct thing *t) { return t->value; }
int compute(struct thing *t, int n) { return read_value(t) * n; }
int parse(struct thing *t, int n) { return compute(t, n + 1) + 1; }
int handle(struct thing *t, int n) { return parse(t, n) - 1; }
int main(int argc, char **argv) {
    int loaded = 0;
    for (int i = 1; i < argc; i++)
        loaded += dlopen(argv[i], RTLD_LAZY | RTLD_GLOBAL) != NULL;
    struct thing *volatile t = NULL;
    printf("%d\\n", handle(t, loaded));
    return 0;
}
"""

#: Imports every extension module of the interpreter's standard library (and the usual ones), then crashes.
MANY_MODULES = """\
import importlib, os, sysconfig
where = os.path.join(sysconfig.get_path("platstdlib"), "lib-dynload")
for name in sorted(os.listdir(where)):
    module = name.split(".", 1)[0]
    if module.startswith(("_test", "_xx", "xx", "_ctypes_test")):
        continue
    try:
        importlib.import_module(module)
    except Exception:
        pass
import ssl, sqlite3, ctypes, decimal, lzma, bz2, zlib, hashlib, json
os.kill(os.getpid(), 11)
"""

BUILD_IDS_SCRIPT = ("import sys\nfrom retracer.worker.coredump import build_ids\n"
                    "sys.stdout.write(''.join(b + '\\n' for b in build_ids(sys.argv[1])))\n")

_NONCE = re.compile(r"==RETRACER-SECTION \w+ ([0-9a-f]+)==")
_GDB_LINE = re.compile(r"^\[[ 0-9.]+\] gdb: (.*)$", re.MULTILINE)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


# -- the crash ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Crash:
    """A stripped executable, the core of its crash, a debug directory with its .build-id tree."""

    executable: Path
    core: Path
    debug_dir: Path
    build_id: str


def need_tools() -> None:
    missing = crashes.missing_tools("eu-unstrip")
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: apt-get install gcc gdb binutils elfutils")


def build_crash(where: Path, source_text: str = crashes.CRASH_SOURCE, libraries: tuple[str, ...] = ()) -> Crash:
    """Compile ``source_text``, split its debug information into a .build-id tree, strip it, and make a core of
    its crash (run with ``libraries`` as arguments)."""
    try:
        program = crashes.build(where, source_text, libraries=("-ldl",))
        core = crashes.make_core([program.executable, *libraries], where / "core")
    except crashes.CrashNotMade as exc:
        raise SystemExit(str(exc)) from None
    return Crash(program.executable, core, program.install_debug(where / "debug"), program.build_id)


# -- 1. per retrace -------------------------------------------------------------------------------------


def engine_config(data_dir: Path, crash: Crash) -> cfg.Config:
    return cfg.load(environ={"RETRACER__SERVICE__DATA_DIR": str(data_dir),
                             "RETRACER__WORKER__DEBUG_DIRS": json.dumps([str(crash.debug_dir)])})


def request_for(crash: Crash, job: int = 1) -> Request:
    return Request(id=f"bench-{job}", job=job, attempt=1, crash_id=f"bench-{job}", package="prog",
                   version="1.0", architecture="amd64", release="bookworm", core=str(crash.core),
                   executable=str(crash.executable))


def bare_invocation(crash: Crash, config: cfg.Config, home: Path, nonce: str | None = None) -> gdb.Invocation:
    """The engine's gdb command line and environment, built by the engine's own functions (no debuginfod)."""
    settings = config["worker"]
    program = shutil.which(str(settings["gdb"]))
    if program is None:
        raise SystemExit(f"gdb not found ({settings['gdb']})")
    debug_dirs = [str(d) for d in settings["debug_dirs"]]
    env = symbols.gdb_environment(home, [], int(settings["debuginfod_timeout_s"]), None)
    return gdb.invocation(program, os.path.realpath(crash.executable), os.path.realpath(crash.core),
                          symbols.gdb_settings(debug_dirs, "", False), env, nonce)


def bare_gdb(crash: Crash, config: cfg.Config, where: Path) -> float:
    """One bare gdb run, its output to a file as the engine does; exits if gdb did not retrace the crash."""
    where.mkdir()
    home = where / "home"
    home.mkdir()
    inv = bare_invocation(crash, config, home)
    output = where / "gdb.out"
    start = time.perf_counter()
    with open(output, "wb") as out:
        subprocess.run(inv.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                       env=inv.env, cwd=where, check=False)
    seconds = time.perf_counter() - start
    text = output.read_text(errors="replace")
    if gdb.marker("end", inv.nonce) not in text or " in read_value (" not in text:
        raise SystemExit(f"bare gdb did not retrace the crash:\n{text[-3000:]}")
    shutil.rmtree(where)
    return seconds


@dataclass
class EngineRound:
    seconds: float
    gdb_seconds: float | None
    outcome: Retraced


class GdbTimer:
    """Wraps ``retracer.worker.gdb.run`` (which ``retrace`` calls through the module) to keep each run's own
    ``elapsed_s``: gdb's share of an attempt, the rest being the engine's Python."""

    def __init__(self) -> None:
        self.elapsed: list[float] = []
        self.original = gdb.run

    def __enter__(self) -> GdbTimer:
        def timed_run(inv: gdb.Invocation, output: Path, timeout_s: float, stop: threading.Event | None = None,
                      cwd: Path | None = None) -> gdb.RunResult:
            result = self.original(inv, output, timeout_s, stop, cwd)
            self.elapsed.append(result.elapsed_s)
            return result

        gdb.run = timed_run
        return self

    def __exit__(self, *exc: object) -> None:
        gdb.run = self.original


def engine_attempt(crash: Crash, config: cfg.Config, workdir: Path) -> EngineRound:
    workdir.mkdir()
    with GdbTimer() as timer:
        start = time.perf_counter()
        outcome = retrace(request_for(crash), config, workdir, threading.Event())
        seconds = time.perf_counter() - start
    shutil.rmtree(workdir)
    if not isinstance(outcome, Retraced):
        raise SystemExit(f"the engine did not retrace the crash: {outcome.error}\n{outcome.log[-3000:]}")
    return EngineRound(seconds, timer.elapsed[0] if len(timer.elapsed) == 1 else None, outcome)


def same_command_line(crash: Crash, config: cfg.Config, logged: str) -> tuple[bool, str]:
    """Whether the gdb command line the engine logged is the bare one (same nonce and home put in)."""
    line = _GDB_LINE.search(logged)
    nonce = _NONCE.search(logged)
    if line is None or nonce is None:
        return False, "the engine's log names no gdb command line"
    words = shlex.split(line[1])
    env_words = [w for w in words if "=" in w and not w.startswith("-") and w.split("=", 1)[0].isupper()]
    home = next((w.split("=", 1)[1] for w in env_words if w.startswith("HOME=")), "")
    inv = bare_invocation(crash, config, Path(home), nonce[1])
    engine_argv = words[len(env_words):]
    shown_env = {k: v for k, v in inv.env.items() if k != "PATH"}
    engine_env = dict(w.split("=", 1) for w in env_words)
    if engine_argv != inv.argv:
        return False, f"argv differs: engine {shlex.join(engine_argv)} / bare {shlex.join(inv.argv)}"
    if engine_env != shown_env:
        return False, f"environment differs: engine {engine_env} / bare {shown_env}"
    return True, shlex.join(inv.argv)


def measure_retrace(rounds: int, tmp: Path, crash: Crash, label: str) -> dict[str, Any]:
    """Bare gdb and the engine on ``crash``, ``rounds`` times each, interleaved (which goes first alternates)."""
    config = engine_config(tmp / f"engine-data-{label}", crash)
    where = tmp / f"rounds-{label}"
    where.mkdir()
    say(f"[1/{label}] warm-up: one bare gdb run and one engine attempt on {crash.core}")
    bare_gdb(crash, config, where / "bare-warm")
    warm = engine_attempt(crash, config, where / "engine-warm")
    same, detail = same_command_line(crash, config, warm.outcome.log)
    if not same:
        say(f"[1/{label}] WARNING: {detail}")
    bare: list[float] = []
    engine: list[EngineRound] = []
    say(f"[1/{label}] {rounds} rounds of bare gdb and the engine, interleaved")
    for i in range(rounds):
        for which in ("bare", "engine") if i % 2 == 0 else ("engine", "bare"):
            if which == "bare":
                bare.append(bare_gdb(crash, config, where / f"bare-{i}"))
            else:
                engine.append(engine_attempt(crash, config, where / f"engine-{i}"))
    inner = [r.gdb_seconds for r in engine if r.gdb_seconds is not None]
    out: dict[str, Any] = {
        "rounds": rounds, "modules": len(coredump.modules(crash.core)),
        "core_kib": crash.core.stat().st_size // 1024, "same_command_line": same, "command_line": detail,
        "bare_gdb_s": median(bare), "bare_gdb_min_s": min(bare),
        "attempt_s": median([r.seconds for r in engine]), "attempt_min_s": min(r.seconds for r in engine),
        "attempt_gdb_s": median(inner) if inner else None,
        "attempt_overhead_s": (median([r.seconds - r.gdb_seconds for r in engine if r.gdb_seconds is not None])
                               if inner else None),
        "signature": warm.outcome.signature,
        "missing_symbols": len([line for line in warm.outcome.log.splitlines() if "no symbols for build-id" in line]),
    }
    out["attempt_vs_gdb"] = out["attempt_s"] / out["bare_gdb_s"]
    return out


def measure_cli(args: argparse.Namespace, tmp: Path, crash: Crash) -> dict[str, Any]:
    """`retracer worker --once` end to end on dispatched jobs, and `python -m retracer --help` alone."""
    data = tmp / "cli-data"
    data.mkdir()
    inst = Instance(data, f"sqlite:///{data / 'retracer.db'}")
    inst.set(WORKER__DEBUG_DIRS=json.dumps([str(crash.debug_dir)]), WORKER__NAME="bench-cli",
             SERVICE__POLL_INTERVAL_S=str(POLL_S), SERVICE__START_REQUIRES_OFFER="true")
    walls: list[float] = []
    attempts: list[float] = []
    startup: list[float] = []
    try:
        inst.run("db", "upgrade")
        say(f"[1] {args.cli_rounds} rounds of submit, `serve --until-idle`, then timed `retracer worker --once`")
        for i in range(args.cli_rounds + 1):  # the first one warms the page cache up and is not counted
            job = int(inst.run("submit", "--crash-id", f"cli-{i}", "--creator", "mark@example.com",
                               "--package", "prog", "--version", "1.0", "--architecture", "amd64",
                               "--release", "bookworm", "--core", str(crash.core), "--executable",
                               str(crash.executable), "--build-id", crash.build_id).stdout)
            inst.run("serve", "--until-idle")
            waiting = waiting_requests(inst)
            if waiting != 1:
                raise SystemExit(f"`serve --until-idle` left {waiting} work requests for job {job}, not 1")
            start = time.perf_counter()
            proc = inst.run("worker", "--once", "--json", check=False)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                raise SystemExit(f"`retracer worker --once` exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
            summary = json.loads(proc.stdout)
            (attempt,) = summary["attempts"]
            if attempt["outcome"] != "retraced":
                raise SystemExit(f"`retracer worker --once` did not retrace job {job}: {attempt}")
            if i:
                walls.append(wall)
                attempts.append(float(attempt["seconds"]))
                startup.append(timed(lambda: inst.run("--help")))
        inst.run("serve", "--until-idle")
        states = {str(s) for (s,) in inst.rows("SELECT state FROM job")}
    finally:
        inst.close()
    return {"cli_rounds": args.cli_rounds, "cli_s": median(walls), "cli_min_s": min(walls),
            "cli_attempt_s": median(attempts), "startup_s": median(startup), "cli_job_states": sorted(states)}


def waiting_requests(inst: Instance) -> int:
    return int(inst.scalar("SELECT count(*) FROM outbox WHERE routing_key = :key AND sent_at IS NULL",
                           key=WORK_REQUEST) or 0)


# -- 2. build-ids of a core with many modules -----------------------------------------------------------


def python_core(tmp: Path) -> Path:
    """A core of this interpreter with every extension module of its standard library imported."""
    where = tmp / "python"
    where.mkdir()
    script = where / "many.py"
    script.write_text(MANY_MODULES, encoding="utf-8")
    python = os.path.realpath(sys.executable)
    say(f"[2] a core of {python} with its standard library's extension modules imported")
    return crashes.make_core([python, "-S", str(script)], where / "core")


def libraries_of(core: Path) -> tuple[str, ...]:
    """The shared objects mapped in ``core`` but the executable, the dynamic linker and libc, in an order
    dlopen() can load them in (plain libraries before Python's extension modules)."""
    found = coredump.modules(core)
    skip = {found[0].path} if found else set()
    paths = [m.path for m in found if m.path and m.path not in skip
             and not re.search(r"/(ld-linux[^/]*|libc\.so[^/]*)$", m.path)]
    return tuple(sorted(dict.fromkeys(paths), key=lambda p: ("cpython-" in p, p)))


def eu_unstrip_ids(core: Path) -> tuple[list[str], int]:
    """(build-ids eu-unstrip lists, in its order, each once; its module lines)."""
    proc = run(["eu-unstrip", "-n", "--core", str(core)])
    if proc.returncode != 0:
        raise SystemExit(f"eu-unstrip -n --core {core} exited {proc.returncode}: {proc.stderr}")
    seen: dict[str, None] = {}
    lines = proc.stdout.splitlines()
    for line in lines:
        build_id = line.split()[1].split("@", 1)[0]
        if build_id != "-":
            seen.setdefault(build_id, None)
    return list(seen), len(lines)


def measure_build_ids(args: argparse.Namespace, core: Path) -> dict[str, Any]:
    modules = coredump.modules(core)
    ours = coredump.build_ids(core)
    theirs, eu_lines = eu_unstrip_ids(core)
    sub_argv = [sys.executable, "-c", BUILD_IDS_SCRIPT, str(core)]
    sub_out = run(sub_argv).stdout.split()
    eu: list[float] = []
    inproc: list[float] = []
    sub: list[float] = []
    say(f"[2] {args.id_rounds} rounds of eu-unstrip, coredump.build_ids in-process and as `python -c`")
    for _ in range(args.id_rounds):
        eu.append(timed(lambda: run(["eu-unstrip", "-n", "--core", str(core)])))
        inproc.append(timed(lambda: coredump.build_ids(core)))
        sub.append(timed(lambda: run(sub_argv)))
    python_alone = median([timed(lambda: run([sys.executable, "-c", "pass"])) for _ in range(args.id_rounds)])
    out: dict[str, Any] = {
        "rounds": args.id_rounds, "core": str(core), "core_mb": round(core.stat().st_size / 2**20, 1),
        "modules": len(modules), "build_ids": len(ours), "eu_unstrip_modules": eu_lines,
        "eu_unstrip_build_ids": len(theirs), "same_build_ids": set(ours) == set(theirs),
        "subprocess_same": sub_out == ours, "only_ours": sorted(set(ours) - set(theirs)),
        "only_eu_unstrip": sorted(set(theirs) - set(ours)), "eu_unstrip_s": median(eu),
        "in_process_s": median(inproc), "subprocess_s": median(sub), "python_pass_s": python_alone,
    }
    out["in_process_vs_eu_unstrip"] = out["in_process_s"] / out["eu_unstrip_s"]
    out["subprocess_vs_eu_unstrip"] = out["subprocess_s"] / out["eu_unstrip_s"]
    return out


# -- 3. retraces per minute by concurrency --------------------------------------------------------------


def bare_rate(crash: Crash, tmp: Path, jobs: int, concurrency: int, label: str) -> float:
    """Retraces per minute of bare gdb alone: ``jobs`` runs of the engine's command line, ``concurrency`` at a
    time (the ceiling of the same work without retracer)."""
    config = engine_config(tmp / f"engine-data-rate-{label}", crash)
    where = tmp / f"bare-rate-{label}-c{concurrency}"
    where.mkdir()
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda i: bare_gdb(crash, config, where / str(i)), range(jobs)))
    return jobs / (time.perf_counter() - start) * 60


def measure_rate(args: argparse.Namespace, tmp: Path, crash: Crash, concurrency: int, label: str) -> dict[str, Any]:
    """M jobs through `retracer serve` and `retracer worker --concurrency C`; the clock runs from the worker's
    "worker started" log line (its Python start-up is timed apart) to the last job's FULLYBUILT."""
    data = tmp / f"rate-{label}-c{concurrency}"
    data.mkdir()
    url = f"sqlite:///{data / 'retracer.db'}"
    store.upgrade(url)
    inst = Instance(data, url)
    inst.set(WORKER__DEBUG_DIRS=json.dumps([str(crash.debug_dir)]), WORKER__NAME=f"bench-c{concurrency}",
             SERVICE__MAX_PARALLEL=str(MAX_PARALLEL), SERVICE__POLL_INTERVAL_S=str(POLL_S),
             SERVICE__START_REQUIRES_OFFER="true")
    jobs = args.jobs
    inst.publish(*(event("crash.submitted", source="bench", **crash_data(
        crash_id=f"rate-{label}-c{concurrency}-{i}", package="prog", version="1.0", architecture="amd64",
        release="bookworm", core=str(crash.core), executable=str(crash.executable), build_ids=[crash.build_id]))
        for i in range(jobs)))
    out: dict[str, Any] = {"core": label, "concurrency": concurrency, "jobs": jobs}
    worker: subprocess.Popen[str] | None = None
    log_path = data / "worker.log"
    try:
        serve = inst.serve()
        first = min(jobs, MAX_PARALLEL)
        inst.wait_for(f"{first} work requests", lambda: waiting_requests(inst) >= first, timeout=60)
        say(f"[3/{label}] --concurrency {concurrency}: {jobs} jobs, `retracer worker` started")
        with open(log_path, "w") as log:
            launched = time.perf_counter()
            worker = subprocess.Popen([*RETRACER, "worker", "--concurrency", str(concurrency), "--json"],
                                      env=inst.env, stdout=subprocess.PIPE, stderr=log, text=True)
            start = wait_started(worker, log_path)
            out["worker_startup_s"] = start - launched
            deadline = time.monotonic() + JOB_DEADLINE_S * jobs / concurrency
            done = 0
            while True:
                rows = inst.rows("SELECT state, count(*) FROM job GROUP BY state")
                counts = {str(state): int(n) for state, n in rows}
                done = counts.get("FULLYBUILT", 0)
                if done >= jobs:
                    break
                stuck = {s: n for s, n in counts.items() if s in ("ON_HOLD", "FAILEDTOUPLOAD")}
                if stuck or worker.poll() is not None or time.monotonic() > deadline:
                    state = f"exited {worker.returncode}" if worker.poll() is not None else "running"
                    out["error"] = f"{done} of {jobs} FULLYBUILT; states {counts}; worker {state}"
                    break
                time.sleep(RATE_POLL_S)
            end = time.perf_counter()
            out.update(seconds=end - start, fullybuilt=done, per_min=done / (end - start) * 60,
                       per_min_with_startup=done / (end - launched) * 60)
            worker.send_signal(signal.SIGTERM)
            stdout, _ = worker.communicate(timeout=60)
        out["worker_exit"] = worker.returncode
        try:
            summary = json.loads(stdout)
            seconds = [float(a["seconds"]) for a in summary["attempts"] if a["outcome"] == "retraced"]
            out.update(retraced=summary["retraced"], failed=summary["failed"], stopped_by=summary["stopped_by"],
                       attempt_s=median(seconds) if seconds else None)
            errors = [a.get("error", "") for a in summary["attempts"] if a["outcome"] != "retraced"]
            if errors:
                out["attempt_errors"] = errors[:3]
        except (ValueError, KeyError) as exc:
            out["worker_output"] = f"{exc}: {stdout[-500:]}"
        out["serve_exit"] = inst.stop(serve)
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
        inst.close()
    out["bare_per_min"] = bare_rate(crash, tmp, jobs, concurrency, label)
    if "per_min" in out:
        out["vs_bare"] = out["per_min"] / out["bare_per_min"]
    return out


def wait_started(worker: subprocess.Popen[str], log_path: Path) -> float:
    """perf_counter() when the worker logged "worker started" (ready to take requests)."""
    deadline = time.monotonic() + 60
    while b'"msg": "worker started"' not in log_path.read_bytes():
        if worker.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"`retracer worker` did not start (exit {worker.returncode}):\n"
                             f"{log_path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.005)
    return time.perf_counter()


# -- the report -----------------------------------------------------------------------------------------


def verdict(ok: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "----"}[ok]


def describe_retrace(title: str, one: dict[str, Any]) -> None:
    print(f"\n{title}: {one['modules']} modules with a build-id, core {one['core_kib']} KiB, "
          f"{one['missing_symbols']} module(s) without symbols; median of {one['rounds']} interleaved rounds")
    same = "yes" if one["same_command_line"] else f"NO: {one['command_line']}"
    print(f"   engine's gdb command line == bare one: {same}")
    print(f"   bare `gdb -nx -batch` (engine's command line)          {ms(one['bare_gdb_s']):>10}  "
          f"(min {ms(one['bare_gdb_min_s'])})")
    print(f"   attempt: retrace() in-process                          {ms(one['attempt_s']):>10}  "
          f"(min {ms(one['attempt_min_s'])}; its gdb run {ms(one['attempt_gdb_s'] or 0)}, "
          f"the engine's Python {ms(one['attempt_overhead_s'] or 0)})")
    print(f"     ratio attempt / bare gdb: {one['attempt_vs_gdb']:.2f}x   target <= 1.10x (the target applies here)")


def report(args: argparse.Namespace, r: dict[str, Any], total: float) -> None:
    small, many, cli, two, rates = r["retrace"], r["retrace_many"], r["cli"], r["build_ids"], r["rates"]
    print(f"\nretracer bench/worker.py{' --quick' if args.quick else ''}: {r['cpus']} CPUs, {r['gdb']}, "
          f"{total:.0f} s in all; load average {r['load_start']} at the start, {r['load_end']} at the end "
          f"(other processes on the machine make every figure noisier; the ratios compare runs interleaved in time)")
    describe_retrace("1. Per retrace, the crash program (symbols from a .build-id debug directory)", small)
    print(f"   `retracer worker --once` subprocess, end to end        {ms(cli['cli_s']):>10}  "
          f"(min {ms(cli['cli_min_s'])}; median of {cli['cli_rounds']}, each on a job `serve --until-idle` dispatched)")
    print(f"     its attempt as the worker timed it (--json seconds)  {ms(cli['cli_attempt_s']):>10}  "
          f"(started event, engine, upload)")
    print(f"     `python -m retracer --help` start-up alone          {ms(cli['startup_s']):>10}")
    print(f"     ratio CLI / bare gdb: {cli['cli_vs_gdb']:.2f}x (process start-up included: no target); "
          f"the worker's attempt / bare gdb: {cli['cli_attempt_vs_gdb']:.2f}x")
    print(f"   jobs of the CLI rounds ended as: {', '.join(cli['cli_job_states'])}")
    describe_retrace(f"1b. Per retrace, the same crash after dlopen() of {r['libraries']} libraries", many)

    print(f"\n2. Build-ids of a core with many modules ({two['core_mb']} MiB, {two['modules']} modules with a "
          f"build-id; eu-unstrip lists {two['eu_unstrip_modules']}); median of {two['rounds']} rounds")
    same = "yes" if two["same_build_ids"] else (f"NO: only ours {two['only_ours']}, only eu-unstrip's "
                                                 f"{two['only_eu_unstrip']}")
    print(f"   same build-ids as eu-unstrip: {same} ({two['build_ids']} / {two['eu_unstrip_build_ids']}); "
          f"`python -c` prints the same list: {'yes' if two['subprocess_same'] else 'NO'}")
    print(f"   eu-unstrip -n --core (subprocess)                      {ms(two['eu_unstrip_s']):>10}")
    print(f"   coredump.build_ids in-process                          {ms(two['in_process_s']):>10}   "
          f"ratio {two['in_process_vs_eu_unstrip']:.2f}x   target <= 2.00x")
    print(f"   coredump.build_ids as `python -c` subprocess           {ms(two['subprocess_s']):>10}   "
          f"ratio {two['subprocess_vs_eu_unstrip']:.2f}x   target <= 2.00x  (`python -c pass` alone: "
          f"{ms(two['python_pass_s'])})")

    print(f"\n3. Retraces per minute, {args.jobs} jobs on one core each, embedded (SQLite), max_parallel "
          f"{MAX_PARALLEL}, poll {POLL_S} s: from `worker started` to the last FULLYBUILT; bare = {args.jobs} bare gdb "
          f"runs of the engine's command line, C at a time")
    for label, title in (("small", "the crash program's core"), ("many", f"the {many['modules']}-module core")):
        print(f"   {title}:")
        mine = [x for x in rates if x["core"] == label]
        base = next((x["per_min"] for x in mine if x["concurrency"] == 1 and "per_min" in x), None)
        for x in mine:
            if "per_min" not in x:
                print(f"     --concurrency {x['concurrency']}: no figure")
            else:
                speedup = f"{x['per_min'] / base:.2f}x --concurrency 1" if base else "-"
                attempt = f"median attempt {ms(x['attempt_s'])}" if x.get("attempt_s") else "no attempt time"
                print(f"     --concurrency {x['concurrency']}: {x['per_min']:6.1f} retraces/min, bare gdb "
                      f"{x['bare_per_min']:6.1f}/min, ratio {x['vs_bare']:.2f}; {speedup}  ({x['fullybuilt']}/"
                      f"{x['jobs']} FULLYBUILT in {x['seconds']:.2f} s; {attempt}; worker start-up "
                      f"{x['worker_startup_s']:.2f} s, counting it {x['per_min_with_startup']:.1f}/min; worker exit "
                      f"{x.get('worker_exit')}, serve exit {x.get('serve_exit')})")
            for key in ("error", "attempt_errors", "worker_output"):
                if key in x:
                    print(f"       PROBLEM {key}: {x[key]}")

    print("\nSummary")
    print(f"  {'measurement':<50} {'figure':>12} {'baseline':>12} {'ratio':>7}  {'target':<8} verdict")
    print("  " + "-" * 102)
    rows: list[tuple[str, str, str, str, str, bool | None]] = []
    for label, one in (("", small), (f", {many['modules']} modules", many)):
        rows.append((f"retrace attempt, in-process{label}", ms(one["attempt_s"]), ms(one["bare_gdb_s"]),
                     f"{one['attempt_vs_gdb']:.2f}", "<= 1.10",
                     one["attempt_vs_gdb"] <= TARGETS["attempt_vs_gdb"] and one["same_command_line"]))
    rows += [
        ("`retracer worker --once`, end to end", ms(cli["cli_s"]), ms(small["bare_gdb_s"]),
         f"{cli['cli_vs_gdb']:.2f}", "none", None),
        ("  its attempt, as the worker timed it", ms(cli["cli_attempt_s"]), ms(small["bare_gdb_s"]),
         f"{cli['cli_attempt_vs_gdb']:.2f}", "none", None),
        (f"build-ids in-process, {two['modules']} modules", ms(two["in_process_s"]), ms(two["eu_unstrip_s"]),
         f"{two['in_process_vs_eu_unstrip']:.2f}", "<= 2.00",
         two["in_process_vs_eu_unstrip"] <= TARGETS["build_ids_vs_eu_unstrip"] and two["same_build_ids"]),
        (f"build-ids `python -c`, {two['modules']} modules", ms(two["subprocess_s"]), ms(two["eu_unstrip_s"]),
         f"{two['subprocess_vs_eu_unstrip']:.2f}", "<= 2.00",
         two["subprocess_vs_eu_unstrip"] <= TARGETS["build_ids_vs_eu_unstrip"] and two["same_build_ids"]),
    ]
    for x in rates:
        core_name = "" if x["core"] == "small" else f", {many['modules']} modules"
        if "per_min" in x:
            rows.append((f"retraces/min, --concurrency {x['concurrency']}{core_name}", f"{x['per_min']:.1f}/min",
                         f"{x['bare_per_min']:.1f}/min", f"{x['vs_bare']:.2f}", "none",
                         None if "error" not in x and x.get("worker_exit") == 0 else False))
        else:
            rows.append((f"retraces/min, --concurrency {x['concurrency']}{core_name}", "-", "-", "-", "none", False))
    for name, figure, baseline, ratio, target, ok in rows:
        print(f"  {name:<50} {figure:>12} {baseline:>12} {ratio:>7}  {target:<8} {verdict(ok)}")
    print(json.dumps(r, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--rounds", type=int, default=None,
                        help="bare gdb / engine rounds on the crash program (default 30, --quick 10)")
    parser.add_argument("--many-rounds", type=int, default=None,
                        help="bare gdb / engine rounds on the many-library core (default 7, --quick 3)")
    parser.add_argument("--cli-rounds", type=int, default=None,
                        help="`retracer worker --once` rounds (default 5, --quick 3)")
    parser.add_argument("--id-rounds", type=int, default=None,
                        help="build-id rounds of each reader (default 30, --quick 10)")
    parser.add_argument("--jobs", type=int, default=None, help="jobs per concurrency (default 12, --quick 6)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and jobs (under two minutes)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (its path is printed)")
    args = parser.parse_args()
    for name, full, quick in (("rounds", 30, 10), ("many_rounds", 7, 3), ("cli_rounds", 5, 3),
                              ("id_rounds", 30, 10), ("jobs", 12, 6)):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
        setattr(args, name, value or (quick if args.quick else full))
    need_tools()
    began = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="retracer-bench-worker-"))
    try:
        say(f"building the crash program in {tmp}")
        crash = build_crash(tmp / "crash")
        core = python_core(tmp)
        libraries = libraries_of(core)
        say(f"[1b] the crash program again, dlopen()ing the {len(libraries)} libraries of that core")
        many = build_crash(tmp / "crash-many", MANY_LIBS_SOURCE, libraries)
        results: dict[str, Any] = {"cpus": os.cpu_count(), "quick": args.quick,
                                   "gdb": run(["gdb", "--version"]).stdout.splitlines()[0],
                                   "libraries": len(libraries), "load_start": round(os.getloadavg()[0], 2)}
        results["retrace"] = measure_retrace(args.rounds, tmp, crash, "small")
        cli = measure_cli(args, tmp, crash)
        cli["cli_vs_gdb"] = cli["cli_s"] / results["retrace"]["bare_gdb_s"]
        cli["cli_attempt_vs_gdb"] = cli["cli_attempt_s"] / results["retrace"]["bare_gdb_s"]
        results["cli"] = cli
        results["retrace_many"] = measure_retrace(args.many_rounds, tmp, many, "many")
        results["build_ids"] = measure_build_ids(args, core)
        results["rates"] = [measure_rate(args, tmp, which, c, label)
                            for label, which in (("small", crash), ("many", many)) for c in CONCURRENCIES]
        results["load_end"] = round(os.getloadavg()[0], 2)
        report(args, results, time.perf_counter() - began)
    finally:
        if args.keep:
            say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
