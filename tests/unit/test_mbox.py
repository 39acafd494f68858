"""The mbox transport (the embedded default): a file Python's mailbox reads, each Message-ID once, even with
several senders appending to it and after the file is rotated."""

from __future__ import annotations

import asyncio
import mailbox
import os
from email.message import EmailMessage
from pathlib import Path

from retracer.mail.transports import Failure, MboxTransport, Outgoing, message_ids


def mail(n: int, body: str = "Hello.\n") -> Outgoing:
    msg = EmailMessage()
    msg["From"] = "retracer@localhost"
    msg["To"] = f"user{n}@example.com"
    msg["Subject"] = f"[Retrace #{n}] test"
    msg["Message-ID"] = f"<job-{n}@retracer>"
    msg.set_content(body)
    return Outgoing(mail_id=n, recipient=f"user{n}@example.com", message_id=f"<job-{n}@retracer>", message=msg)


def send(transport: MboxTransport, items: list[Outgoing]) -> list[tuple[int, Failure | None]]:
    """Run one flush; what ``done`` was told for each mail."""
    pending = list(items)
    told: list[tuple[int, Failure | None]] = []

    async def source() -> Outgoing | None:
        return pending.pop(0) if pending else None

    async def done(item: Outgoing, failure: Failure | None) -> None:
        told.append((item.mail_id, failure))

    asyncio.run(transport.send_all(source, done, len(items)))
    return told


def subjects(path: Path) -> list[str]:
    return [str(m["Subject"]) for m in mailbox.mbox(str(path), create=False)]


def test_written_as_mailbox_reads_it(tmp_path: Path) -> None:
    """Python's mailbox reads every message back whole, a body line starting "From " included."""
    path = tmp_path / "outbox.mbox"
    told = send(MboxTransport(path), [mail(1, "From here on.\nSecond line.\n"), mail(2)])
    assert told == [(1, None), (2, None)]
    box = mailbox.mbox(str(path), create=False)
    first, second = list(box)
    assert (first["Message-ID"], second["Message-ID"]) == ("<job-1@retracer>", "<job-2@retracer>")
    assert first.get_payload() == ">From here on.\nSecond line.\n"  # quoted, as mbox readers expect
    assert first.get_from().startswith("MAILER-DAEMON ")


def test_each_message_id_once_across_senders(tmp_path: Path) -> None:
    """A second sender (another process) appends; the first one's next flush finds what it appended."""
    path = tmp_path / "outbox.mbox"
    one, two = MboxTransport(path), MboxTransport(path)
    send(one, [mail(1), mail(2)])
    send(two, [mail(2), mail(3)])  # 2 is there already: only marked
    told = send(one, [mail(3), mail(4), mail(1)])
    assert told == [(3, None), (4, None), (1, None)]
    assert subjects(path) == [f"[Retrace #{n}] test" for n in (1, 2, 3, 4)]
    assert message_ids(path) == {f"<job-{n}@retracer>" for n in (1, 2, 3, 4)}


def test_a_rotated_file_is_read_again(tmp_path: Path) -> None:
    """After the file is moved away (logrotate) the transport starts a new one and forgets the old ids;
    a file cut shorter is read again from its start."""
    path = tmp_path / "outbox.mbox"
    transport = MboxTransport(path)
    send(transport, [mail(1), mail(2)])
    os.rename(path, tmp_path / "outbox.mbox.1")
    send(transport, [mail(2)])
    assert subjects(path) == ["[Retrace #2] test"]
    # Cut to its first message by someone else, then mail 1 again: it is in the kept part, so skipped.
    send(transport, [mail(3)])
    keep = path.read_bytes()
    keep = keep[: keep.index(b"From MAILER-DAEMON", 1)]
    path.write_bytes(keep)
    send(transport, [mail(2), mail(3)])
    assert subjects(path) == ["[Retrace #2] test", "[Retrace #3] test"]


def test_an_unwritable_place_fails_each_mail(tmp_path: Path) -> None:
    """A mailbox that cannot be opened fails every mail with the reason (they are retried later)."""
    (tmp_path / "file").write_text("not a directory")
    told = send(MboxTransport(tmp_path / "file" / "outbox.mbox"), [mail(1), mail(2)])
    assert [n for n, _ in told] == [1, 2]
    assert all(f is not None and "cannot open mbox file" in f.error for _, f in told)
