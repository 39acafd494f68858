"""Integration fixtures: a retracer instance (retracer.testing.instance) in each mode."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from retracer.testing import crashes
from retracer.testing.instance import Instance

from ..conftest import AMQP_URL, IN_CI, require_server


@pytest.fixture
def embedded(tmp_path: Path, sqlite_url: str) -> Iterator[Instance]:
    """The embedded default: SQLite, no broker."""
    inst = Instance(tmp_path / "data", sqlite_url)
    yield inst
    inst.close()


@pytest.fixture
def scaled(tmp_path: Path, pg_database: str) -> Iterator[Instance]:
    """At scale: RabbitMQ carries the events, PostgreSQL holds the state."""
    require_server("RabbitMQ", "127.0.0.1", 5672)
    from ..conftest import truncate_all

    truncate_all(pg_database)
    inst = Instance(tmp_path / "data", pg_database, AMQP_URL)
    inst.data_dir.mkdir(parents=True, exist_ok=True)
    yield inst
    inst.close()


@pytest.fixture(params=["embedded", pytest.param("scaled", marks=[pytest.mark.postgres, pytest.mark.rabbitmq])])
def instance(request: pytest.FixtureRequest) -> Instance:
    """Each test runs in both modes."""
    inst: Instance = request.getfixturevalue(request.param)
    return inst


# -- The retrace engine's real crash and symbol server (tests/integration/test_retrace.py) ---------------------

@dataclass(frozen=True)
class CrashBuild:
    """A crashing C program built with -g, stripped, its debug file kept apart, and two cores of its crash."""

    executable: Path
    build_id: str
    debug_file: Path
    cores: tuple[Path, Path]

    def install_debug(self, debug_dir: Path) -> Path:
        """Put the debug file at ``debug_dir/.build-id/xx/rest.debug`` (where gdb and debuginfod look)."""
        target = debug_dir / ".build-id" / self.build_id[:2] / f"{self.build_id[2:]}.debug"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.debug_file, target)
        return debug_dir


def _need_tools(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        (pytest.fail if IN_CI else pytest.skip)(f"{', '.join(missing)} not installed (.ci/run installs them)")


def make_core(executable: Path, core: Path) -> Path:
    """A core of executable's crash written by gdb, with address-space randomisation left on."""
    try:
        return crashes.make_core([executable], core)
    except crashes.CrashNotMade as exc:
        pytest.skip(str(exc))


def crashed_program(where: Path) -> tuple[crashes.Program, Path]:
    """The crashing program built in ``where`` and a core of its crash (skipped, or failed in CI, without the
    tools that make them)."""
    _need_tools(*crashes.TOOLS)
    program = crashes.build(where)
    return program, make_core(program.executable, where / "core")


def build_crash(where: Path, source: str = crashes.CRASH_SOURCE, name: str = "prog") -> tuple[Path, Path, str]:
    """(stripped executable, debug file, build-id) of ``source`` compiled in ``where``."""
    program = crashes.build(where, source, name)
    return program.executable, program.debug_file, program.build_id


@pytest.fixture(scope="module")
def crash_build(tmp_path_factory: pytest.TempPathFactory) -> CrashBuild:
    """The crashing program, stripped, and two cores of its crash made under different address layouts."""
    _need_tools(*crashes.TOOLS)
    where = tmp_path_factory.mktemp("crash")
    exe, debug, build_id = build_crash(where)
    cores = (make_core(exe, where / "core.1"), make_core(exe, where / "core.2"))
    return CrashBuild(exe, build_id, debug, cores)


@dataclass
class Debuginfod:
    """A real debuginfod serving ``root``, alone in a network namespace of its own.

    debuginfod listens on every address and has no option to choose one, so it runs in a new network
    namespace whose only interface is its loopback: nothing outside this machine can reach it. gdb reaches
    it through ``gdb_wrapper``, a script that enters the same namespace and runs the real gdb.
    """

    root: Path
    pid: int
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def netns(self) -> str:
        return f"/proc/{self.pid}/ns/net"

    def gdb_wrapper(self, where: Path) -> Path:
        gdb = shutil.which("gdb")
        script = where / "gdb-in-netns"
        script.write_text(f'#!/bin/sh\nexec nsenter --net={self.netns} -- {gdb} "$@"\n', encoding="utf-8")
        script.chmod(0o755)
        return script

    def status(self, path: str) -> int:
        """The HTTP status of GET path, asked from inside the namespace (0: no answer)."""
        probe = ("import sys, urllib.request, urllib.error\n"
                 "try:\n    print(urllib.request.urlopen(sys.argv[1], timeout=5).status)\n"
                 "except urllib.error.HTTPError as e:\n    print(e.code)\n"
                 "except OSError:\n    print(0)\n")
        out = subprocess.run(["nsenter", f"--net={self.netns}", "--", sys.executable, "-c", probe,
                              self.url + path], capture_output=True, text=True, timeout=30, check=False)
        return int(out.stdout.strip() or 0)

    def wait_for(self, build_id: str, timeout: float = 60) -> None:
        """Until the server has indexed build_id's debug file (it rescans its root every second)."""
        deadline = time.monotonic() + timeout
        while self.status(f"/buildid/{build_id}/debuginfo") != 200:
            if time.monotonic() > deadline:
                raise AssertionError(f"debuginfod did not index {build_id} within {timeout} s")
            time.sleep(0.5)


@pytest.fixture
def debuginfod(tmp_path: Path) -> Iterator[Debuginfod]:
    """debuginfod scanning an (empty) directory every second, in a network namespace of its own."""
    _need_tools("debuginfod", "unshare", "nsenter", "ip")
    root = tmp_path / "debuginfod-root"
    root.mkdir()
    with running_debuginfod(tmp_path, f"-F -d {tmp_path / 'debuginfod.db'} -t 1 -g 0 -c 1", root) as server:
        yield server


@contextmanager
def running_debuginfod(tmp_path: Path, options: str, root: Path) -> Iterator[Debuginfod]:
    """``debuginfod OPTIONS -p PORT ROOT`` alone in a network namespace of its own, once it answers; stopped
    after. Its log is ``tmp_path/debuginfod.log``."""
    port = 8002
    log_path = tmp_path / "debuginfod.log"
    log = open(log_path, "wb")  # noqa: SIM115  (closed after the server stops)
    # unshare and sh exec: the pid is debuginfod's, and its namespace is the one gdb_wrapper enters.
    proc = subprocess.Popen(["unshare", "--net", "--", "sh", "-c",
                             f"ip link set lo up && exec debuginfod {options} -p {port} {root}"],
                            stdout=log, stderr=subprocess.STDOUT)
    server = Debuginfod(root, proc.pid, port)
    try:
        deadline = time.monotonic() + 30
        while server.status("/metrics") != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                detail = log_path.read_text(errors="replace")[-2000:]
                (pytest.fail if IN_CI else pytest.skip)(f"debuginfod did not start in a network namespace "
                                                        f"(root needed for unshare --net): {detail}")
            time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
