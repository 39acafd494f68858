"""Hostile archives and ELF files: each is refused whole with its name and the reason, nothing of it indexed,
and the other archives of the same run still imported (exit status 1)."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from sqlalchemy import func, select

from retracer.store.models import SymbolArchive, SymbolFile
from retracer.symbols.archive import BadArchive, Limits, member_path, read_deb
from retracer.symbols.elf import BadElf, identify
from retracer.testing.packages import Packages, make_packages, missing_tools
from tests.unit.clirun import Retracer

pytestmark = pytest.mark.skipif(bool(missing_tools()) or not os.path.exists("/usr/bin/ar"),
                                reason="needs gcc, objcopy, dpkg-deb and ar")

CONTROL = "Package: evil\nVersion: 1\nArchitecture: amd64\nMaintainer: x <x@example.invalid>\nDescription: x\n"


@dataclass(frozen=True)
class Entry:
    name: str
    data: bytes = b""
    kind: bytes = tarfile.REGTYPE
    link: str = ""


def _tar(entries: Sequence[Entry], mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=tarfile.GNU_FORMAT) as tar:  # type: ignore[call-overload]
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type = entry.kind
            info.linkname = entry.link
            info.size = len(entry.data) if entry.kind == tarfile.REGTYPE else 0
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(entry.data) if entry.kind == tarfile.REGTYPE else None)
    return buf.getvalue()


def make_deb(where: Path, name: str, entries: Sequence[Entry], control: str = CONTROL,
             members: Sequence[str] = ("debian-binary", "control.tar.gz", "data.tar.xz")) -> Path:
    """A .deb put together by hand: tarfile for the tars, binutils' ar for the outside."""
    work = where / f"{name}.parts"
    work.mkdir(parents=True)
    (work / "debian-binary").write_bytes(b"2.0\n")
    (work / "control.tar.gz").write_bytes(_tar([Entry("./control", control.encode())], "w:gz"))
    (work / "data.tar.xz").write_bytes(_tar(entries, "w:xz"))
    out = where / f"{name}.deb"
    subprocess.run(["ar", "rc", str(out), *members], cwd=work, check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    return make_packages(tmp_path_factory.mktemp("pk"), name="good")


@pytest.fixture(scope="module")
def elf(built: Packages) -> bytes:
    return (built.program.unstripped.parent / "deb-root/usr/bin/good").read_bytes()


def _rows(rt: Retracer) -> tuple[int, int]:
    with rt.factory() as session:
        return (session.scalar(select(func.count()).select_from(SymbolArchive)) or 0,
                session.scalar(select(func.count()).select_from(SymbolFile)) or 0)


def _refused(rt: Retracer, bad: Path, good: Path, reason: str) -> None:
    """``bad`` fails with ``reason`` and nothing of it is indexed; ``good``, in the same run, goes in."""
    result = rt.run(f"symbols import --json {bad} {good}")
    assert result.exit_code == 1, result.output
    out = json.loads(result.output)
    by_path = {a["path"]: a for a in out["archives"]}
    failed = by_path[str(bad)]
    assert failed["status"] == "failed" and failed["files"] == []
    assert str(bad) in failed["error"] and reason in failed["error"], failed["error"]
    assert by_path[str(good)]["status"] == "imported"
    assert _rows(rt) == (1, 1)
    with rt.factory() as session:
        assert session.scalars(select(SymbolArchive.path)).all() == [str(good)]


def _elf_patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    patched = bytearray(data)
    struct.pack_into("<" + fmt, patched, offset, value)
    return bytes(patched)


def _section_offset(data: bytes, name: str) -> int:
    """Where the section header of ``name`` lies."""
    elf = ELFFile(io.BytesIO(data))
    for index, section in enumerate(elf.iter_sections()):
        if section.name == name:
            return int(elf.header["e_shoff"]) + index * int(elf.header["e_shentsize"])
    raise AssertionError(name)


def _note_offset(data: bytes) -> int:
    section = ELFFile(io.BytesIO(data)).get_section_by_name(".note.gnu.build-id")
    assert section is not None
    return int(section["sh_offset"])


LYING_ELVES: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "program headers past the end": (lambda d: _elf_patch(d, 32, "Q", len(d) + 64), "program header table"),
    "section headers past the end": (lambda d: _elf_patch(d, 40, "Q", len(d) - 10), "section header table"),
    "too many sections": (lambda d: _elf_patch(d, 60, "H", 60000), "section header table"),
    "section bigger than the file": (lambda d: _elf_patch(d, _section_offset(d, ".text") + 32, "Q", 1 << 40),
                                     "past its end"),
    "note bigger than its table": (lambda d: _elf_patch(d, _note_offset(d) + 4, "I", 0x7FFFFFF0),
                                   "a note claims"),
    "names table out of range": (lambda d: _elf_patch(d, 62, "H", 999), "section-name table index"),
    "cut short": (lambda d: d[:300], "past its end"),
    "garbage after the magic": (lambda d: b"\x7fELF" + b"\xff" * 60 + d[64:200], "header"),
}


@pytest.mark.parametrize("case", sorted(LYING_ELVES))
def test_lying_elf_is_refused_by_the_reader(elf: bytes, case: str) -> None:
    mutate, reason = LYING_ELVES[case]
    data = mutate(elf)
    with pytest.raises(BadElf, match=reason):
        identify(io.BytesIO(data), len(data))


def test_the_real_elf_reads(elf: bytes, built: Packages) -> None:
    identity = identify(io.BytesIO(elf), len(elf))
    assert identity is not None and identity.build_id == built.build_id
    assert identity.kinds(in_debug_tree=False) == ("executable",)


@pytest.mark.parametrize("case", ["section headers past the end", "note bigger than its table", "cut short"])
def test_package_with_a_lying_elf_is_refused_whole(rt: Retracer, tmp_path: Path, elf: bytes, built: Packages,
                                                   case: str) -> None:
    mutate, _ = LYING_ELVES[case]
    # A sound ELF member first: it must not be indexed either.
    bad = make_deb(tmp_path, "lying", [Entry("./usr/bin/fine", elf), Entry("./usr/bin/liar", mutate(elf))])
    _refused(rt, bad, built.deb, "member /usr/bin/liar")


@pytest.mark.parametrize(("name", "reason"), [("../../etc/evil", "climbs out"), ("./usr/../../evil", "climbs out"),
                                         ("/usr/bin/abs", "absolute path")])
def test_members_leaving_the_package_root(rt: Retracer, tmp_path: Path, elf: bytes, built: Packages,
                                          name: str, reason: str) -> None:
    bad = make_deb(tmp_path, "escape", [Entry("./usr/bin/fine", elf), Entry(name, elf)])
    _refused(rt, bad, built.deb, reason)


def test_links_are_never_indexed_whatever_their_target(rt: Retracer, tmp_path: Path, elf: bytes,
                                                       built: Packages) -> None:
    deb = make_deb(tmp_path, "links", [
        Entry("./usr/bin/real", elf),
        Entry("./usr/bin/sym", kind=tarfile.SYMTYPE, link="real"),
        Entry("./usr/bin/outside", kind=tarfile.SYMTYPE, link="../../../../bin/sh"),
        Entry("./usr/bin/hard", kind=tarfile.LNKTYPE, link="./usr/bin/real")])
    out = rt.json(f"symbols import {deb}")
    archive = out["archives"][0]
    assert archive["status"] == "imported" and archive["links"] == 3
    assert [f["member"] for f in archive["files"]] == ["/usr/bin/real"]
    assert archive["files"][0]["build_id"] == built.build_id


def test_member_count_bomb(rt: Retracer, tmp_path: Path, built: Packages) -> None:
    rt.env["RETRACER__SYMBOLS__MAX_MEMBERS"] = "50"
    bad = make_deb(tmp_path, "many", [Entry(f"./usr/share/f{i}", b"x") for i in range(60)])
    _refused(rt, bad, built.deb, "more than max_members (50)")


def test_directories_count_as_members(rt: Retracer, tmp_path: Path, built: Packages) -> None:
    rt.env["RETRACER__SYMBOLS__MAX_MEMBERS"] = "50"
    bad = make_deb(tmp_path, "dirs", [Entry(f"./usr/share/d{i}/", kind=tarfile.DIRTYPE) for i in range(60)])
    _refused(rt, bad, built.deb, "more than max_members (50)")


def test_member_size_bomb(rt: Retracer, tmp_path: Path, built: Packages, elf: bytes) -> None:
    rt.env["RETRACER__SYMBOLS__MAX_MEMBER_BYTES"] = str(len(elf) + 1)
    bad = make_deb(tmp_path, "big", [Entry("./usr/share/zeros", bytes(len(elf) + 2))])
    _refused(rt, bad, built.deb, "more than max_member_bytes")


def test_unpacked_size_bomb(rt: Retracer, tmp_path: Path, built: Packages) -> None:
    # 16 MiB of zeros packs into a few kilobytes: the limit is on what the members unpack to.
    rt.env["RETRACER__SYMBOLS__MAX_ARCHIVE_BYTES"] = str(1 << 20)
    bad = make_deb(tmp_path, "zeros", [Entry(f"./usr/share/z{i}", bytes(1 << 19)) for i in range(32)])
    assert bad.stat().st_size < built.deb.stat().st_size * 4
    _refused(rt, bad, built.deb, "more than max_archive_bytes")


def test_archive_file_size_limit(rt: Retracer, tmp_path: Path, built: Packages) -> None:
    rt.env["RETRACER__SYMBOLS__MAX_ARCHIVE_BYTES"] = str(64 << 10)
    bad = make_deb(tmp_path, "large", [Entry("./usr/share/noise", os.urandom(200 << 10))])
    _refused(rt, bad, built.deb, "larger than the limit (65536 bytes) (max_archive_bytes)")


def test_truncated_archive(rt: Retracer, tmp_path: Path, built: Packages) -> None:
    bad = tmp_path / "cut.deb"
    data = built.ddeb.read_bytes()
    bad.write_bytes(data[:len(data) * 2 // 3])
    _refused(rt, bad, built.deb, str(bad))
    assert "Traceback" not in rt.run(f"symbols import {bad}").output


@pytest.mark.parametrize(("content", "reason"), [
    (b"", "not a readable Debian package"),
    (b"this is not an archive at all\n" * 40, "not a readable Debian package"),
    (b"!<arch>\n", "no control.tar"),
])
def test_not_an_archive(rt: Retracer, tmp_path: Path, built: Packages, content: bytes, reason: str) -> None:
    bad = tmp_path / "fake.ddeb"
    bad.write_bytes(content)
    _refused(rt, bad, built.deb, reason)


def test_a_tar_is_not_a_package(rt: Retracer, tmp_path: Path, built: Packages, elf: bytes) -> None:
    bad = tmp_path / "tar.deb"
    bad.write_bytes(_tar([Entry("./usr/bin/x", elf)], "w"))
    _refused(rt, bad, built.deb, "not a readable Debian package")


@pytest.mark.parametrize(("members", "reason"), [
    (("control.tar.gz", "debian-binary", "data.tar.xz"), "first member is not debian-binary"),
    (("debian-binary", "data.tar.xz", "control.tar.gz"), "data.tar comes before its control file"),
    (("debian-binary", "control.tar.gz"), "no data.tar"),
])
def test_misordered_or_incomplete_packages(rt: Retracer, tmp_path: Path, built: Packages, elf: bytes,
                                           members: tuple[str, ...], reason: str) -> None:
    bad = make_deb(tmp_path, "odd", [Entry("./usr/bin/x", elf)], members=members)
    _refused(rt, bad, built.deb, reason)


@pytest.mark.parametrize(("control", "reason"), [
    ("Version: 1\nArchitecture: amd64\n", "no Package field"),
    ("Package: " + "p" * 300 + "\nVersion: 1\n", "longer than 200"),
])
def test_bad_control_files(rt: Retracer, tmp_path: Path, built: Packages, elf: bytes, control: str,
                           reason: str) -> None:
    bad = make_deb(tmp_path, "ctl", [Entry("./usr/bin/x", elf)], control=control)
    _refused(rt, bad, built.deb, reason)


def test_a_hostile_loose_elf_in_a_directory_fails_alone(rt: Retracer, tmp_path: Path, elf: bytes,
                                                        built: Packages) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "liar").write_bytes(LYING_ELVES["section headers past the end"][0](elf))
    (tree / "fine").write_bytes(elf)
    result = rt.run(f"symbols import --json {tree}")
    assert result.exit_code == 1
    out = json.loads(result.output)
    assert {a["path"]: a["status"] for a in out["archives"]} == {str(tree / "liar"): "failed",
                                                                 str(tree / "fine"): "imported"}
    assert _rows(rt) == (1, 1)


def test_member_path_normalisation() -> None:
    assert member_path("./usr/bin/x") == "/usr/bin/x"
    assert member_path("usr//bin/./x") == "/usr/bin/x"
    with pytest.raises(ValueError, match="climbs out"):
        member_path("usr/bin/../../../x")


def test_read_deb_names_the_archive(tmp_path: Path) -> None:
    bad = tmp_path / "x.deb"
    bad.write_bytes(b"\0" * 100)
    with pytest.raises(BadArchive) as caught:
        read_deb(bad, Limits(), lambda path, size, blocks: None)
    assert caught.value.path == str(bad) and str(caught.value).startswith(str(bad))
