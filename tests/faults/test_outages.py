"""Outages while events flow: PostgreSQL restarted, the SMTP server down for a minute, the embedded
database's disk gone read-only. `serve` keeps running or exits with a clear message, and once the fault
is cleared (serve restarted if it exited) everything resumes with nothing lost or duplicated.

(RabbitMQ restarted mid-stream is tests/integration/test_outages.py.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from retracer.mail.sender import MARK_BATCH
from retracer.testing.instance import Instance
from retracer.testing.smtp import CaptureServer

from ..conftest import IN_CI
from .scenario import (
    Delivered,
    Exit,
    Publishing,
    Supervisor,
    Tally,
    Workload,
    bus_for,
    check,
    configure,
    delivered_from,
    done_predicate,
    error_line,
    expected_mail_count,
    job_ids,
    progress_of,
    publish_all,
    read_mbox,
    wait_until,
)

pytestmark = pytest.mark.slow

JOBS = 400  # about 1,900 events and 800 mails per run


def pg_cluster() -> list[str]:
    versions = sorted(p.name for p in Path("/etc/postgresql").iterdir()) if Path("/etc/postgresql").is_dir() else []
    if not versions or shutil.which("pg_ctlcluster") is None:
        (pytest.fail if IN_CI else pytest.skip)("pg_ctlcluster or /etc/postgresql is missing here")
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main"]


def pg_answers() -> bool:
    return subprocess.run(["pg_isready", "-h", "127.0.0.1", "-t", "2"], capture_output=True).returncode == 0


def _last_line(e: Exit) -> str:
    return e.tail.strip().splitlines()[-1] if e.tail.strip() else "(no output)"


def unclear(exits: list[Exit], must_name: re.Pattern[str]) -> list[str]:
    """The exits whose output is not a clear message: a traceback, or a last line that does not say what
    is wrong."""
    bad = []
    for e in exits:
        if "Traceback (most recent call last)" in e.tail or not must_name.search(_last_line(e)):
            bad.append(f"serve incarnation {e.incarnation} exited {e.returncode} ({e.cause}); its last output:\n"
                       + "\n".join(e.tail.strip().splitlines()[-12:])[-2500:])
    return bad


def start_flow(inst: Instance, workload: Workload, supervisor: Supervisor, via: str = "inprocess",
               chunk: int = 100, pause_s: float = 0.2) -> tuple[dict[str, int], Publishing]:
    """Submissions applied, then the rest of the scripts published in the background, slowly."""
    supervisor.start()
    first = workload.submissions()
    bus = bus_for(inst, via)
    try:
        publish_all(bus, first, 500)
    finally:
        bus.close()
    workload.published += len(first)
    assert wait_until("the submissions", lambda: int(inst.scalar("SELECT count(*) FROM job")) >= len(workload.scripts),
                      lambda: progress_of(inst), 180, 60), "the submissions were not applied before the fault"
    ids = job_ids(inst, workload)
    rest = workload.rest(ids)
    workload.published += len(rest)
    publishing = Publishing(bus_for(inst, via), rest, chunk=chunk, pause_s=pause_s)
    publishing.start()
    return ids, publishing


def finish(inst: Instance, workload: Workload, ids: dict[str, int], supervisor: Supervisor,
           publishing: Publishing, deliveries: Callable[[], list[Delivered]], what: str) -> tuple[Tally, list[Exit]]:
    """Wait for everything, stop serve, check; returns the tally and serve's own exits (printed)."""
    publishing.join(timeout=600)
    assert publishing.error is None, f"the publisher gave up: {publishing.error!r}"
    done = done_predicate(inst, workload, expected_mail_count(inst, workload, ids))
    complete = wait_until("every event and mail", done, lambda: progress_of(inst), 300, 60)
    supervisor.stop()
    tally = check(inst, workload, ids, deliveries(), smtp="RETRACER__MAIL__URL" in inst.env)
    tally.complete = complete
    exits = supervisor.crashes()
    print(f"\n[{what}] {tally.line()}\n  serve exits during the outage: {len(exits)}"
          + "".join(f"\n    #{e.incarnation} exit {e.returncode}: {error_line(e.tail)[:300]}" for e in exits[:5])
          + (f"\n  publisher retries: {len(publishing.failures)}, e.g. {publishing.failures[0][:300]}"
             if publishing.failures else ""))
    return tally, exits


@pytest.fixture
def restartable_postgresql() -> Iterator[list[str]]:
    """pg_ctlcluster for the local cluster; PostgreSQL is started again after the test whatever happens."""
    cluster = pg_cluster()
    try:
        yield cluster
    finally:
        if not pg_answers():
            subprocess.run([*cluster, "start"], capture_output=True, timeout=120)
        for _ in range(60):
            if pg_answers():
                break
            time.sleep(1)
        _drop_dead_connections()


def _drop_dead_connections() -> None:
    """After a restart every pooled connection of this process is dead, including those of session fixtures
    (the test database's admin engine would fail its DROP DATABASE): empty every engine's pool."""
    import gc

    from sqlalchemy.engine import Engine

    for obj in gc.get_objects():
        if isinstance(obj, Engine) and obj.dialect.name == "postgresql":
            obj.dispose()


@pytest.mark.usefixtures("pg_database")
def test_postgresql_restart_mid_stream(scaled: Instance, smtp_server: CaptureServer,
                                       restartable_postgresql: list[str]) -> None:
    """PostgreSQL restarted while events and mails flow: serve survives or exits clearly, nothing is lost."""
    inst = scaled
    configure(inst, mail_url=smtp_server.url)
    workload = Workload.build(2 * JOBS, seed=21)
    supervisor = Supervisor(inst, "scaled", restart_delay_s=2.0)
    try:
        # All at once, so that serve has a backlog to apply while the database restarts.
        ids, publishing = start_flow(inst, workload, supervisor, chunk=1000, pause_s=0)
        total = workload.distinct_events()
        assert wait_until("a third of the events", lambda: progress_of(inst)[0] > total // 3,
                          lambda: progress_of(inst), 120, 60)
        subprocess.run([*restartable_postgresql, "restart"], check=True, capture_output=True, timeout=120)
        assert wait_until("PostgreSQL", pg_answers, lambda: 0, 60, 60)
        tally, exits = finish(inst, workload, ids, supervisor, publishing, lambda: _captured(smtp_server),
                              "PostgreSQL restart")
    finally:
        supervisor.stop()
    tally.crashes = []  # judged below: an exit with a clear message is allowed
    # Mails accepted by the server whose "sent" marks failed in the outage are sent again (same Message-ID): at
    # most one commit's worth of marks.
    problems = tally.problems(allow_smtp_resends=MARK_BATCH) + unclear(
        exits, re.compile(r"database|PostgreSQL|postgres|5432", re.IGNORECASE))
    assert not problems, "\n".join(p[:3000] for p in problems)


@pytest.mark.usefixtures("pg_database")
def test_smtp_server_down_for_a_minute(scaled: Instance, smtp_server: CaptureServer) -> None:
    """The SMTP server is down for 60 s mid-stream: mails wait with a clear error, then all arrive once."""
    inst = scaled
    configure(inst, mail_url=smtp_server.url)
    workload = Workload.build(JOBS, seed=22)
    supervisor = Supervisor(inst, "scaled", restart_delay_s=2.0)
    try:
        ids, publishing = start_flow(inst, workload, supervisor)
        assert wait_until("the first mails", lambda: len(smtp_server.messages) >= 50, lambda: progress_of(inst),
                          120, 60)
        smtp_server.stop()
        down = time.monotonic()
        assert wait_until("mails failing", lambda: int(inst.scalar(
            "SELECT count(*) FROM mail WHERE status = 'failing'")) > 0, lambda: 0, 30, 30)
        failing = inst.json("mail", "list", "--status", "failing")
        time.sleep(max(0.0, 60 - (time.monotonic() - down)))
        assert not supervisor.crashes(), f"serve exited while the SMTP server was down: {supervisor.crashes()}"
        smtp_server.start()
        tally, _ = finish(inst, workload, ids, supervisor, publishing, lambda: _captured(smtp_server),
                          "SMTP down 60 s")
    finally:
        supervisor.stop()
    errors = {m["last_error"] for m in failing}
    print(f"  last_error while down: {sorted(errors)[:3]}")
    assert all(f"cannot connect to {smtp_server.url}" in e or "not attempted: cannot connect" in e
               for e in errors), errors
    # Mails the server had accepted when it went away, but whose answer never arrived, are sent again with
    # the same Message-ID: at most one per pooled connection (pool_size 4).
    problems = tally.problems(allow_smtp_resends=4)
    assert not problems, "\n".join(p[:3000] for p in problems)


# -- the embedded database's disk goes read-only ----------------------------------------------------------


@pytest.fixture
def ext4_disk(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A loop-mounted ext4 file system mounted with errors=remount-ro: (mount point, image).

    Making it read-only under open files is what happens to a real disk: ext4 turns read-only after an error
    (here triggered through /sys/fs/ext4/<dev>/trigger_fs_error), and the processes' next writes get EROFS.
    A tmpfs cannot be remounted read-only while a file is open for writing (EBUSY), and chmod does not stop
    root, so this is what works here.
    """
    image, mount = tmp_path / "disk.img", tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(f"truncate -s 256M {image} && mkfs.ext4 -q -F {image} && "  # noqa: S602  (paths we made)
                          f"mount -o loop,errors=remount-ro {image} {mount}", shell=True, capture_output=True,
                          text=True)
    if made.returncode != 0:
        (pytest.fail if IN_CI else pytest.skip)(f"cannot loop-mount an ext4 image here: {made.stderr.strip()}")
    try:
        yield mount, image
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def make_read_only(mount: Path) -> None:
    """What a disk error does to ext4 with errors=remount-ro: from now on every write gets EROFS."""
    device = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(mount)], capture_output=True, text=True,
                            check=True).stdout.strip()
    subprocess.run(["sync"], check=True)
    Path(f"/sys/fs/ext4/{Path(device).name}/trigger_fs_error").write_text("retracer fault test: disk error\n")


def repair(mount: Path, image: Path) -> None:
    """What an admin does: unmount, fsck, mount again (an aborted ext4 journal cannot be remounted rw)."""
    umount = subprocess.run(["umount", str(mount)], capture_output=True, text=True, timeout=60)
    assert umount.returncode == 0, f"umount: {umount.stderr} (open: {_open_files(mount)})"
    fsck = subprocess.run(["e2fsck", "-fy", str(image)], capture_output=True, text=True, timeout=120)
    assert fsck.returncode in (0, 1), f"e2fsck: {fsck.stdout}\n{fsck.stderr}"
    subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(image), str(mount)], check=True,
                   capture_output=True, timeout=60)


def _open_files(mount: Path) -> list[str]:
    found = []
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(mount)):
            found.append(f"{fd}: {target}")
    return found


def test_embedded_disk_read_only(ext4_disk: tuple[Path, Path], sqlite_template: Path, tmp_path: Path) -> None:
    """The embedded database's disk turns read-only mid-stream: serve survives or exits clearly, and after
    the repair nothing is lost and no mail is duplicated."""
    mount, image = ext4_disk
    data = mount / "data"
    data.mkdir()
    shutil.copyfile(sqlite_template, data / "retracer.db")
    inst = Instance(data, f"sqlite:///{data / 'retracer.db'}")
    configure(inst)
    workload = Workload.build(2 * JOBS, seed=23)
    supervisor = Supervisor(inst, "embedded", restart_delay_s=2.0, log_dir=tmp_path / "logs")
    publish_errors: list[str] = []
    try:
        # All at once, so that serve has a backlog to apply when the disk turns read-only.
        ids, publishing = start_flow(inst, workload, supervisor, chunk=1000, pause_s=0)
        total = workload.distinct_events()
        assert wait_until("a third of the events", lambda: progress_of(inst)[0] > total // 3,
                          lambda: progress_of(inst), 120, 60)
        make_read_only(mount)
        time.sleep(10)  # serve meets the read-only disk, and so do the publisher and the mail sender
        during = list(supervisor.crashes())
        alive = supervisor.current is not None and supervisor.current.poll() is None
        bad = inst.run("publish", "-", input=_one_event(workload, ids), check=False)
        publish_errors.append(f"exit {bad.returncode}: {(bad.stderr or bad.stdout).strip()}")
        with publishing.paused():
            supervisor.hold()
            publishing.bus.close()  # the in-process publisher's database connections, so it can unmount
            inst.engine.dispose()
            repair(mount, image)
            supervisor.resume()
        tally, exits = finish(inst, workload, ids, supervisor, publishing,
                              lambda: read_mbox(data / "mail" / "outbox.mbox"), "embedded disk read-only")
    finally:
        supervisor.stop()
        inst.close()
    print(f"  serve while read-only: {'running' if alive else 'not running'}, exits {len(during)}; "
          f"`retracer publish` on the read-only disk: {publish_errors[0][-400:]}")
    tally.crashes = []
    problems = tally.problems() + unclear(exits, re.compile(r"read-only|readonly|disk", re.IGNORECASE))
    if bad.returncode == 0 or "Traceback" in publish_errors[0]:
        problems.append(f"`retracer publish` on a read-only database does not say so clearly: "
                        f"{publish_errors[0][-1500:]}")
    assert not problems, "\n".join(p[:3000] for p in problems)


def _one_event(workload: Workload, ids: dict[str, int]) -> str:
    import json

    s = workload.scripts[0]
    return json.dumps(workload.script_events(s, ids[s.crash_id])[0] | {"id": f"{workload.tag}:probe"}) + "\n"


def _captured(server: CaptureServer) -> list[Delivered]:
    with server._lock:
        return delivered_from(list(server.messages))


@pytest.mark.usefixtures("pg_database")
def test_batch_failed_in_an_outage_is_delivered_again(scaled: Instance) -> None:
    """A batch whose apply raises (the database went away) is delivered again, even if a later batch succeeds."""
    import json

    from sqlalchemy.exc import OperationalError

    from retracer import config as cfg
    from retracer.bus.amqp import BatchConsumer, Publisher

    config = cfg.load(environ={**scaled.env, "RETRACER__SERVICE__BATCH_SIZE": "50"})
    publisher = Publisher(config)
    sent = [f"outage-{i}" for i in range(120)]
    for n in sent:
        publisher.publish("retrace.heartbeat", json.dumps({"n": n}), n)
    publisher.close()
    applied: list[str] = []
    failures: list[str] = []

    def handle(bodies: Sequence[bytes], fresh: bool) -> list[bool]:
        if not failures:
            failures.append("first batch")
            raise OperationalError("COMMIT", {}, ConnectionRefusedError("connection to server failed"))
        applied.extend(json.loads(b)["n"] for b in bodies)
        return [True] * len(bodies)

    def consume() -> BaseException | None:
        consumer = BatchConsumer(config, handle, idle=lambda: None)
        last = [time.monotonic(), len(applied)]

        def idle() -> None:
            if len(applied) != last[1]:
                last[:] = [time.monotonic(), len(applied)]
            elif time.monotonic() - last[0] > 3:
                consumer.stop()

        consumer.idle = idle
        try:
            consumer.run_until_stopped()
        except Exception as exc:  # serve would exit here; the supervisor restarts it
            return exc
        return None

    crashed = consume()
    after_first = list(applied)
    consume()  # "serve restarted": whatever was not acked comes back now
    missing = sorted(set(sent) - set(applied), key=lambda n: int(n.split("-")[1]))
    print(f"\n[failed batch] first consumer: {crashed!r}; applied before the restart {len(after_first)}, "
          f"after {len(set(applied))} of {len(sent)}; never delivered again: {len(missing)}")
    assert not missing, (f"{len(missing)} events of the batch that failed were acked without being applied "
                         f"(lost): {missing[:5]}...")
