"""Lookups in the symbol index: the contract the CLI, the web routes and the worker share."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from retracer.errors import RetracerError
from retracer.store.models import SymbolArchive, SymbolFile

#: What a member of an archive is: an executable or shared library, or separate debug info.
KINDS = ("executable", "debuginfo")

#: A GNU build-id is a hash: SHA-1 (20 bytes) in practice; anything from 2 to 64 bytes is accepted (the
#: column holds 128 hex digits) because linkers may be told to use other lengths.
MIN_BUILD_ID_HEX = 4
MAX_BUILD_ID_HEX = 128
_HEX = re.compile(r"[0-9a-f]+")


class BadBuildId(RetracerError):
    """Raised when a build-id is not an even number of hex digits of a plausible length."""


def normalise_build_id(text: str) -> str:
    """``text`` as lower-case hex, or BadBuildId saying what is wrong with it."""
    value = text.strip().lower()
    shown = text if len(text) <= 80 else text[:77] + "..."
    if not value or not _HEX.fullmatch(value):
        raise BadBuildId(f"build-id {shown!r} is not hexadecimal: give the GNU build-id as hex digits "
                         "(as `readelf -n` or `file` prints it)")
    if len(value) % 2:
        raise BadBuildId(f"build-id {shown!r} has an odd number of hex digits: a build-id is whole bytes")
    if not MIN_BUILD_ID_HEX <= len(value) <= MAX_BUILD_ID_HEX:
        raise BadBuildId(f"build-id {shown!r} is {len(value)} hex digits long: a build-id has "
                         f"{MIN_BUILD_ID_HEX} to {MAX_BUILD_ID_HEX}")
    return value


def is_build_id(text: str) -> bool:
    try:
        normalise_build_id(text)
    except BadBuildId:
        return False
    return True


@dataclass(frozen=True)
class Found:
    """One indexed ELF file: what it is and where its bytes lie."""

    build_id: str
    kind: str
    member: str            # path inside the package ("/usr/bin/foo"), or the file's own path for a loose file
    size: int
    archive_path: str      # the .deb/.ddeb (or the loose file) as imported
    archive_kind: str      # "deb", "ddeb" or "file"
    package: str | None
    version: str | None
    architecture: str | None

    def darkserver(self) -> dict[str, str | None]:
        """Darkserver's shape of a build-id answer."""
        return {"buildid": self.build_id, "elf": self.member, "package": self.package,
                "version": self.version, "architecture": self.architecture, "kind": self.kind}


def _select() -> Select[*tuple[Any, ...]]:
    return (select(SymbolFile.build_id, SymbolFile.kind, SymbolFile.member, SymbolFile.size,
                   SymbolArchive.path, SymbolArchive.kind, SymbolArchive.package, SymbolArchive.version,
                   SymbolArchive.architecture, SymbolArchive.id)
            .join(SymbolArchive, SymbolArchive.id == SymbolFile.archive_id))


def _found(row: Any) -> Found:
    build_id, kind, member, size, path, akind, package, version, arch = row[:9]
    return Found(build_id=str(build_id), kind=str(kind), member=str(member), size=int(size),
                 archive_path=str(path), archive_kind=str(akind),
                 package=None if package is None else str(package),
                 version=None if version is None else str(version),
                 architecture=None if arch is None else str(arch))


def _normalised(build_ids: Sequence[str]) -> list[str]:
    """The valid build-ids among ``build_ids``, lower-cased, first occurrence kept; invalid ones match nothing."""
    seen: dict[str, None] = {}
    for text in build_ids:
        if is_build_id(text):
            seen.setdefault(text.strip().lower(), None)
    return list(seen)


#: Build-ids per IN (...) query: far below every database's bound-parameter limit.
_CHUNK = 500


def lookup(session: Session, build_ids: Sequence[str]) -> list[Found]:
    """Every indexed file with one of ``build_ids`` (normalised to lower-case hex), in the order asked.

    Within one build-id: executables before debug info, then in import order. Ids that are not valid
    build-ids match nothing (callers that want an error call normalise_build_id first)."""
    wanted = _normalised(build_ids)
    by_id: dict[str, list[tuple[int, int, Found]]] = {b: [] for b in wanted}
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start:start + _CHUNK]
        query = _select().where(SymbolFile.build_id.in_(chunk))
        for row in session.execute(query):
            found = _found(row)
            by_id[found.build_id].append((KINDS.index(found.kind) if found.kind in KINDS else len(KINDS),
                                          int(row[9]), found))
    out: list[Found] = []
    for build_id in wanted:
        out.extend(found for _, _, found in sorted(by_id[build_id], key=lambda item: (item[0], item[1])))
    return out


def find(session: Session, build_id: str, kind: str) -> Found | None:
    """The file to serve for ``build_id`` of ``kind``, or None.

    When several packages hold it (the same build-id means the same bytes), the most recently imported one
    whose archive still exists on disk wins, so a moved or deleted package does not hide another copy."""
    if kind not in KINDS or not is_build_id(build_id):
        return None
    query = (_select().where(SymbolFile.build_id == build_id.strip().lower(),
                             SymbolFile.kind == kind)
             .order_by(SymbolArchive.id.desc()).limit(20))
    candidates = [_found(row) for row in session.execute(query)]
    for found in candidates:
        if os.path.exists(found.archive_path):
            return found
    return candidates[0] if candidates else None


def package_files(session: Session, name: str, version: str | None = None) -> list[Found]:
    """Every indexed file of a package (of one version, or of all), by version, then member path."""
    query = _select().where(SymbolArchive.package == name)
    if version is not None:
        query = query.where(SymbolArchive.version == version)
    query = query.order_by(SymbolArchive.version, SymbolArchive.architecture, SymbolFile.member,
                           SymbolFile.kind)
    return [_found(row) for row in session.execute(query)]
