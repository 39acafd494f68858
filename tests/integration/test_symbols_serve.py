"""The symbol index served for real: packages built by dpkg-deb, imported with `retracer symbols import` (on
SQLite and PostgreSQL), served by `retracer web` on a loopback port, and used by the real clients: gdb's
debuginfod client, `debuginfod-find`, a real `debuginfod -U` indexing the same packages as a peer, and
`retracer worker` retracing a core whose symbols exist only in an imported .ddeb."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from retracer import config as cfg
from retracer import store
from retracer.testing import crashes, packages
from retracer.testing.instance import RETRACER, Instance
from retracer.web.app import create_app

from ..conftest import AMQP_URL, IN_CI, require_server, truncate_all
from .conftest import Debuginfod, running_debuginfod


def _need(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        (pytest.fail if IN_CI else pytest.skip)(f"{', '.join(missing)} not installed (.ci/run installs them)")


@dataclass(frozen=True)
class Built:
    """A .deb and .ddeb of the crashing program, the program stripped of everything (as a worker has it),
    a core of its crash, and the packages' members as dpkg-deb unpacks them."""

    pkgs: packages.Packages
    executable: Path
    core: Path
    unpacked: Path

    @property
    def build_id(self) -> str:
        return self.pkgs.build_id

    def member(self, kind: str) -> bytes:
        member = self.pkgs.debug_member if kind == "debuginfo" else self.pkgs.executable_member
        return (self.unpacked / member.lstrip("/")).read_bytes()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    _need(*crashes.TOOLS, *packages.TOOLS)
    where = tmp_path_factory.mktemp("packages")
    pool = where / "pool"
    pool.mkdir()
    try:
        pkgs = packages.make_packages(pool)
        core = crashes.make_core([pkgs.program.executable], where / "core")
    except crashes.CrashNotMade as exc:
        pytest.skip(str(exc))
    unpacked = where / "unpacked"
    for package in (pkgs.deb, pkgs.ddeb):
        subprocess.run(["dpkg-deb", "-x", str(package), str(unpacked)], check=True, timeout=60)
    return Built(pkgs, pkgs.program.executable, core, unpacked)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str) -> tuple[int, bytes, Message]:
    """Status, body and headers (looked up in any case, as HTTP's are) of GET url."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310  (our own loopback server)
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers


@dataclass
class Web:
    """`retracer web` on a free loopback port."""

    proc: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_web(inst: Instance, log: Path) -> Web:
    port = free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen([*RETRACER, "web", "--host", "127.0.0.1", "--port", str(port)],
                                env=inst.env, stdout=out, stderr=subprocess.STDOUT)
    web = Web(proc, port)
    deadline = time.monotonic() + 60
    while True:
        try:
            if get(web.url + "/buildids/" + "00" * 20)[0] == 200:
                return web
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"retracer web did not answer: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.2)


def stop_web(web: Web) -> None:
    web.proc.terminate()
    try:
        web.proc.wait(15)
    except subprocess.TimeoutExpired:
        web.proc.kill()
        web.proc.wait()


def import_packages(inst: Instance, built: Built) -> None:
    out = inst.run("symbols", "import", str(built.pkgs.deb), str(built.pkgs.ddeb))
    assert out.returncode == 0, out.stderr


@pytest.fixture
def served(built: Built, tmp_path: Path, db_url: str) -> Iterator[tuple[Instance, Web]]:
    """The packages imported into a fresh retracer (SQLite, then PostgreSQL) and `retracer web` serving it."""
    inst = Instance(tmp_path / "data", db_url)
    inst.data_dir.mkdir(parents=True, exist_ok=True)
    import_packages(inst, built)
    web = start_web(inst, tmp_path / "web.log")
    try:
        yield inst, web
    finally:
        stop_web(web)
        inst.close()


def client_env(tmp_path: Path, urls: str | None) -> dict[str, str]:
    """An environment for a debuginfod client: a fresh cache (no miss remembered from before), nothing of
    ours leaking in."""
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(tmp_path), "LC_ALL": "C"}
    if urls is not None:
        cache = tmp_path / f"cache-{time.monotonic_ns()}"
        env.update({"DEBUGINFOD_URLS": urls, "DEBUGINFOD_CACHE_PATH": str(cache), "DEBUGINFOD_TIMEOUT": "30"})
    return env


def gdb_backtrace(built: Built, env: dict[str, str]) -> str:
    proc = subprocess.run(["gdb", "-nx", "-batch", "-iex", "set debuginfod enabled on", "-ex", "bt",
                           str(built.executable), str(built.core)],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    return proc.stdout + proc.stderr


class TestClients:
    def test_gdb_gets_the_debug_information_from_retracer(self, built: Built, served: tuple[Instance, Web],
                                                          tmp_path: Path) -> None:
        _, web = served
        without = gdb_backtrace(built, client_env(tmp_path, None))
        assert "crashy.c:4" not in without, without  # the executable alone has no symbols
        text = gdb_backtrace(built, client_env(tmp_path, web.url))
        assert "read_value (" in text and "crashy.c:4" in text, text
        assert "handle (" in text and "main (" in text, text

    def test_debuginfod_find_gets_both_files_byte_for_byte(self, built: Built, served: tuple[Instance, Web],
                                                            tmp_path: Path) -> None:
        _, web = served
        for base in (web.url, web.url + "/"):
            for kind in ("debuginfo", "executable"):
                proc = subprocess.run(["debuginfod-find", kind, built.build_id], capture_output=True, text=True,
                                      env=client_env(tmp_path, base), timeout=60, check=False)
                assert proc.returncode == 0, (base, kind, proc.stderr)
                assert Path(proc.stdout.strip()).read_bytes() == built.member(kind), (base, kind)
        proc = subprocess.run(["debuginfod-find", "debuginfo", "ab" * 20], capture_output=True, text=True,
                              env=client_env(tmp_path, web.url), timeout=60, check=False)
        assert proc.returncode != 0 and "No such file" in proc.stderr, proc.stderr

    def test_headers_and_darkserver_answers(self, built: Built, served: tuple[Instance, Web]) -> None:
        _, web = served
        status, body, headers = get(f"{web.url}/buildid/{built.build_id}/debuginfo")
        assert status == 200 and body == built.member("debuginfo")
        assert headers["X-DEBUGINFOD-SIZE"] == str(len(body)) == headers["Content-Length"]
        assert headers["X-DEBUGINFOD-FILE"] == built.pkgs.debug_member
        assert headers["X-DEBUGINFOD-ARCHIVE"] == str(built.pkgs.ddeb)
        assert headers["Content-Type"] == "application/octet-stream"
        status, body, _ = get(f"{web.url}/buildids/{built.build_id}")
        assert status == 200
        assert sorted((e["kind"], e["package"], e["elf"]) for e in json.loads(body)) == [
            ("debuginfo", built.pkgs.dbgsym, built.pkgs.debug_member),
            ("executable", built.pkgs.name, built.pkgs.executable_member)]
        status, body, _ = get(f"{web.url}/package/{built.pkgs.name}/{built.pkgs.version}/buildids")
        assert status == 200 and [e["buildid"] for e in json.loads(body)] == [built.build_id]
        status, body, _ = get(f"{web.url}/buildid/{built.build_id}/source/usr/src/crashy.c")
        assert status == 404 and b"not source files" in body


@pytest.fixture
def peer(built: Built, tmp_path: Path) -> Iterator[Debuginfod]:
    """A real `debuginfod -U` indexing the same two packages once, alone in a network namespace."""
    _need("debuginfod", "unshare", "nsenter", "ip", "bsdtar")
    root = tmp_path / "peer-root"
    root.mkdir()
    for package in (built.pkgs.deb, built.pkgs.ddeb):
        shutil.copyfile(package, root / package.name)
    with running_debuginfod(tmp_path, "-U -t 0 -g 0 -d :memory:", root) as server:
        server.wait_for(built.build_id)
        yield server


def peer_bytes(peer: Debuginfod, kind: str, build_id: str, tmp_path: Path) -> bytes:
    """The file the real debuginfod serves, fetched with debuginfod-find from inside its namespace."""
    proc = subprocess.run(["nsenter", f"--net={peer.netns}", "--", "debuginfod-find", kind, build_id],
                          capture_output=True, text=True, env=client_env(tmp_path, peer.url), timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip()).read_bytes()


def test_retracer_and_real_debuginfod_serve_byte_identical_files(built: Built, served: tuple[Instance, Web],
                                                                 peer: Debuginfod, tmp_path: Path) -> None:
    _, web = served
    for kind in ("debuginfo", "executable"):
        status, ours, _ = get(f"{web.url}/buildid/{built.build_id}/{kind}")
        assert status == 200, kind
        theirs = peer_bytes(peer, kind, built.build_id, tmp_path)
        assert ours == theirs == built.member(kind), kind
    assert peer.status("/buildid/" + "ab" * 20 + "/debuginfo") == 404
    assert get(f"{web.url}/buildid/{'ab' * 20}/debuginfo")[0] == 404


# -- The done-when: a core whose symbols exist only in an imported .ddeb, retraced by `retracer worker` -----

@pytest.fixture(params=["embedded-sqlite", pytest.param("embedded-postgresql", marks=pytest.mark.postgres),
                        pytest.param("scaled", marks=[pytest.mark.postgres, pytest.mark.rabbitmq])])
def deployment(request: pytest.FixtureRequest, tmp_path: Path, sqlite_url: str) -> Iterator[Instance]:
    """The embedded mode (the worker reads the index from the database) on SQLite and on PostgreSQL, and the
    scaled mode (PostgreSQL and RabbitMQ: the worker has no database and asks `retracer web` over debuginfod)."""
    if request.param == "embedded-sqlite":
        inst = Instance(tmp_path / "data", sqlite_url)
    else:
        url: str = request.getfixturevalue("pg_database")
        truncate_all(url)
        if request.param == "scaled":
            require_server("RabbitMQ", "127.0.0.1", 5672)
        inst = Instance(tmp_path / "data", url, AMQP_URL if request.param == "scaled" else None)
    inst.data_dir.mkdir(parents=True, exist_ok=True)
    yield inst
    inst.close()


def submit(inst: Instance, built: Built) -> int:
    out = inst.run("submit", "--crash-id", "index-1", "--creator", "mark@example.com", "--package",
                   built.pkgs.name, "--version", built.pkgs.version, "--architecture", built.pkgs.architecture,
                   "--release", "noble", "--core", str(built.core), "--executable", str(built.executable),
                   "--build-id", built.build_id).stdout
    return int(out)


def test_a_core_with_symbols_only_in_an_imported_ddeb_ends_fullybuilt(built: Built, deployment: Instance,
                                                                       tmp_path: Path) -> None:
    """Before the import the attempt fails (transient) for want of the executable's symbols; `retracer symbols
    import` of the .deb and .ddeb, then the retry: FULLYBUILT with a backtrace naming the crash function and
    its line. No [worker] debug_dirs, and (embedded) no debuginfod_urls: nothing but retracer's own index."""
    inst = deployment
    scaled = "RETRACER__BROKER__URL" in inst.env
    inst.set(WORKER__NAME="index-worker", SERVICE__START_REQUIRES_OFFER="true", POLICY__BACKOFF_BASE_S="0.2",
             POLICY__BACKOFF_MAX_S="0.2")
    web = None
    if scaled:
        # The broker's worker has no database: the admin points it at retracer web (the README's setting).
        web = start_web(inst, tmp_path / "web.log")
        inst.set(WORKER__DEBUGINFOD_URLS=json.dumps([web.url]))
    assert "RETRACER__WORKER__DEBUG_DIRS" not in inst.env
    serve = inst.serve()
    try:
        job = submit(inst, built)
        offered = "SELECT count(*) FROM outbox" + (" WHERE sent_at IS NOT NULL" if scaled else "")
        inst.wait_for("the work request", lambda: inst.scalar(offered) >= 1)
        out = inst.run("worker", "--once").stdout
        assert out.startswith(f"job {job} attempt 1: failed (transient)"), out
        assert f"no symbols for build-id {built.build_id}" in out, out
        inst.wait_for("the retry", lambda: inst.scalar("SELECT state FROM job WHERE id = :id", id=job) == "PENDING"
                      and inst.scalar("SELECT attempts FROM job WHERE id = :id", id=job) == 1)

        import_packages(inst, built)
        inst.wait_for("the second work request", lambda: inst.scalar(offered) >= 2)
        out = inst.run("worker", "--once").stdout
        assert out.startswith(f"job {job} attempt 2: retraced"), out
        inst.wait_for("the upload's verdict", lambda: inst.scalar(
            "SELECT state FROM job WHERE id = :id", id=job) in ("FULLYBUILT", "FAILEDTOUPLOAD", "ON_HOLD"))
        shown = inst.json("show", str(job))
        assert shown["state"] == "FULLYBUILT", shown.get("upload_log") or shown.get("hold_reason")
        results = inst.data_dir / "results" / str(job)
        backtrace = (results / "backtrace.txt").read_text()
        assert "read_value" in backtrace and "crashy.c:4" in backtrace, backtrace
        accepted = sorted((cfg.load(environ=inst.env).spool_dir / "accepted").rglob("worker.log"))
        assert len(accepted) == 1, accepted
        worker_log = accepted[0].read_text()
        if web is not None:
            assert f"DEBUGINFOD_URLS={web.url}" in worker_log, worker_log
        else:
            assert f"symbol index: build-id {built.build_id}: debug information from" in worker_log, worker_log
            assert str(built.pkgs.ddeb) in worker_log
            # The extracted file stays in the worker's cache for the next attempts; the attempt's links went.
            cache = inst.data_dir / "worker" / "symbol-index" / ".build-id" / built.build_id[:2]
            assert (cache / f"{built.build_id[2:]}.debug").read_bytes() == built.member("debuginfo")
    finally:
        assert inst.stop(serve) == 0
        if web is not None:
            stop_web(web)


def test_the_worker_log_says_where_it_looked(built: Built, tmp_path: Path, sqlite_url: str) -> None:
    """Without the index and without any other source the failure says so, naming the places looked in."""
    inst = Instance(tmp_path / "data", sqlite_url)
    inst.set(WORKER__USE_INDEX="false", SERVICE__START_REQUIRES_OFFER="true")
    serve = inst.serve()
    try:
        import_packages(inst, built)
        job = submit(inst, built)
        inst.wait_for("the work request", lambda: inst.scalar("SELECT count(*) FROM outbox") >= 1)
        out = inst.run("worker", "--once").stdout
        assert out.startswith(f"job {job} attempt 1: failed (transient)"), out
        assert "no [worker] debug_dirs or debuginfod_urls are configured" in out, out
    finally:
        assert inst.stop(serve) == 0
        inst.close()



#: The symbol routes whose parameters have a documented form, so that schemathesis can also send bad ones.
CONSTRAINED = ("GET /buildids/{build_ids}", "GET /buildid/{build_id}/debuginfo", "GET /buildid/{build_id}/executable")


def test_the_symbol_routes_conform_to_their_description(built: Built, tmp_path: Path, db_url: str) -> None:
    """schemathesis on every symbol route with valid input, and on those with a documented form with invalid
    input too: no server error, and every status, content type and body is one /openapi.json allows."""
    inst = Instance(tmp_path / "data", db_url)
    inst.data_dir.mkdir(parents=True, exist_ok=True)
    import_packages(inst, built)
    config = cfg.load(environ=inst.env)
    engine = store.make_engine(config.database_url, read_only=True)
    try:
        app = create_app(config, store.session_factory(engine))
        schema = schemathesis.openapi.from_asgi("/openapi.json", app).include(path_regex="^/(buildids?|package)/")
        found = {}
        for result in schema.get_all_operations():
            assert isinstance(result, Ok), f"/openapi.json describes an operation badly: {result.err()}"
            operation = result.ok()
            found[f"{operation.method.upper()} {operation.path}"] = operation
        assert set(CONSTRAINED) < set(found) and "GET /package/{name}/{version}/buildids" in found
        for name, operation in found.items():
            modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if name in CONSTRAINED else [])
            for mode in modes:
                @given(case=operation.as_strategy(generation_mode=mode))
                @settings(max_examples=30, deadline=None, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))
                def conforms(case: schemathesis.Case) -> None:  # type: ignore[type-arg]
                    case.call_and_validate()

                conforms()
    finally:
        engine.dispose()
        inst.close()
