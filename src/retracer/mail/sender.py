"""Delivering the mail outbox: claim due rows, drop stale ones, apply flood control, render, send, record
each outcome.

The applier writes mail rows in the transition's own transaction; this module sends them after commit.
A claim is a short transaction that marks the rows "sending" until a lease runs out, so several
processes can deliver at once without sending a mail twice (rows are locked with SKIP LOCKED on
PostgreSQL; SQLite serialises writers with BEGIN IMMEDIATE). A mail is marked sent only after the server
accepted it; the marks of the mails accepted meanwhile go to the database together, in one statement, while
the connections go on sending (group commit). A process killed between acceptance and mark leaves the row
to be claimed again when its lease expires: that mail can arrive twice, with the same Message-ID (the mbox
transport skips it).

Stale mails: a mail announces that its job entered a state. When the job has left that state by the time
the mail is claimed (a FAILEDTOUPLOAD job rescued before its mails went out), the mail would tell people to
act on something already done: it is marked "stale" with the job's state now in ``last_error``, never sent,
never retried, and never folded into a digest.

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
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, insert, or_, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from retracer.config import Config
from retracer.errors import MailError
from retracer.mail.render import DIGEST, Notice, crash_title, message_id, wire
from retracer.mail.stale import CHUNK, chunks, stale_reasons
from retracer.mail.transports import Failure, Outgoing, Transport, transport_for
from retracer.store.models import Mail, utcnow
from retracer.testing import faults

log = logging.getLogger("retracer.mail")

STATUSES = ("pending", "sending", "sent", "failing", "failed", "digested", "stale")
# Any constant works; it only has to be the same in every process that delivers mail.
_PG_LOCK_KEY = 0x7265_7472_6D61_696C
_MAIL = cast(Table, Mail.__table__)
#: Sent marks wait at most this long, or for this many outcomes, to share a commit. Recording each mail
#: on its own made 1,000 mails cost ~640 commits and ~0.8 ms of database-thread CPU a mail, which took the
#: GIL from the event loop (delivery ran at 0.29 of aiosmtplib's own rate); a process killed meanwhile
#: re-sends at most these mails, each with its Message-ID.
_MARK_WAIT_S = 0.02
MARK_BATCH = 100


@dataclass
class DeliveryReport:
    """What one delivery run did: mails sent, failed (retried later unless permanent), folded into
    digests, digests made, mails held back because their recipient's window was full, and mails dropped
    as stale (their job has left the state they announce)."""

    sent: int = 0
    failed: int = 0
    digested: int = 0
    digests: int = 0
    deferred: int = 0
    stale: int = 0
    destination: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Due:
    """A due mail row, read without the ORM (loading and flushing ORM objects cost ~110 µs a row, measured
    claiming 1,000 mails on SQLite; the plain rows and one executemany ~25)."""

    id: int
    job_id: int | None
    history_id: int | None
    state: str
    recipient: str
    rationale: str
    context: dict[str, Any] = field(default_factory=dict)


def backoff(config: Config, attempts: int) -> timedelta:
    """How long a mail that has failed ``attempts`` times waits: backoff_s doubling, capped."""
    m = config["mail"]
    # The exponent is capped: 2**1024 overflows a float, and any cap past max_backoff_s waits the same.
    seconds = min(float(m["backoff_s"]) * 2.0 ** min(max(0, attempts - 1), 64), float(m["max_backoff_s"]))
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

    def _claim(self, limit: int, report: DeliveryReport) -> list[tuple[Notice, str]]:
        """The mails to send now, each with its Message-ID, marked "sending" until the lease runs out."""
        now = self.clock()
        with self.factory() as session, session.begin():
            if session.get_bind().dialect.name == "postgresql":
                # Flood control counts what was sent and what is being sent; two claimers counting at
                # once could each fill the same window. The lock lasts only for this short transaction.
                session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
            c = _MAIL.c
            due = [_Due(*row) for row in session.execute(
                select(c.id, c.job_id, c.history_id, c.state, c.recipient, c.rationale, c.context)
                .where(or_(and_(c.status.in_(("pending", "failing")),
                                or_(c.next_attempt_at.is_(None), c.next_attempt_at <= now)),
                           # A claim whose lease ran out: its sender died before recording the outcome.
                           and_(c.status == "sending", c.next_attempt_at <= now)))
                .order_by(c.id).limit(limit).with_for_update(skip_locked=True))]
            if not due:
                return []
            due = self._drop_stale(session, due, report)
            sender = self.config["mail"]["sender"]
            notices = [Notice(m.job_id, m.history_id, m.state, m.recipient, m.rationale, dict(m.context or {}), m.id)
                       for m in self._flood_control(session, due, now, report)]
            claimed = [(n, message_id(n, sender)) for n in notices]
            if claimed:
                session.connection().execute(
                    update(_MAIL).where(c.id == bindparam("mail_id"))
                    .values(message_id=bindparam("mid"), status="sending", next_attempt_at=now + self.lease),
                    [{"mail_id": n.mail_id, "mid": mid} for n, mid in claimed])
        return claimed

    def _drop_stale(self, session: Session, due: list[_Due], report: DeliveryReport) -> list[_Due]:
        """Mark the stale mails among ``due`` (and stale entries of due digests) and return the rest."""
        reasons = stale_reasons(session, ((m.id, m.job_id, m.history_id, m.state) for m in due))
        live = [m for m in due if m.id not in reasons]
        for digest in (m for m in live if m.state == DIGEST):
            reasons.update(self._prune_digest(session, digest))
        dead = [m for m in live if m.state == DIGEST and not m.context.get("mails")]
        for digest in dead:
            reasons[digest.id] = "not sent: every mail this digest listed is stale"
        if reasons:
            session.connection().execute(
                update(_MAIL).where(_MAIL.c.id == bindparam("mail_id"))
                .values(status="stale", last_error=bindparam("why"), next_attempt_at=None),
                [{"mail_id": mail_id, "why": why} for mail_id, why in reasons.items()])
            for mail_id, why in reasons.items():
                log.info("mail stale", extra={"mail": mail_id, "why": why})
            report.stale += len(reasons) - len(dead)
        return [m for m in live if m.id not in reasons]

    def _prune_digest(self, session: Session, digest: _Due) -> dict[int, str]:
        """A digest made earlier and due again (its send failed): the entries whose mails went stale since
        are taken out of it (and those mails marked stale), so that it lists only what is still true."""
        folded = [int(i) for i in digest.context.get("mails", [])]
        if not folded:
            return {}
        c = _MAIL.c
        rows = session.execute(select(c.id, c.job_id, c.history_id, c.state).where(c.id.in_(folded)))
        reasons = stale_reasons(session, rows)
        if reasons:
            items = digest.context.get("items", [])
            kept = [(item, mail_id) for item, mail_id in zip(items, folded, strict=False) if mail_id not in reasons]
            digest.context = {**digest.context, "items": [item for item, _ in kept],
                              "mails": [mail_id for _, mail_id in kept], "count": len(kept)}
            session.execute(update(_MAIL).where(_MAIL.c.id == digest.id).values(context=digest.context))
        return reasons

    def _flood_control(self, session: Session, due: list[_Due], now: datetime,
                       report: DeliveryReport) -> list[_Due]:
        threshold = int(self.config["mail"]["flood_threshold"])
        window = timedelta(seconds=float(self.config["mail"]["flood_window_s"]))
        groups: dict[str, list[_Due]] = {}
        for mail in due:
            groups.setdefault(mail.recipient.strip().lower(), []).append(mail)
        # What already used each recipient's window: mails sent in it, and live claims about to be sent.
        used: dict[str, list[datetime]] = {}
        c = _MAIL.c
        recipients = sorted({m.recipient for m in due})
        for chunk in (recipients[i:i + CHUNK] for i in range(0, len(recipients), CHUNK)):
            rows = session.execute(
                select(c.recipient, c.sent_at)
                .where(c.recipient.in_(chunk))
                .where(or_(and_(c.status == "sent", c.sent_at >= now - window),
                           and_(c.status == "sending", c.next_attempt_at > now))))
            for recipient, sent_at in rows:
                used.setdefault(recipient.strip().lower(), []).append(sent_at or now)
        chosen: list[_Due] = []
        waits: list[dict[str, Any]] = []
        for key, mails in groups.items():
            taken = used.get(key, [])
            free = threshold - len(taken)
            # A slot frees up when the oldest mail in the window leaves it.
            reopens = max(min(taken) + window, now) if taken else now
            waiting: list[_Due] = []
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
            waits += [{"mail_id": m.id, "at": reopens} for m in waiting]
            report.deferred += len(waiting)
        if waits:
            session.connection().execute(
                update(_MAIL).where(c.id == bindparam("mail_id")).values(next_attempt_at=bindparam("at")), waits)
        return chosen

    def _digest(self, session: Session, mails: Sequence[_Due], threshold: int, window: timedelta,
                report: DeliveryReport) -> _Due:
        items = [{"job": m.job_id, "title": crash_title(m.context), "state": m.state,
                  "state_title": m.context.get("state_title", m.state), "reason": m.context.get("reason")}
                 for m in mails]
        context = {"count": len(mails), "threshold": threshold, "window_s": int(window.total_seconds()),
                   "items": items, "mails": [m.id for m in mails]}
        rationale = "Admin" if any(m.rationale == "Admin" for m in mails) else "Creator"
        digest_id = session.connection().execute(insert(_MAIL).values(
            job_id=None, history_id=None, state=DIGEST, recipient=mails[0].recipient, rationale=rationale,
            context=context, status="pending", attempts=0, created_at=utcnow())).inserted_primary_key[0]  # type: ignore[index]
        for chunk in chunks([m.id for m in mails]):
            session.execute(update(_MAIL).where(_MAIL.c.id.in_(chunk))
                            .values(status="digested", digest_of=digest_id, next_attempt_at=None))
        report.digested += len(mails)
        report.digests += 1
        log.info("flood control: digest", extra={"mail": digest_id, "to": mails[0].recipient, "count": len(mails)})
        return _Due(int(digest_id), None, None, DIGEST, mails[0].recipient, rationale, context)

    # -- rendering and sending ---------------------------------------------------------------------------

    async def _send(self, claimed: Sequence[tuple[Notice, str]], report: DeliveryReport) -> None:
        """Render each mail as a connection asks for it, outside the claim's transaction (on SQLite that
        transaction blocks every other writer), and record the outcomes as they come, many per commit.

        One commit per mail, each awaited by the connection that sent it, held delivery to ~250 mails/s
        (the thread hop, the GIL handed back and forth, a transaction each); the connections now go on
        sending while one commit records everything accepted since the last one started.
        """
        loop = asyncio.get_running_loop()
        queue = deque(claimed)
        now = self.clock()
        outcomes: list[tuple[int, str, Failure | None]] = []
        wake = asyncio.Event()
        sending = True
        broken: list[BaseException] = []

        async def recorder() -> None:
            while outcomes or sending:
                if not outcomes:
                    wake.clear()
                    await wake.wait()
                    continue
                if sending and len(outcomes) < MARK_BATCH:
                    # Let a few more outcomes join this commit: each commit costs ~0.5 ms of Python (the
                    # transaction, the statement) that holds the GIL against the connections' I/O.
                    await asyncio.sleep(_MARK_WAIT_S)
                batch = outcomes.copy()
                outcomes.clear()
                try:
                    await loop.run_in_executor(self._db, self._record, batch)
                except BaseException as exc:  # the database failed: stop sending, re-raised below
                    broken.append(exc)
                    return
                for _, _, failure in batch:
                    if failure is None:
                        report.sent += 1
                    else:
                        report.failed += 1

        def record(mail_id: int, recipient: str, failure: Failure | None) -> None:
            outcomes.append((mail_id, recipient, failure))
            wake.set()

        async def next_mail() -> Outgoing | None:
            faults.point("mail.mid_flush")
            while queue and not broken:
                notice, mid = queue.popleft()
                if notice.mail_id is None:  # claimed notices come from database rows, which have ids
                    raise MailError(f"a claimed mail to {notice.recipient} has no id; this is a bug")
                try:
                    data = wire(notice, self.config, now)
                except MailError as exc:
                    # Rendering the same snapshot again gives the same error: do not retry it.
                    record(notice.mail_id, notice.recipient, Failure(str(exc), permanent=True))
                    continue
                return Outgoing(notice.mail_id, notice.recipient, mid, data=data)
            return None

        async def done(item: Outgoing, failure: Failure | None) -> None:
            record(item.mail_id, item.recipient, failure)

        marks = asyncio.create_task(recorder())
        try:
            await self.transport.send_all(next_mail, done, len(claimed))
        finally:
            sending = False
            wake.set()
            await marks
        if broken:
            raise broken[0]

    def _record(self, outcomes: Sequence[tuple[int, str, Failure | None]]) -> None:
        """Record what happened to each mail in one transaction: the sent ones in one statement."""
        now = self.clock()
        sent = [mail_id for mail_id, _, failure in outcomes if failure is None]
        with self.factory() as session, session.begin():
            # Only our own claim is recorded: if the lease ran out and another sender took the row,
            # its outcome is the one that counts.
            for chunk in chunks(sent):
                for _ in chunk:
                    faults.point("mail.after_send")
                # Core, not the ORM's bulk update: that one evaluates its criteria against the session
                # and cost ~1 ms a statement more.
                session.connection().execute(
                    update(_MAIL).where(_MAIL.c.id.in_(chunk), _MAIL.c.status == "sending")
                    .values(status="sent", sent_at=now, next_attempt_at=None))
            for mail_id, recipient, failure in outcomes:
                if failure is not None:
                    self._record_failure(session, mail_id, recipient, failure, now)
        for mail_id, recipient, failure in outcomes:
            if failure is None:
                log.info("mail sent", extra={"mail": mail_id, "to": recipient})

    def _record_failure(self, session: Session, mail_id: int, recipient: str, failure: Failure,
                        now: datetime) -> None:
        mail = session.scalars(select(Mail).where(Mail.id == mail_id, Mail.status == "sending")
                               .with_for_update()).one_or_none()
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
