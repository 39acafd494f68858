"""The symbol routes of `retracer web` through the ASGI app (TestClient): Darkserver's JSON shapes, the
debuginfod protocol's bytes and headers, and the errors a bad or unknown build-id gets."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from retracer import store
from retracer.config import Config
from retracer.store.models import SymbolArchive, SymbolFile
from retracer.symbols import members
from retracer.symbols.index import Found
from retracer.web import symbols as routes
from retracer.web.app import create_app

from ..conftest import make_config

EXE_ID = "c89156ebdabf859f4ee70cb0c303004dccf1ae51"
DEBUG_ID = "15dfff3239aa7c3b16a71e6b2e3b6e4009dab998"
UNKNOWN = "00" * 20


@pytest.fixture
def factory(tmp_path: Path, sqlite_url: str) -> Iterator[sessionmaker[Session]]:
    engine = store.make_engine(sqlite_url)
    yield store.session_factory(engine)
    engine.dispose()


@pytest.fixture
def client(tmp_path: Path, sqlite_url: str, factory: sessionmaker[Session]) -> Iterator[TestClient]:
    config: Config = make_config(tmp_path / "data", sqlite_url)
    with TestClient(create_app(config, factory)) as test_client:
        yield test_client


def add_archive(factory: sessionmaker[Session], path: Path, kind: str, files: list[tuple[str, str, str, int]],
                package: str | None = "hello", version: str | None = "1.0-1",
                architecture: str | None = "amd64") -> None:
    """An imported archive with ``files`` (build-id, kind, member, size), as `retracer symbols import` leaves it."""
    with factory() as session, session.begin():
        row = SymbolArchive(path=str(path), sha256=hashlib.sha256(str(path).encode()).hexdigest(), size=1,
                            kind=kind, package=package, version=version, architecture=architecture,
                            imported_by="test")
        row.files = [SymbolFile(build_id=b, kind=k, member=m, size=s) for b, k, m, s in files]
        session.add(row)


@pytest.fixture
def loose(tmp_path: Path, factory: sessionmaker[Session]) -> Path:
    """A loose debug file of 600 KiB (more than one chunk) indexed as it lies."""
    path = tmp_path / "loose" / "hello.debug"
    path.parent.mkdir()
    path.write_bytes(bytes(range(256)) * 2400)
    add_archive(factory, path, "file", [(DEBUG_ID, "debuginfo", str(path), path.stat().st_size)],
                package=None, version=None, architecture=None)
    return path


class TestDarkserver:
    def test_one_build_id_answers_the_package_that_holds_it(self, client: TestClient,
                                                             factory: sessionmaker[Session]) -> None:
        add_archive(factory, Path("/pool/hello_1.0-1_amd64.deb"), "deb",
                    [(EXE_ID, "executable", "/usr/bin/hello", 100)])
        response = client.get(f"/buildids/{EXE_ID.upper()}")
        assert response.status_code == 200
        assert response.json() == [{"buildid": EXE_ID, "elf": "/usr/bin/hello", "package": "hello",
                                    "version": "1.0-1", "architecture": "amd64", "kind": "executable"}]

    def test_several_build_ids_answer_in_the_order_asked_and_unknown_ones_are_absent(
            self, client: TestClient, factory: sessionmaker[Session]) -> None:
        add_archive(factory, Path("/pool/hello_1.0-1_amd64.deb"), "deb",
                    [(EXE_ID, "executable", "/usr/bin/hello", 100)])
        add_archive(factory, Path("/pool/hello-dbgsym_1.0-1_amd64.ddeb"), "ddeb",
                    [(DEBUG_ID, "debuginfo", "/usr/lib/debug/.build-id/15/dfff.debug", 200)],
                    package="hello-dbgsym")
        response = client.get(f"/buildids/{DEBUG_ID},{UNKNOWN},{EXE_ID}")
        assert response.status_code == 200
        assert [(e["buildid"], e["package"]) for e in response.json()] == [(DEBUG_ID, "hello-dbgsym"),
                                                                          (EXE_ID, "hello")]
        assert client.get(f"/buildids/{UNKNOWN}").json() == []

    def test_at_most_max_ids_build_ids_a_request(self, client: TestClient) -> None:
        ids = [f"{n:040x}" for n in range(1, routes.MAX_IDS + 2)]
        assert client.get("/buildids/" + ",".join(ids[:routes.MAX_IDS])).status_code == 200
        response = client.get("/buildids/" + ",".join(ids))
        assert response.status_code == 422
        body = response.json()
        assert body["status"] == 422
        assert f"at most {routes.MAX_IDS}" in body["error"] and "split" in body["error"]

    @pytest.mark.parametrize(("text", "said"), [("xyz", "not hexadecimal"), ("abc", "odd number"),
                                                ("ab", "hex digits long"), ("", "empty build-id"),
                                                ("%20abcd", "spaces around it")])
    def test_a_malformed_build_id_is_422_with_the_reason(self, client: TestClient, text: str, said: str) -> None:
        response = client.get(f"/buildids/{EXE_ID},{text}")
        assert response.status_code == 422
        assert response.headers["content-type"].startswith("application/json")
        assert said in response.json()["error"]

    def test_a_package_version_lists_its_build_ids(self, client: TestClient,
                                                   factory: sessionmaker[Session]) -> None:
        add_archive(factory, Path("/pool/hello_1.0-1_amd64.deb"), "deb",
                    [(EXE_ID, "executable", "/usr/bin/hello", 100),
                     (DEBUG_ID, "executable", "/usr/lib/libhello.so.1", 50)])
        add_archive(factory, Path("/pool/hello_2.0-1_amd64.deb"), "deb",
                    [(UNKNOWN, "executable", "/usr/bin/hello", 100)], version="2.0-1")
        response = client.get("/package/hello/1.0-1/buildids")
        assert response.status_code == 200
        assert sorted((e["elf"], e["buildid"], e["version"]) for e in response.json()) == [
            ("/usr/bin/hello", EXE_ID, "1.0-1"), ("/usr/lib/libhello.so.1", DEBUG_ID, "1.0-1")]

    def test_an_unknown_package_is_404_saying_how_to_import_it(self, client: TestClient) -> None:
        response = client.get("/package/nosuch/1.0/buildids")
        assert response.status_code == 404
        assert "nosuch" in response.json()["error"] and "retracer symbols import" in response.json()["error"]

    def test_the_routes_are_in_the_openapi_description(self, client: TestClient) -> None:
        paths = client.get("/openapi.json").json()["paths"]
        for path in ("/buildids/{build_ids}", "/package/{name}/{version}/buildids",
                     "/buildid/{build_id}/debuginfo", "/buildid/{build_id}/executable"):
            assert path in paths


class TestDebuginfod:
    def test_a_loose_file_is_served_whole_with_debuginfods_headers(self, client: TestClient, loose: Path) -> None:
        response = client.get(f"/buildid/{DEBUG_ID}/debuginfo")
        assert response.status_code == 200
        assert response.content == loose.read_bytes()
        size = str(loose.stat().st_size)
        assert response.headers["content-type"] == "application/octet-stream"
        assert response.headers["content-length"] == size
        assert response.headers["x-debuginfod-size"] == size
        assert response.headers["x-debuginfod-file"] == str(loose)
        assert "x-debuginfod-archive" not in response.headers  # a loose file is in no archive

    def test_a_range_header_is_ignored_as_debuginfod_does(self, client: TestClient, loose: Path) -> None:
        response = client.get(f"/buildid/{DEBUG_ID}/debuginfo", headers={"Range": "bytes=0-9"})
        assert response.status_code == 200 and response.content == loose.read_bytes()

    def test_head_gives_the_headers_without_the_body(self, client: TestClient, loose: Path) -> None:
        response = client.head(f"/buildid/{DEBUG_ID}/debuginfo")
        assert response.status_code == 200
        assert response.content == b""
        assert response.headers["x-debuginfod-size"] == str(loose.stat().st_size)

    def test_a_member_of_a_package_is_streamed_in_chunks_and_names_its_archive(
            self, client: TestClient, factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch,
            tmp_path: Path) -> None:
        data = b"\x7fELF" + bytes(3 * routes.CHUNK)
        deb = tmp_path / "hello-dbgsym_1.0-1_amd64.ddeb"
        deb.write_bytes(b"!<arch>\n")
        member = "/usr/lib/debug/.build-id/15/dfff3239aa7c3b16a71e6b2e3b6e4009dab998.debug"
        add_archive(factory, deb, "ddeb", [(DEBUG_ID, "debuginfo", member, len(data))], package="hello-dbgsym")
        reads: list[int] = []
        opened: list[Found] = []
        closed: list[bool] = []

        class Reader:
            offset = 0

            def read(self, n: int = -1) -> bytes:
                reads.append(n)
                out = data[self.offset:self.offset + n]
                self.offset += len(out)
                return out

        @contextmanager
        def open_member(found: Found) -> Iterator[Reader]:
            opened.append(found)
            try:
                yield Reader()
            finally:
                closed.append(True)

        monkeypatch.setattr(members, "open_member", open_member)
        response = client.get(f"/buildid/{DEBUG_ID}/debuginfo")
        assert response.status_code == 200
        assert response.content == data
        assert response.headers["x-debuginfod-archive"] == str(deb)
        assert response.headers["x-debuginfod-file"] == member
        assert [f.member for f in opened] == [member]
        # Never read whole: a chunk at a time, and the archive closed once sent.
        assert len(reads) >= 3 and max(reads) <= routes.CHUNK and -1 not in reads
        assert closed == [True]

    def test_an_archive_breaking_mid_stream_cuts_the_body_short_of_its_length(
            self, client: TestClient, factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch,
            tmp_path: Path) -> None:
        deb = tmp_path / "hello-dbgsym_1.0-1_amd64.ddeb"
        add_archive(factory, deb, "ddeb", [(DEBUG_ID, "debuginfo", "/usr/lib/debug/x.debug", 3 * routes.CHUNK)])
        calls: list[int] = []

        class Breaking:
            def read(self, n: int = -1) -> bytes:
                calls.append(n)
                if len(calls) > 1:
                    raise members.MemberUnavailable(f"{deb} cannot be read to its end (truncated)")
                return b"x" * n

        @contextmanager
        def open_member(found: Found) -> Iterator[Breaking]:
            yield Breaking()

        monkeypatch.setattr(members, "open_member", open_member)
        response = client.get(f"/buildid/{DEBUG_ID}/debuginfo")
        # The headers went out before the break: the client sees fewer bytes than promised, a failed download.
        assert response.status_code == 200
        assert int(response.headers["content-length"]) == 3 * routes.CHUNK
        assert len(response.content) == routes.CHUNK

    def test_the_executable_of_a_build_id(self, client: TestClient, factory: sessionmaker[Session],
                                          tmp_path: Path) -> None:
        exe = tmp_path / "hello"
        shutil.copyfile("/bin/true", exe)
        add_archive(factory, exe, "file", [(EXE_ID, "executable", str(exe), exe.stat().st_size)])
        response = client.get(f"/buildid/{EXE_ID}/executable")
        assert response.status_code == 200 and response.content == exe.read_bytes()
        assert client.get(f"/buildid/{EXE_ID}/debuginfo").status_code == 404

    def test_an_unknown_build_id_is_404_saying_how_to_import_it(self, client: TestClient) -> None:
        for kind in ("debuginfo", "executable"):
            response = client.get(f"/buildid/{UNKNOWN}/{kind}")
            assert response.status_code == 404
            body = response.json()
            assert body["status"] == 404 and UNKNOWN in body["error"] and "retracer symbols import" in body["error"]

    def test_a_malformed_build_id_is_422(self, client: TestClient) -> None:
        response = client.get("/buildid/not-hex/debuginfo")
        assert response.status_code == 422 and "not hexadecimal" in response.json()["error"]

    def test_sources_are_not_indexed_and_say_so(self, client: TestClient, loose: Path) -> None:
        response = client.get(f"/buildid/{DEBUG_ID}/source/usr/src/hello/hello.c")
        assert response.status_code == 404
        assert "not source files" in response.json()["error"]
        assert client.get(f"/buildid/{DEBUG_ID}/section").status_code == 404

    def test_a_file_changed_since_its_import_is_404_with_the_reason(self, client: TestClient, loose: Path) -> None:
        loose.write_bytes(b"shorter now")
        response = client.get(f"/buildid/{DEBUG_ID}/debuginfo")
        assert response.status_code == 404
        assert str(loose) in response.json()["error"] and "import" in response.json()["error"]

    def test_an_archive_gone_is_404_with_the_reason(self, client: TestClient, loose: Path) -> None:
        loose.unlink()
        response = client.get(f"/buildid/{DEBUG_ID}/debuginfo")
        assert response.status_code == 404 and str(loose) in response.json()["error"]

    def test_a_member_name_no_header_can_carry_is_percent_encoded(self, client: TestClient,
                                                                   factory: sessionmaker[Session],
                                                                   tmp_path: Path) -> None:
        path = tmp_path / "héllo\n.debug"
        path.write_bytes(b"data")
        add_archive(factory, path, "file", [(DEBUG_ID, "debuginfo", str(path), 4)])
        response = client.get(f"/buildid/{DEBUG_ID}/debuginfo")
        assert response.status_code == 200 and response.content == b"data"
        assert response.headers["x-debuginfod-file"].endswith("/h%C3%A9llo%0A.debug")

    def test_a_database_without_the_index_is_503_not_500(self, tmp_path: Path) -> None:
        empty = tmp_path / "empty.db"
        engine = store.make_engine(f"sqlite:///{empty}")
        try:
            app = create_app(make_config(tmp_path / "data", f"sqlite:///{empty}"), store.session_factory(engine))
            with TestClient(app, raise_server_exceptions=False) as test_client:
                for path in (f"/buildid/{DEBUG_ID}/debuginfo", f"/buildids/{DEBUG_ID}", "/package/a/1/buildids"):
                    response = test_client.get(path)
                    assert response.status_code == 503, path
                    assert "try again later" in response.json()["error"]
        finally:
            engine.dispose()
