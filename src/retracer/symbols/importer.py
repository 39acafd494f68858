"""`retracer symbols import`: packages and directories of ELF files into the index, one transaction per
archive, the same content (by SHA-256) once, nothing of a hostile archive kept."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from retracer.store import transaction
from retracer.store.models import SymbolArchive, SymbolFile
from retracer.symbols import release
from retracer.symbols.archive import BadArchive, Limits, archive_kind, file_sha256, read_deb
from retracer.symbols.elf import BadElf, identify, is_elf
from retracer.symbols.index import is_build_id

#: ELF members up to this size are examined in memory; larger ones (big debug files) spill to a temporary
#: file, as pyelftools needs to seek.
SPOOL_IN_MEMORY = 32 << 20
DEBUG_TREE = "/usr/lib/debug/"


@dataclass(frozen=True)
class FileRow:
    build_id: str
    kind: str
    member: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"build_id": self.build_id, "kind": self.kind, "member": self.member, "size": self.size}


@dataclass
class ArchiveResult:
    """What became of one archive (or loose ELF file)."""

    path: str
    kind: str                       # "deb", "ddeb" or "file"
    status: str = "pending"         # imported, would-import, already, moved, skipped, failed
    sha256: str | None = None
    package: str | None = None
    version: str | None = None
    architecture: str | None = None
    files: list[FileRow] = field(default_factory=list)
    elf_members: int = 0
    without_build_id: int = 0
    links: int = 0
    error: str | None = None
    known_as: str | None = None     # the path the same content was imported from before
    indexed: int | None = None      # files the index holds from it already (content imported before)
    released: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "status": self.status, "sha256": self.sha256,
                "package": self.package, "version": self.version, "architecture": self.architecture,
                "elf_members": self.elf_members, "without_build_id": self.without_build_id, "links": self.links,
                "files": [f.to_dict() for f in self.files], "error": self.error, "known_as": self.known_as,
                "indexed": self.indexed, "released_jobs": self.released}


@dataclass
class ImportReport:
    dry_run: bool
    archives: list[ArchiveResult] = field(default_factory=list)

    @property
    def failed(self) -> list[ArchiveResult]:
        return [a for a in self.archives if a.status == "failed"]

    @property
    def released(self) -> list[int]:
        return sorted({job for a in self.archives for job in a.released})

    def count(self, status: str) -> int:
        return sum(1 for a in self.archives if a.status == status)

    def to_dict(self) -> dict[str, Any]:
        statuses = ("imported", "would-import", "already", "moved", "skipped", "failed")
        return {"dry_run": self.dry_run, "counts": {s: self.count(s) for s in statuses},
                "files": sum(len(a.files) for a in self.archives if a.status in ("imported", "would-import")),
                "released_jobs": self.released, "archives": [a.to_dict() for a in self.archives]}


@dataclass(frozen=True)
class Candidate:
    path: Path
    kind: str   # "deb", "ddeb" or "file"


def candidates(paths: Sequence[Path]) -> tuple[list[Candidate], list[ArchiveResult]]:
    """What ``paths`` name: packages and loose ELF files (directories walked, links in them never followed),
    and a failed result for each path that is none of these."""
    found: list[Candidate] = []
    failed: list[ArchiveResult] = []
    for given in paths:
        # A path given by name is taken where it really lies (its links resolved), so that the index
        # records the file itself; inside directories, links are skipped.
        path = Path(os.path.realpath(given))
        try:
            info = os.stat(path)
        except OSError as exc:
            failed.append(ArchiveResult(str(path), "file", "failed", error=f"{path}: {exc.strerror}"))
            continue
        if stat.S_ISDIR(info.st_mode):
            found.extend(_walk(path))
        elif stat.S_ISREG(info.st_mode) and archive_kind(path):
            found.append(Candidate(path, str(archive_kind(path))))
        elif stat.S_ISREG(info.st_mode) and _starts_elf(path):
            found.append(Candidate(path, "file"))
        else:
            failed.append(ArchiveResult(str(path), "file", "failed", error=f"{path}: not a .deb, a .ddeb, an ELF "
                                        "file or a directory; nothing imported"))
    return _unique(found), failed


def _unique(found: list[Candidate]) -> list[Candidate]:
    seen: set[Path] = set()
    out = []
    for candidate in found:
        if candidate.path not in seen:
            seen.add(candidate.path)
            out.append(candidate)
    return out


def _walk(root: Path) -> Iterator[Candidate]:
    for directory, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            path = Path(directory) / name
            try:
                info = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISREG(info.st_mode):
                continue  # a link is never indexed as a file
            kind = archive_kind(path)
            if kind:
                yield Candidate(path, kind)
            elif info.st_size >= 52 and _starts_elf(path):
                yield Candidate(path, "file")


def _starts_elf(path: Path) -> bool:
    try:
        with path.open("rb") as file:
            return is_elf(file.read(4))
    except OSError:
        return False


class Importer:
    """Imports candidates one by one; each archive is its own transaction."""

    def __init__(self, factory: sessionmaker[Session], limits: Limits, actor: str, dry_run: bool = False) -> None:
        self.factory = factory
        self.limits = limits
        self.actor = actor
        self.dry_run = dry_run

    def run(self, paths: Sequence[Path],
            progress: Callable[[int, ArchiveResult | None], None] | None = None) -> ImportReport:
        """Import every candidate of ``paths``; ``progress(total, None)`` once, then ``(total, result)`` each."""
        found, failed = candidates(paths)
        report = ImportReport(self.dry_run, list(failed))
        if progress:
            progress(len(found), None)
        for candidate in found:
            result = self.one(candidate)
            report.archives.append(result)
            if progress:
                progress(len(found), result)
        return report

    def one(self, candidate: Candidate) -> ArchiveResult:
        result = ArchiveResult(str(candidate.path), candidate.kind)
        try:
            self._one(candidate, result)
        except BadArchive as exc:
            result.status, result.error, result.files = "failed", f"{exc}; nothing of it was imported", []
        except (BadElf, ValueError) as exc:
            result.status, result.files = "failed", []
            result.error = f"{candidate.path}: {exc}; nothing of it was imported"
        except OSError as exc:
            result.status, result.files = "failed", []
            result.error = f"{candidate.path}: it cannot be read ({exc.strerror or exc}); nothing of it was imported"
        return result

    def _one(self, candidate: Candidate, result: ArchiveResult) -> None:
        limit = self.limits.max_member_bytes if candidate.kind == "file" else self.limits.max_archive_bytes
        try:
            sha256, _ = file_sha256(candidate.path, limit)
        except ValueError as exc:
            what = "max_member_bytes" if candidate.kind == "file" else "max_archive_bytes"
            raise BadArchive(candidate.path, f"{exc} ({what})") from None
        result.sha256 = sha256
        if self._already(candidate, result):
            return
        if candidate.kind == "file":
            self._read_file(candidate.path, result)
        else:
            self._read_deb(candidate.path, result)
        if candidate.kind == "file" and not result.files:
            result.status = "skipped"
            return
        if self.dry_run:
            result.status = "would-import"
            return
        self._store(result)

    def _already(self, candidate: Candidate, result: ArchiveResult) -> bool:
        with self.factory() as session:
            row = session.scalars(select(SymbolArchive).where(SymbolArchive.sha256 == result.sha256)).first()
            if row is None:
                return False
            row_id, result.known_as = row.id, row.path
            result.package, result.version, result.architecture = row.package, row.version, row.architecture
            result.indexed = int(session.scalar(select(func.count()).select_from(SymbolFile)
                                                .where(SymbolFile.archive_id == row_id)) or 0)
        result.status = "already"
        if result.known_as != result.path and not os.path.exists(result.known_as):
            # The same bytes moved: serve them from where they now lie.
            result.status = "moved"
            if not self.dry_run:
                with transaction(self.factory) as tx:
                    moved = tx.get(SymbolArchive, row_id)
                    if moved is not None:
                        moved.path = result.path
                        if candidate.kind == "file":
                            for file in moved.files:
                                file.member = result.path
        return True

    def _read_deb(self, path: Path, result: ArchiveResult) -> None:
        rows: list[FileRow] = []
        counts = {"elf": 0, "no_id": 0}

        def visit(member: str, size: int, blocks: Iterator[bytes]) -> None:
            first = next(blocks, b"")
            if not is_elf(first):
                return
            counts["elf"] += 1
            try:
                with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
                    spool.write(first)
                    for block in blocks:
                        spool.write(block)
                    identity = identify(spool, spool.tell())
            except BadElf as exc:
                raise BadElf(f"member {member}: {exc}") from None
            if identity is None or identity.build_id is None or not is_build_id(identity.build_id):
                counts["no_id"] += 1
                return
            for kind in identity.kinds(member.startswith(DEBUG_TREE)):
                rows.append(FileRow(identity.build_id, kind, member, size))

        info = read_deb(path, self.limits, visit)
        if info.sha256 != result.sha256:
            raise BadArchive(path, "it changed while it was being imported; import it again once it is complete")
        result.package, result.version, result.architecture = info.package, info.version, info.architecture
        result.files = rows
        result.elf_members = counts["elf"]
        result.without_build_id = counts["no_id"]
        result.links = info.counts.links

    def _read_file(self, path: Path, result: ArchiveResult) -> None:
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size > self.limits.max_member_bytes:
                raise BadArchive(path, f"it is {size} bytes, more than max_member_bytes "
                                       f"({self.limits.max_member_bytes})")
            identity = identify(file, size)
        result.elf_members = 1
        if identity is None or identity.build_id is None or not is_build_id(identity.build_id):
            result.without_build_id = 1
            result.error = f"{path}: an ELF file without a GNU build-id (or not a program, library or debug file)"
            return
        text = str(path)
        in_tree = DEBUG_TREE in text or "/.build-id/" in text or text.endswith(".debug")
        result.files = [FileRow(identity.build_id, kind, text, size) for kind in identity.kinds(in_tree)]

    def _store(self, result: ArchiveResult) -> None:
        try:
            with transaction(self.factory) as session:
                archive = SymbolArchive(path=result.path, sha256=result.sha256, size=os.path.getsize(result.path),
                                        kind=result.kind, package=result.package, version=result.version,
                                        architecture=result.architecture, imported_by=self.actor)
                archive.files = [SymbolFile(build_id=f.build_id, kind=f.kind, member=f.member, size=f.size)
                                 for f in result.files]
                session.add(archive)
                session.flush()
                result.released = list(release.release_unblocked(
                    session, self.actor, build_ids={f.build_id for f in result.files}))
        except IntegrityError:
            # Another import of the same content committed first.
            result.status, result.released = "already", []
            return
        result.status = "imported"


def import_paths(factory: sessionmaker[Session], paths: Sequence[Path], limits: Limits, actor: str,
                 dry_run: bool = False,
                 progress: Callable[[int, ArchiveResult | None], None] | None = None) -> ImportReport:
    return Importer(factory, limits, actor, dry_run).run(paths, progress)
