"""The mbox transport's flush against the size of the mailbox (the embedded default's mail file).

    python bench/mbox.py [--mails 20000]

Fills an mbox through MboxTransport, then times one flush of one more mail with the transport's kept index,
one flush by a fresh transport (a restarted `serve` reads the file once), and, as the baseline measured in
the same run, the two whole-file reads every flush did before (the Message-ID scan and mailbox.mbox's table
of contents).
"""

from __future__ import annotations

import argparse
import asyncio
import mailbox
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

from retracer.mail.transports import Failure, MboxTransport, Outgoing, message_ids


def mail(n: int) -> Outgoing:
    msg = EmailMessage()
    msg["From"] = "retracer@localhost"
    msg["To"] = "mark@example.com"
    msg["Subject"] = f"[Retrace #{n}] cdrkit 1.0 was retraced"
    msg["Message-ID"] = f"<job-{n}.FULLYBUILT.creator@retracer>"
    msg.set_content("The retrace of your crash succeeded.\n" * 20)
    msg.add_alternative("<p>The retrace of your crash succeeded.</p>\n" * 20, subtype="html")
    return Outgoing(mail_id=n, recipient="mark@example.com", message_id=str(msg["Message-ID"]), message=msg)


def flush(transport: MboxTransport, items: list[Outgoing]) -> None:
    pending = list(items)

    async def source() -> Outgoing | None:
        return pending.pop(0) if pending else None

    async def done(item: Outgoing, failure: Failure | None) -> None:
        if failure is not None:
            raise SystemExit(f"mail {item.mail_id} failed: {failure.error}")

    asyncio.run(transport.send_all(source, done, len(items)))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mails", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="retracer-mbox-") as tmp:
        path = Path(tmp) / "outbox.mbox"
        transport = MboxTransport(path)
        for start in range(0, args.mails, 1000):
            flush(transport, [mail(n) for n in range(start, min(start + 1000, args.mails))])
        size_mb = path.stat().st_size / 1e6
        t0 = time.perf_counter()
        flush(transport, [mail(args.mails)])
        kept = time.perf_counter() - t0
        t0 = time.perf_counter()
        flush(MboxTransport(path), [mail(args.mails + 1)])
        fresh = time.perf_counter() - t0
        t0 = time.perf_counter()
        message_ids(path)
        box = mailbox.mbox(str(path), create=False)
        box.keys()  # builds the table of contents, as mailbox.mbox.add did on every flush
        box.close()
        old = time.perf_counter() - t0
    print(f"mbox with {args.mails:,} mails ({size_mb:.0f} MB): one flush with the kept index {kept * 1000:.1f} ms; "
          f"a fresh transport's first flush {fresh * 1000:.0f} ms; the whole-file reads every flush did before "
          f"{old * 1000:.0f} ms ({old / kept:.0f}x)")


if __name__ == "__main__":
    main()
