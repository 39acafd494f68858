"""retracer's own symbol index as the worker's symbol source, when the worker has the database (the embedded
mode): the debug files of a core's modules are looked up by build-id and taken out of the imported packages
before gdb runs, so that a core whose symbols exist only in an imported .ddeb is retraced with no
[worker] debug_dirs or debuginfod_urls at all.

Extracted files are kept in a cache shared by the worker's attempts (``<work_dir>/symbol-index``, laid out as a
``.build-id`` tree): a library's debug file, tens of MiB inside a compressed package, is taken out once, not
at every attempt. Each file is written under a temporary name and renamed into place once whole and checked
(its build-id is the one asked for: an archive replaced on disk since its import cannot slip another build's
symbols in), so an attempt running beside it, in this process or another worker's, never sees half a file.
Each attempt then gets hard links to its files in a ``.build-id`` tree of its own: the cache may drop its
least recently used files to stay within ``[worker] index_cache_bytes`` at any time without pulling a file
from under a gdb that is about to read it.

With a broker the worker has no database: the admin adds retracer web's URL to ``[worker] debuginfod_urls``,
and gdb fetches the same files over the debuginfod protocol.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from retracer.config import Config
from retracer.errors import RetracerError
from retracer.symbols import members
from retracer.symbols.index import KINDS, Found, lookup
from retracer.worker import checks

DEBUGINFO = KINDS[1]
#: The cache's directory under the worker's work directory.
CACHE_NAME = "symbol-index"
#: A temporary file this old was left by a worker killed while extracting: no extraction takes an hour.
STALE_TEMPORARY_S = 3600.0
_TEMPORARY = ".part-"


class ExtractionFailed(RetracerError):
    """Raised when a member cannot be taken out of its archive as indexed (gone, changed, unreadable)."""


@dataclass
class Provided:
    """What the index gave one attempt: the attempt's own debug directory (None: nothing found), the packages
    each build-id's debug information came from, and lines for the attempt's log."""

    directory: Path | None
    found: dict[str, Found] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)


def cache_dir(config: Config) -> Path:
    """Where the worker keeps the files it took out of the index (beside its attempts' directories)."""
    work_dir = config["worker"]["work_dir"]
    base = Path(os.path.expanduser(work_dir)) if work_dir else config.data_dir / "worker"
    return base / CACHE_NAME


def debug_path(root: Path, build_id: str) -> Path:
    """``root/.build-id/xx/rest.debug``: where gdb's debug-file-directory looks for a build-id."""
    return root / ".build-id" / build_id[:2] / f"{build_id[2:]}.debug"


def choose(found: Iterable[Found]) -> dict[str, Found]:
    """Per build-id, the debug file to use: the most recently imported one whose archive still exists (the
    same build-id means the same bytes, so any copy will do if none does)."""
    chosen: dict[str, Found] = {}
    for item in found:  # in import order within a build-id: a later one replaces an earlier one
        if item.kind != DEBUGINFO:
            continue
        current = chosen.get(item.build_id)
        if current is None or os.path.exists(item.archive_path) or not os.path.exists(current.archive_path):
            chosen[item.build_id] = item
    return chosen


class IndexSymbols:
    """The symbol index, read through ``factory``, extracting into ``cache`` (at most ``max_bytes`` kept)."""

    def __init__(self, factory: sessionmaker[Session], cache: Path, max_bytes: int) -> None:
        self.factory = factory
        self.cache = cache
        self.max_bytes = max_bytes

    @classmethod
    def for_worker(cls, config: Config, factory: sessionmaker[Session] | None) -> IndexSymbols | None:
        """The index for a worker with this configuration, or None: no database here (a broker's worker asks
        retracer web over debuginfod instead), or ``[worker] use_index = false``."""
        if factory is None or not config["worker"]["use_index"]:
            return None
        return cls(factory, cache_dir(config), int(config["worker"]["index_cache_bytes"]))

    def provide(self, build_ids: Sequence[str], attempt_dir: Path) -> Provided:
        """Put the debug files the index holds for ``build_ids`` into ``attempt_dir/.build-id``. Never raises
        for the index's sake: a database or archive that cannot be read is said in the lines, and gdb runs
        with the other sources (the attempt then fails as missing symbols, and is retried)."""
        out = Provided(None)
        try:
            with self.factory() as session:
                chosen = choose(lookup(session, build_ids))
        except SQLAlchemyError as exc:
            out.lines.append(f"symbol index: the database cannot be read ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]}); going on without it")
            return out
        wanted = [b for b in dict.fromkeys(build_ids) if b in chosen]
        grown = False
        for build_id in wanted:
            found = chosen[build_id]
            origin = _origin(found)
            try:
                grown = self._place(found, attempt_dir) or grown
            except (ExtractionFailed, OSError) as exc:
                out.lines.append(f"symbol index: build-id {build_id}'s debug information ({origin}) cannot be "
                                 f"used: {exc}")
                continue
            out.found[build_id] = found
            out.lines.append(f"symbol index: build-id {build_id}: debug information from {origin}")
        if out.found:
            out.directory = attempt_dir
        if not grown:
            return out
        try:
            self.evict()
        except OSError as exc:
            out.lines.append(f"symbol index: the cache {self.cache} could not be trimmed ({exc})")
        return out

    def _place(self, found: Found, attempt_dir: Path) -> bool:
        """Link (or copy) ``found``'s cached copy into the attempt's tree; whether the cache grew for it."""
        target = debug_path(attempt_dir, found.build_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        grown = False
        for _ in range(2):  # once more if another worker evicted the file between extracting and linking
            cached, extracted = self._cached(found)
            grown = grown or extracted
            try:
                os.link(cached, target)
                return grown
            except FileNotFoundError:
                continue
            except FileExistsError:
                return grown
            except OSError:
                # Another file system, or hard links refused: a copy is as good for gdb.
                shutil.copyfile(cached, target)
                return grown
        raise ExtractionFailed(f"{debug_path(self.cache, found.build_id)} kept vanishing from the cache while "
                               f"being linked: is [worker] index_cache_bytes far too small?")

    def _cached(self, found: Found) -> tuple[Path, bool]:
        """The cached copy of ``found``, freshly used, and whether it had to be taken out of its archive."""
        path = debug_path(self.cache, found.build_id)
        try:
            if path.stat().st_size == found.size:
                os.utime(path)  # least recently used goes first
                return path, False
        except FileNotFoundError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=_TEMPORARY, dir=path.parent)
        temporary = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                written = _copy_member(found, out)
            if written != found.size:
                raise ExtractionFailed(f"{found.member} in {found.archive_path} is {written} bytes, not the "
                                       f"{found.size} indexed: the archive changed since its import; import it "
                                       f"again with `retracer symbols import`")
            _check_build_id(temporary, found)
            os.chmod(temporary, 0o644)
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return path, True

    def evict(self) -> None:
        """Drop the least recently used files until the cache holds at most ``max_bytes`` (and temporary files
        a killed worker left behind)."""
        entries: list[tuple[float, int, Path]] = []
        root = self.cache / ".build-id"
        if not root.is_dir():
            return
        now = time.time()
        for directory in root.iterdir():
            if not directory.is_dir():
                continue
            for path in directory.iterdir():
                try:
                    info = path.stat()
                except FileNotFoundError:
                    continue
                if path.name.startswith(_TEMPORARY):
                    if now - info.st_mtime > STALE_TEMPORARY_S:
                        path.unlink(missing_ok=True)
                    continue
                entries.append((info.st_mtime, info.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries, key=lambda entry: entry[0]):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size


def _origin(found: Found) -> str:
    if found.archive_kind == "file":
        return f"the imported file {found.archive_path}"
    package = " ".join(p for p in (found.package, found.version, found.architecture) if p)
    return f"{found.member} in {package or 'the package'} ({found.archive_path})"


def _copy_member(found: Found, out: BinaryIO) -> int:
    """Stream the member into ``out``; the bytes written (one more than indexed at most, enough to tell)."""
    written = 0
    try:
        with members.open_member(found) as stream:
            while written <= found.size:
                data = stream.read(min(1 << 20, found.size + 1 - written))
                if not data:
                    break
                out.write(data)
                written += len(data)
    except RetracerError as exc:
        raise ExtractionFailed(str(exc)) from None
    return written


def _check_build_id(path: Path, found: Found) -> None:
    try:
        actual = checks.elf_facts(path).build_id
    except (OSError, ValueError) as exc:
        raise ExtractionFailed(f"{found.member} in {found.archive_path} is not a whole ELF file any more "
                               f"({exc}): the archive changed since its import; import it again") from None
    if actual != found.build_id:
        raise ExtractionFailed(f"{found.member} in {found.archive_path} now has build-id {actual or 'none'}, not "
                               f"{found.build_id}: the archive was replaced since its import; import it again")
