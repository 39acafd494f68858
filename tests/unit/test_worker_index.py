"""The worker's symbol source from retracer's own index: files taken out of what was imported, checked, kept
in a bounded cache, and linked into each attempt's own .build-id tree."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from retracer import store
from retracer.store.models import SymbolArchive, SymbolFile
from retracer.worker import checks
from retracer.worker.index_source import IndexSymbols, cache_dir, debug_path

from ..conftest import make_config


def elf(name: str) -> tuple[Path, str]:
    path = Path(shutil.which(name) or f"/bin/{name}").resolve()
    build_id = checks.elf_facts(path).build_id
    assert build_id
    return path, build_id


TRUE, TRUE_ID = elf("true")
LS, LS_ID = elf("ls")


@pytest.fixture
def factory(sqlite_url: str) -> Iterator[sessionmaker[Session]]:
    engine = store.make_engine(sqlite_url)
    yield store.session_factory(engine)
    engine.dispose()


def index_file(factory: sessionmaker[Session], path: Path, build_id: str, kind: str = "debuginfo") -> None:
    """A loose file imported as it lies (``retracer symbols import DIR`` does this for .debug files)."""
    with factory() as session, session.begin():
        row = SymbolArchive(path=str(path), sha256=hashlib.sha256(str(path).encode()).hexdigest(),
                            size=path.stat().st_size, kind="file", package=None, version=None,
                            architecture=None, imported_by="test")
        row.files = [SymbolFile(build_id=build_id, kind=kind, member=str(path), size=path.stat().st_size)]
        session.add(row)


@pytest.fixture
def imported(tmp_path: Path, factory: sessionmaker[Session]) -> dict[str, Path]:
    """Two debug files of two build-ids, imported."""
    files = {}
    for source, build_id in ((TRUE, TRUE_ID), (LS, LS_ID)):
        target = tmp_path / "pool" / f"{build_id}.debug"
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(source, target)
        index_file(factory, target, build_id)
        files[build_id] = target
    return files


def test_the_attempt_gets_links_to_checked_files_and_the_cache_keeps_them(
        tmp_path: Path, factory: sessionmaker[Session], imported: dict[str, Path]) -> None:
    index = IndexSymbols(factory, tmp_path / "cache", 1 << 30)
    attempt = tmp_path / "attempt"
    provided = index.provide([TRUE_ID, "ab" * 20, LS_ID], attempt)
    assert provided.directory == attempt
    assert sorted(provided.found) == sorted([TRUE_ID, LS_ID])
    for build_id, source in imported.items():
        linked = debug_path(attempt, build_id)
        assert linked.read_bytes() == source.read_bytes()
        assert debug_path(tmp_path / "cache", build_id).read_bytes() == source.read_bytes()
    assert any(f"build-id {TRUE_ID}: debug information from the imported file" in line for line in provided.lines)
    # Later attempts take the cached copy: the imported file may even be gone.
    for source in imported.values():
        source.unlink()
    again = index.provide([TRUE_ID], tmp_path / "attempt-2")
    assert debug_path(tmp_path / "attempt-2", TRUE_ID).read_bytes() == TRUE.read_bytes()
    assert again.directory == tmp_path / "attempt-2"


def test_nothing_indexed_gives_no_directory(tmp_path: Path, factory: sessionmaker[Session]) -> None:
    provided = IndexSymbols(factory, tmp_path / "cache", 1 << 30).provide(["ab" * 20], tmp_path / "attempt")
    assert provided.directory is None and provided.found == {} and provided.lines == []
    assert not (tmp_path / "cache").exists()


def test_an_executable_is_not_taken_for_debug_information(tmp_path: Path, factory: sessionmaker[Session]) -> None:
    index_file(factory, TRUE, TRUE_ID, kind="executable")
    provided = IndexSymbols(factory, tmp_path / "cache", 1 << 30).provide([TRUE_ID], tmp_path / "attempt")
    assert provided.directory is None


def test_a_file_replaced_by_another_build_since_its_import_is_refused(
        tmp_path: Path, factory: sessionmaker[Session], imported: dict[str, Path]) -> None:
    # The same size, other bytes: only the build-id check can tell.
    target = imported[TRUE_ID]
    replaced = bytearray(LS.read_bytes()[:target.stat().st_size])
    target.write_bytes(bytes(replaced) + bytes(target.stat().st_size - len(replaced)))
    index = IndexSymbols(factory, tmp_path / "cache", 1 << 30)
    provided = index.provide([TRUE_ID], tmp_path / "attempt")
    assert provided.directory is None
    assert any("cannot be used" in line and "import it again" in line for line in provided.lines), provided.lines
    assert not debug_path(tmp_path / "cache", TRUE_ID).exists()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # no temporary left behind


def test_a_file_of_another_size_is_refused(tmp_path: Path, factory: sessionmaker[Session],
                                            imported: dict[str, Path]) -> None:
    imported[LS_ID].write_bytes(b"\x7fELF short")
    provided = IndexSymbols(factory, tmp_path / "cache", 1 << 30).provide([LS_ID], tmp_path / "attempt")
    assert provided.directory is None and "import it again" in provided.lines[0]


def test_the_cache_drops_the_least_recently_used_beyond_its_bound(
        tmp_path: Path, factory: sessionmaker[Session], imported: dict[str, Path]) -> None:
    bound = max(TRUE.stat().st_size, LS.stat().st_size)
    index = IndexSymbols(factory, tmp_path / "cache", bound)
    index.provide([TRUE_ID], tmp_path / "a1")
    old = time.time() - 100
    os.utime(debug_path(tmp_path / "cache", TRUE_ID), (old, old))
    index.provide([LS_ID], tmp_path / "a2")
    assert not debug_path(tmp_path / "cache", TRUE_ID).exists()
    assert debug_path(tmp_path / "cache", LS_ID).exists()
    # The attempt that used the dropped file still has it.
    assert debug_path(tmp_path / "a1", TRUE_ID).read_bytes() == TRUE.read_bytes()


def test_a_bound_of_zero_keeps_nothing_but_the_attempt_still_gets_its_files(
        tmp_path: Path, factory: sessionmaker[Session], imported: dict[str, Path]) -> None:
    provided = IndexSymbols(factory, tmp_path / "cache", 0).provide([TRUE_ID, LS_ID], tmp_path / "attempt")
    assert len(provided.found) == 2
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert debug_path(tmp_path / "attempt", LS_ID).read_bytes() == LS.read_bytes()


def test_temporaries_a_killed_worker_left_are_removed(tmp_path: Path, factory: sessionmaker[Session],
                                                       imported: dict[str, Path]) -> None:
    left = tmp_path / "cache" / ".build-id" / "ab" / ".part-x1"
    left.parent.mkdir(parents=True)
    left.write_bytes(b"half")
    fresh = left.with_name(".part-x2")
    fresh.write_bytes(b"being written")
    os.utime(left, (time.time() - 7200, time.time() - 7200))
    IndexSymbols(factory, tmp_path / "cache", 1 << 30).provide([TRUE_ID], tmp_path / "attempt")
    assert not left.exists() and fresh.exists()


def test_a_database_that_cannot_be_read_is_said_not_raised(tmp_path: Path) -> None:
    engine = store.make_engine(f"sqlite:///{tmp_path / 'no-schema.db'}")
    try:
        provided = IndexSymbols(store.session_factory(engine), tmp_path / "cache", 1).provide(
            [TRUE_ID], tmp_path / "attempt")
    finally:
        engine.dispose()
    assert provided.directory is None
    assert "the database cannot be read" in provided.lines[0]


def test_the_worker_uses_the_index_only_with_a_database_and_use_index(
        tmp_path: Path, sqlite_url: str, factory: sessionmaker[Session]) -> None:
    config = make_config(tmp_path / "data", sqlite_url)
    index = IndexSymbols.for_worker(config, factory)
    assert index is not None and index.cache == cache_dir(config) == tmp_path / "data" / "worker" / "symbol-index"
    assert index.max_bytes == config["worker"]["index_cache_bytes"]
    assert IndexSymbols.for_worker(config, None) is None  # a broker's worker: no database
    off = make_config(tmp_path / "data", sqlite_url, RETRACER__WORKER__USE_INDEX="false")
    assert IndexSymbols.for_worker(off, factory) is None
