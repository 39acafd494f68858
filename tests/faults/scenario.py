"""The reliability scenario: a workload of job scripts, an at-least-once publisher, a supervisor that keeps
`retracer serve` running while killing it, and a checker that classifies every event and every mail in
Jepsen's terms (lost / duplicated / unexpected).

Used by tests/faults (the CI-sized runs) and bench/soak.py (the long version). Every job follows a script:
``crash.submitted``, ``retrace.started``, one or two ``retrace.heartbeat``, then an ending chosen by job:
``upload.accepted`` (FULLYBUILT, the creator is mailed), ``upload.failed`` (FAILEDTOUPLOAD, the admins and
the creator) or a permanent ``retrace.failed`` (ON_HOLD, the admins). Some events are published twice
(exact replays), and a few out-of-order events (an upload before the start, a heartbeat after the end) must
be rejected. Job ids come from the database, so the submissions go first, and the rest once they are
applied.
"""

from __future__ import annotations

import json
import mailbox
import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any, Protocol

from retracer import config as cfg
from retracer import events as ev
from retracer.testing.faults import POINTS
from retracer.testing.instance import RETRACER, Instance
from retracer.workflow import load_spec

FINAL_STATE = {"accepted": "FULLYBUILT", "upload_failed": "FAILEDTOUPLOAD", "held": "ON_HOLD"}
ENDINGS = tuple(FINAL_STATE)
#: Triggers that are not written to history (the machine's `record = false`).
NOT_RECORDED = frozenset({"retrace.heartbeat"})
#: Where each mode can die by its own hand: the embedded inbox has no ack (the rows are deleted in the
#: apply transaction), so ``ack.after`` is never reached there.
POINTS_BY_MODE = {"embedded": tuple(p for p in POINTS if p != "ack.after"), "scaled": POINTS}
#: Per-incarnation probabilities: each `serve` is armed with one point at a time (in rotation), so a
#: SIGKILL it gives itself is attributed exactly.
DEFAULT_FAULTS = {"apply.before_commit": 0.2, "apply.after_commit": 0.2, "ack.after": 0.2,
                  "mail.after_send": 0.05, "mail.mid_flush": 0.05}
#: Settings for fault runs: small batches (more commit/ack points), no watchdog or re-offer during the run,
#: a 10 s mail lease (10 x timeout_s) so a killed sender's claims are retaken soon, no flood digests.
FAULT_SETTINGS = {
    "SERVICE__BATCH_SIZE": "50", "SERVICE__HEARTBEAT_TIMEOUT_S": "86400", "SERVICE__DISPATCH_TIMEOUT_S": "86400",
    "SERVICE__POLL_INTERVAL_S": "0.2", "MAIL__TIMEOUT_S": "1", "MAIL__FLOOD_THRESHOLD": "1000000000",
    "MAIL__BACKOFF_S": "1", "MAIL__MAX_BACKOFF_S": "5",
}

Event = dict[str, Any]


def configure(inst: Instance, mail_url: str | None = None, **settings: str) -> None:
    """Apply the fault-run settings (and an SMTP url, if mail goes to a server) to an instance."""
    inst.set(**{**FAULT_SETTINGS, **settings})
    if mail_url:
        inst.set(MAIL__URL=mail_url)


def admins_of(inst: Instance) -> list[str]:
    return [a.strip() for a in inst.env.get("RETRACER__MAIL__ADMINS", "").split(",") if a.strip()]


# -- the workload -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Script:
    """One job's story: its crash, how it ends, and which hostile extras it gets."""

    index: int
    crash_id: str
    creator: str
    ending: str
    heartbeats: int
    early: bool  # an upload.accepted before retrace.started: the job is PENDING, it must be rejected
    late: bool  # a heartbeat after the ending: the job has left RETRACING, it must be rejected


@dataclass
class Workload:
    """J job scripts and the two streams of events they make (submissions, then the rest)."""

    tag: str
    scripts: list[Script]
    seed: int
    replay_rate: float
    published: int = 0  # events handed to the bus, replays included (resent chunks not counted)

    @classmethod
    def build(cls, jobs: int, seed: int = 1, replay_rate: float = 0.06, ooo_rate: float = 0.02,
              tag: str | None = None) -> Workload:
        rng = random.Random(seed)
        tag = tag or f"w{uuid.uuid4().hex[:6]}"
        scripts = [Script(i, f"{tag}-crash-{i}", f"user{i}@example.com", ENDINGS[i % 3], rng.choice((1, 2)),
                          rng.random() < ooo_rate, rng.random() < ooo_rate) for i in range(jobs)]
        return cls(tag, scripts, seed, replay_rate)

    def eid(self, script: Script, step: str) -> str:
        return f"{self.tag}:{script.index}:{step}"

    # The events of each script, by step. Ids are deterministic so the checker knows them all in advance.

    def submission(self, s: Script) -> Event:
        data = {"crash_id": s.crash_id, "creator": s.creator, "package": "cdrkit", "version": "1.0",
                "architecture": "amd64", "release": "noble", "core": f"/srv/crashes/{s.index}/core",
                "executable": "/usr/bin/cdrecord", "priority": s.index % 7}
        return ev.make("crash.submitted", None, data, source="faults", event_id=self.eid(s, "submit")).to_dict()

    def script_events(self, s: Script, job: int) -> list[Event]:
        """Everything after the submission, in the order a worker and an uploader would publish it."""

        def make(step: str, etype: str, **data: Any) -> Event:
            return ev.make(etype, job, data, source="faults", event_id=self.eid(s, step)).to_dict()

        worker = f"worker-{s.index % 5}"
        out = []
        if s.early:
            out.append(make("early-upload", "upload.accepted", leaf=f"early-{s.index}"))
        out.append(make("start", "retrace.started", worker=worker))
        out += [make(f"heartbeat-{n}", "retrace.heartbeat", worker=worker) for n in range(s.heartbeats)]
        if s.ending == "accepted":
            out.append(make("end", "upload.accepted", leaf=f"leaf-{s.index}", result="#0 main () at cdrecord.c:3"))
        elif s.ending == "upload_failed":
            out.append(make("end", "upload.failed", leaf=f"leaf-{s.index}",
                            upload_log=f"backtrace.txt: checksum mismatch (script {s.index})"))
        else:
            out.append(make("end", "retrace.failed", worker=worker, transient=False,
                            error=f"retracer bug: unwinder assertion in frame {s.index}"))
        if s.late:
            out.append(make("late-heartbeat", "retrace.heartbeat", worker=worker))
        return out

    def submissions(self) -> list[Event]:
        rng = random.Random(self.seed * 7919 + 1)
        events = [self.submission(s) for s in self.scripts]
        rng.shuffle(events)
        return self._with_replays(events, rng)

    def rest(self, job_ids: dict[str, int]) -> list[Event]:
        """The scripts' other events, jobs interleaved at random, each job's own events in order."""
        rng = random.Random(self.seed * 7919 + 2)
        queues = {s.index: deque(self.script_events(s, job_ids[s.crash_id]))
                  for s in self.scripts if s.crash_id in job_ids}
        turns = [i for i, q in queues.items() for _ in q]
        rng.shuffle(turns)
        return self._with_replays([queues[i].popleft() for i in turns], rng)

    def _with_replays(self, events: list[Event], rng: random.Random) -> list[Event]:
        """Exact copies of some events, each placed somewhere after its original."""
        keyed: list[tuple[float, Event]] = [(float(i), e) for i, e in enumerate(events)]
        for i, e in enumerate(events):
            if rng.random() < self.replay_rate:
                keyed.append((rng.uniform(i + 0.5, len(events)), e))
        keyed.sort(key=lambda pair: pair[0])
        return [e for _, e in keyed]

    # -- what must happen

    def expected_applied(self) -> dict[str, str]:
        """Event id -> type of every event that must be applied exactly once."""
        out: dict[str, str] = {}
        for s in self.scripts:
            out[self.eid(s, "submit")] = "crash.submitted"
            out[self.eid(s, "start")] = "retrace.started"
            for n in range(s.heartbeats):
                out[self.eid(s, f"heartbeat-{n}")] = "retrace.heartbeat"
            out[self.eid(s, "end")] = {"accepted": "upload.accepted", "upload_failed": "upload.failed",
                                       "held": "retrace.failed"}[s.ending]
        return out

    def expected_rejected(self) -> set[str]:
        return {self.eid(s, "early-upload") for s in self.scripts if s.early} | \
               {self.eid(s, "late-heartbeat") for s in self.scripts if s.late}

    def distinct_events(self) -> int:
        return len(self.expected_applied()) + len(self.expected_rejected())

    def expected_mails(self, job_ids: dict[str, int], admins: Sequence[str]) -> set[tuple[int, str, str]]:
        """(job, state, recipient) of every mail the workload must cause, each exactly once."""
        out: set[tuple[int, str, str]] = set()
        for s in self.scripts:
            job = job_ids.get(s.crash_id)
            if job is None:
                continue  # its submission was lost: the checker counts that
            state = FINAL_STATE[s.ending]
            notify = load_spec().states[state].notify  # whom the workflow file says the state mails
            people = [*(admins if "admins" in notify else []), *([s.creator] if "creator" in notify else [])]
            out |= {(job, state, p.lower()) for p in people}
        return out


# -- publishing ---------------------------------------------------------------------------------------------


class Bus(Protocol):
    """Publishes a chunk of events, or raises; never half-reports success."""

    def publish(self, events: Sequence[Event]) -> None: ...

    def close(self) -> None: ...


class InboxBus:
    """The embedded bus in-process: what `retracer publish` does (validate every line, then append to the
    inbox table in one transaction), without starting a process per chunk."""

    def __init__(self, inst: Instance) -> None:
        from retracer import store

        self.config = cfg.load(environ=inst.env)
        self.engine = store.make_engine(self.config.database_url)
        self.factory = store.session_factory(self.engine)

    def publish(self, events: Sequence[Event]) -> None:
        from retracer.bus import embedded

        bodies = [ev.parse(e).to_json() for e in events]
        with self.factory() as session, session.begin():
            embedded.append(session, bodies)

    def close(self) -> None:
        self.engine.dispose()


class AmqpBus:
    """RabbitMQ in-process: retracer's own Publisher (persistent messages, publisher confirms)."""

    def __init__(self, inst: Instance) -> None:
        self.config = cfg.load(environ=inst.env)
        self.publisher: Any = None

    def publish(self, events: Sequence[Event]) -> None:
        from retracer.bus.amqp import Publisher

        parsed = [ev.parse(e) for e in events]
        try:
            if self.publisher is None:
                self.publisher = Publisher(self.config)
            for e in parsed:
                self.publisher.publish(e.type, e.to_json(), e.id)
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        if self.publisher is not None:
            with suppress(Exception):  # a connection the broker already dropped
                self.publisher.close()
            self.publisher = None


class CliBus:
    """`retracer publish -` in a subprocess per chunk: slower, but exactly what a publisher runs."""

    def __init__(self, inst: Instance) -> None:
        self.inst = inst
        self.errors: list[str] = []

    def publish(self, events: Sequence[Event]) -> None:
        proc = self.inst.run("publish", "-", input="".join(json.dumps(e) + "\n" for e in events), check=False)
        if proc.returncode != 0:
            self.errors.append((proc.stderr or proc.stdout).strip())
            raise RuntimeError(f"retracer publish exited {proc.returncode}: {self.errors[-1][-500:]}")

    def close(self) -> None:
        return None


def bus_for(inst: Instance, via: str = "inprocess") -> Bus:
    if via == "cli":
        return CliBus(inst)
    return InboxBus(inst) if "RETRACER__BROKER__URL" not in inst.env else AmqpBus(inst)


def publish_all(bus: Bus, events: Sequence[Event], chunk: int = 500, deadline_s: float = 900,
                pause_s: float = 0.0, failures: list[str] | None = None) -> None:
    """Publish in chunks, resending a chunk until it goes through (at-least-once, as a real publisher)."""
    deadline = time.monotonic() + deadline_s
    for start in range(0, len(events), chunk):
        part = events[start:start + chunk]
        while True:
            try:
                bus.publish(part)
                break
            except Exception as exc:
                if failures is not None:
                    failures.append(f"{type(exc).__name__}: {str(exc)[:300]}")
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        if pause_s:
            time.sleep(pause_s)


class Publishing(threading.Thread):
    """publish_all in the background, so a fault can be injected while events flow.

    ``paused()`` holds it between two attempts (for instance while a disk is being remounted).
    """

    def __init__(self, bus: Bus, events: Sequence[Event], chunk: int = 200, pause_s: float = 0.05,
                 deadline_s: float = 900) -> None:
        super().__init__(daemon=True)
        self.bus, self.events, self.chunk, self.pause_s, self.deadline_s = bus, events, chunk, pause_s, deadline_s
        self.failures: list[str] = []
        self.error: BaseException | None = None
        self.sent = 0
        self._gate = threading.Event()
        self._gate.set()
        self._busy = threading.Lock()

    def run(self) -> None:
        gated = _GatedBus(self.bus, self._gate, self._busy)
        try:
            for start in range(0, len(self.events), self.chunk):
                part = self.events[start:start + self.chunk]
                publish_all(gated, part, self.chunk, self.deadline_s, 0, self.failures)
                self.sent += len(part)
                time.sleep(self.pause_s)
        except BaseException as exc:
            self.error = exc

    @contextmanager
    def paused(self) -> Iterator[None]:
        self._gate.clear()
        with self._busy:  # the attempt in flight, if any, is over
            pass
        try:
            yield
        finally:
            self._gate.set()


class _GatedBus:
    def __init__(self, bus: Bus, gate: threading.Event, busy: threading.Lock) -> None:
        self.bus, self.gate, self.busy = bus, gate, busy

    def publish(self, events: Sequence[Event]) -> None:
        while True:
            self.gate.wait()
            with self.busy:
                if self.gate.is_set():
                    self.bus.publish(events)
                    return

    def close(self) -> None:
        self.bus.close()


# -- the supervisor ------------------------------------------------------------------------------------------


@dataclass
class Exit:
    """How one `serve` incarnation ended."""

    incarnation: int
    cause: str  # a fault point, "external", "stopped" (by us, SIGTERM), "crash" (non-zero exit), "exited"
    returncode: int
    armed: str | None
    doing: str  # the "msg" of its last JSON log line: what it was doing
    tail: str  # the last lines of its output


def log_tail(path: Path, size: int = 6000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def error_line(tail: str) -> str:
    """The line of a traceback that names the exception (else the last line)."""
    lines = tail.strip().splitlines()
    for line in reversed(lines):
        if line and not line.startswith((" ", "\t", "(Background", "[SQL", "[parameters")) and ":" in line \
                and ("Error" in line.split(":")[0] or "Exception" in line.split(":")[0]):
            return line.strip()
    return lines[-1].strip() if lines else "(no output)"


def last_msg(tail: str) -> str:
    for line in reversed(tail.strip().splitlines()):
        try:
            return str(json.loads(line).get("msg", "?"))
        except (ValueError, AttributeError):
            return line.strip()[:200]
    return "(no output)"


class Supervisor:
    """Keeps `retracer serve` running, like systemd with Restart=always, while it gets killed.

    Each incarnation is armed (RETRACER_FAULTS) with one fault point in rotation, so a SIGKILL it gives
    itself is attributed to that point exactly; with probability ``external[0]`` it is also SIGKILLed from
    outside after a random ``external[1]..external[2]`` seconds. An armed incarnation that has not died
    after ``rotate_s`` is stopped with SIGTERM and the next point armed. After ``max_kills`` kills it runs
    serve unarmed. Any other exit is recorded (a crash is a product failure) and serve is restarted.
    """

    def __init__(self, inst: Instance, mode: str, faults: dict[str, float] | None = None,
                 external: tuple[float, float, float] | None = None, max_kills: int | None = None,
                 rotate_s: float = 8.0, seed: int = 1, restart_delay_s: float = 1.0,
                 log_dir: Path | None = None) -> None:
        self.inst = inst
        self.log_dir = log_dir or inst.data_dir
        self.points = [p for p in POINTS_BY_MODE[mode] if faults and faults.get(p)]
        self.faults = faults or {}
        self.external = external
        self.max_kills = max_kills
        self.rotate_s = rotate_s
        self.rng = random.Random(seed)
        self.restart_delay_s = restart_delay_s
        self.exits: list[Exit] = []
        self.kills: Counter[str] = Counter()
        self._stop = threading.Event()
        self._hold = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.current: subprocess.Popen[bytes] | None = None
        self.incarnations = 0

    @property
    def killing(self) -> bool:
        return bool(self.points or self.external) and (
            self.max_kills is None or sum(self.kills.values()) < self.max_kills)

    def crashes(self) -> list[Exit]:
        return [e for e in self.exits if e.cause in ("crash", "exited")]

    def start(self) -> Supervisor:
        self._thread = threading.Thread(target=self._loop, name="serve-supervisor", daemon=True)
        self._thread.start()
        return self

    def hold(self, timeout: float = 60) -> None:
        """Stop serve (SIGTERM, SIGKILL if it hangs) and do not restart it until resume()."""
        self._hold.set()
        deadline = time.monotonic() + timeout
        while self.current is not None and time.monotonic() < deadline:
            time.sleep(0.05)

    def resume(self) -> None:
        self._hold.clear()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)
        proc = self.current
        if proc is not None and proc.poll() is None:  # the loop did not get to it: never leave one behind
            proc.kill()
            proc.wait()

    def _loop(self) -> None:
        rotation = 0
        while not self._stop.is_set():
            if self._hold.is_set():
                time.sleep(0.05)
                continue
            armed = None
            if self.points and self.killing:
                armed = self.points[rotation % len(self.points)]
                rotation += 1
            crashed = self._incarnation(armed)
            if crashed:
                self._stop.wait(self.restart_delay_s)

    def _incarnation(self, armed: str | None) -> bool:
        n = self.incarnations = self.incarnations + 1
        env = dict(self.inst.env)
        env.pop("RETRACER_FAULTS", None)
        if armed:
            env["RETRACER_FAULTS"] = f"{armed}={self.faults[armed]}"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"serve-sup-{n}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([*RETRACER, "serve"], env=env, stdout=out, stderr=out)
        self.current = proc
        started = time.monotonic()
        kill_at = None
        if self.external and self.killing and self.rng.random() < self.external[0]:
            kill_at = started + self.rng.uniform(self.external[1], self.external[2])
        cause = ""
        try:
            while True:
                rc = proc.poll()
                now = time.monotonic()
                if rc is not None:
                    if rc == -signal.SIGKILL:
                        cause = armed or "SIGKILL (not armed)"
                    elif rc == 0 and '"msg": "stopping' in log_tail(log, 200_000):
                        cause = "stopped from outside"  # a SIGTERM we did not send: not serve's doing
                    elif rc == 0:
                        cause = "exited"
                    else:
                        cause = "crash"
                    break
                if self._stop.is_set() or self._hold.is_set() or (armed and now - started > self.rotate_s):
                    proc.send_signal(signal.SIGTERM)
                    try:
                        rc = proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        rc = proc.wait()
                    # -SIGTERM: it was still starting, before its handlers were installed; -SIGKILL: its
                    # armed point fired while it finished the batch in hand.
                    if rc in (0, -signal.SIGTERM):
                        cause = "stopped"
                    elif rc == -signal.SIGKILL and armed:
                        cause = armed
                    else:
                        cause = "crash"
                    break
                if kill_at is not None and now >= kill_at:
                    proc.kill()
                    rc = proc.wait()
                    cause = "external"
                    break
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            self.current = None
        tail = log_tail(log)
        record = Exit(n, cause, rc, armed, last_msg(tail), tail)
        with open(self.log_dir / "exits.jsonl", "a") as f:
            f.write(json.dumps({k: v for k, v in record.__dict__.items() if k != "tail"}) + "\n")
        with self._lock:
            self.exits.append(record)
            if cause in POINTS or cause == "external":
                self.kills[cause] += 1
        return cause in ("crash", "exited")


# -- waiting ---------------------------------------------------------------------------------------------


def wait_until(what: str, done: Callable[[], bool], progress: Callable[[], Any], deadline_s: float,
               stall_s: float, log: Callable[[str], None] = print) -> bool:
    """Wait for ``done``; give up after ``deadline_s``, or after ``stall_s`` without any progress."""
    def ask(question: Callable[[], Any], otherwise: Any) -> Any:
        try:
            return question()
        except Exception as exc:  # the database may be the thing under test: ask again later
            log(f"while waiting for {what}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            return otherwise

    start = last_change = time.monotonic()
    seen = ask(progress, None)
    while True:
        if ask(done, False):
            return True
        now = time.monotonic()
        current = ask(progress, seen)
        if current != seen:
            seen, last_change = current, now
        if now - start > deadline_s:
            log(f"gave up waiting for {what} after {deadline_s:.0f}s (progress: {seen})")
            return False
        if now - last_change > stall_s:
            log(f"gave up waiting for {what}: no progress for {stall_s:.0f}s (stuck at {seen})")
            return False
        time.sleep(0.5)


def job_ids(inst: Instance, workload: Workload) -> dict[str, int]:
    prefix = f"{workload.tag}-crash-"
    return {str(c): int(i) for c, i in inst.rows("SELECT crash_id, min(id) FROM job WHERE crash_id LIKE :p "
                                                 "GROUP BY crash_id", p=prefix + "%")}


def progress_of(inst: Instance) -> tuple[int, ...]:
    """Markers, mails sent, mails not sent yet, inbox rows: any change is progress."""
    row = inst.rows(
        "SELECT (SELECT count(*) FROM processed_event), (SELECT count(*) FROM mail WHERE status = 'sent'), "
        "(SELECT count(*) FROM mail WHERE status <> 'sent'), (SELECT count(*) FROM inbox)")[0]
    return tuple(int(v) for v in row)


# -- deliveries ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivered:
    """One mail as it arrived: the job, the state, the recipient, the Message-ID."""

    job: str
    state: str
    to: str
    message_id: str


def delivered_from(messages: Iterable[Message]) -> list[Delivered]:
    return [Delivered(str(m.get("X-Retracer-Job", "")).strip(), str(m.get("X-Retracer-Job-State", "")).strip(),
                      str(m.get("To", "")).strip().lower(), str(m.get("Message-ID", "")).strip())
            for m in messages]


def read_mbox(path: Path) -> list[Delivered]:
    if not path.exists():
        return []
    box = mailbox.mbox(str(path), create=False)
    try:
        return delivered_from(box)
    finally:
        box.close()


# -- the checker -----------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Every event and mail of a run, classified; ``problems`` says what broke the guarantees."""

    published: int = 0
    distinct: int = 0
    applied: int = 0
    rejected_ok: int = 0
    lost: int = 0
    duplicated: int = 0
    unexpected: int = 0
    jobs: int = 0
    wrong_state: int = 0
    rows_expected: int = 0
    rows_missing: int = 0
    rows_duplicated: int = 0
    rows_unexpected: int = 0
    rows_unsent: int = 0
    mails_expected: int = 0
    delivered: int = 0
    mails_lost: int = 0
    mails_duplicated: int = 0
    same_id_resends: int = 0
    mails_unexpected: int = 0
    smtp: bool = False
    complete: bool = True
    kills: Counter[str] = field(default_factory=Counter)
    crashes: list[Exit] = field(default_factory=list)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def note(self, kind: str, example: str) -> None:
        found = self.examples.setdefault(kind, [])
        if len(found) < 5:
            found.append(example)

    @property
    def other_mail_duplicates(self) -> int:
        return self.mails_duplicated - self.same_id_resends

    def line(self) -> str:
        kills = ", ".join(f"{k} {v}" for k, v in sorted(self.kills.items()))
        dup = str(self.mails_duplicated)
        if self.smtp:
            dup += (f" ({self.same_id_resends} re-sends of the same Message-ID after a kill between the SMTP "
                    f"server's acceptance and the sent mark: a known SMTP limit; {self.other_mail_duplicates} other)")
        return (f"events: published {self.published} (distinct {self.distinct}), applied {self.applied}, "
                f"rejected as expected {self.rejected_ok}, lost {self.lost}, duplicated {self.duplicated}, "
                f"unexpected {self.unexpected} | jobs {self.jobs}, in the wrong state {self.wrong_state} | "
                f"mail rows: expected {self.rows_expected}, missing {self.rows_missing}, "
                f"duplicated {self.rows_duplicated}, unexpected {self.rows_unexpected}, unsent {self.rows_unsent} | "
                f"mails: expected {self.mails_expected}, delivered {self.delivered}, lost {self.mails_lost}, "
                f"duplicated {dup}, unexpected {self.mails_unexpected} | "
                f"kills {sum(self.kills.values())} ({kills or 'none'}) | serve crashes {len(self.crashes)}"
                + ("" if self.complete else " | INCOMPLETE (gave up waiting)"))

    def problems(self, allow_smtp_resends: int = 0) -> list[str]:
        """What broke a guarantee; empty when the run is clean."""
        out = []
        for name in ("lost", "duplicated", "unexpected", "wrong_state", "rows_missing", "rows_duplicated",
                     "rows_unexpected", "rows_unsent", "mails_lost", "mails_unexpected"):
            if getattr(self, name):
                out.append(f"{name} {getattr(self, name)}: {self.examples.get(name, [])}")
        if self.other_mail_duplicates:
            out.append(f"mails duplicated with different Message-IDs {self.other_mail_duplicates}: "
                       f"{self.examples.get('mails_duplicated', [])}")
        if self.same_id_resends > (allow_smtp_resends if self.smtp else 0):
            out.append(f"same Message-ID re-sent {self.same_id_resends} times (allowed {allow_smtp_resends}): "
                       f"{self.examples.get('mails_duplicated', [])}")
        for crash in self.crashes:
            out.append(f"serve incarnation {crash.incarnation} {crash.cause} (exit {crash.returncode}): "
                       f"{crash.tail[-1500:]}")
        if not self.complete:
            out.append("the run did not complete (see the log above)")
        return out


def check(  # noqa: C901  (one pass over every event, job and mail, tallied as Jepsen does)
        inst: Instance, workload: Workload, ids: dict[str, int], delivered: Sequence[Delivered],
          smtp: bool = False, other_events: frozenset[str] = frozenset()) -> Tally:
    """Classify every published event, every job, every mail row and every delivered mail.

    ``other_events``: ids published besides the workload's (hostile events a test checks itself).
    """
    t = Tally(published=workload.published, distinct=workload.distinct_events(), smtp=smtp)
    applied_ids = workload.expected_applied()
    rejected_ids = workload.expected_rejected()
    published = set(applied_ids) | rejected_ids
    markers = {str(e): str(o) for e, o in inst.rows("SELECT event_id, outcome FROM processed_event")}
    history = Counter({str(e): int(n) for e, n in inst.rows(
        "SELECT event_id, count(*) FROM history WHERE event_id IS NOT NULL GROUP BY event_id")})
    rejected = Counter(str(e) for (e,) in inst.rows("SELECT event_id FROM rejected WHERE event_id IS NOT NULL"))
    reasons = {str(e): str(r) for e, r in inst.rows("SELECT event_id, reason FROM rejected WHERE event_id IS NOT NULL")}

    for eid, etype in applied_ids.items():
        marker = markers.get(eid)
        rows = history.get(eid, 0)
        if marker != "applied" or (etype not in NOT_RECORDED and rows == 0):
            t.lost += 1
            t.note("lost", f"{eid} ({etype}): marker {marker}, history rows {rows}"
                   + (f", rejected: {reasons[eid][:200]}" if eid in reasons else ""))
        elif etype in NOT_RECORDED and rows:
            t.unexpected += rows
            t.note("unexpected", f"{eid} ({etype}) is not recorded, yet has {rows} history rows")
        elif rows > 1:
            t.duplicated += rows - 1
            t.note("duplicated", f"{eid} ({etype}): {rows} history rows")
        else:
            t.applied += 1
    for eid in rejected_ids:
        marker = markers.get(eid)
        if marker == "rejected" and rejected[eid] == 1 and not history.get(eid):
            t.rejected_ok += 1
        elif history.get(eid) or marker == "applied":
            t.unexpected += 1
            t.note("unexpected", f"{eid}: an out-of-order event was applied ({history.get(eid, 0)} history rows)")
        elif rejected[eid] > 1:
            t.duplicated += 1
            t.note("duplicated", f"{eid}: rejected {rejected[eid]} times")
        else:
            t.lost += 1
            t.note("lost", f"{eid}: an out-of-order event has marker {marker} and {rejected[eid]} rejected rows")
    for eid in {e for e in set(applied_ids) & set(rejected) if markers.get(e) == "applied"}:
        # Applied after all, yet an admin is shown a rejection (e.g. an "internal error" kept in an outage).
        t.unexpected += rejected[eid]
        t.note("unexpected", f"a rejection listed for {eid}, which must be applied: {reasons.get(eid, '')[:200]}")
    published |= other_events
    for eid, n in history.items():
        if eid not in published:
            t.unexpected += n
            t.note("unexpected", f"history row(s) for event {eid}, never published")
    orphans = int(inst.scalar("SELECT count(*) FROM history WHERE event_id IS NULL"))
    if orphans:
        t.unexpected += orphans
        t.note("unexpected", f"{orphans} history rows without an event id")
    for eid in set(rejected) - published:
        t.unexpected += rejected[eid]
        t.note("unexpected", f"rejected event {eid}, never published: {reasons.get(eid, '')[:200]}")

    # Jobs: one per crash, in the state its script ends in.
    per_crash = Counter(str(c) for (c,) in inst.rows("SELECT crash_id FROM job"))
    states = {int(i): str(s) for i, s in inst.rows("SELECT id, state FROM job")}
    t.jobs = len(states)
    crashes = {s.crash_id: s for s in workload.scripts}
    for crash_id, n in per_crash.items():
        if crash_id not in crashes:
            t.unexpected += n
            t.note("unexpected", f"job for crash {crash_id}, never submitted")
        elif n > 1:
            t.duplicated += n - 1
            t.note("duplicated", f"{n} jobs for crash {crash_id}")
    for s in workload.scripts:
        job = ids.get(s.crash_id)
        if job is not None and states.get(job) != FINAL_STATE[s.ending]:
            t.wrong_state += 1
            t.note("wrong_state", f"job {job} ({s.ending}) is {states.get(job)}, not {FINAL_STATE[s.ending]}")

    # Mail rows: exactly the expected (job, state, recipient), once each, all sent.
    expected = workload.expected_mails(ids, admins_of(inst))
    t.rows_expected = t.mails_expected = len(expected)
    mail_rows = inst.rows("SELECT job_id, history_id, state, recipient, status, last_error FROM mail")
    keyed = Counter((r[0], r[1], str(r[3]).lower()) for r in mail_rows)
    t.rows_duplicated = sum(n - 1 for n in keyed.values() if n > 1)
    for row_key, n in keyed.items():
        if n > 1:
            t.note("rows_duplicated", f"mail rows for (job, history, recipient) {row_key}: {n}")
    have = Counter((r[0], str(r[2]), str(r[3]).lower()) for r in mail_rows)
    for key in expected - set(have):
        t.rows_missing += 1
        t.note("rows_missing", f"no mail row for {key}")
    for key in set(have) - expected:
        t.rows_unexpected += have[key]
        t.note("rows_unexpected", f"mail row {key}, not expected")
    for r in mail_rows:
        if r[4] != "sent":
            t.rows_unsent += 1
            t.note("rows_unsent", f"mail ({r[0]}, {r[2]}, {r[3]}) is {r[4]}: {str(r[5])[:300]}")

    # Delivered mails, per (job, state, recipient).
    t.delivered = len(delivered)
    got = Counter((d.job, d.state, d.to) for d in delivered)
    want = {(str(j), s, r) for j, s, r in expected}
    for wanted in want - set(got):
        t.mails_lost += 1
        t.note("mails_lost", f"never delivered: {wanted}")
    for arrived, n in got.items():
        if arrived not in want:
            t.mails_unexpected += n
            t.note("mails_unexpected", f"delivered but not expected: {arrived} x{n}")
        elif n > 1:
            t.mails_duplicated += n - 1
    by_id = Counter((d.job, d.state, d.to, d.message_id) for d in delivered)
    t.same_id_resends = sum(n - 1 for mail, n in by_id.items() if n > 1 and mail[:3] in want)
    for mail, n in by_id.items():
        if n > 1:
            t.note("mails_duplicated", f"{mail} delivered {n} times")
    return t


# -- the kill matrix ----------------------------------------------------------------------------------------


def expected_mail_count(inst: Instance, workload: Workload, ids: dict[str, int]) -> int:
    return len(workload.expected_mails(ids, admins_of(inst)))


def done_predicate(inst: Instance, workload: Workload, expected_mails: int) -> Callable[[], bool]:
    distinct = workload.distinct_events()

    def done() -> bool:
        markers, sent, unsent, inbox = progress_of(inst)
        return markers >= distinct and inbox == 0 and sent >= expected_mails and unsent == 0

    return done


def run_scenario(inst: Instance, mode: str, workload: Workload, supervisor: Supervisor,
                 deliveries: Callable[[], list[Delivered]], *, deadline_s: float = 1200, stall_s: float = 60,
                 via: str = "inprocess", chunk: int = 500, log: Callable[[str], None] = print) -> Tally:
    """Publish the workload through `serve` under ``supervisor`` and check the result."""
    bus = bus_for(inst, via)
    ids: dict[str, int] = {}
    complete = False
    started = time.monotonic()
    supervisor.start()
    try:
        first = workload.submissions()
        publish_all(bus, first, chunk)
        workload.published += len(first)
        jobs = len(workload.scripts)
        complete = wait_until("the submissions", lambda: int(inst.scalar("SELECT count(*) FROM job")) >= jobs,
                              lambda: progress_of(inst), deadline_s, stall_s, log)
        ids = job_ids(inst, workload)
        log(f"phase 1: {len(ids)} of {jobs} jobs after {time.monotonic() - started:.0f}s, "
            f"kills so far {sum(supervisor.kills.values())}")
        rest = workload.rest(ids)
        publish_all(bus, rest, chunk)
        workload.published += len(rest)
        if complete:
            complete = wait_until("every event and mail",
                                  done_predicate(inst, workload, expected_mail_count(inst, workload, ids)),
                                  lambda: progress_of(inst), deadline_s, stall_s, log)
        log(f"phase 2: done={complete} after {time.monotonic() - started:.0f}s, "
            f"kills {sum(supervisor.kills.values())}, incarnations {supervisor.incarnations}")
    finally:
        supervisor.stop()
        bus.close()
    tally = check(inst, workload, ids, deliveries(), smtp="RETRACER__MAIL__URL" in inst.env)
    tally.kills = Counter(supervisor.kills)
    tally.crashes = supervisor.crashes()
    tally.complete = complete
    return tally


def kill_doings(supervisor: Supervisor) -> str:
    """What serve was doing when each kind of kill hit it, from its last log line."""
    by: dict[str, Counter[str]] = {}
    for e in supervisor.exits:
        if e.cause in POINTS or e.cause == "external":
            by.setdefault(e.cause, Counter())[e.doing] += 1
    return "; ".join(f"{k}: " + ", ".join(f"{d} {n}" for d, n in c.most_common(4)) for k, c in sorted(by.items()))
