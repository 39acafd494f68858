"""The retrace engine on real cores with the real gdb: symbols from a debug directory and from a real
debuginfod, the retry after symbols are imported, bad cores and executables, and a gdb that never ends."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import replace
from itertools import count
from pathlib import Path

import pytest

from retracer import config as cfg
from retracer.worker import coredump
from retracer.worker.request import Failed, Missing, Outcome, Request, Retraced
from retracer.worker.retrace import debuginfod_cache, retrace

from .conftest import CrashBuild, Debuginfod, build_crash, make_core

_attempts = count(1)


def worker_config(tmp_path: Path, **worker: object) -> cfg.Config:
    env = {"RETRACER__SERVICE__DATA_DIR": str(tmp_path / "data")}
    for key, value in worker.items():
        env[f"RETRACER__WORKER__{key.upper()}"] = json.dumps(value) if isinstance(value, list) else str(value)
    return cfg.load(environ=env)


def request_for(exe: Path, core: Path) -> Request:
    return Request(id="req-1", job=7, attempt=1, crash_id="crash-1", package="prog", version="1.0-1",
                   architecture="amd64", release="bookworm", core=str(core), executable=str(exe))


def attempt(tmp_path: Path, exe: Path, core: Path, config: cfg.Config,
            stop: threading.Event | None = None) -> Outcome:
    """One retrace in a fresh work directory, as the worker loop makes them."""
    workdir = tmp_path / f"attempt-{next(_attempts)}"
    workdir.mkdir()
    return retrace(request_for(exe, core), config, workdir, stop)


def retraced(outcome: Outcome) -> Retraced:
    assert isinstance(outcome, Retraced), outcome
    return outcome


def failed(outcome: Outcome, transient: bool) -> Failed:
    assert isinstance(outcome, Failed), outcome
    assert outcome.transient is transient, outcome.error
    return outcome


def live_members(pgid: int) -> list[int]:
    """Processes of the group pgid that are alive (zombies, already dead, left out)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(entry.name))
    return alive


def assert_group_gone(pgid: int) -> None:
    assert live_members(pgid) == [], f"processes of gdb's group {pgid} survived"
    deadline = time.monotonic() + 10
    while True:  # the killed processes' zombies are reaped by init, a moment later
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, f"process group {pgid} still exists"
        time.sleep(0.05)


def hanging_gdb(tmp_path: Path) -> tuple[Path, Path]:
    """(a gdb that never ends, the file where it writes its pid): the real gdb whose first command is a shell
    that sleeps, so the group holds gdb and its child."""
    pid_file = tmp_path / "gdb.pid"
    script = tmp_path / "slow-gdb"
    script.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec {shutil.which('gdb')} -ex 'shell sleep 100' \"$@\"\n",
                      encoding="utf-8")
    script.chmod(0o755)
    return script, pid_file


class TestSymbolsFound:
    def test_debug_dir_gives_source_lines_and_a_signature(self, crash_build: CrashBuild, tmp_path: Path) -> None:
        """Symbols from a .build-id debug directory: the backtrace names functions, file and line."""
        debug_dir = crash_build.install_debug(tmp_path / "debug")
        config = worker_config(tmp_path, debug_dirs=[str(debug_dir)])
        result = retraced(attempt(tmp_path, crash_build.executable, crash_build.cores[0], config))
        for function in ("read_value", "compute", "parse", "handle", "main"):
            assert f" in {function} (" in result.backtrace
        assert "/prog.c:4\n" in result.backtrace  # read_value's line
        assert result.signature == f"{crash_build.executable}:11:read_value:compute:parse:handle:main"
        assert result.address_signature is not None
        assert result.address_signature.startswith(f"{crash_build.build_id}+0x")
        assert "---- gdb output ----" in result.log and "-nx -batch" in result.log
        assert f"debug file {debug_dir}" in result.log
        assert "libc.so.6" in result.log  # the libraries without symbols are listed, and do not fail it

    def test_same_crash_same_signatures_under_aslr(self, crash_build: CrashBuild, tmp_path: Path) -> None:
        """Two cores of the same crash, loaded at different addresses, get the same two signatures."""
        first, second = (coredump.modules(core)[0].start for core in crash_build.cores)
        if first == second and Path("/proc/sys/kernel/randomize_va_space").read_text().strip() != "0":
            pytest.fail("gdb ran both crashes at the same address although randomisation is on")
        config = worker_config(tmp_path, debug_dirs=[str(crash_build.install_debug(tmp_path / "debug"))])
        results = [retraced(attempt(tmp_path, crash_build.executable, core, config)) for core in crash_build.cores]
        assert results[0].signature is not None
        assert results[0].signature == results[1].signature
        assert results[0].address_signature == results[1].address_signature

    def test_debuginfod_serves_the_symbols(self, crash_build: CrashBuild, debuginfod: Debuginfod,
                                           tmp_path: Path) -> None:
        """A real debuginfod has the debug file: gdb downloads it into the worker's shared cache."""
        crash_build.install_debug(debuginfod.root)
        debuginfod.wait_for(crash_build.build_id)
        config = worker_config(tmp_path, gdb=debuginfod.gdb_wrapper(tmp_path), debuginfod_urls=[debuginfod.url])
        result = retraced(attempt(tmp_path, crash_build.executable, crash_build.cores[0], config))
        assert " in read_value (" in result.backtrace
        assert result.signature == f"{crash_build.executable}:11:read_value:compute:parse:handle:main"
        assert f"DEBUGINFOD_URLS={debuginfod.url}" in result.log
        cached = debuginfod_cache(config) / crash_build.build_id / "debuginfo"
        assert cached.stat().st_size > 0

    def test_sysroot_of_the_release(self, crash_build: CrashBuild, tmp_path: Path) -> None:
        """[worker] sysroot with {release}: the executable and libraries are taken from the release's tree."""
        root = tmp_path / "sysroots" / "bookworm"
        for module in coredump.modules(crash_build.cores[0]):
            if module.path is not None:
                target = root / module.path.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(module.path, target)
        config = worker_config(tmp_path, sysroot=str(tmp_path / "sysroots" / "{release}"),
                               debug_dirs=[str(crash_build.install_debug(tmp_path / "debug"))])
        result = retraced(attempt(tmp_path, crash_build.executable, crash_build.cores[0], config))
        assert f"executable {root}{crash_build.executable}: build-id {crash_build.build_id}" in result.log
        assert f"'set sysroot {root}'" in result.log
        assert " in read_value (" in result.backtrace

    def test_unstripped_executable_carries_its_symbols(self, tmp_path: Path) -> None:
        """No debug directory, no server: the executable's own DWARF is enough."""
        stripped, _, _ = build_crash(tmp_path / "build")
        full = stripped.parent.parent / "prog.full"
        core = make_core(full, tmp_path / "core")
        result = retraced(attempt(tmp_path, full, core, worker_config(tmp_path)))
        assert f"its own debug information ({full})" in result.log
        assert result.signature == f"{full}:11:read_value:compute:parse:handle:main"


class TestSymbolsMissing:
    def test_no_symbols_anywhere_is_transient(self, crash_build: CrashBuild, tmp_path: Path) -> None:
        """No debug directory, no server: transient, naming the executable's build-id and path."""
        result = failed(attempt(tmp_path, crash_build.executable, crash_build.cores[0], worker_config(tmp_path)),
                        transient=True)
        assert f"no symbols for build-id {crash_build.build_id} ({crash_build.executable})" in result.error
        assert "then the retry will find them" in result.error
        assert Missing(crash_build.build_id, str(crash_build.executable)) in result.missing

    def test_debug_file_added_after_a_miss(self, crash_build: CrashBuild, tmp_path: Path) -> None:
        """The admin imports the debug file after a failed attempt: the next attempt succeeds."""
        debug_dir = tmp_path / "debug"
        debug_dir.mkdir()
        config = worker_config(tmp_path, debug_dirs=[str(debug_dir)])
        failed(attempt(tmp_path, crash_build.executable, crash_build.cores[0], config), transient=True)
        crash_build.install_debug(debug_dir)
        retraced(attempt(tmp_path, crash_build.executable, crash_build.cores[0], config))

    def test_debuginfod_miss_is_not_remembered(self, crash_build: CrashBuild, debuginfod: Debuginfod,
                                               tmp_path: Path) -> None:
        """The server lacks the file (the client caches that miss), then gets it: the retry, with the same
        cache, asks again and succeeds."""
        config = worker_config(tmp_path, gdb=debuginfod.gdb_wrapper(tmp_path), debuginfod_urls=[debuginfod.url])
        first = failed(attempt(tmp_path, crash_build.executable, crash_build.cores[0], config), transient=True)
        assert crash_build.build_id in first.error
        negative = debuginfod_cache(config) / crash_build.build_id / "debuginfo"
        assert negative.exists() and negative.stat().st_size == 0, "the client recorded no miss"
        crash_build.install_debug(debuginfod.root)
        debuginfod.wait_for(crash_build.build_id)
        result = retraced(attempt(tmp_path, crash_build.executable, crash_build.cores[0], config))
        assert " in read_value (" in result.backtrace
        assert "forgot the recorded miss" in result.log

    def test_unreachable_server_is_transient(self, crash_build: CrashBuild, debuginfod: Debuginfod,
                                             tmp_path: Path) -> None:
        """A server that refuses connections: transient, saying the symbol server failed."""
        config = worker_config(tmp_path, gdb=debuginfod.gdb_wrapper(tmp_path),
                               debuginfod_urls=[f"http://127.0.0.1:{debuginfod.port + 1}"])
        result = failed(attempt(tmp_path, crash_build.executable, crash_build.cores[0], config), transient=True)
        assert "the symbol server failed" in result.error and "Connection refused" in result.error


class TestBadInput:
    def test_truncated_core_is_permanent(self, crash_build: CrashBuild, tmp_path: Path) -> None:
        core = tmp_path / "core.cut"
        data = crash_build.cores[0].read_bytes()
        core.write_bytes(data[:len(data) // 2])
        result = failed(attempt(tmp_path, crash_build.executable, core, worker_config(tmp_path)), transient=False)
        assert f"core {core} is truncated" in result.error and "ask for the complete core" in result.error

    def test_not_a_core_is_permanent(self, crash_build: CrashBuild, tmp_path: Path) -> None:
        exe = crash_build.executable
        result = failed(attempt(tmp_path, exe, exe, worker_config(tmp_path)), transient=False)
        assert f"core {exe} is not a core dump" in result.error

    def test_missing_core_is_transient(self, crash_build: CrashBuild, tmp_path: Path) -> None:
        core = tmp_path / "elsewhere" / "core"
        result = failed(attempt(tmp_path, crash_build.executable, core, worker_config(tmp_path)), transient=True)
        assert f"core {core} does not exist on this worker" in result.error

    def test_other_build_of_the_executable_is_permanent(self, tmp_path: Path) -> None:
        """The executable at the crashed path is another build (other source, other build-id)."""
        exe, _, crashed_id = build_crash(tmp_path / "build")
        core = make_core(exe, tmp_path / "core")
        _, _, other_id = build_crash(tmp_path / "build", "int main(void) { return *(volatile int *)0; }\n")
        result = failed(attempt(tmp_path, exe, core, worker_config(tmp_path)), transient=False)
        assert f"executable {exe} is not the build that crashed" in result.error
        assert other_id in result.error and crashed_id in result.error
        assert "`retracer retry 7`" in result.error

    @pytest.mark.parametrize("cut", [b"#!/bin/sh\n", None])
    def test_executable_that_is_not_elf_is_permanent(self, crash_build: CrashBuild, tmp_path: Path,
                                                     cut: bytes | None) -> None:
        """A script, or the program cut inside its headers, where the executable should be."""
        exe = tmp_path / "prog"
        exe.write_bytes(cut if cut is not None else crash_build.executable.read_bytes()[:200])
        core = tmp_path / "core"
        core.symlink_to(crash_build.cores[0])
        result = failed(attempt(tmp_path, exe, core, worker_config(tmp_path)), transient=False)
        assert f"executable {exe} is not a valid ELF file" in result.error

    def test_executable_not_installed_is_permanent(self, crash_build: CrashBuild, tmp_path: Path) -> None:
        exe = tmp_path / "usr" / "bin" / "prog"
        result = failed(attempt(tmp_path, exe, crash_build.cores[0], worker_config(tmp_path)), transient=False)
        assert f"executable {exe} does not exist on this worker; install prog 1.0-1" in result.error

    @pytest.mark.parametrize("release", ["../../etc", "a/b", ".."])
    def test_release_that_is_not_a_directory_name_is_permanent(self, crash_build: CrashBuild, tmp_path: Path,
                                                               release: str) -> None:
        config = worker_config(tmp_path, sysroot=str(tmp_path / "{release}"))
        workdir = tmp_path / "work"
        workdir.mkdir()
        request = replace(request_for(crash_build.executable, crash_build.cores[0]), release=release)
        outcome = retrace(request, config, workdir)
        assert f"release {release!r} cannot name a directory" in failed(outcome, transient=False).error

    def test_missing_sysroot_is_permanent(self, crash_build: CrashBuild, tmp_path: Path) -> None:
        config = worker_config(tmp_path, sysroot=str(tmp_path / "sysroots" / "{release}"))
        result = failed(attempt(tmp_path, crash_build.executable, crash_build.cores[0], config), transient=False)
        assert f"sysroot {tmp_path / 'sysroots' / 'bookworm'} for release bookworm does not exist" in result.error


class TestGdbProcess:
    def test_deadline_kills_the_whole_group(self, crash_build: CrashBuild, tmp_path: Path) -> None:
        """gdb (and the shell it started) past gdb_timeout_s: TERM, then KILL, to the group; transient."""
        gdb, pid_file = hanging_gdb(tmp_path)
        config = worker_config(tmp_path, gdb=gdb, gdb_timeout_s=1.0,
                               debug_dirs=[str(crash_build.install_debug(tmp_path / "debug"))])
        started = time.monotonic()
        result = failed(attempt(tmp_path, crash_build.executable, crash_build.cores[0], config), transient=True)
        # gdb would sleep 100 s: far less means the deadline ended it (a generous bound on a shared machine).
        assert time.monotonic() - started < 60
        assert "gdb did not finish within 1 s" in result.error
        assert_group_gone(int(pid_file.read_text()))

    def test_stop_abandons_the_attempt_at_once(self, crash_build: CrashBuild, tmp_path: Path) -> None:
        gdb, pid_file = hanging_gdb(tmp_path)
        config = worker_config(tmp_path, gdb=gdb, gdb_timeout_s=600.0)
        stop = threading.Event()
        timer = threading.Timer(1.0, stop.set)
        timer.start()
        started = time.monotonic()
        result = failed(attempt(tmp_path, crash_build.executable, crash_build.cores[0], config, stop),
                        transient=True)
        timer.cancel()
        # The deadline is 600 s: far less means the stop ended it (a generous bound on a shared machine).
        assert time.monotonic() - started < 60
        assert result.error.startswith("abandoned: the worker was stopped")
        assert_group_gone(int(pid_file.read_text()))

    def test_gdb_killed_by_a_signal_is_permanent(self, crash_build: CrashBuild, tmp_path: Path) -> None:
        crashing = tmp_path / "crashing-gdb"
        crashing.write_text("#!/bin/sh\nkill -SEGV $$\n", encoding="utf-8")
        crashing.chmod(0o755)
        result = failed(attempt(tmp_path, crash_build.executable, crash_build.cores[0],
                                worker_config(tmp_path, gdb=crashing)), transient=False)
        assert "gdb was killed by SIGSEGV" in result.error

    def test_gdb_not_installed_is_transient(self, crash_build: CrashBuild, tmp_path: Path) -> None:
        config = worker_config(tmp_path, gdb=str(tmp_path / "no-gdb"))
        result = failed(attempt(tmp_path, crash_build.executable, crash_build.cores[0], config), transient=True)
        assert "gdb not found" in result.error and "install gdb" in result.error

