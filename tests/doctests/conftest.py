"""Each spec runs in a fresh embedded instance: its own data directory, a migrated SQLite database.

Names every spec can use without importing: ``retracer`` (run a command line and print its output),
``data_dir`` (the instance's directory) and ``env`` (the environment the commands see).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from retracer.testing.shell import Shell


@pytest.fixture(autouse=True)
def _embedded_instance(doctest_namespace: dict[str, Any], tmp_path: Path, sqlite_template: Path,
                       monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    data_dir = tmp_path / "retracer"
    data_dir.mkdir()
    shutil.copy(sqlite_template, data_dir / "retracer.db")
    env = {"RETRACER__SERVICE__DATA_DIR": str(data_dir),
           "RETRACER__MAIL__ADMINS": "celso.providelo@example.com,foo.bar@example.com"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RETRACER_CONFIG", raising=False)
    doctest_namespace.update(retracer=Shell(env), data_dir=data_dir, env=env)
    yield
