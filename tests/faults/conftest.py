"""Fixtures for the fault-injection suite: the integration instances, an SMTP server to catch the mail,
and the RETRACER_FAULTS variable kept out of everything but the supervised `serve`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from retracer.testing.smtp import CaptureServer
from tests.integration.conftest import embedded, scaled  # noqa: F401  (fixtures used here)


@pytest.fixture(autouse=True)
def _no_inherited_faults(monkeypatch: pytest.MonkeyPatch) -> None:
    """A RETRACER_FAULTS left in the environment would kill the CLI helpers too."""
    monkeypatch.delenv("RETRACER_FAULTS", raising=False)


@pytest.fixture
def smtp_server() -> Iterator[CaptureServer]:
    """A real SMTP server (aiosmtpd in a thread) that keeps every message it accepts."""
    server = CaptureServer().start()
    try:
        yield server
    finally:
        server.stop()

