"""Stale mails: a mail whose job has left the state it announces is never sent, nor folded into a digest.

The issue: FAILEDTOUPLOAD mails still in the outbox when the job is rescued went out after the rescue,
asking people to rescue a job that was already FULLYBUILT. Each test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from retracer import store
from retracer.apply.applier import Applier
from retracer.cli import cli
from retracer.config import Config
from retracer.mail.render import DIGEST
from retracer.mail.sender import Sender
from retracer.mail.transports import Done, Outgoing, Source
from retracer.store.models import Mail
from retracer.testing.factories import event, submit
from retracer.testing.smtp import CaptureServer
from retracer.workflow import load_spec

from ..conftest import make_config

SPEC = load_spec()
ROLES = SPEC.roles
ADMINS = ["celso@example.com", "foo.bar@example.com"]
CREATOR = "mark@example.com"
#: The admin trigger that sends a job whose upload failed back to the queue (an admin's retry).
RETRY = next(t.trigger for t in SPEC.transitions
             if t.admin and ROLES.rescuable in t.source and t.dest == ROLES.queue)


class Recording:
    """A transport that accepts every mail and keeps it: what would have reached people."""

    description = "recording"

    def __init__(self) -> None:
        self.sent: list[Outgoing] = []

    async def send_all(self, source: Source, done: Done, size: int) -> None:
        while (item := await source()) is not None:
            self.sent.append(item)
            await done(item, None)

    async def aclose(self) -> None:
        return None


def failed_upload(applier: Applier, factory: sessionmaker[Session]) -> int:
    with factory() as s, s.begin():
        job = submit(applier, s)
        applier.apply_batch(s, [event("retrace.started", job, worker="bob"),
                                event("upload.failed", job, leaf=f"upload-{job}", upload_log="ANY OUTPUT")])
    return job


def fire(applier: Applier, factory: sessionmaker[Session], job: int, trigger: str, **data: Any) -> None:
    with factory() as s, s.begin():
        applier.fire(s, job, trigger, by="admin:test", reason="test", data=data)


def rows(factory: sessionmaker[Session]) -> list[Mail]:
    with factory() as s:
        return list(s.scalars(select(Mail).order_by(Mail.id)))


def about(sent: list[Outgoing], factory: sessionmaker[Session]) -> list[tuple[int | None, str, str]]:
    """(job, state, recipient) of each mail sent, read from its row."""
    by_id = {m.id: m for m in rows(factory)}
    return sorted(((by_id[o.mail_id].job_id, by_id[o.mail_id].state, o.recipient) for o in sent),
                  key=lambda t: (t[0] or 0, t[1], t[2]))


class TestStale:
    def test_mails_for_a_state_the_job_has_left_are_not_sent(self, config: Config,
                                                              factory: sessionmaker[Session]) -> None:
        """Failed to upload, rescued before the flush: only the creator's FULLYBUILT mail goes out; the three
        FAILEDTOUPLOAD mails are stale, say the job's state now, and are never tried again."""
        applier = Applier(config)
        job = failed_upload(applier, factory)
        fire(applier, factory, job, ROLES.rescue)
        transport = Recording()
        with Sender(factory, config, transport=transport) as sender:
            report = sender.deliver_pending()
            again = sender.deliver_pending()
        assert about(transport.sent, factory) == [(job, ROLES.success, CREATOR)]
        assert (report.sent, report.stale, report.failed, again.sent) == (1, 3, 0, 0)
        stale = [m for m in rows(factory) if m.status == "stale"]
        assert sorted(m.recipient for m in stale) == sorted([*ADMINS, CREATOR])
        assert all(m.state == ROLES.rescuable and m.message_id is None and m.attempts == 0 for m in stale)
        assert all(f"job {job} is {ROLES.success} now" in (m.last_error or "") for m in stale)

    def test_a_failing_mail_that_went_stale_is_not_retried(self, config: Config,
                                                           factory: sessionmaker[Session]) -> None:
        """A mail waiting for its retry when the job moves on is dropped at its next attempt."""
        applier = Applier(config)
        job = failed_upload(applier, factory)
        with factory() as s, s.begin():
            for mail in s.scalars(select(Mail)):
                mail.status, mail.attempts, mail.last_error = "failing", 1, "server down"
        fire(applier, factory, job, RETRY)
        transport = Recording()
        with Sender(factory, config, transport=transport) as sender:
            report = sender.deliver_pending()
        assert transport.sent == []
        assert [m.status for m in rows(factory)] == ["stale"] * 3
        assert report.stale == 3

    def test_a_job_that_left_and_came_back_gets_only_the_newer_mails(self, config: Config,
                                                                     factory: sessionmaker[Session]) -> None:
        """Retried and failed to upload again: it is FAILEDTOUPLOAD again, but the first mails carry the old
        upload log; only the mails of the second failure are sent."""
        applier = Applier(config)
        job = failed_upload(applier, factory)
        fire(applier, factory, job, RETRY)
        with factory() as s, s.begin():
            applier.apply_batch(s, [event("retrace.started", job, worker="bob"),
                                    event("upload.failed", job, leaf=f"again-{job}", upload_log="NEW LOG")])
        transport = Recording()
        with Sender(factory, config, transport=transport) as sender:
            report = sender.deliver_pending()
        newest = max(m.history_id or 0 for m in rows(factory))
        by_id = {m.id: m for m in rows(factory)}
        assert [by_id[o.mail_id].history_id for o in transport.sent] == [newest] * 3
        assert (report.sent, report.stale) == (3, 3)

    def test_a_stale_mail_is_not_folded_into_a_digest(self, tmp_path: Path, db_url: str) -> None:
        """Flood control counts and lists only live mails: four jobs fail, the first is rescued; each admin
        gets one mail and a digest of the last two, and nobody is told the rescued job failed to upload."""
        config = make_config(tmp_path / "data", db_url, RETRACER__MAIL__FLOOD_THRESHOLD="2",
                             RETRACER__MAIL__FLOOD_WINDOW_S="3600")
        engine = store.make_engine(db_url)
        factory = store.session_factory(engine)
        try:
            applier = Applier(config)
            jobs = [failed_upload(applier, factory) for _ in range(4)]
            fire(applier, factory, jobs[0], ROLES.rescue)
            transport = Recording()
            with Sender(factory, config, transport=transport) as sender:
                sender.deliver_pending()
            sent = about(transport.sent, factory)
            assert not [m for m in sent if m[0] == jobs[0] and m[1] == ROLES.rescuable]
            digests = [m for m in rows(factory) if m.state == DIGEST]
            assert len(digests) == 3
            for digest in digests:
                listed = [(item["job"], item["state"]) for item in digest.context["items"]]
                assert (jobs[0], ROLES.rescuable) not in listed
            admin_digests = [d for d in digests if d.recipient in ADMINS]
            assert all([item["job"] for item in d.context["items"]] == jobs[2:] for d in admin_digests)
            assert not any(m.status == "digested" and m.job_id == jobs[0] and m.state == ROLES.rescuable
                           for m in rows(factory))
        finally:
            engine.dispose()


# -- against the real SMTP server --------------------------------------------------------------------------


@pytest.fixture
def smtp() -> Iterator[CaptureServer]:
    with CaptureServer(idle_timeout=300) as server:
        yield server


@pytest.fixture
def smtp_env(tmp_path: Path, db_url: str, smtp: CaptureServer) -> Iterator[Callable[..., tuple[
        dict[str, str], Config, sessionmaker[Session]]]]:
    engines = []

    def make(**settings: str) -> tuple[dict[str, str], Config, sessionmaker[Session]]:
        env = {"RETRACER__SERVICE__DATA_DIR": str(tmp_path / "data"), "RETRACER__DATABASE__URL": db_url,
               "RETRACER__MAIL__ADMINS": ",".join(ADMINS), "RETRACER__MAIL__URL": smtp.url,
               "RETRACER__MAIL__BACKOFF_S": "0", "RETRACER__MAIL__TIMEOUT_S": "5", **settings}
        config = make_config(tmp_path / "data", db_url, **{k: v for k, v in env.items()
                                                           if k != "RETRACER__SERVICE__DATA_DIR"})
        engine = store.make_engine(db_url)
        engines.append(engine)
        return env, config, store.session_factory(engine)

    yield make
    for engine in engines:
        engine.dispose()


class TestOverSmtp:
    def test_nothing_stale_arrives_and_mail_list_says_why(
            self, smtp: CaptureServer,
            smtp_env: Callable[..., tuple[dict[str, str], Config, sessionmaker[Session]]]) -> None:
        """The issue end to end: two jobs fail to upload, one is rescued before the flush. The server gets the
        other job's three mails and the rescued job's FULLYBUILT mail, nothing asking for a rescue of a
        FULLYBUILT job; `mail list` shows the three stale mails with the job's state now."""
        env, config, factory = smtp_env()
        applier = Applier(config)
        rescued, waiting = failed_upload(applier, factory), failed_upload(applier, factory)
        fire(applier, factory, rescued, ROLES.rescue)
        runner = CliRunner()
        flushed = runner.invoke(cli, ["mail", "flush", "--json"], env=env)
        assert flushed.exit_code == 0, flushed.output
        got = sorted((m["X-Retracer-Job"], m["X-Retracer-Job-State"], str(m["To"])) for m in smtp.pop())
        assert got == sorted([(str(rescued), ROLES.success, CREATOR)] +
                             [(str(waiting), ROLES.rescuable, who) for who in [*ADMINS, CREATOR]])
        listed = runner.invoke(cli, ["mail", "list", "--status", "stale"], env=env)
        assert listed.exit_code == 0, listed.output
        assert listed.output.count(f"stale (job now {ROLES.success})") == 3
        shown = runner.invoke(cli, ["mail", "list", "--status", "stale", "--json"], env=env)
        assert {(m["job"], m["state"], m["job_state_now"]) for m in json.loads(shown.output)} == \
            {(rescued, ROLES.rescuable, ROLES.success)}
        assert runner.invoke(cli, ["mail", "flush"], env=env).exit_code == 0
        assert smtp.pop() == []

    def test_a_digest_sent_again_drops_what_went_stale(
            self, smtp: CaptureServer,
            smtp_env: Callable[..., tuple[dict[str, str], Config, sessionmaker[Session]]]) -> None:
        """A digest made while the server was down is sent later; a job rescued meanwhile is taken out of it."""
        _, config, factory = smtp_env(RETRACER__MAIL__FLOOD_THRESHOLD="2", RETRACER__MAIL__FLOOD_WINDOW_S="3600")
        applier = Applier(config)
        jobs = [failed_upload(applier, factory) for _ in range(4)]
        smtp.stop()
        with Sender(factory, config) as sender:
            assert sender.deliver_pending().digests == 3
            fire(applier, factory, jobs[2], ROLES.rescue)
            smtp.start()
            report = sender.deliver_pending()
        assert report.failed == 0
        digests = [m for m in smtp.pop() if m["X-Retracer-Digest"] and m["To"] in ADMINS]
        assert len(digests) == 2
        for digest in digests:
            part = digest.get_body(("plain",))
            assert part is not None
            body = part.get_content()
            assert f" * Job {jobs[2]}: " not in body and f" * Job {jobs[3]}: " in body
            assert digest["X-Retracer-Digest"] == "2"
        assert {m.status for m in rows(factory) if m.job_id == jobs[2] and m.state == ROLES.rescuable} == {"stale"}
        for row in (m for m in rows(factory) if m.state == DIGEST):
            assert (jobs[2], ROLES.rescuable) not in [(i["job"], i["state"]) for i in row.context["items"]]
