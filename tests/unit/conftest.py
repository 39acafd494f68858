"""Fixtures the unit tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.clirun import Retracer


@pytest.fixture
def rt(tmp_path: Path, sqlite_url: str) -> Iterator[Retracer]:
    """A migrated embedded instance."""
    instance = Retracer({"RETRACER__SERVICE__DATA_DIR": str(tmp_path / "data"),
                         "RETRACER__DATABASE__URL": sqlite_url,
                         "RETRACER__MAIL__ADMINS": "celso@example.com",
                         # These tests drive jobs with events directly, without serve's offers.
                         "RETRACER__SERVICE__START_REQUIRES_OFFER": "false"})
    yield instance
    instance.engine.dispose()
