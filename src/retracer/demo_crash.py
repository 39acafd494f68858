"""`retracer demo`'s real crash: a program compiled on the spot crashes, and the real worker retraces its core.

The stand-in stories show the machine around the worker; this chapter shows the worker itself. gcc builds a
small C program that dereferences NULL two calls below main, its debug info moves to a .build-id tree (the
way distributions ship debug symbols apart from the binaries), gdb runs it and writes a core of the crash,
`retracer submit` makes the job, `serve` offers it, and `retracer worker --once` turns the core into a
symbolic backtrace with gdb and uploads it, exactly as on a real installation.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from retracer import events as ev
from retracer import store
from retracer.events import WORK_REQUEST
from retracer.store.models import Job, Outbox
from retracer.testing import crashes
from retracer.worker.checks import elf_facts
from retracer.workflow import load_spec

if TYPE_CHECKING:
    from retracer.demo import Story

#: What the real crash needs: what any made crash needs, and strip (the demo keeps the symbol table).
EXTRA_TOOLS = ("strip",)
TOOLS = (*crashes.TOOLS, *EXTRA_TOOLS)
CRASH_ID = "real-crash-1"
PACKAGE = "demo-crash"
CREATOR = "grace@example.com"
SOURCE = "crash.c"
PROGRAM = """\
#include <stdio.h>

struct config { int port; };

static int read_port(const struct config *c) {
    return c->port;
}

static int start_server(const struct config *c) {
    return read_port(c) + 1;
}

int main(void) {
    const struct config *none = NULL;
    printf("listening on %d\\n", start_server(none));
    return 0;
}
"""
#: Where the backtrace must place the crash: the line that dereferences NULL.
CRASH_LINE = next(n for n, line in enumerate(PROGRAM.splitlines(), start=1) if "c->port" in line)
#: `worker --once` can look before serve's offer is visible to it; a few looks cover that race.
WORKER_TRIES = 5


@dataclass
class RealCrash:
    """The real crash's files and, once it ran, how its job ended."""

    workdir: Path
    executable: Path
    core: Path
    debug_dir: Path
    build_id: str
    job: int = 0
    state: str | None = None
    signature: str | None = None
    backtrace: str = ""

    def names_the_line(self) -> bool:
        return f"{SOURCE}:{CRASH_LINE}" in self.backtrace


def missing_tools() -> list[str]:
    return crashes.missing_tools(*EXTRA_TOOLS)


def skipped_line(missing: list[str]) -> str:
    return (f"No real crash this time: {', '.join(missing)} not found on PATH; install gcc, gdb and binutils to "
            f"see one compiled here and retraced by the real worker. Stand-in stories only.")


def debug_dir(root: Path) -> Path:
    return root / "real-crash" / "debug"


def build(root: Path) -> RealCrash:
    """Compile, split the debug info off, crash under gdb; CrashNotMade says which step did not work."""
    where = root / "real-crash"
    where.mkdir(parents=True, exist_ok=True)
    (where / SOURCE).write_text(PROGRAM, encoding="utf-8")
    exe = where / "crash"
    crashes.run(["gcc", "-g", "-O0", "-Wl,--build-id", "-o", str(exe), SOURCE], where, "gcc")
    try:
        build_id = elf_facts(exe).build_id
    except (OSError, ValueError) as exc:
        raise crashes.CrashNotMade(f"gcc's output {exe} cannot be read as ELF ({exc})") from None
    if not build_id:
        raise crashes.CrashNotMade(f"gcc wrote {exe} without a GNU build-id (the linker ignored --build-id)")
    debug = debug_dir(root)
    target = debug / ".build-id" / build_id[:2] / f"{build_id[2:]}.debug"
    target.parent.mkdir(parents=True, exist_ok=True)
    crashes.run(["objcopy", "--only-keep-debug", str(exe), str(target)], where, "objcopy --only-keep-debug")
    crashes.run(["strip", "--strip-debug", str(exe)], where, "strip --strip-debug")
    core = where / "core"
    crashes.make_core([exe], core)
    return RealCrash(where, exe, core, debug, build_id)


def play(story: Story, factory: sessionmaker[Session], deadline: float) -> None:
    """The chapter: build, submit, wait for serve's offer, run the real worker, show what it found."""
    story.out("")
    story.say("now a REAL crash with the REAL worker: gcc builds a small program that dereferences NULL two "
              "calls below main")
    try:
        crash = build(story.root)
    except crashes.CrashNotMade as exc:
        story.say(f"no real crash after all: {exc}. The stand-in stories stand alone.")
        return
    story.real = crash
    story.say(f"built {_rel(story, crash.executable)} (gcc -g -O0), moved its debug info to "
              f"{_rel(story, crash.debug_dir)}/.build-id/{crash.build_id[:2]}/{crash.build_id[2:]}.debug, "
              f"stripped it, and let gdb run it into a SIGSEGV and write {_rel(story, crash.core)}")
    # Published as a crash reporter would; `retracer submit` is the admin's way to the same job.
    submitted = crash.workdir / "crash.submitted.jsonl"
    submitted.write_text(ev.make("crash.submitted", None, {
        "crash_id": CRASH_ID, "creator": CREATOR, "package": PACKAGE, "version": "1.0-1",
        "architecture": "amd64", "release": "noble", "core": str(crash.core),
        "executable": str(crash.executable)}, source="demo:reporter").to_json() + "\n", encoding="utf-8")
    story.say(f"the crash report, one crash.submitted event in {_rel(story, submitted)}, is published:")
    if story.command("publish", str(submitted)).returncode != 0:
        story.problems.append("`retracer publish` refused the real crash's event; its output is above")
        return
    if not _wait(lambda: _job_of(factory) is not None, deadline):
        story.problems.append(f"serve never made a job of {CRASH_ID}; `retracer rejected` or serve.log says why")
        return
    crash.job = _job_of(factory) or 0
    if not _wait(lambda: _offered(factory, crash.job), deadline):
        story.problems.append(f"serve never offered the real crash's job {crash.job} to a worker (no work request "
                              f"in the outbox); see serve.log")
        return
    story.show_transitions(factory)
    story.say(f"serve offered job {crash.job} (a work request in the outbox); the real worker takes it, runs gdb "
              f"with [worker] debug_dirs = [\"{_rel(story, crash.debug_dir)}\"] and writes the upload:")
    if not _work(story):
        story.problems.append(f"`retracer worker --once` found no work request for job {crash.job} in "
                              f"{WORKER_TRIES} tries")
        return
    _wait(lambda: _settled(factory, crash.job), deadline)
    story.show_transitions(factory)
    _report(story, crash)


def _work(story: Story) -> bool:
    for _ in range(WORKER_TRIES):
        if "no work requested" not in story.command("worker", "--once", "--log-level", "WARNING").stdout:
            return True
        time.sleep(0.5)
    return False


def _report(story: Story, crash: RealCrash) -> None:
    stored = story.root / "results" / str(crash.job) / "backtrace.txt"
    crash.backtrace = stored.read_text(encoding="utf-8", errors="replace") if stored.exists() else ""
    shown = _show_json(story, crash.job)
    crash.state = shown.get("state")
    crash.signature = shown.get("signature")
    story.say(f"job {crash.job} is {crash.state}; the top frames of {_rel(story, stored)}:")
    for line in [f for f in crash.backtrace.splitlines() if f.startswith("#")][:3]:
        story.out(f"    {line}")
    story.say(f"its crash signature (`retracer show {crash.job} --json`): {crash.signature}")


def _show_json(story: Story, job: int) -> dict[str, Any]:
    proc = story.command("show", str(job), "--json", echo=False)
    try:
        shown = json.loads(proc.stdout)
    except json.JSONDecodeError:
        story.problems.append(f"`retracer show {job} --json` printed no JSON: {proc.stderr.strip()}")
        return {}
    return shown if isinstance(shown, dict) else {}


def _job_of(factory: sessionmaker[Session]) -> int | None:
    with factory() as session:
        return session.scalar(select(Job.id).where(Job.crash_id == CRASH_ID))


def _offered(factory: sessionmaker[Session], job: int) -> bool:
    with factory() as session:
        bodies = session.scalars(select(Outbox.body).where(Outbox.routing_key == WORK_REQUEST))
        return any(json.loads(b).get("job") == job for b in bodies)


def _settled(factory: sessionmaker[Session], job: int) -> bool:
    """The worker's outcome is applied: the job left the queue and the worker, or counts a failed attempt."""
    roles = load_spec().roles
    with factory() as session:
        row = session.execute(select(Job.state, Job.attempts).where(Job.id == job)).one_or_none()
    return row is not None and (row.state not in (roles.queue, roles.working) or row.attempts > 0)


def _wait(done: Callable[[], bool], deadline: float) -> bool:
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _rel(story: Story, path: Path) -> str:
    return str(path.relative_to(story.root))


def summary(root: Path) -> dict[str, Any] | None:
    """The real crash's job for `retracer demo --json` (``real_crash``): None when it did not run."""
    url = f"sqlite:///{root / 'retracer.db'}"
    if not (root / "retracer.db").exists():
        return None
    engine = store.make_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(select(Job.id, Job.state, Job.signature).where(Job.crash_id == CRASH_ID)).first()
    finally:
        engine.dispose()
    return None if row is None else {"job": row.id, "state": row.state, "signature": row.signature}
