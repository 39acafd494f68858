"""`retracer symbols import|lookup|package`: real .deb/.ddeb packages (dpkg-deb) into the index on SQLite,
idempotency, dry runs, directories, links, and the lookups the web routes and the worker use."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from retracer.store import transaction
from retracer.store.models import SymbolArchive, SymbolFile
from retracer.symbols import release
from retracer.symbols.archive import Limits
from retracer.symbols.importer import import_paths
from retracer.symbols.index import BadBuildId, find, lookup, normalise_build_id, package_files
from retracer.symbols.members import MemberUnavailable, open_member
from retracer.testing.packages import Packages, make_packages, missing_tools
from tests.unit.clirun import Retracer

pytestmark = pytest.mark.skipif(bool(missing_tools()), reason=f"needs {missing_tools()}")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    return make_packages(tmp_path_factory.mktemp("packages"), name="crashy", version="2:1.0-1")


@pytest.fixture
def pkgs(tmp_path: Path, built: Packages) -> Packages:
    """The module's packages copied into this test's directory (tests move and delete them)."""
    where = tmp_path / "pool"
    where.mkdir()
    deb = Path(shutil.copy(built.deb, where))
    ddeb = Path(shutil.copy(built.ddeb, where))
    return Packages(deb, ddeb, built.build_id, built.name, built.version, built.architecture,
                    built.executable_member, built.debug_member, built.program)


def _counts(rt: Retracer) -> tuple[int, int]:
    with rt.factory() as session:
        return (session.scalar(select(func.count()).select_from(SymbolArchive)) or 0,
                session.scalar(select(func.count()).select_from(SymbolFile)) or 0)


def test_import_indexes_executable_and_debug_file_with_package_fields(rt: Retracer, pkgs: Packages) -> None:
    out = rt.json(f"symbols import {pkgs.deb} {pkgs.ddeb}")
    assert out["counts"]["imported"] == 2 and out["counts"]["failed"] == 0
    with rt.factory() as session:
        found = lookup(session, [pkgs.build_id.upper()])
    assert [(f.kind, f.member, f.package, f.version, f.architecture, f.archive_kind) for f in found] == [
        ("executable", "/usr/bin/crashy", "crashy", "2:1.0-1", pkgs.architecture, "deb"),
        ("debuginfo", pkgs.debug_member, "crashy-dbgsym", "2:1.0-1", pkgs.architecture, "ddeb")]
    assert found[0].archive_path == str(pkgs.deb.resolve())
    assert found[0].darkserver() == {"buildid": pkgs.build_id, "elf": "/usr/bin/crashy", "package": "crashy",
                                     "version": "2:1.0-1", "architecture": pkgs.architecture,
                                     "kind": "executable"}


def test_members_stream_back_byte_for_byte(rt: Retracer, pkgs: Packages, built: Packages) -> None:
    rt.ok(f"symbols import {pkgs.deb} {pkgs.ddeb}")
    with rt.factory() as session:
        exe = find(session, pkgs.build_id, "executable")
        dbg = find(session, pkgs.build_id, "debuginfo")
    assert exe is not None and dbg is not None
    root = built.program.unstripped.parent
    with open_member(exe) as reader:
        assert reader.read(10) + reader.read() == (root / "deb-root/usr/bin/crashy").read_bytes()
    with open_member(dbg) as reader:
        assert b"".join(reader) == (root / "ddeb-root" / pkgs.debug_member.lstrip("/")).read_bytes()


def test_same_content_twice_changes_nothing_and_says_so(rt: Retracer, pkgs: Packages) -> None:
    rt.ok(f"symbols import {pkgs.deb} {pkgs.ddeb}")
    before = _counts(rt)
    out = rt.json(f"symbols import {pkgs.deb} {pkgs.ddeb}")
    assert out["counts"] == {"imported": 0, "would-import": 0, "already": 2, "moved": 0, "skipped": 0,
                             "failed": 0}
    assert _counts(rt) == before == (2, 2)
    text = rt.ok(f"symbols import {pkgs.deb}")
    assert "already imported: 1" in text


def test_moved_package_is_served_from_where_it_now_lies(rt: Retracer, pkgs: Packages, tmp_path: Path) -> None:
    rt.ok(f"symbols import {pkgs.deb}")
    moved = tmp_path / "elsewhere.deb"
    pkgs.deb.rename(moved)
    out = rt.json(f"symbols import {moved}")
    assert out["archives"][0]["status"] == "moved"
    with rt.factory() as session:
        found = find(session, pkgs.build_id, "executable")
    assert found is not None and found.archive_path == str(moved)
    assert _counts(rt) == (1, 1)


def test_dry_run_reports_and_writes_nothing(rt: Retracer, pkgs: Packages) -> None:
    out = rt.json(f"symbols import --dry-run {pkgs.deb} {pkgs.ddeb}")
    assert out["dry_run"] is True and out["counts"]["would-import"] == 2
    assert {f["kind"] for a in out["archives"] for f in a["files"]} == {"executable", "debuginfo"}
    assert _counts(rt) == (0, 0)
    assert "nothing was changed" in rt.ok(f"symbols import --dry-run {pkgs.deb}")


def test_directory_walk_takes_packages_and_loose_elf_files_but_never_links(rt: Retracer, tmp_path: Path,
                                                                          pkgs: Packages,
                                                                          built: Packages) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    shutil.copy(pkgs.deb, tree / "sub")
    unstripped = Path(shutil.copy(built.program.unstripped, tree / "prog.full"))
    (tree / "notes.txt").write_text("not ELF\n", encoding="utf-8")
    (tree / "link-to-elf").symlink_to(unstripped)
    (tree / "link-to-deb.deb").symlink_to(tree / "sub" / pkgs.deb.name)
    out = rt.json(f"symbols import {tree}")
    paths = {a["path"]: a for a in out["archives"]}
    assert set(paths) == {str(tree / "sub" / pkgs.deb.name), str(unstripped)}
    # An unstripped program is both the executable and its debug info, as debuginfod serves it.
    assert {f["kind"] for f in paths[str(unstripped)]["files"]} == {"executable", "debuginfo"}
    assert paths[str(unstripped)]["files"][0]["member"] == str(unstripped)


def test_debug_file_is_told_from_executable_by_its_sections_outside_the_debug_tree(
        rt: Retracer, tmp_path: Path, built: Packages) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    debug = Path(shutil.copy(built.program.debug_file, loose / "prog.dbg"))
    stripped = Path(shutil.copy(built.program.executable, loose / "prog"))
    out = rt.json(f"symbols import {loose}")
    kinds = {a["path"]: [f["kind"] for f in a["files"]] for a in out["archives"]}
    assert kinds == {str(debug): ["debuginfo"], str(stripped): ["executable"]}


def test_release_runs_in_the_import_transaction_after_the_rows_are_flushed(
        rt: Retracer, pkgs: Packages, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, int, set[str]]] = []

    def fake_release(session: Session, actor: str, build_ids: set[str]) -> list[int]:
        seen.append((actor, session.scalar(select(func.count()).select_from(SymbolFile)) or 0, build_ids))
        return [7, 3]

    monkeypatch.setattr(release, "release_unblocked", fake_release)
    out = rt.json(f"symbols import --as celso {pkgs.deb}")
    # Only what the archive brought is looked for among the missing build-ids.
    assert seen == [("admin:celso", 1, {pkgs.build_id})]
    assert out["released_jobs"] == [3, 7]
    assert "released job(s): 3, 7" in rt.ok(f"symbols import --as celso {pkgs.ddeb}")


def test_a_failing_release_leaves_nothing_of_the_archive(rt: Retracer, pkgs: Packages,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(session: Session, actor: str, build_ids: set[str]) -> list[int]:
        raise RuntimeError("release broke")

    monkeypatch.setattr(release, "release_unblocked", broken)
    with pytest.raises(RuntimeError):
        import_paths(rt.factory, [pkgs.deb], Limits(), "admin:t")
    assert _counts(rt) == (0, 0)


def test_lookup_cli_tables_json_and_errors(rt: Retracer, pkgs: Packages) -> None:
    rt.ok(f"symbols import {pkgs.deb} {pkgs.ddeb}")
    table = rt.ok(f"symbols lookup {pkgs.build_id}")
    assert "/usr/bin/crashy" in table and "crashy-dbgsym" in table
    assert [d["kind"] for d in rt.json(f"symbols lookup {pkgs.build_id}")] == ["executable", "debuginfo"]
    missing = rt.run(f"symbols lookup {pkgs.build_id} {'ab' * 20}")
    assert missing.exit_code == 1 and f"not in the index: {'ab' * 20}" in missing.output
    bad = rt.run("symbols lookup zz-not-hex")
    assert bad.exit_code == 1 and "is not hexadecimal" in bad.output and "Traceback" not in bad.output
    long = rt.run(f"symbols lookup {'a' * 200}")
    assert long.exit_code == 1 and "200 hex digits long" in long.output
    as_json = rt.run("symbols lookup nothex --json")
    assert as_json.exit_code == 1 and "not hexadecimal" in json.loads(as_json.output)["error"]


def test_package_cli_lists_files_of_a_version(rt: Retracer, pkgs: Packages) -> None:
    rt.ok(f"symbols import {pkgs.deb} {pkgs.ddeb}")
    rows = rt.json("symbols package crashy-dbgsym 2:1.0-1")
    assert [(r["buildid"], r["elf"], r["kind"]) for r in rows] == [(pkgs.build_id, pkgs.debug_member, "debuginfo")]
    assert rt.json("symbols package crashy")[0]["elf"] == "/usr/bin/crashy"
    none = rt.run("symbols package crashy 9.9")
    assert none.exit_code == 1 and "no file of package crashy 9.9" in none.output


def test_find_prefers_a_copy_that_still_exists(rt: Retracer, pkgs: Packages, tmp_path: Path,
                                               built: Packages) -> None:
    loose = Path(shutil.copy(built.program.unstripped, tmp_path / "prog.full"))
    rt.ok(f"symbols import {pkgs.deb}")
    rt.ok(f"symbols import {loose}")
    with rt.factory() as session:
        newest = find(session, pkgs.build_id, "executable")
        assert newest is not None and newest.archive_path == str(loose)
        loose.unlink()
        remaining = find(session, pkgs.build_id, "executable")
        assert remaining is not None and remaining.archive_path == str(pkgs.deb.resolve())
        assert find(session, pkgs.build_id, "source") is None
        assert find(session, "not-hex", "executable") is None
    with pytest.raises(MemberUnavailable, match="cannot be read"), open_member(newest):
        pass


def test_open_member_refuses_a_package_replaced_since_import(rt: Retracer, pkgs: Packages,
                                                             tmp_path: Path) -> None:
    rt.ok(f"symbols import {pkgs.deb}")
    with rt.factory() as session:
        found = find(session, pkgs.build_id, "executable")
    assert found is not None
    other = make_packages(tmp_path / "other", name="crashy", variant=1)
    shutil.copy(other.deb, pkgs.deb)
    with pytest.raises(MemberUnavailable, match="changed since it was imported"), open_member(found):
        pass


def test_lookup_keeps_the_order_asked_and_ignores_invalid_ids(rt: Retracer, tmp_path: Path) -> None:
    with transaction(rt.factory) as session:
        for n, build_id in enumerate(["aa" * 20, "bb" * 20]):
            archive = SymbolArchive(path=f"/p/{n}.deb", sha256=f"{n:064x}", size=1, kind="deb", package=f"p{n}",
                                    version="1", architecture="amd64", imported_by="t")
            archive.files = [SymbolFile(build_id=build_id, kind="debuginfo", member=f"/m{n}", size=1)]
            session.add(archive)
    with rt.factory() as session:
        assert [f.build_id for f in lookup(session, ["BB" * 20, "xx", "aa" * 20, "bb" * 20])] == ["bb" * 20,
                                                                                                 "aa" * 20]
        assert [f.member for f in package_files(session, "p1", "1")] == ["/m1"]
        assert package_files(session, "p1", "2") == []


@pytest.mark.parametrize(("text", "why"), [("", "not hexadecimal"), ("abc", "odd number"), ("ab", "2 hex digits"),
                                      ("a" * 130, "130 hex digits"), ("12 34", "not hexadecimal")])
def test_build_id_validation(text: str, why: str) -> None:
    with pytest.raises(BadBuildId, match=why):
        normalise_build_id(text)
    assert normalise_build_id(" ABCD ") == "abcd"


def test_not_a_package_nor_elf_on_the_command_line_fails_with_status_1(rt: Retracer, tmp_path: Path,
                                                                        pkgs: Packages) -> None:
    text = tmp_path / "readme.txt"
    text.write_text("hello\n", encoding="utf-8")
    result = rt.run(f"symbols import {text} {tmp_path / 'absent.deb'} {pkgs.deb}")
    assert result.exit_code == 1
    assert "not a .deb, a .ddeb, an ELF file or a directory" in result.output
    assert "absent.deb: No such file or directory" in result.output
    assert _counts(rt) == (1, 1)
