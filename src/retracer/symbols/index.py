"""Lookups in the symbol index (the contract the CLI, the web routes and the worker share; filled in by the
import's owner)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

#: What a member of an archive is: an executable or shared library, or separate debug info.
KINDS = ("executable", "debuginfo")


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


def lookup(session: Session, build_ids: Sequence[str]) -> list[Found]:
    """Every indexed file with one of ``build_ids`` (normalised to lower-case hex), in the order asked."""
    raise NotImplementedError


def find(session: Session, build_id: str, kind: str) -> Found | None:
    """The file to serve for ``build_id`` of ``kind``, or None."""
    raise NotImplementedError


def package_files(session: Session, name: str, version: str | None = None) -> list[Found]:
    """Every indexed file of a package (of one version, or of all)."""
    raise NotImplementedError
