"""Delivering the mail outbox: claim due rows, apply flood control, render, send, record each outcome.

The applier writes mail rows in the transition's own transaction; this module sends them after commit.
A claim is a short transaction that marks the rows "sending" until a lease runs out, so several
processes can deliver at once without sending a mail twice (rows are locked with SKIP LOCKED on
PostgreSQL; SQLite serialises writers with BEGIN IMMEDIATE). Each mail is marked sent right after the
server accepted it. A process killed between the two leaves the row to be claimed again when its lease
expires: that one mail can arrive twice, with the same Message-ID (the mbox transport skips it).

Flood control: a recipient never gets more than ``flood_threshold`` mails within ``flood_window_s``.
When more are due than the window has room for, the last free slot carries one digest listing the
rest; with no slot free they wait (not failing) until the oldest mail of the window ages out.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any

from sqlalchemy import and_, or_, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from retracer.config import Config
from retracer.errors import MailError
from retracer.mail.render import DIGEST, Notice, crash_title, message_id, render
from retracer.mail.transports import Failure, Outgoing, Transport, transport_for
from retracer.store.models import Mail, utcnow
from retracer.testing import faults

log = logging.getLogger("retracer.mail")

STATUSES = ("pending", "sending", "sent", "failing", "failed", "digested")
# Any constant works; it only has to be the same in every process that delivers mail.
_PG_LOCK_KEY = 0x7265_7472_6D61_696C


@dataclass
class DeliveryReport:
    """What one delivery run did: mails sent, failed (retried later unless permanent), folded into
    digests, digests made, and mails held back because their recipient's window was full."""

    sent: int = 0
    failed: int = 0
    digested: int = 0
    digests: int = 0
    deferred: int = 0
    destination: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def backoff(config: Config, attempts: int) -> timedelta:
    """How long a mail that has failed ``attempts`` times waits: backoff_s doubling, capped."""
    m = config["mail"]
    seconds = min(float(m["backoff_s"]) * 2 ** max(0, attempts - 1), float(m["max_backoff_s"]))
    return timedelta(seconds=max(0.0, seconds))


class Sender:
    """Delivers pending mails; keeps its SMTP connections (and event loop) between runs.

    Long-running callers (``serve``) keep one Sender and call :meth:`deliver_pending` on each tick, so
    the pool is reused; ``close()`` ends the connections. Not for use from several threads at once.
    """

    def __init__(self, factory: sessionmaker[Session], config: Config, transport: Transport | None = None,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.factory = factory
        self.config = config
        self.transport = transport or transport_for(config)
        self.clock = clock
        self._runner: asyncio.Runner | None = None
        # Marks run on one thread beside the event loop, so SMTP I/O goes on while a commit waits.
        self._db: ThreadPoolExecutor | None = None
        # A claim outlives any honest send (ten SMTP timeouts); a sender killed mid-flush is taken over then.
        self.lease = timedelta(seconds=10 * float(config["mail"]["timeout_s"]))

    # -- public ----------------------------------------------------------------------------------------

    def deliver_pending(self, limit: int = 500) -> DeliveryReport:
        """Send up to ``limit`` due mails now; returns what happened. Never raises for a mail's failure."""
        if limit < 1:
            raise MailError(f"limit must be at least 1, not {limit}")
        report = DeliveryReport(destination=self.transport.description)
        claimed = self._claim(limit, report)
        if claimed:
            if self._runner is None:
                self._runner = asyncio.Runner()
            if self._db is None:
                self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retracer-mail-db")
            self._runner.run(self._send(claimed, report))
        return report

    def close(self) -> None:
        if self._runner is not None:
            self._runner.run(self.transport.aclose())
            self._runner.close()
            self._runner = None
        if self._db is not None:
            self._db.shutdown(wait=True)
            self._db = None

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- claiming --------------------------------------------------------------------------------------

    def _claim(self, limit: int, report: DeliveryReport) -> list[Notice]:
        now = self.clock()
        with self.factory() as session, session.begin():
            if session.get_bind().dialect.name == "postgresql":
                # Flood control counts what was sent and what is being sent; two claimers counting at
                # once could each fill the same window. The lock lasts only for this short transaction.
                session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
            due = list(session.scalars(
                select(Mail)
                .where(or_(and_(Mail.status.in_(("pending", "failing")),
                                or_(Mail.next_attempt_at.is_(None), Mail.next_attempt_at <= now)),
                           # A claim whose lease ran out: its sender died before recording the outcome.
                           and_(Mail.status == "sending", Mail.next_attempt_at <= now)))
                .order_by(Mail.id).limit(limit).with_for_update(skip_locked=True)))
            if not due:
                return []
            sender = self.config["mail"]["sender"]
            claimed = []
            for mail in self._flood_control(session, due, now, report):
                notice = Notice.from_mail(mail)
                mail.message_id = message_id(notice, sender)
                mail.status, mail.next_attempt_at = "sending", now + self.lease
                claimed.append(notice)
        return claimed

    def _flood_control(self, session: Session, due: list[Mail], now: datetime,
                       report: DeliveryReport) -> list[Mail]:
        threshold = int(self.config["mail"]["flood_threshold"])
        window = timedelta(seconds=float(self.config["mail"]["flood_window_s"]))
        groups: dict[str, list[Mail]] = {}
        for mail in due:
            groups.setdefault(mail.recipient.strip().lower(), []).append(mail)
        # What already used each recipient's window: mails sent in it, and live claims about to be sent.
        used: dict[str, list[datetime]] = {}
        rows = session.execute(
            select(Mail.recipient, Mail.sent_at)
            .where(Mail.recipient.in_(sorted({m.recipient for m in due})))
            .where(or_(and_(Mail.status == "sent", Mail.sent_at >= now - window),
                       and_(Mail.status == "sending", Mail.next_attempt_at > now))))
        for recipient, sent_at in rows:
            used.setdefault(recipient.strip().lower(), []).append(sent_at or now)
        chosen: list[Mail] = []
        for key, mails in groups.items():
            taken = used.get(key, [])
            free = threshold - len(taken)
            # A slot frees up when the oldest mail in the window leaves it.
            reopens = max(min(taken) + window, now) if taken else now
            waiting: list[Mail] = []
            for digest in (m for m in mails if m.state == DIGEST):
                if free > 0:
                    chosen.append(digest)
                    free -= 1
                else:
                    waiting.append(digest)
            plain = [m for m in mails if m.state != DIGEST]
            if len(plain) <= free:
                chosen += plain
            elif free >= 1:
                chosen += plain[:free - 1]
                chosen.append(self._digest(session, plain[free - 1:], threshold, window, report))
            else:
                waiting += plain
            for mail in waiting:
                mail.next_attempt_at = reopens
                report.deferred += 1
        return chosen

    def _digest(self, session: Session, mails: Sequence[Mail], threshold: int, window: timedelta,
                report: DeliveryReport) -> Mail:
        items = [{"job": m.job_id, "title": crash_title(m.context), "state": m.state,
                  "state_title": m.context.get("state_title", m.state), "reason": m.context.get("reason")}
                 for m in mails]
        digest = Mail(job_id=None, history_id=None, state=DIGEST, recipient=mails[0].recipient,
                      rationale="Admin" if any(m.rationale == "Admin" for m in mails) else "Creator",
                      context={"count": len(mails), "threshold": threshold,
                               "window_s": int(window.total_seconds()), "items": items,
                               "mails": [m.id for m in mails]},
                      status="pending", attempts=0)
        session.add(digest)
        session.flush()
        for mail in mails:
            mail.status, mail.digest_of, mail.next_attempt_at = "digested", digest.id, None
        report.digested += len(mails)
        report.digests += 1
        log.info("flood control: digest", extra={"mail": digest.id, "to": digest.recipient, "count": len(mails)})
        return digest

    # -- rendering and sending ---------------------------------------------------------------------------

    async def _send(self, claimed: Sequence[Notice], report: DeliveryReport) -> None:
        """Render each mail as a connection asks for it, outside the claim's transaction (on SQLite that
        transaction blocks every other writer), and record each outcome as soon as it is known."""
        loop = asyncio.get_running_loop()
        queue = deque(claimed)
        now = self.clock()

        async def record(mail_id: int, recipient: str, failure: Failure | None) -> None:
            await loop.run_in_executor(self._db, self._record, mail_id, recipient, failure)
            if failure is None:
                report.sent += 1
            else:
                report.failed += 1

        async def next_mail() -> Outgoing | None:
            faults.point("mail.mid_flush")
            while queue:
                notice = queue.popleft()
                if notice.mail_id is None:  # claimed notices come from database rows, which have ids
                    raise MailError(f"a claimed mail to {notice.recipient} has no id; this is a bug")
                try:
                    message = render(notice, self.config, now)
                except MailError as exc:
                    # Rendering the same snapshot again gives the same error: do not retry it.
                    await record(notice.mail_id, notice.recipient, Failure(str(exc), permanent=True))
                    continue
                return Outgoing(notice.mail_id, notice.recipient, str(message["Message-ID"]), message)
            return None

        async def done(item: Outgoing, failure: Failure | None) -> None:
            await record(item.mail_id, item.recipient, failure)

        await self.transport.send_all(next_mail, done, len(claimed))

    def _record(self, mail_id: int, recipient: str, failure: Failure | None) -> None:
        now = self.clock()
        with self.factory() as session, session.begin():
            # Only our own claim is recorded: if the lease ran out and another sender took the row,
            # its outcome is the one that counts.
            mine = and_(Mail.id == mail_id, Mail.status == "sending")
            if failure is None:
                faults.point("mail.after_send")
                session.execute(update(Mail).where(mine).values(status="sent", sent_at=now, next_attempt_at=None))
                log.info("mail sent", extra={"mail": mail_id, "to": recipient})
                return
            mail = session.scalars(select(Mail).where(mine).with_for_update()).one_or_none()
            if mail is None:
                return
            mail.attempts += 1
            mail.last_error = failure.error
            if failure.permanent:
                mail.status, mail.next_attempt_at = "failed", None
            else:
                mail.status, mail.next_attempt_at = "failing", now + backoff(self.config, mail.attempts)
            log.warning("mail not sent", extra={"mail": mail_id, "to": recipient, "attempts": mail.attempts,
                                                "error": failure.error, "permanent": failure.permanent})


def deliver_pending(factory: sessionmaker[Session], config: Config, limit: int = 500) -> DeliveryReport:
    """Send up to ``limit`` due mails now, through a Sender used once (for cron and `retracer mail flush`)."""
    with Sender(factory, config) as sender:
        return sender.deliver_pending(limit)
