"""`retracer symbols import`, `lookup` and `package` as processes, on SQLite and on the real PostgreSQL, with
packages built by gcc, objcopy and dpkg-deb."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from retracer import store
from retracer.symbols.index import find
from retracer.symbols.members import open_member
from retracer.testing.instance import Instance
from retracer.testing.packages import Packages, make_packages, missing_tools

pytestmark = pytest.mark.skipif(bool(missing_tools()), reason=f"needs {missing_tools()}")


@pytest.fixture
def inst(tmp_path: Path, db_url: str) -> Iterator[Instance]:
    instance = Instance(tmp_path / "data", db_url)
    yield instance
    instance.close()


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Packages]]:
    """Two programs, each a .deb and a .ddeb (gzip and zstd, as distributions use both), in one directory."""
    where = tmp_path_factory.mktemp("pool")
    return where, [make_packages(where, name="alpha", version="1.0-1", compression="gzip"),
                   make_packages(where, name="beta", version="2.3-0ubuntu1", compression="zstd")]


def test_import_then_lookup_by_command_line(inst: Instance, pool: tuple[Path, list[Packages]]) -> None:
    where, (alpha, beta) = pool
    first = inst.json("symbols", "import", str(where))
    assert first["counts"]["imported"] >= 4 and first["counts"]["failed"] == 0
    imported = {a["package"] for a in first["archives"] if a["kind"] in ("deb", "ddeb")}
    assert imported == {"alpha", "alpha-dbgsym", "beta", "beta-dbgsym"}

    again = inst.json("symbols", "import", str(alpha.deb), str(beta.ddeb))
    assert again["counts"]["already"] == 2 and again["counts"]["imported"] == 0

    found = inst.json("symbols", "lookup", beta.build_id, alpha.build_id)
    packaged = [(d["buildid"], d["package"], d["kind"], d["elf"]) for d in found if d["package"]]
    assert packaged == [(beta.build_id, "beta", "executable", "/usr/bin/beta"),
                        (beta.build_id, "beta-dbgsym", "debuginfo", beta.debug_member),
                        (alpha.build_id, "alpha", "executable", "/usr/bin/alpha"),
                        (alpha.build_id, "alpha-dbgsym", "debuginfo", alpha.debug_member)]

    table = inst.run("symbols", "lookup", alpha.build_id).stdout
    assert "alpha-dbgsym" in table and str(alpha.ddeb) in table
    missing = inst.run("symbols", "lookup", "ab" * 20, check=False)
    assert missing.returncode == 1 and "not in the index" in missing.stderr
    bad = inst.run("symbols", "lookup", "not-a-build-id", check=False)
    assert bad.returncode == 1 and "not hexadecimal" in bad.stderr and "Traceback" not in bad.stderr

    files = inst.json("symbols", "package", "beta-dbgsym", "2.3-0ubuntu1")
    assert [(d["buildid"], d["elf"]) for d in files] == [(beta.build_id, beta.debug_member)]


def test_imported_members_stream_back_from_the_packages(inst: Instance, pool: tuple[Path, list[Packages]]) -> None:
    _, (alpha, _) = pool
    inst.run("symbols", "import", str(alpha.deb), str(alpha.ddeb))
    factory = store.session_factory(inst.engine)
    with factory() as session:
        debug = find(session, alpha.build_id, "debuginfo")
    assert debug is not None and debug.archive_path == str(alpha.ddeb)
    root = alpha.program.unstripped.parent / "ddeb-root"
    with open_member(debug) as reader:
        assert b"".join(reader) == (root / alpha.debug_member.lstrip("/")).read_bytes()


def test_a_hostile_package_among_good_ones(inst: Instance, tmp_path: Path,
                                           pool: tuple[Path, list[Packages]]) -> None:
    _, (alpha, beta) = pool
    cut = tmp_path / "cut_1_amd64.deb"
    cut.write_bytes(beta.deb.read_bytes()[:600])
    result = inst.run("symbols", "import", str(alpha.deb), str(cut), str(beta.deb), check=False)
    assert result.returncode == 1
    assert f"{cut}: " in result.stderr and "nothing of it was imported" in result.stderr
    assert inst.scalar("SELECT count(*) FROM symbol_archive") == 2
    assert inst.scalar("SELECT count(*) FROM symbol_archive WHERE path = :p", p=str(cut)) == 0
