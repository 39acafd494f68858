"""An instance with jobs in every state, as the status pages' tests and their screenshot need it.

Every job gets where it is the way production jobs do: events through the real apply path and admin triggers
through ``Applier.fire``, each in its own committed transaction. Some values carry markup, as a hostile or
careless publisher could send them: a page must show them as text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from retracer import store
from retracer.apply.applier import Applier, Outcome
from retracer.config import Config
from retracer.errors import RetracerError
from retracer.testing.factories import crash_data, event
from retracer.workflow import load_spec

#: Values that would run a script if a page put them into its HTML unescaped.
HOSTILE_CRASH = "crash-<script>document.title='pwned';alert(1)</script>"
HOSTILE_ERROR = 'gdb failed: "><img src=x onerror="document.title=\'pwned\';alert(2)">'
HOSTILE_REASON = "<script>alert(3)</script> waiting for the symbols of libfoo"
HOSTILE_SOURCE = '"><svg onload=alert(4)>'
HOSTILE_MODULE = "/usr/lib/<script>alert(5)</script>.so"

ADMIN = "admin:celso"
WORKER = "worker-7"
BACKTRACE = """\
#0  __pthread_kill_implementation (threadid=<optimized out>, signo=6) at ./nptl/pthread_kill.c:44
#1  0x00007f3c2a04526e in __GI_raise (sig=6) at ../sysdeps/posix/raise.c:26
#2  0x00007f3c2a0288ff in __GI_abort () at ./stdlib/abort.c:79
#3  0x000055d0c0a1b1d9 in write_track (fd=3) at cdrecord.c:412
#4  0x000055d0c0a1b201 in main (argc=1, argv=0x7ffd6c1b2a88) at cdrecord.c:97
"""
SIGNATURE = "/usr/bin/cdrecord:6:__pthread_kill_implementation:__GI_raise:__GI_abort:write_track:main"


@dataclass
class World:
    """The jobs made, by what they show (each name maps to job ids, the first the most telling)."""

    jobs: dict[str, list[int]] = field(default_factory=dict)
    rejected: int = 0

    def add(self, name: str, job_id: int) -> int:
        self.jobs.setdefault(name, []).append(job_id)
        return job_id

    def one(self, name: str) -> int:
        return self.jobs[name][0]


class Driver:
    """The real apply path on one database."""

    def __init__(self, config: Config, factory: sessionmaker[Session]) -> None:
        self.factory = factory
        self.applier = Applier(config)

    def apply(self, body: dict[str, Any]) -> Outcome:
        with store.transaction(self.factory) as session:
            (outcome,) = self.applier.apply_batch(session, [body])
        return outcome

    def applied(self, body: dict[str, Any]) -> Outcome:
        outcome = self.apply(body)
        if outcome.status != "applied":
            raise RetracerError(f"event {body['type']} for job {body.get('job')} was not applied: {outcome.reason}")
        return outcome

    def fire(self, job_id: int, trigger: str, **kwargs: Any) -> None:
        with store.transaction(self.factory) as session:
            self.applier.fire(session, job_id, trigger, by=ADMIN, **kwargs)

    def submit(self, **overrides: Any) -> int:
        outcome = self.applied(event("crash.submitted", None, source="builder-1", **crash_data(**overrides)))
        if outcome.job_id is None:
            raise RetracerError(f"submit made no job: {outcome.reason}")
        return outcome.job_id

    def start(self, job_id: int) -> None:
        self.applied(event("retrace.started", job_id, source=WORKER, worker=WORKER))

    def fail(self, job_id: int, error: str, transient: bool, **data: Any) -> None:
        self.start(job_id)
        self.applied(event("retrace.failed", job_id, source=WORKER, error=error, transient=transient, **data))


def populate(config: Config, factory: sessionmaker[Session], queued: int = 3, hostile: bool = True) -> World:
    """Jobs in every state of the workflow, with history, mails, duplicates and rejected events; with
    ``hostile``, one job and one rejected event carry markup where text belongs."""
    packages = ("cdrkit", "gnome-shell", "evolution", "gimp", "inkscape", "nautilus", "totem", "rhythmbox")
    d = Driver(config, factory)
    w = World()
    spec = load_spec()
    # An admin's hold: the admin trigger into the held state (names come from the workflow file's roles).
    hold = next(t.trigger for t in spec.transitions if t.admin and t.dest == spec.roles.held)
    for i in range(queued):
        w.add("pending", d.submit(package=packages[i % len(packages)], version=f"1.{i}", priority=i % 3))
    urgent = w.add("pending", d.submit(package="gnome-shell", version="45.2"))
    d.fire(urgent, spec.roles.reprioritize, data={"priority": 50})

    waiting = w.add("waiting", d.submit(package="nautilus", version="44.1"))
    d.fail(waiting, "E: Failed to fetch http://archive/pool/n/nautilus-dbgsym.ddeb 503", transient=True)

    w.add("retracing", d.submit(package="firefox", version="120.0"))
    d.start(w.one("retracing"))

    uploaded = w.add("fullybuilt", d.submit(package="cdrkit", version="1.1.11"))
    d.start(uploaded)
    d.applied(event("upload.accepted", uploaded, source="uploader", leaf=f"upload-{uploaded}", result=BACKTRACE,
                    signature=SIGNATURE, address_signature="ab12cd+0x11d9"))
    for _ in range(2):
        dup = w.add("duplicate", d.submit(package="cdrkit", version="1.1.11"))
        d.start(dup)
        d.applied(event("upload.accepted", dup, source="uploader", leaf=f"upload-{dup}", result=BACKTRACE,
                        signature=SIGNATURE))

    refused = w.add("failedtoupload", d.submit(package="evince", version="45.0"))
    d.start(refused)
    d.applied(event("upload.failed", refused, source="uploader", leaf=f"upload-{refused}",
                    upload_log="Rejected: backtrace.txt has no frames\nmanifest.json: crash id mismatch"))

    permanent = w.add("held_permanent", d.submit(package="gedit", version="46.0"))
    d.fail(permanent, "no symbols for libgedit-46.so and libpeas-1.0.so.0", transient=False,
           missing=[{"build_id": "5e1f0c9a0b6d4e2f8a7c3b1d9e0f2a4c6b8d0e1f", "module": "/usr/lib/gedit/libgedit-46.so"},
                    {"build_id": "0a9b8c7d6e5f40312233445566778899aabbccdd", "module": "/usr/lib/libpeas-1.0.so.0"}])

    pattern = w.add("held_pattern", d.submit(package="totem", version="43.0"))
    for _ in range(int(config["policy"]["max_attempts"])):
        d.fail(pattern, "Connection refused by debuginfod.example.org:8002", transient=True)

    if hostile:
        evil = w.add("hostile", d.submit(crash_id=HOSTILE_CRASH, package="<b>evil</b>", version="1"))
        d.fail(evil, HOSTILE_ERROR, transient=False,
               missing=[{"build_id": "feedfacefeedfacefeedfacefeedfacefeedface", "module": HOSTILE_MODULE}])
    held = w.add("held_admin", d.submit(package="libfoo", version="2.0"))
    d.fire(held, hold, reason=HOSTILE_REASON if hostile else "waiting for the symbols of libfoo 2.0")

    bad = event("retrace.started", 999_999, source=HOSTILE_SOURCE if hostile else "builder-2", worker="w")
    if d.apply(bad).status == "rejected":
        w.rejected += 1
    return w
