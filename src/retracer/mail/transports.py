"""Where rendered mails go: an SMTP server over a small pool of reused connections, or an mbox file.

Both report each mail's outcome through the ``done`` callback as soon as it is known, so the sender can
mark it sent in the database right after the server (or the file) has it.
"""

from __future__ import annotations

import asyncio
import email
import email.generator
import email.policy
import fcntl
import io
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse

import aiosmtplib

from retracer.config import Config, mask
from retracer.errors import MailError

log = logging.getLogger("retracer.mail")


@dataclass(frozen=True)
class Outgoing:
    """One rendered mail on its way out: as an ``EmailMessage``, or as the bytes SMTP carries (CRLF line
    ends, what :func:`retracer.mail.render.wire` writes, the sender's form). Give one of the two."""

    mail_id: int
    recipient: str
    message_id: str
    message: EmailMessage | None = None
    data: bytes | None = None

    def __post_init__(self) -> None:
        if (self.message is None) == (self.data is None):
            raise MailError(f"mail {self.mail_id}: an Outgoing carries either a message or its bytes")

    def as_message(self) -> EmailMessage:
        """The message object (parsed from the bytes when that is what was given)."""
        if self.message is not None:
            return self.message
        parsed = email.message_from_bytes(self.data or b"", policy=email.policy.default)
        if not isinstance(parsed, EmailMessage):  # the default policy always makes an EmailMessage
            raise MailError(f"mail {self.mail_id}: the rendered bytes did not parse as a message")
        return parsed


@dataclass(frozen=True)
class Failure:
    """Why a mail was not delivered; a permanent one is never retried."""

    error: str
    permanent: bool = False


Done = Callable[[Outgoing, Failure | None], Awaitable[None]]
#: The next mail to send, or None when there are no more. Mails are rendered as they are asked for, so
#: one connection's worker renders while another waits for its server's answer.
Source = Callable[[], Awaitable[Outgoing | None]]


class Transport(Protocol):
    """Delivers up to ``size`` mails from ``source``, calling ``done`` once per mail with None (delivered)
    or a Failure."""

    description: str

    async def send_all(self, source: Source, done: Done, size: int) -> None: ...

    async def aclose(self) -> None: ...


class ServerUnavailable(MailError):
    """Raised when the SMTP server cannot be reached or refuses the session (connect, TLS, login)."""


class SmtpTransport:
    """aiosmtplib over at most ``pool_size`` connections, kept open between batches.

    One connection gains nothing from parallel sends (aiosmtplib serialises them with a lock), so the
    pool runs one worker per connection. A server that has dropped an idle connection shows up as
    SMTPServerDisconnected (or a 421) on the next send: the worker reconnects and retries that mail once.
    When a connection cannot be opened at all, the rest of the run is failed at once instead of
    waiting for one timeout per mail; every mail keeps its own backoff.
    """

    def __init__(self, url: str, *, sender: str, starttls: bool = False, username: str = "", password: str = "",
                 timeout: float = 30, pool_size: int = 4, reuse: bool = True) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("smtp", "smtps") or not parsed.hostname:
            raise MailError(f"[mail] url = {mask(url)!r}: use smtp://HOST:PORT or smtps://HOST:PORT")
        self.use_tls = parsed.scheme == "smtps"
        if self.use_tls and starttls:
            raise MailError("[mail] starttls = true with an smtps:// url: smtps is TLS from the first byte; "
                            "use smtp://HOST:587 with starttls = true, or set starttls = false")
        if bool(username) != bool(password):
            raise MailError("[mail] username and password go together: set both to log in, or neither")
        self.hostname = parsed.hostname
        self.port = parsed.port or (465 if self.use_tls else 25)
        self.sender = sender
        # start_tls=None would upgrade only when the server offers it, which an attacker can strip.
        self.starttls = starttls
        self.username = username or None
        self.password = password or None
        self.timeout = timeout
        self.pool_size = max(1, pool_size)
        self.reuse = reuse
        self.description = mask(url)
        self._idle: list[aiosmtplib.SMTP] = []
        self._down: str | None = None

    @classmethod
    def from_config(cls, config: Config, *, pool_size: int | None = None, reuse: bool = True) -> SmtpTransport:
        m = config["mail"]
        return cls(m["url"], sender=m["sender"], starttls=m["starttls"], username=m["username"],
                   password=m["password"], timeout=m["timeout_s"],
                   pool_size=m["pool_size"] if pool_size is None else pool_size, reuse=reuse)

    async def _connect(self) -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(hostname=self.hostname, port=self.port, use_tls=self.use_tls,
                                 start_tls=self.starttls, username=self.username, password=self.password,
                                 timeout=self.timeout)
        try:
            await client.connect()
        except aiosmtplib.SMTPAuthenticationError as exc:
            client.close()
            raise ServerUnavailable(f"{self.description} refused the login as {self.username!r}: {exc.code} "
                                    f"{exc.message}; check [mail] username and password") from None
        except aiosmtplib.SMTPNotSupported as exc:
            client.close()
            raise ServerUnavailable(f"{self.description}: {exc} (STARTTLS is required by [mail] starttls)") \
                from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            client.close()
            raise ServerUnavailable(f"cannot connect to {self.description}: {exc or type(exc).__name__}") \
                from None
        return client

    async def _send(self, client: aiosmtplib.SMTP | None, item: Outgoing) -> aiosmtplib.SMTP:
        """Send ``item``, reconnecting once if the connection turns out to be dead; returns the client."""
        for retry in (False, True):
            if client is not None and not client.is_connected:
                client.close()
                client = None
            if client is None:
                client = await self._connect()
            try:
                await self._transmit(client, item)
                return client
            except aiosmtplib.SMTPServerDisconnected:
                client.close()
                client = None
                if retry:
                    raise
            except aiosmtplib.SMTPResponseException as exc:
                if exc.code != 421 or retry:  # 421: the server is closing this connection
                    raise
                client.close()
                client = None
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _transmit(self, client: aiosmtplib.SMTP, item: Outgoing) -> None:
        """One mail transaction. Bytes rendered for the wire go as they are: flattening an EmailMessage
        again here cost ~0.6 ms a mail. aiosmtplib's send_message is kept for what the bytes cannot carry
        unchanged: a given EmailMessage, a non-ASCII address (SMTPUTF8 changes the headers' form), and 8-bit
        text for a server without 8BITMIME (it re-encodes it as 7-bit)."""
        data = item.data
        if data is not None and (self.sender + item.recipient).isascii():
            if data.isascii():
                await client.sendmail(self.sender, [item.recipient], data)
                return
            if client.is_ehlo_or_helo_needed:
                await client.ehlo()
            if client.supports_extension("8bitmime"):
                await client.sendmail(self.sender, [item.recipient], data, mail_options=["BODY=8BITMIME"])
                return
        await client.send_message(item.as_message(), sender=self.sender, recipients=[item.recipient])

    async def _worker(self, source: Source, done: Done) -> None:
        client = self._idle.pop() if self._idle else None
        try:
            while (item := await source()) is not None:
                if self._down is not None:
                    await done(item, Failure(f"not attempted: {self._down}"))
                    continue
                try:
                    client = await self._send(client, item)
                except ServerUnavailable as exc:
                    self._down = str(exc)
                    client = None
                    await done(item, Failure(str(exc)))
                    continue
                except aiosmtplib.SMTPRecipientsRefused as exc:
                    codes = [r.code for r in exc.recipients]
                    text = "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
                    await done(item, Failure(f"{self.description} refused {item.recipient}: {text}",
                                             permanent=all(code >= 500 for code in codes)))
                    continue
                except aiosmtplib.SMTPResponseException as exc:
                    await done(item, Failure(f"{self.description} answered {exc.code} {exc.message}"))
                    continue
                except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                    if client is not None:
                        client.close()
                    client = None
                    await done(item, Failure(f"sending to {self.description} failed: "
                                             f"{exc or type(exc).__name__}"))
                    continue
                if not self.reuse:
                    await _quit(client)
                    client = None
                await done(item, None)
        finally:
            if client is not None and client.is_connected and self.reuse:
                self._idle.append(client)
            elif client is not None:
                client.close()

    async def send_all(self, source: Source, done: Done, size: int) -> None:
        self._down = None
        await asyncio.gather(*(self._worker(source, done) for _ in range(min(self.pool_size, size))))

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        await asyncio.gather(*(_quit(client) for client in idle))


async def _quit(client: aiosmtplib.SMTP) -> None:
    try:
        await client.quit()
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        client.close()


class MboxTransport:
    """The embedded default: append to an mbox file, locked, skipping a Message-ID already in it.

    The skip is what makes a crash between appending a mail and marking it sent harmless: the next run
    finds the Message-ID (deterministic per job, transition and recipient) and only marks the row.

    The Message-IDs read and the offset read up to are kept between flushes: writers only append, under
    the same lock, so a flush reads what was added since the last one instead of the whole file (reading it
    all on every flush made a long-lived mailbox quadratic: 25 minutes of a 100,000-event soak). A file
    replaced or cut shorter is read again from the start.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"mbox file {path}"
        self._ids: set[str] = set()
        self._read_to = 0
        self._file: tuple[int, int] | None = None  # (st_dev, st_ino) of the file read so far

    async def send_all(self, source: Source, done: Done, size: int) -> None:
        fd = -1
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # flock on our own descriptor, not a dot-lock file: that outlives a sender killed with SIGKILL
            # and then refuses every later delivery; the kernel drops an flock with the process.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._catch_up(fd)
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            while (item := await source()) is not None:
                await done(item, Failure(f"cannot open {self.description}: {exc}"))
            return
        try:
            while (item := await source()) is not None:
                if item.message_id not in self._ids:
                    entry = mbox_entry(item.message) if item.message is not None else mbox_entry_from_wire(item.data)
                    try:
                        _write_all(fd, entry)
                        os.fsync(fd)  # on disk before the row is marked sent
                    except OSError as exc:
                        self._file = None  # what reached the file is unknown: read it all next time
                        await done(item, Failure(f"cannot write to {self.description}: {exc}"))
                        continue
                    self._ids.add(item.message_id)
                    self._read_to += len(entry)
                await done(item, None)
        finally:
            os.close(fd)  # releases the flock

    def _catch_up(self, fd: int) -> None:
        """Read the Message-IDs appended since the last flush (all of them for a new or replaced file)."""
        st = os.fstat(fd)
        if self._file != (st.st_dev, st.st_ino) or st.st_size < self._read_to:
            self._ids, self._read_to, self._file = set(), 0, (st.st_dev, st.st_ino)
        if st.st_size > self._read_to:
            with open(os.dup(fd), "rb") as f:
                f.seek(self._read_to)
                read_message_ids(f, self._ids)
                self._read_to = f.tell()

    async def aclose(self) -> None:
        return None


def mbox_entry(message: EmailMessage) -> bytes:
    """One message as Python's mailbox.mbox appends it: a From_ line, the message with body lines starting
    "From " quoted as ">From ", and a blank line after it."""
    buffer = io.BytesIO()
    email.generator.BytesGenerator(buffer, mangle_from_=True, maxheaderlen=0).flatten(message)
    data = buffer.getvalue()
    if not data.endswith(b"\n"):
        data += b"\n"
    unixfrom = message.get_unixfrom()
    from_line = unixfrom.encode("ascii") if unixfrom else b"From MAILER-DAEMON " + time.asctime(time.gmtime()).encode()
    return from_line + b"\n" + data + b"\n"


_FROM_LINE = re.compile(rb"^From ", re.MULTILINE)
_FOLD = re.compile(rb"\n(?=[ \t])")


def mbox_entry_from_wire(data: bytes | None) -> bytes:
    """:func:`mbox_entry` for a message given as the bytes SMTP carries: LF line ends, body lines starting
    "From " quoted, and the top-level headers unfolded as ``mbox_entry`` writes them (one line each, so that
    :func:`read_message_ids` finds a Message-ID however long)."""
    text = (data or b"").replace(b"\r\n", b"\n")
    head, sep, body = text.partition(b"\n\n")
    text = _FOLD.sub(b"", head) + sep + body
    text = _FROM_LINE.sub(b">From ", text)
    if not text.endswith(b"\n"):
        text += b"\n"
    return b"From MAILER-DAEMON " + time.asctime(time.gmtime()).encode() + b"\n" + text + b"\n"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def message_ids(path: Path) -> set[str]:
    """The Message-IDs in an mbox file, read from the header blocks only (a body may quote headers)."""
    ids: set[str] = set()
    if path.exists():
        with open(path, "rb") as f:
            read_message_ids(f, ids)
    return ids


def read_message_ids(f: BinaryIO, ids: set[str]) -> None:
    """Add the Message-IDs from ``f``'s position (the start of a message) to its end."""
    in_headers = False
    previous_blank = True
    for line in f:
        blank = line in (b"\n", b"\r\n")
        if previous_blank and line.startswith(b"From "):
            in_headers = True
        elif in_headers:
            if blank:
                in_headers = False
            elif line[:11].lower() == b"message-id:":
                ids.add(line[11:].strip().decode("ascii", "replace"))
        previous_blank = blank


def transport_for(config: Config) -> Transport:
    """SMTP when [mail] url is set, else the mbox file under the data directory."""
    if config["mail"]["url"]:
        return SmtpTransport.from_config(config)
    return MboxTransport(config.mailbox_path)
