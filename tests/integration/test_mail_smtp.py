"""Mail delivery against a real SMTP server (aiosmtpd in this process), on SQLite and PostgreSQL."""

from __future__ import annotations

import mailbox
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from retracer import store
from retracer.apply.applier import Applier
from retracer.cli import cli
from retracer.config import Config
from retracer.mail.render import DIGEST
from retracer.mail.sender import Sender, backoff, deliver_pending
from retracer.store.models import Mail, utcnow
from retracer.testing.factories import event, submit
from retracer.testing.smtp import CaptureServer

from ..conftest import make_config

ADMINS = ["celso@example.com", "foo.bar@example.com"]
CREATOR = "mark@example.com"


@pytest.fixture
def smtp() -> Iterator[CaptureServer]:
    with CaptureServer(idle_timeout=300) as server:
        yield server


class Instance:
    """A database, a configuration pointing at the test SMTP server, and helpers to make mail."""

    def __init__(self, tmp_path: Path, db_url: str, **settings: str) -> None:
        env = {"RETRACER__MAIL__BACKOFF_S": "0", "RETRACER__MAIL__TIMEOUT_S": "5", **settings}
        self.env = {"RETRACER__SERVICE__DATA_DIR": str(tmp_path / "data"), "RETRACER__DATABASE__URL": db_url,
                    "RETRACER__MAIL__ADMINS": ",".join(ADMINS), **env}
        self.config: Config = make_config(tmp_path / "data", db_url, **env)
        self.engine = store.make_engine(db_url)
        self.factory: sessionmaker[Session] = store.session_factory(self.engine)
        self.applier = Applier(self.config)

    def failed_upload(self, **crash: Any) -> tuple[int, list[dict[str, Any]]]:
        """A job that fails to upload; returns its id and the events that did it (to replay them)."""
        with self.factory() as s, s.begin():
            job = submit(self.applier, s, **crash)
            events = [event("retrace.started", job, worker="bob"),
                      event("upload.failed", job, leaf=f"upload-{job}", upload_log="ANY OUTPUT")]
            self.applier.apply_batch(s, events)
        return job, events

    def apply(self, events: list[dict[str, Any]]) -> list[str]:
        with self.factory() as s, s.begin():
            return [o.status for o in self.applier.apply_batch(s, events)]

    def mails(self, **where: Any) -> list[Mail]:
        with self.factory() as s:
            return list(s.scalars(select(Mail).filter_by(**where).order_by(Mail.id)))

    def sender(self, clock: Callable[[], datetime] = utcnow) -> Sender:
        return Sender(self.factory, self.config, clock=clock)

    def close(self) -> None:
        self.engine.dispose()


@pytest.fixture
def make_instance(tmp_path: Path, db_url: str) -> Iterator[Callable[..., Instance]]:
    made: list[Instance] = []

    def make(**settings: str) -> Instance:
        inst = Instance(tmp_path, db_url, **settings)
        made.append(inst)
        return inst

    yield make
    for inst in made:
        inst.close()


@pytest.fixture
def inst(make_instance: Callable[..., Instance], smtp: CaptureServer) -> Instance:
    return make_instance(RETRACER__MAIL__URL=smtp.url)


def received_to(messages: list[Any]) -> list[str]:
    return sorted(str(m["To"]) for m in messages)


class TestDelivery:
    def test_two_admins_and_the_creator_get_one_mail_each(self, inst: Instance, smtp: CaptureServer) -> None:
        """Given a job that failed to upload, when the outbox is flushed, then three people get one mail each."""
        job, _ = inst.failed_upload()
        report = deliver_pending(inst.factory, inst.config)
        assert (report.sent, report.failed) == (3, 0)
        messages = smtp.pop()
        assert received_to(messages) == sorted([*ADMINS, CREATOR])
        rows = inst.mails()
        assert [r.status for r in rows] == ["sent"] * 3
        assert {r.message_id for r in rows} == {m["Message-ID"] for m in messages}
        assert all(m["X-Retracer-Job"] == str(job) and m["X-Retracer-Job-State"] == "FAILEDTOUPLOAD"
                   for m in messages)
        rationale = {str(m["To"]): m["X-Retracer-Rationale"] for m in messages}
        assert rationale == {ADMINS[0]: "Admin", ADMINS[1]: "Admin", CREATOR: "Creator"}

    def test_each_envelope_goes_to_its_own_recipient_only(self, inst: Instance, smtp: CaptureServer) -> None:
        """The SMTP envelope names only the mail's recipient, nobody else."""
        inst.failed_upload()
        deliver_pending(inst.factory, inst.config)
        assert sorted(tuple(rcpts) for _, rcpts in smtp.envelopes) == [(a,) for a in sorted([*ADMINS, CREATOR])]
        assert {sender for sender, _ in smtp.envelopes} == {inst.config["mail"]["sender"]}

    def test_replaying_the_same_events_sends_nothing_new(self, inst: Instance, smtp: CaptureServer) -> None:
        """At-least-once delivery of events: the replayed batch is a duplicate and mails nobody again."""
        _, events = inst.failed_upload()
        deliver_pending(inst.factory, inst.config)
        smtp.pop()
        assert inst.apply(events) == ["duplicate", "duplicate"]
        report = deliver_pending(inst.factory, inst.config)
        assert report.sent == 0
        assert smtp.pop() == []
        assert len(inst.mails()) == 3

    def test_an_admin_who_is_also_the_creator_gets_one_mail(self, inst: Instance, smtp: CaptureServer) -> None:
        """Recipients are deduplicated: Celso created the crash and is an admin; one mail, as the admin."""
        inst.failed_upload(creator=ADMINS[0])
        deliver_pending(inst.factory, inst.config)
        messages = smtp.pop()
        assert received_to(messages) == sorted(ADMINS)
        celso = next(m for m in messages if m["To"] == ADMINS[0])
        assert celso["X-Retracer-Rationale"] == "Admin"
        assert celso["X-Creator-Recipient"] == ADMINS[0]

    def test_injection_in_a_package_name_adds_no_header(self, inst: Instance, smtp: CaptureServer) -> None:
        """The issue's case end to end: a package name carrying an encoded newline and a Bcc adds nothing."""
        inst.failed_upload(package="A =?UTF-8?Q?=0A?=Bcc: x@example.com")
        deliver_pending(inst.factory, inst.config)
        messages = smtp.pop()
        assert len(messages) == 3
        assert all(m["Bcc"] is None for m in messages)
        assert "x@example.com" not in {r for _, rcpts in smtp.envelopes for r in rcpts}

    def test_non_ascii_values_arrive_intact_over_8bitmime(self, inst: Instance, smtp: CaptureServer) -> None:
        """The sender's bytes carry 8-bit text as the email package would (BODY=8BITMIME): it reads back."""
        inst.failed_upload(package="paquet-été", release="ünïcode " * 12)
        report = deliver_pending(inst.factory, inst.config)
        assert (report.sent, report.failed) == (3, 0)
        for message in smtp.pop():
            assert "paquet-été" in str(message["Subject"])
            part = message.get_body(("plain",))
            assert part is not None and " * Package: paquet-été" in part.get_content()

    def test_a_mail_that_cannot_be_rendered_fails_for_good(self, inst: Instance, smtp: CaptureServer) -> None:
        """A snapshot without its upload log is refused with the reason, kept as failed, never retried."""
        inst.failed_upload()
        with inst.factory() as s, s.begin():
            broken = s.scalars(select(Mail).where(Mail.recipient == CREATOR)).one()
            broken.context = {**broken.context, "upload_log": None}
        report = deliver_pending(inst.factory, inst.config)
        assert (report.sent, report.failed) == (2, 1)
        (failed,) = inst.mails(status="failed")
        assert failed.recipient == CREATOR
        assert "An upload log is required for FAILEDTOUPLOAD notifications" in (failed.last_error or "")
        assert deliver_pending(inst.factory, inst.config).failed == 0
        assert received_to(smtp.pop()) == sorted(ADMINS)

    def test_a_refused_recipient_fails_for_good_and_the_others_are_sent(
            self, make_instance: Callable[..., Instance]) -> None:
        """A 550 for one address is permanent: that mail is failed with the server's answer, never retried."""
        with CaptureServer(refuse=[CREATOR]) as server:
            inst = make_instance(RETRACER__MAIL__URL=server.url)
            inst.failed_upload()
            report = deliver_pending(inst.factory, inst.config)
            assert (report.sent, report.failed) == (2, 1)
            (refused,) = inst.mails(recipient=CREATOR)
            assert refused.status == "failed" and "550" in (refused.last_error or "")
            assert deliver_pending(inst.factory, inst.config).failed == 0
            assert inst.mails(recipient=CREATOR)[0].attempts == 1


class TestConnections:
    def test_the_pool_reuses_its_connections(self, make_instance: Callable[..., Instance],
                                             smtp: CaptureServer) -> None:
        """Fifteen mails over a pool of two take two SMTP sessions, and the next run reuses them."""
        inst = make_instance(RETRACER__MAIL__URL=smtp.url, RETRACER__MAIL__POOL_SIZE="2")
        for _ in range(5):
            inst.failed_upload()
        with inst.sender() as sender:
            assert sender.deliver_pending().sent == 15
            inst.failed_upload()
            assert sender.deliver_pending().sent == 3
        assert len(smtp.pop()) == 18
        assert smtp.sessions == 2

    def test_a_connection_the_server_dropped_while_idle_is_reopened(
            self, make_instance: Callable[..., Instance]) -> None:
        """Servers close idle connections; the next send reconnects and retries, and nothing fails."""
        with CaptureServer(idle_timeout=0.3) as server:
            inst = make_instance(RETRACER__MAIL__URL=server.url)
            with inst.sender() as sender:
                inst.failed_upload()
                assert sender.deliver_pending().sent == 3
                time.sleep(0.8)  # the server has hung up on every pooled connection by now
                inst.failed_upload()
                report = sender.deliver_pending()
            assert (report.sent, report.failed) == (3, 0)
            assert len(server.pop()) == 6
            assert all(m.attempts == 0 for m in inst.mails())

    def test_a_connection_dropped_under_the_client_is_retried_once(self, inst: Instance,
                                                                    smtp: CaptureServer) -> None:
        """A pooled connection that the server has closed fails mid-send; the mail goes on a new one."""
        with inst.sender() as sender:
            inst.failed_upload()
            assert sender.deliver_pending().sent == 3
            smtp.drop_connections()
            inst.failed_upload()
            report = sender.deliver_pending()
        assert (report.sent, report.failed) == (3, 0)
        assert len(smtp.pop()) == 6
        assert smtp.sessions == 6

    def test_server_down_for_a_while_then_back_every_mail_arrives_once(self, inst: Instance,
                                                                       smtp: CaptureServer) -> None:
        """Given an outage, mails fail with the reason and are retried; once the server is back each arrives once."""
        with inst.sender() as sender:
            inst.failed_upload()
            assert sender.deliver_pending().sent == 3
            smtp.stop()
            inst.failed_upload()
            for attempt in (1, 2):
                report = sender.deliver_pending()
                assert (report.sent, report.failed) == (0, 3)
                failing = inst.mails(status="failing")
                assert len(failing) == 3 and all(m.attempts == attempt for m in failing)
                assert all("cannot connect to smtp://127.0.0.1" in (m.last_error or "") for m in failing)
            smtp.start()
            assert sender.deliver_pending().sent == 3
            assert sender.deliver_pending().sent == 0
        ids = Counter(str(m["Message-ID"]) for m in smtp.pop())
        assert len(ids) == 6 and set(ids.values()) == {1}
        assert [m.status for m in inst.mails()] == ["sent"] * 6

    def test_a_failing_mail_waits_for_its_backoff(self, make_instance: Callable[..., Instance],
                                                  smtp: CaptureServer) -> None:
        """Retries back off exponentially from backoff_s, capped at max_backoff_s."""
        inst = make_instance(RETRACER__MAIL__URL=smtp.url, RETRACER__MAIL__BACKOFF_S="10",
                             RETRACER__MAIL__MAX_BACKOFF_S="15")
        assert [backoff(inst.config, n).total_seconds() for n in (1, 2, 3)] == [10, 15, 15]
        now = [utcnow()]
        with inst.sender(clock=lambda: now[0]) as sender:
            smtp.stop()
            inst.failed_upload()
            assert sender.deliver_pending().failed == 3
            assert all(m.next_attempt_at == now[0] + timedelta(seconds=10) for m in inst.mails())
            smtp.start()
            assert sender.deliver_pending().sent == 0  # not due yet
            now[0] += timedelta(seconds=11)
            assert sender.deliver_pending().sent == 3
        assert len(smtp.pop()) == 3

    def test_two_senders_at_once_never_send_a_mail_twice(self, inst: Instance, smtp: CaptureServer) -> None:
        """Several processes may flush together: each mail is claimed by one of them."""
        for _ in range(10):
            inst.failed_upload()
        errors: list[BaseException] = []

        def flush() -> None:
            try:
                with inst.sender() as sender:
                    while sender.deliver_pending(limit=4).sent:
                        pass
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=flush) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert errors == []
        ids = Counter(str(m["Message-ID"]) for m in smtp.pop())
        assert len(ids) == 30 and set(ids.values()) == {1}


class TestFloodControl:
    def test_the_surplus_becomes_one_digest(self, make_instance: Callable[..., Instance],
                                            smtp: CaptureServer) -> None:
        """Five failures, at most three mails each per window: two mails and a digest listing three jobs."""
        inst = make_instance(RETRACER__MAIL__URL=smtp.url, RETRACER__MAIL__FLOOD_THRESHOLD="3",
                             RETRACER__MAIL__FLOOD_WINDOW_S="3600")
        jobs = [inst.failed_upload()[0] for _ in range(5)]
        report = deliver_pending(inst.factory, inst.config)
        assert (report.sent, report.digests, report.digested) == (9, 3, 9)
        messages = smtp.pop()
        assert Counter(str(m["To"]) for m in messages) == {ADMINS[0]: 3, ADMINS[1]: 3, CREATOR: 3}
        digests = [m for m in messages if m["X-Retracer-Digest"]]
        assert len(digests) == 3
        for digest in digests:
            assert digest["Subject"] == f"[Retrace digest] 3 notifications: jobs {jobs[2]}, {jobs[3]}, {jobs[4]}"
            part = digest.get_body(("plain",))
            assert part is not None
            body = part.get_content()
            assert all(f" * Job {j}: " in body for j in jobs[2:])
        rows = {m.id: m for m in inst.mails()}
        digest_rows = [m for m in rows.values() if m.state == DIGEST]
        assert len(digest_rows) == 3 and all(m.status == "sent" and m.job_id is None for m in digest_rows)
        folded = [m for m in rows.values() if m.status == "digested"]
        assert len(folded) == 9
        assert all(rows[m.digest_of or 0].recipient == m.recipient for m in folded)

    def test_a_full_window_holds_mails_until_it_has_room(self, make_instance: Callable[..., Instance],
                                                         smtp: CaptureServer) -> None:
        """With the window full, new mails wait (not failing) and go out once the oldest ages out."""
        inst = make_instance(RETRACER__MAIL__URL=smtp.url, RETRACER__MAIL__FLOOD_THRESHOLD="2",
                             RETRACER__MAIL__FLOOD_WINDOW_S="600")
        now = [utcnow()]
        with inst.sender(clock=lambda: now[0]) as sender:
            inst.failed_upload()
            inst.failed_upload()
            assert sender.deliver_pending().sent == 6
            inst.failed_upload()
            report = sender.deliver_pending()
            assert (report.sent, report.deferred, report.failed) == (0, 3, 0)
            waiting = inst.mails(status="pending")
            assert len(waiting) == 3
            assert all(m.next_attempt_at and m.next_attempt_at > now[0] + timedelta(seconds=590)
                       for m in waiting)
            now[0] += timedelta(seconds=601)
            assert sender.deliver_pending().sent == 3
        assert len(smtp.pop()) == 9


class TestMbox:
    def test_without_a_url_mails_go_to_a_readable_mbox_once(self, make_instance: Callable[..., Instance]) -> None:
        """The embedded default writes an mbox; a second flush, even after a lost mark, adds nothing."""
        inst = make_instance()
        inst.failed_upload()
        report = deliver_pending(inst.factory, inst.config)
        assert report.sent == 3 and report.destination == f"mbox file {inst.config.mailbox_path}"

        def read() -> list[Any]:
            box = mailbox.mbox(str(inst.config.mailbox_path), create=False)
            try:
                return list(box)
            finally:
                box.close()

        first = read()
        assert received_to(first) == sorted([*ADMINS, CREATOR])
        assert all(m["X-Retracer-Job-State"] == "FAILEDTOUPLOAD" for m in first)
        assert deliver_pending(inst.factory, inst.config).sent == 0
        # A process killed after appending but before marking: the rows are pending again.
        with inst.factory() as s, s.begin():
            s.execute(update(Mail).values(status="pending", sent_at=None))
        assert deliver_pending(inst.factory, inst.config).sent == 3
        again = read()
        assert len(again) == 3
        assert [m["Message-ID"] for m in again] == [m["Message-ID"] for m in first]
        assert [m.status for m in inst.mails()] == ["sent"] * 3


class TestCommands:
    def test_flush_and_list_while_the_server_is_down(self, inst: Instance, smtp: CaptureServer) -> None:
        """`mail flush` exits 1 and says so; `mail list` shows the failing mails with their last error."""
        smtp.stop()
        inst.failed_upload()
        runner = CliRunner()
        result = runner.invoke(cli, ["mail", "flush"], env=inst.env)
        assert result.exit_code == 1
        assert "sent 0 mails" in result.output and "3 failed" in result.output
        listed = runner.invoke(cli, ["mail", "list", "--status", "failing"], env=inst.env)
        assert listed.exit_code == 0
        assert listed.output.count("cannot connect to smtp://127.0.0.1") == 3
        smtp.start()
        flushed = runner.invoke(cli, ["mail", "flush", "--json"], env=inst.env)
        assert flushed.exit_code == 0, flushed.output
        assert '"sent": 3' in flushed.output
        assert runner.invoke(cli, ["mail", "list", "--status", "failing"], env=inst.env).output.strip() == \
            "no mails with status failing"
