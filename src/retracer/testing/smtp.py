"""A real SMTP server inside the test process (aiosmtpd in a thread) that keeps what it receives.

aiosmtpd is a test-only dependency (the ``test`` extra), imported only when a server starts. Typical use:
start it, point ``RETRACER__MAIL__URL`` at ``server.url``, deliver, then read ``server.pop()``; ``stop()``
and ``start()`` again give an outage on the same port.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import threading
from collections.abc import Iterable
from email.message import EmailMessage
from types import TracebackType
from typing import Any


class _Handler:
    """aiosmtpd handler hooks: refuse chosen recipients, keep every message, count sessions."""

    def __init__(self, owner: CaptureServer) -> None:
        self.owner = owner

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        with self.owner._lock:
            self.owner.sessions += 1
        # With this hook present aiosmtpd leaves recording the greeting to it; without, MAIL gets 503.
        session.host_name = hostname
        return responses

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        with self.owner._lock:
            stale = session in self.owner._stale
            self.owner._stale.discard(session)
            self.owner._open.add(session)
        if stale:
            # What a client meets on a connection the server dropped while it sat in the pool.
            server.transport.close()
            return "421 4.4.2 connection dropped"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if address.lower() in self.owner.refuse:
            return "550 5.1.1 no such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw = envelope.original_content or envelope.content
        data = raw if isinstance(raw, bytes) else str(raw).encode("utf-8")
        message = email.message_from_bytes(data, policy=email.policy.default)
        with self.owner._lock:
            self.owner.messages.append(message)
            self.owner.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 OK: message accepted"


class CaptureServer:
    """An SMTP server on 127.0.0.1 that collects messages; stop() and start() again simulate an outage.

    ``idle_timeout`` is how long the server keeps a quiet connection open (aiosmtpd's ``timeout``): make
    it short to test that a sender reconnects after the server dropped an idle connection.
    ``refuse`` lists recipients answered with 550.
    """

    def __init__(self, hostname: str = "127.0.0.1", port: int = 0, idle_timeout: float = 300,
                 refuse: Iterable[str] = ()) -> None:
        self.hostname = hostname
        self.port = port
        self.idle_timeout = idle_timeout
        self.refuse = {r.lower() for r in refuse}
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.sessions = 0
        self._lock = threading.Lock()
        self._open: set[Any] = set()  # aiosmtpd sessions, by identity
        self._stale: set[Any] = set()
        self._controller: Any = None

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("start the server first: its port is chosen when it starts")
        return f"smtp://{self.hostname}:{self.port}"

    @property
    def running(self) -> bool:
        return self._controller is not None

    def start(self) -> CaptureServer:
        """Listen (on the port of the previous start, if any); returns self."""
        from aiosmtpd.controller import Controller

        class _Controller(Controller):
            def _trigger_server(self) -> None:
                # aiosmtpd's readiness probe connects to self.port, which is still 0 when the OS chose it.
                if self.port == 0 and isinstance(self.server, asyncio.Server):
                    self.port = self.server.sockets[0].getsockname()[1]
                super()._trigger_server()  # type: ignore[no-untyped-call]

        if self._controller is not None:
            return self
        controller = _Controller(_Handler(self), hostname=self.hostname, port=self.port,
                                 timeout=self.idle_timeout)
        controller.start()
        self.port = controller.port
        self._controller = controller
        return self

    def stop(self) -> None:
        """Stop listening and drop every open connection (the port stays this server's for start())."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def drop_connections(self) -> None:
        """Hang up on every connection opened so far, at its next MAIL command: like a server that closed
        idle connections while the client still believes them open."""
        with self._lock:
            self._stale |= self._open
            self._open = set()

    def pop(self) -> list[EmailMessage]:
        """The messages received so far, in arrival order; the list starts empty again."""
        with self._lock:
            taken, self.messages = self.messages, []
            self.envelopes = []
        return taken

    def __enter__(self) -> CaptureServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
