"""`retracer demo`: the whole story on the embedded default, through the real bus and the real machine.

It creates an instance in a fresh directory, starts `retracer serve` as its own process, and plays four
crashes with a STAND-IN worker and uploader: they take the work requests `serve` dispatches and publish
exactly the events (and write exactly the uploads) a real worker would, with scripted outcomes. The
admin's rescue is the `retracer rescue` command, run as an admin would type it. Nothing is faked past
that line: the transitions, the backoff, the spool checks, the mails are retracer's own. Then, where gcc,
gdb and binutils are installed, one real crash goes through the real `retracer worker` (``demo_crash``).
"""

from __future__ import annotations

import mailbox
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from retracer import config as cfg
from retracer import demo_crash, store
from retracer import events as ev
from retracer.bus import embedded
from retracer.demo_crash import RealCrash
from retracer.errors import RetracerError
from retracer.store.models import History, Job
from retracer.uploads import spool
from retracer.workflow import load_spec

ADMINS = ["ada.admin@example.com", "bob.admin@example.com"]
GOOD_BACKTRACE = """\
#0  __pthread_kill_implementation (threadid=<optimized out>, signo=6) at ./nptl/pthread_kill.c:44
#1  0x00007f3c2a04526e in __GI_raise (sig=6) at ../sysdeps/posix/raise.c:26
#2  0x00007f3c2a0288ff in __GI_abort () at ./stdlib/abort.c:79
#3  0x000055d0c0a1b1d9 in {function} () at {source}:{line}
#4  0x000055d0c0a1b201 in main (argc=1, argv=0x7ffd6c1b2a88) at {source}:{main_line}
"""
NO_SYMBOLS = "#0  0x00007f3c2a0969fc in ?? ()\n#1  0x00007f3c2a04526e in ?? ()\n#2  0x000055d0c0a1b1d9 in ?? ()\n"


@dataclass
class Crash:
    """One crash of the story and what the stand-in worker will do with each attempt."""

    crash_id: str
    package: str
    version: str
    creator: str
    function: str
    outcomes: list[str]  # per attempt: "ok", "transient", "no-symbols"
    expect_state: str
    expect_attempts: int
    job: int = 0
    attempt: int = 0
    leaf: str | None = None


ROLES = load_spec().roles
CRASHES = [
    Crash("LP-2071", "gedit", "46.2-1", "carol@example.com", "gedit_document_save", ["ok"], ROLES.success, 0),
    Crash("LP-2072", "nautilus", "46.1-1", "dave@example.com", "nautilus_file_get_name",
          ["transient", "ok"], ROLES.success, 1),
    Crash("LP-2073", "evince", "46.3-1", "erin@example.com", "ev_document_load", ["transient"] * 3, ROLES.held, 3),
    Crash("LP-2074", "totem", "43.0-2", "frank@example.com", "totem_object_play", ["no-symbols"], ROLES.success, 0),
]

FAILURE = "E: Failed to fetch http://archive.ubuntu.com/ubuntu/pool/main/{p}/{p}-dbgsym.ddeb  503  Service Unavailable"


@dataclass
class Story:
    root: Path
    config_path: Path
    out: Callable[[str], None]
    started: float = field(default_factory=time.monotonic)
    seen_history: int = 0
    problems: list[str] = field(default_factory=list)
    real: RealCrash | None = None

    def say(self, text: str) -> None:
        self.out(f"[{time.monotonic() - self.started:5.1f}s] {text}")

    def env(self) -> dict[str, str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("RETRACER__")}
        return {**clean, "RETRACER_CONFIG": str(self.config_path)}

    def command(self, *args: str, echo: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a retracer command as the reader would type it; ``echo=False`` keeps long output (JSON) for the
        caller to pick from."""
        self.out(f"\n    $ RETRACER_CONFIG={self.config_path} retracer {' '.join(_quote(a) for a in args)}")
        proc = subprocess.run([sys.executable, "-m", "retracer", *args],  # noqa: S603  (our own command, no shell)
                              env=self.env(), capture_output=True, text=True, timeout=60)
        for line in (proc.stdout + proc.stderr).rstrip().splitlines() if echo else []:
            self.out(f"    {line}")
        self.out("")
        return proc

    def show_transitions(self, factory: sessionmaker[Session]) -> None:
        """Say every history row written since the last call."""
        with factory() as session:
            rows = list(session.execute(
                select(History, Job.package).join(Job, Job.id == History.job_id)
                .where(History.id > self.seen_history).order_by(History.id)).tuples())
        for h, package in rows:
            self.seen_history = h.id
            why = f" ({h.reason})" if h.reason and h.from_state is not None else ""
            self.say(f"job {h.job_id} {package}: {h.from_state or 'new'} -> {h.to_state} [{h.trigger}, by "
                     f"{h.actor}]{why}")


def _quote(arg: str) -> str:
    return f'"{arg}"' if " " in arg else arg


def write_config(root: Path, debug_dirs: list[Path] | None = None) -> Path:
    """The demo instance's configuration: the embedded defaults with short timings so the story fits a minute,
    and the real worker's debug symbols in ``debug_dirs``."""
    path = root / "retracer.toml"
    dirs = ", ".join(f'"{d}"' for d in debug_dirs or [])
    admins = ", ".join(f'"{a}"' for a in ADMINS)
    path.write_text(f"""# The demo's instance: the embedded default (SQLite, no broker, mail to an mbox file).
# Use it with: RETRACER_CONFIG={path} retracer status

[service]
data_dir = "{root}"
max_parallel = 2
heartbeat_timeout_s = 30.0
poll_interval_s = 0.2
batch_wait_ms = 20

[mail]
admins = [{admins}]

[policy]
max_attempts = 3
backoff_base_s = 1.0
backoff_factor = 2.0
backoff_max_s = 4.0

[worker]
# The real crash's worker: a name to read in the job's history, and gdb bounded so the demo is too.
name = "demo-worker"
heartbeat_interval_s = 5.0
gdb_timeout_s = 30.0
debug_dirs = [{dirs}]
""", encoding="utf-8")
    return path


def run(root: Path, out: Callable[[str], None] = print, timeout: float = 55.0) -> int:
    """Play the story; return 0 when it ends as told, 1 (after saying what diverged) otherwise."""
    root = root.resolve()
    if root.exists() and any(root.iterdir()):
        raise RetracerError(f"{root} is not empty; the demo needs a fresh directory (give another --dir)")
    root.mkdir(parents=True, exist_ok=True)
    missing = demo_crash.missing_tools()
    story = Story(root, write_config(root, [] if missing else [demo_crash.debug_dir(root)]), out)
    config = cfg.load(story.config_path, environ={})
    out(f"retracer demo: an embedded instance in {root}")
    out("  state: SQLite file retracer.db; bus: its inbox table; mail: mail/outbox.mbox; uploads: spool/")
    out("  The worker and the uploader below are STAND-INS: they publish exactly the events a real worker")
    out("  publishes (retrace.started, retrace.heartbeat, retrace.failed) and write uploads into the spool")
    out("  the way a real uploader does, with outcomes scripted for the story. Everything else is retracer.")
    out("  " + (demo_crash.skipped_line(missing) if missing else
                "Then one REAL crash: compiled here, retraced by the real `retracer worker` with gdb."))
    out("")
    store.upgrade(config.database_url)
    engine = store.make_engine(config.database_url)
    factory = store.session_factory(engine)
    spool.ensure_layout(config.spool_dir)
    log = open(root / "serve.log", "ab")  # noqa: SIM115  # held for the server's lifetime
    server = subprocess.Popen([sys.executable, "-m", "retracer", "serve"], env=story.env(), stdout=log,
                              stderr=log)
    story.say(f"started `retracer serve` (pid {server.pid}, log {root / 'serve.log'})")
    deadline = time.monotonic() + timeout
    try:
        _play(story, config, factory, server, timeout)
        if not missing and server.poll() is None:
            # The real crash gets at least a fair share even when the stand-ins used up their time.
            demo_crash.play(story, factory, max(deadline, time.monotonic() + 20))
            _wait_mails(factory, time.monotonic() + 10)
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=30)
        log.close()
        engine.dispose()
    return _verdict(story, config, factory)


def _publish(factory: sessionmaker[Session], *events: ev.Event) -> None:
    with store.transaction(factory) as session:
        embedded.append(session, [e.to_json() for e in events])


def _play(story: Story, config: cfg.Config, factory: sessionmaker[Session], server: subprocess.Popen[bytes],
          timeout: float) -> None:
    for crash in CRASHES:
        _publish(factory, ev.make("crash.submitted", None, {
            "crash_id": crash.crash_id, "creator": crash.creator, "package": crash.package,
            "version": crash.version, "architecture": "amd64", "release": "noble",
            "core": f"/srv/crashes/{crash.crash_id}/core", "executable": f"/usr/bin/{crash.package}"},
            source="demo:reporter"))
    story.say(f"published {len(CRASHES)} crash.submitted events (" + ", ".join(c.package for c in CRASHES) + ")")
    rescued = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            story.problems.append(f"`retracer serve` exited with status {server.returncode}; see serve.log")
            return
        story.show_transitions(factory)
        with store.transaction(factory) as session:
            requests = embedded.take_work(session, 10)
        for request in requests:
            _work(story, config, factory, request)
        states = _states(factory)
        failed = [c for c in CRASHES if states.get(c.job) == ROLES.rescuable]
        if failed and not rescued and _mails_sent(factory):
            story.show_transitions(factory)
            _rescue(story, config, failed[0])
            rescued = True
        if all(states.get(c.job) == c.expect_state for c in CRASHES) and rescued and not _mails_pending(factory):
            story.show_transitions(factory)
            return
        time.sleep(0.1)
    story.problems.append(f"the story did not finish within {timeout:.0f}s")


def _work(story: Story, config: cfg.Config, factory: sessionmaker[Session], request: dict[str, Any]) -> None:
    """The stand-in worker: take a work request, retrace (scripted), report through events and the spool."""
    crash = next(c for c in CRASHES if c.crash_id == request["data"]["crash_id"])
    crash.job = request["job"]
    outcome = crash.outcomes[min(crash.attempt, len(crash.outcomes) - 1)]
    crash.attempt += 1
    worker = f"standin-worker-{crash.attempt}"
    story.say(f"stand-in worker took the work request for job {crash.job} ({crash.package}), "
              f"attempt {request['data']['attempt']}")
    _publish(factory, ev.make("retrace.started", crash.job, {"worker": worker}, source=worker),
             ev.make("retrace.heartbeat", crash.job, {"worker": worker}, source=worker))
    if outcome == "transient":
        _publish(factory, ev.make("retrace.failed", crash.job, {"error": FAILURE.format(p=crash.package),
                                                                "worker": worker}, source=worker))
        return
    crash.leaf = f"{crash.crash_id}-upload-{crash.attempt}"
    backtrace = GOOD_BACKTRACE.format(function=crash.function, source=f"src/{crash.package}.c", line=412,
                                      main_line=57) if outcome == "ok" else NO_SYMBOLS
    # The stand-in uploader only writes the upload once the job is RETRACING, as a real one would.
    _wait_state(factory, crash.job, ROLES.working)
    spool.write_upload(config.spool_dir, crash.leaf, {"job": crash.job, "crash_id": crash.crash_id,
                                                      "build_ids": [], "worker": worker},
                       backtrace, f"{worker}: retraced {crash.crash_id} in 2.1s\n")
    story.say(f"stand-in uploader wrote spool/incoming/{crash.leaf} for job {crash.job}")


def _wait_state(factory: sessionmaker[Session], job: int, state: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _states(factory).get(job) != state:
        time.sleep(0.05)


def _rescue(story: Story, config: cfg.Config, crash: Crash) -> None:
    """What the admin does after reading the FAILEDTOUPLOAD mail: look, fix, dry-run, rescue."""
    story.say(f"job {crash.job} is FAILEDTOUPLOAD; the admins and {crash.creator} have the mail with the upload "
              f"log. The admin looks at the job:")
    story.command("show", str(crash.job))
    kept = config.spool_dir / "failed" / str(crash.leaf) / "backtrace.txt"
    kept.write_text(GOOD_BACKTRACE.format(function=crash.function, source=f"src/{crash.package}.c", line=88,
                                          main_line=21), encoding="utf-8")
    story.say(f"the admin installed the missing debug symbols and regenerated {kept.relative_to(story.root)}; "
              f"first a dry run, then the rescue:")
    story.command(ROLES.rescue, str(crash.job), "--dry-run")
    story.command(ROLES.rescue, str(crash.job), "--as", "ada", "--reason", "debug symbols installed on the worker")


def _states(factory: sessionmaker[Session]) -> dict[int, str]:
    with factory() as session:
        return {i: s for i, s in session.execute(select(Job.id, Job.state))}


def _mails_pending(factory: sessionmaker[Session]) -> bool:
    from retracer.store.models import Mail

    with factory() as session:
        return session.scalar(select(Mail.id).where(Mail.status != "sent").limit(1)) is not None


def _mails_sent(factory: sessionmaker[Session]) -> bool:
    return not _mails_pending(factory)


def _wait_mails(factory: sessionmaker[Session], deadline: float) -> None:
    while _mails_pending(factory) and time.monotonic() < deadline:
        time.sleep(0.1)


def _verdict(story: Story, config: cfg.Config, factory: sessionmaker[Session]) -> int:
    out = story.out
    engine = factory.kw["bind"]
    states = _states(factory)
    with factory() as session:
        jobs = {j.id: j for j in session.scalars(select(Job))}
    for crash in CRASHES:
        job = jobs.get(crash.job)
        if job is None:
            story.problems.append(f"{crash.crash_id} ({crash.package}) never became a dispatched job")
            continue
        if states[job.id] != crash.expect_state:
            story.problems.append(f"job {job.id} ({crash.package}) ended {job.state}, the story says "
                                  f"{crash.expect_state}")
        if job.attempts != crash.expect_attempts:
            story.problems.append(f"job {job.id} ({crash.package}) has {job.attempts} failed attempts, the story "
                                  f"says {crash.expect_attempts}")
    real = story.real
    if real is not None and real.job:
        if states.get(real.job) != ROLES.success:
            story.problems.append(f"the real crash's job {real.job} ended {states.get(real.job)}, expected "
                                  f"{ROLES.success}; `retracer show {real.job}` says why")
        elif not real.names_the_line():
            story.problems.append(f"the real crash's backtrace (results/{real.job}/backtrace.txt) does not name "
                                  f"{demo_crash.SOURCE}:{demo_crash.CRASH_LINE}, where the program crashes")
    mails = _read_mbox(config.mailbox_path)
    expected = _expected_mails(real)
    got = sorted((m["X-Retracer-Job"], m["X-Retracer-Job-State"], m["To"]) for m in mails)
    if got != sorted(expected):
        story.problems.append(f"mails differ from the story: expected {sorted(expected)}, got {got}")
    out("")
    out(f"Mail: {len(mails)} messages in {config.mailbox_path} (an mbox file; read it with "
        f"`mutt -f {config.mailbox_path}` or `python3 -m mailbox` tools, or list them with `retracer mail list`):")
    for m in mails:
        out(f"  To: {m['To']:<24} {m['Subject']}  [{m['X-Retracer-Job-State']}, {m['X-Retracer-Rationale']}]")
    story.command("status")
    engine.dispose()
    if story.problems:
        out("The demo DIVERGED from its story:")
        for p in story.problems:
            out(f"  - {p}")
        out(f"Look at {story.root / 'serve.log'} and `retracer show JOB` with RETRACER_CONFIG={story.config_path}.")
        return 1
    out("The story ended as told. Explore further (the instance is left in place):")
    out(f"  export RETRACER_CONFIG={story.config_path}")
    rescued = next(c.job for c in CRASHES if c.outcomes[0] == "no-symbols")
    shows = [f"retracer show {rescued}"] + ([f"retracer show {real.job}     # the real crash"] if real else [])
    for cmd in ("retracer jobs", *shows, "retracer states --diagram", "retracer mail list",
                "retracer web          # the status pages on http://127.0.0.1:8080/ (Ctrl-C stops it)",
                "retracer serve        # keep the service running; Ctrl-C stops it cleanly"):
        out(f"  {cmd}")
    return 0


def _expected_mails(real: RealCrash | None) -> list[tuple[str, str, str]]:
    """Per crash, the (job, state, recipient) mails its story must have sent: whom the workflow file says each
    state it passes through notifies. The real crash's story is the shortest: retraced at the first try."""
    spec = load_spec()

    def to(state: str, creator: str) -> list[str]:
        notify = spec.states[state].notify
        return [*(ADMINS if "admins" in notify else []), *([creator] if "creator" in notify else [])]

    expected = []
    for crash in CRASHES:
        job = str(crash.job)
        passed = [crash.expect_state]
        if crash.outcomes[0] == "no-symbols":
            passed.insert(0, ROLES.rescuable)
        expected += [(job, state, recipient) for state in passed for recipient in to(state, crash.creator)]
    if real is not None and real.job:
        expected += [(str(real.job), ROLES.success, r) for r in to(ROLES.success, demo_crash.CREATOR)]
    return expected


def _read_mbox(path: Path) -> list[Any]:
    if not path.exists():
        return []
    box = mailbox.mbox(str(path))
    try:
        return list(box)
    finally:
        box.close()


def default_dir() -> Path:
    return Path.cwd() / f"retracer-demo-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
