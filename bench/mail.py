"""Mail delivery throughput: the pooled sender against one SMTP connection per mail, in the same run.

    python bench/mail.py [--count 1000] [--pool-size 4] [--rounds 3] [--db-url URL]

Jobs fail to upload through the real apply path until the outbox holds --count mails; each mode then
delivers that whole outbox (claim, render, send, mark sent) to a local aiosmtpd that discards them. The
server runs in its own process so it does not share the GIL with the sender. The outbox is reset between
modes; the modes take turns in each round and the best round of each counts (the machine is shared: compare
the ratios of one run). A third mode is the ceiling: aiosmtplib alone sending the same mails, rendered
beforehand, over as many connections, with no database. The sender's CPU time per mail is printed too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import aiosmtplib
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from retracer import config as cfg
from retracer import store
from retracer.apply.applier import Applier
from retracer.config import Config
from retracer.mail.render import Notice, wire
from retracer.mail.sender import Sender
from retracer.mail.transports import SmtpTransport
from retracer.store.models import Mail
from retracer.testing.factories import event, submit

ADMINS = "celso@example.com,foo.bar@example.com"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def smtp_server() -> Iterator[str]:
    """aiosmtpd's Sink handler in a child process; yields its smtp:// url."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}",
                             "-c", "aiosmtpd.handlers.Sink"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("aiosmtpd did not start (is the test extra installed?)") from None
                time.sleep(0.05)
        yield f"smtp://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def fill_outbox(applier: Applier, factory: sessionmaker[Session], count: int) -> int:
    """Fail uploads until at least ``count`` mails are pending (three per job: two admins, the creator)."""
    with store.transaction(factory) as session:
        for _ in range((count + 2) // 3):
            job = submit(applier, session)
            applier.apply_batch(session, [event("retrace.started", job, worker="bench"),
                                          event("upload.failed", job, leaf=f"upload-{job}", upload_log="ANY")])
        return int(session.scalar(select(func.count()).select_from(Mail)) or 0)


def reset_outbox(factory: sessionmaker[Session]) -> None:
    with store.transaction(factory) as session:
        session.execute(update(Mail).values(status="pending", sent_at=None, next_attempt_at=None,
                                            message_id=None, attempts=0, last_error=None))


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def deliver_all(sender: Sender, count: int) -> float:
    """Seconds to deliver the whole outbox; exits if any mail failed (the figure would be meaningless)."""
    start = time.perf_counter()
    sent = 0
    while sent < count:
        report = sender.deliver_pending(limit=count)
        if report.failed or not report.sent:
            raise SystemExit(f"delivery failed: {report}")
        sent += report.sent
    return time.perf_counter() - start


def rendered(factory: sessionmaker[Session], config: Config) -> list[tuple[str, bytes]]:
    """Every mail of the outbox as the sender puts it on the wire: (recipient, bytes)."""
    now = datetime.now().astimezone()
    with store.transaction(factory) as session:
        return [(m.recipient, wire(Notice.from_mail(m), config, now)) for m in session.scalars(select(Mail))]


def ceiling(url: str, sender: str, mails: list[tuple[str, bytes]], connections: int) -> float:
    """Seconds for aiosmtplib alone to send ``mails`` over ``connections`` (connecting included)."""
    host, port = url.removeprefix("smtp://").rsplit(":", 1)

    async def run() -> None:
        todo = iter(mails)

        async def worker() -> None:
            client = aiosmtplib.SMTP(hostname=host, port=int(port))
            await client.connect()
            for recipient, data in todo:
                await client.sendmail(sender, [recipient], data)
            await client.quit()

        await asyncio.gather(*(worker() for _ in range(connections)))

    start = time.perf_counter()
    asyncio.run(run())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="mails in the outbox (default 1000)")
    parser.add_argument("--pool-size", type=int, default=4, help="connections of the pooled sender (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="measure each mode this many times, keep the best")
    parser.add_argument("--db-url", default=None, help="an empty database (default: a temporary SQLite file)")
    args = parser.parse_args()
    if args.count < 1 or args.pool_size < 1 or args.rounds < 1:
        parser.error("--count, --pool-size and --rounds must be at least 1")

    with tempfile.TemporaryDirectory() as tmp, smtp_server() as url:
        db_url = args.db_url or f"sqlite:///{Path(tmp) / 'retracer.db'}"
        store.upgrade(db_url)
        config = cfg.load(environ={
            "RETRACER__SERVICE__DATA_DIR": tmp, "RETRACER__DATABASE__URL": db_url, "RETRACER__MAIL__ADMINS": ADMINS,
            "RETRACER__MAIL__URL": url, "RETRACER__MAIL__POOL_SIZE": str(args.pool_size),
            "RETRACER__SERVICE__START_REQUIRES_OFFER": "false",  # the jobs are driven by events alone
            # The bench measures delivery, not flood control: let every mail through.
            "RETRACER__MAIL__FLOOD_THRESHOLD": str(10 * args.count),
        })
        engine = store.make_engine(db_url)
        factory = store.session_factory(engine)
        count = fill_outbox(Applier(config), factory, args.count)
        pooled = f"pooled sender ({args.pool_size} reused connections)"
        single = "one connection per mail"
        modes: dict[str, Callable[[], SmtpTransport]] = {
            pooled: lambda: SmtpTransport.from_config(config),
            single: lambda: SmtpTransport.from_config(config, pool_size=1, reuse=False),
        }
        bare = f"ceiling: aiosmtplib alone, {args.pool_size} connections, no database"
        mails = rendered(factory, config)
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.rounds):
            for name, make in modes.items():
                reset_outbox(factory)
                with Sender(factory, config, transport=make()) as sender:
                    before = cpu()
                    seconds = deliver_all(sender, count)
                    used = cpu() - before
                if name not in best or seconds < best[name][0]:
                    best[name] = (seconds, used)
            before = cpu()
            seconds = ceiling(url, config["mail"]["sender"], mails, args.pool_size)
            used = cpu() - before
            if bare not in best or seconds < best[bare][0]:
                best[bare] = (seconds, used)
        engine.dispose()

    print(f"{count} mails from the outbox ({db_url.split(':', 1)[0]}) to aiosmtpd on 127.0.0.1, "
          f"{os.cpu_count()} CPUs, best of {args.rounds}:")
    rates = {name: count / seconds for name, (seconds, _) in best.items()}
    for name, (seconds, used) in best.items():
        print(f"  {name:<58} {rates[name]:7.0f} mails/s  ({seconds:.2f} s, "
              f"{used / count * 1e6:.0f} µs CPU a mail in this process)")
    print(f"  ratio pooled / one connection per mail: {rates[pooled] / rates[single]:.2f}x")
    print(f"  ratio pooled / ceiling: {rates[pooled] / rates[bare]:.2f}")


if __name__ == "__main__":
    main()
