"""The index's bytes read back out of the packages they were imported from, streamed: what the debuginfod
routes serve and what the worker extracts."""

from __future__ import annotations

import os
import stat
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import Path

import libarchive

from retracer.errors import RetracerError
from retracer.symbols.archive import BLOCK, Feed, Source, bounded, member_path
from retracer.symbols.index import Found


class MemberUnavailable(RetracerError):
    """Raised when an indexed file cannot be read back (its package moved, changed or went away)."""


class MemberReader:
    """A member's bytes, read as a file would be (``read(n)``) or block by block (iteration), from blocks
    libarchive streams. MemberUnavailable if the archive turns out cut short while it is read."""

    def __init__(self, blocks: Iterator[bytes], size: int, where: str) -> None:
        self.size = size
        self._blocks = blocks
        self._where = where
        self._pending = b""

    def _next(self) -> bytes | None:
        try:
            return next(self._blocks, None)
        except (libarchive.ArchiveError, ValueError, OSError) as exc:
            raise MemberUnavailable(f"{self._where} cannot be read to its end ({exc}); import it again") from None

    def read(self, n: int = -1) -> bytes:
        want = self.size + 1 if n is None or n < 0 else n
        while len(self._pending) < want:
            block = self._next()
            if block is None:
                break
            self._pending += block
        out, self._pending = self._pending[:want], self._pending[want:]
        return out

    def __iter__(self) -> Iterator[bytes]:
        if self._pending:
            yield self._pending
            self._pending = b""
        while (block := self._next()) is not None:
            yield block


@contextmanager
def open_member(found: Found) -> Iterator[MemberReader]:
    """The bytes of an indexed file, streamed out of its .deb/.ddeb (or read from the loose file).

    MemberUnavailable when the archive went away, no longer holds the member, or holds it at another size
    (the package was replaced since it was imported: import it again)."""
    path = Path(found.archive_path)
    if found.archive_kind == "file":
        try:
            file = path.open("rb")
        except OSError as exc:
            raise MemberUnavailable(f"{path} cannot be read ({exc.strerror}); import it again where it now "
                                    "lies") from None
        with file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_size != found.size:
                raise MemberUnavailable(f"{path} changed since it was imported ({info.st_size} bytes, not "
                                        f"{found.size}); import it again")
            yield MemberReader(iter(lambda: file.read(BLOCK), b""), info.st_size, str(path))
        return
    walk = _seek(path, found.member)
    try:
        try:
            reader = next(walk)
        except (OSError, ValueError, libarchive.ArchiveError) as exc:
            raise MemberUnavailable(f"{path} cannot be read ({exc}); import the package again") from None
        if reader is None:
            raise MemberUnavailable(f"{path} does not hold {found.member} (any more); import the package again")
        if reader.size != found.size:
            raise MemberUnavailable(f"{path} holds {found.member} at {reader.size} bytes, not the {found.size} "
                                    "indexed: the package changed since it was imported; import it again")
        yield reader
    finally:
        walk.close()


def _seek(path: Path, member: str) -> Generator[MemberReader | None, None, None]:
    """Yields the reader of ``member`` with libarchive still open on it (the readers are context managers the
    generator stays suspended in), or None when the package does not hold it."""
    with path.open("rb") as file:
        source = Source(file, 1 << 62)
        with libarchive.stream_reader(source, format_name="ar", filter_name="none", block_size=BLOCK) as outer:
            for entry in outer:
                name = str(entry.pathname or "")
                if not name.startswith("data.tar"):
                    continue
                feed = Feed(bounded(entry.get_blocks(BLOCK), int(entry.size or 0), f"member {name}"))
                with libarchive.stream_reader(feed, format_name="tar", filter_name="all",
                                              block_size=BLOCK) as inner:
                    for item in inner:
                        if not item.isreg or item.issym or item.islnk or isinstance(item.pathname, bytes):
                            continue
                        try:
                            if member_path(item.pathname) != member:
                                continue
                        except ValueError:
                            continue
                        size = int(item.size or 0)
                        yield MemberReader(bounded(item.get_blocks(BLOCK), size, f"member {member}"), size,
                                           f"{member} in {path}")
                        return
    yield None
