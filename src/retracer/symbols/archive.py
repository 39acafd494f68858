"""Debian packages (.deb, .ddeb) read with libarchive, streamed and within limits: the outer ``ar``, then the
control.tar.* and data.tar.* inside it, nothing extracted to disk. `retracer.symbols.members` reads the
index's bytes back out of them."""

from __future__ import annotations

import ctypes
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BufferedReader
from pathlib import Path
from typing import Any

import libarchive
from debian.deb822 import Deb822

from retracer.config import Config
from retracer.errors import RetracerError

#: The package kinds by file name suffix.
ARCHIVE_SUFFIXES = {".deb": "deb", ".ddeb": "ddeb"}
#: A control file is a few kilobytes; anything far larger is not one.
MAX_CONTROL_BYTES = 1 << 20
#: Blocks asked of libarchive: large enough that Python's per-call cost does not dominate.
BLOCK = 256 * 1024
#: Fields longer than the index's columns are refused rather than cut.
FIELD_LIMITS = {"Package": 200, "Version": 200, "Architecture": 50}


class BadArchive(RetracerError):
    """Raised when an archive cannot be imported; the message names the archive and the reason."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class Limits:
    """What an archive must keep to ([symbols] in the configuration)."""

    max_members: int = 100_000
    max_member_bytes: int = 4 << 30
    max_archive_bytes: int = 16 << 30

    @classmethod
    def from_config(cls, config: Config) -> Limits:
        section = config["symbols"]
        return cls(int(section["max_members"]), int(section["max_member_bytes"]),
                   int(section["max_archive_bytes"]))


@dataclass
class Counts:
    """What reading one archive met."""

    members: int = 0
    files: int = 0
    links: int = 0
    unpacked_bytes: int = 0


@dataclass
class DebInfo:
    """What a package says of itself, and what its bytes are."""

    sha256: str
    size: int
    control: dict[str, str] = field(default_factory=dict)
    counts: Counts = field(default_factory=Counts)

    @property
    def package(self) -> str | None:
        return self.control.get("Package")

    @property
    def version(self) -> str | None:
        return self.control.get("Version")

    @property
    def architecture(self) -> str | None:
        return self.control.get("Architecture")


#: Called for every regular file of a package's data: its path ("/usr/bin/x"), its size, and its bytes (a
#: visitor reads as much of them as it needs, libarchive skips the rest).
Visitor = Callable[[str, int, Iterator[bytes]], None]


def archive_kind(path: Path) -> str | None:
    return ARCHIVE_SUFFIXES.get(path.suffix.lower())


def member_path(name: str | bytes) -> str:
    """A data member's name as an absolute path inside the package ("./usr/bin/x" -> "/usr/bin/x").

    ValueError for a name that leaves the package root: an absolute name or one with a ".." part."""
    text = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
    if text.startswith("/"):
        raise ValueError(f"member {text[:200]!r} has an absolute path (a package's members lie under ./)")
    parts = [part for part in text.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"member {text[:200]!r} climbs out of the package root with '..'")
    return "/" + "/".join(parts)


class Source:
    """The file libarchive reads, hashed and counted as it goes by (the hash is of exactly what was parsed)."""

    def __init__(self, file: BufferedReader, limit: int) -> None:
        self.file = file
        self.limit = limit
        self.digest = hashlib.sha256()
        self.size = 0
        self.error: BaseException | None = None

    def seekable(self) -> bool:
        return False

    def readinto(self, buf: Any) -> int:
        # Called from C: an exception here would be printed and lost, so it is kept and -1 (fatal) returned.
        try:
            view = memoryview(buf).cast("B")
            n = self.file.readinto(view) or 0
            self.digest.update(view[:n])
            self.size += n
            if self.size > self.limit:
                raise ValueError(f"it is larger than max_archive_bytes ({self.limit} bytes)")
            return n
        except BaseException as exc:
            self.error = exc
            return -1

    def drain(self) -> None:
        buf = bytearray(BLOCK)
        while self.readinto(buf) > 0:
            pass
        if self.error is not None:
            raise self.error


class Feed:
    """An entry's blocks as a stream an inner libarchive reader can read (a tar inside the ``ar``)."""

    def __init__(self, blocks: Iterator[bytes]) -> None:
        self.blocks = blocks
        self.pending = b""
        self.error: BaseException | None = None

    def seekable(self) -> bool:
        return False

    def readinto(self, buf: Any) -> int:
        try:
            if not self.pending:
                self.pending = next(self.blocks, b"")
            n = min(len(buf), len(self.pending))
            ctypes.memmove(buf, self.pending, n)
            self.pending = self.pending[n:]
            return n
        except BaseException as exc:
            self.error = exc
            return -1


def bounded(blocks: Iterator[bytes], limit: int, what: str) -> Iterator[bytes]:
    seen = 0
    for block in blocks:
        seen += len(block)
        if seen > limit:
            raise ValueError(f"{what} holds more than its header said or than the limit ({limit} bytes)")
        yield block


def _read_small(blocks: Iterator[bytes], limit: int, what: str) -> bytes:
    return b"".join(bounded(blocks, limit, what))


def _parse_control(data: bytes) -> dict[str, str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("its control file is not UTF-8 text") from None
    try:
        control = {str(k): str(v).strip() for k, v in Deb822(text).items()}
    except Exception as exc:  # python-debian's parser has no error class of its own
        raise ValueError(f"its control file cannot be parsed ({exc})") from None
    for key in ("Package", "Version"):
        if not control.get(key):
            raise ValueError(f"its control file has no {key} field")
    for key, limit in FIELD_LIMITS.items():
        value = control.get(key)
        if value is not None and (len(value) > limit or "\n" in value):
            raise ValueError(f"its control file's {key} field is longer than {limit} characters or spans lines")
    return control


class _Walk:
    """One pass over a package's ar members and their tars, within the limits."""

    def __init__(self, path: Path, limits: Limits, info: DebInfo) -> None:
        self.path = path
        self.limits = limits
        self.info = info
        self.declared = 0

    def count(self, size: int | None) -> None:
        counts = self.info.counts
        counts.members += 1
        if counts.members > self.limits.max_members:
            raise ValueError(f"it has more than max_members ({self.limits.max_members}) members")
        self.declared += size or 0
        if self.declared > self.limits.max_archive_bytes:
            raise ValueError(f"its members add up to more than max_archive_bytes "
                             f"({self.limits.max_archive_bytes} bytes) unpacked")

    def tar(self, blocks: Iterator[bytes], visit: Callable[[str, int, Any], None]) -> None:
        feed = Feed(blocks)
        try:
            with libarchive.stream_reader(feed, format_name="tar", filter_name="all",
                                          block_size=BLOCK) as inner:
                for entry in inner:
                    name = entry.pathname
                    path = member_path(name)
                    size = int(entry.size or 0)
                    # Directories count too: a tar of millions of empty directories is a bomb as well.
                    self.count(size)
                    if entry.isdir:
                        continue
                    if entry.issym or entry.islnk:
                        # A link is never indexed as a file: its target is someone else's business (and may
                        # lie outside the package), the file it names is indexed under its own name.
                        self.info.counts.links += 1
                        continue
                    if not entry.isreg or isinstance(name, bytes):
                        continue
                    if size > self.limits.max_member_bytes:
                        raise ValueError(f"member {path} is {size} bytes, more than max_member_bytes "
                                         f"({self.limits.max_member_bytes})")
                    self.info.counts.files += 1
                    self.info.counts.unpacked_bytes += size
                    visit(path, size, entry)
        except libarchive.ArchiveError as exc:
            if feed.error is not None:
                raise feed.error from None
            raise ValueError(f"a tar inside it cannot be read ({_said(exc)})") from None
        if feed.error is not None:
            raise feed.error

    def run(self, visit: Visitor) -> None:
        with self.path.open("rb") as file:
            source = Source(file, self.limits.max_archive_bytes)
            try:
                self._outer(source, visit)
                source.drain()
            except libarchive.ArchiveError as exc:
                if source.error is not None:
                    raise source.error from None
                raise ValueError(f"it is not a readable Debian package ({_said(exc)})") from None
            if source.error is not None:
                raise source.error
        self.info.sha256 = source.digest.hexdigest()
        self.info.size = source.size

    def _outer(self, source: Source, visit: Visitor) -> None:
        seen: list[str] = []
        with libarchive.stream_reader(source, format_name="ar", filter_name="none", block_size=BLOCK) as outer:
            for entry in outer:
                name = str(entry.pathname or "")
                size = int(entry.size or 0)
                self.count(0)
                if not seen and name != "debian-binary":
                    raise ValueError("its first member is not debian-binary: it is not a Debian package")
                seen.append(name)
                blocks = bounded(entry.get_blocks(BLOCK), size, f"member {name}")
                if name == "debian-binary":
                    if not _read_small(blocks, 64, "debian-binary").startswith(b"2."):
                        raise ValueError("its debian-binary does not say format 2.x")
                elif name.startswith("control.tar"):
                    self.tar(blocks, self._control)
                elif name.startswith("data.tar"):
                    if not self.info.control:
                        raise ValueError("its data.tar comes before its control file")
                    self.tar(blocks, lambda path, size, entry: visit(
                        path, size, bounded(entry.get_blocks(BLOCK), size, f"member {path}")))
        if not self.info.control:
            raise ValueError("it has no control.tar with a control file: it is not a Debian package")
        if not any(name.startswith("data.tar") for name in seen):
            raise ValueError("it has no data.tar: it is not a Debian package")

    def _control(self, path: str, size: int, entry: Any) -> None:
        if path != "/control":
            return
        if size > MAX_CONTROL_BYTES:
            raise ValueError(f"its control file is {size} bytes (a control file has at most {MAX_CONTROL_BYTES})")
        self.info.control = _parse_control(
            _read_small(entry.get_blocks(BLOCK), MAX_CONTROL_BYTES, "the control file"))


def _said(exc: libarchive.ArchiveError) -> str:
    return str(getattr(exc, "msg", None) or exc).strip() or "libarchive gave no reason"


def read_deb(path: Path, limits: Limits, visit: Visitor) -> DebInfo:
    """Walk a .deb/.ddeb: its control fields, then every regular data file through ``visit``.

    BadArchive (naming the archive and the reason) when it is not a package, is cut short, breaks a limit or
    has a member leaving the package root; ``visit``'s own RetracerErrors pass through as BadArchive too."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise BadArchive(path, f"it cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise BadArchive(path, "it is not a regular file")
    if info.st_size > limits.max_archive_bytes:
        raise BadArchive(path, f"it is {info.st_size} bytes, more than max_archive_bytes "
                               f"({limits.max_archive_bytes})")
    result = DebInfo(sha256="", size=info.st_size)
    try:
        _Walk(path, limits, result).run(visit)
    except BadArchive:
        raise
    except (ValueError, RetracerError) as exc:
        raise BadArchive(path, str(exc)) from None
    except OSError as exc:
        raise BadArchive(path, f"it cannot be read ({exc.strerror or exc})") from None
    except MemoryError:
        raise BadArchive(path, "reading it ran out of memory (a member claims more than can be held)") from None
    return result


def file_sha256(path: Path, limit: int | None = None) -> tuple[str, int]:
    """SHA-256 and size of a file; ValueError past ``limit`` bytes."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as file:
        while chunk := file.read(BLOCK * 4):
            size += len(chunk)
            if limit is not None and size > limit:
                raise ValueError(f"it is larger than the limit ({limit} bytes)")
            digest.update(chunk)
    return digest.hexdigest(), size
