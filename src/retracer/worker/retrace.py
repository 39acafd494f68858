"""One retrace attempt: a core and its executable in, a symbolic backtrace or an actionable failure out.

The steps: check the core and the executable (``checks``), take the modules' debug files out of retracer's
symbol index when the worker has the database (``index_source``), find where each module's symbols may come
from and tell gdb (``symbols``), run gdb under a deadline (``gdb``), then judge what it printed. Nothing about the
crash raises: a bad core, a missing file or a gdb crash each end as a ``Failed`` whose error names the file,
the problem and what to do.

Transient (retried after a backoff): the core cannot be opened (its storage may be unmounted), the symbol
server failed or was slow for a module left without symbols, gdb passed its deadline, the executable's own
symbols are missing (an admin imports them; the retry finds them), the crashing thread has no known frame
while some module lacks symbols, the worker's disk is full, the worker was stopped, and gdb cannot be run at
all (the worker's misconfiguration: an exception would only kill the worker, while a transient failure says
what to install and lets another worker, or this one once fixed, take the job). Permanent (the job is held):
not a core, a truncated core, an executable that is not the build that crashed or is not installed (or a
release without a sysroot), gdb killed by a signal we did not send, and a crashing thread whose every frame
is unknown although every module's symbols were found. Libraries without symbols do not fail an attempt:
they are listed in worker.log.
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from retracer.config import Config
from retracer.worker import checks, coredump, gdb, symbols
from retracer.worker.checks import CheckFailed
from retracer.worker.index_source import IndexSymbols
from retracer.worker.request import Failed, Missing, Outcome, Request, Retraced
from retracer.worker.signature import address_signature, crash_signature, parse_frames, parse_mappings

ABANDONED = ("abandoned: the worker was stopped while retracing (gdb's process group was killed); the attempt "
             "is retried")
#: A release names a directory when put into [worker] sysroot: no separators, no "..".
_RELEASE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]*")
_TERMINATED = re.compile(r"^Program terminated with signal (SIG[A-Z0-9]+)", re.MULTILINE)


def retrace(request: Request, config: Config, workdir: Path, stop: threading.Event | None = None,
            index: IndexSymbols | None = None) -> Outcome:
    """Retrace ``request``'s core in ``workdir`` (a fresh directory the caller creates and removes). ``stop``
    set means the worker is shutting down: gdb is killed at once and the attempt is abandoned (transient).
    ``index``: retracer's symbol index, consulted for every module's debug information before gdb runs."""
    attempt = _Attempt(request, config, workdir, stop, index)
    try:
        return attempt.run()
    except CheckFailed as exc:
        return attempt.failed(str(exc), exc.transient)
    except OSError as exc:
        return attempt.failed(_worker_disk_error(exc, workdir), transient=True)


def engine_for(config: Config, factory: sessionmaker[Session] | None
               ) -> Callable[[Request, Config, Path, threading.Event | None], Outcome]:
    """The engine a worker runs: ``retrace``, with retracer's symbol index as a symbol source when the worker
    has the database (the embedded mode) and ``[worker] use_index`` is on."""
    index = IndexSymbols.for_worker(config, factory)
    if index is None:
        return retrace

    def engine(request: Request, config: Config, workdir: Path, stop: threading.Event | None = None) -> Outcome:
        return retrace(request, config, workdir, stop, index)

    return engine


def debuginfod_cache(config: Config) -> Path:
    """The debuginfod client cache shared by the worker's attempts (see ``symbols`` for why it is shared)."""
    work_dir = config["worker"]["work_dir"]
    base = Path(os.path.expanduser(work_dir)) if work_dir else config.data_dir / "worker"
    return base / "debuginfod-cache"


def _worker_disk_error(exc: OSError, workdir: Path) -> str:
    where = exc.filename or workdir
    if exc.errno == errno.ENOSPC:
        return (f"no space left on the worker's disk writing {where}: free space there (the attempt is "
                f"retried)")
    return (f"the worker cannot use {where}: {exc.strerror}; check that file's directory, its space and "
            f"permissions on this worker (the attempt is retried)")


class _Attempt:
    def __init__(self, request: Request, config: Config, workdir: Path, stop: threading.Event | None,
                 index: IndexSymbols | None = None) -> None:
        self.request = request
        self.index = index
        self.settings = config["worker"]
        self.config = config
        self.workdir = workdir
        self.stop = stop
        self.lines: list[str] = []
        self.gdb_text = ""
        self.missing: list[Missing] = []
        self.blocking: list[Missing] | None = None
        self.started = time.monotonic()

    def note(self, line: str) -> None:
        self.lines.append(f"[{time.monotonic() - self.started:7.3f}] {line}")

    def log(self) -> str:
        text = "\n".join(self.lines) + "\n"
        if self.gdb_text:
            text += "\n---- gdb output ----\n" + self.gdb_text.rstrip("\n") + "\n"
        return text

    def failed(self, error: str, transient: bool) -> Failed:
        self.note(f"failed ({'transient' if transient else 'permanent'}): {error}")
        return Failed(error=error, transient=transient, log=self.log(), missing=list(self.missing),
                      blocking=None if self.blocking is None else list(self.blocking))

    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def run(self) -> Outcome:
        req = self.request
        self.note(f"job {req.job} attempt {req.attempt}: crash {req.crash_id}, {req.package} {req.version} "
                  f"({req.architecture}, {req.release}), core {req.core}, executable {req.executable}")
        program = self.settings["gdb"]
        gdb_path = shutil.which(program)
        if gdb_path is None:
            return self.failed(f"gdb not found at {program!r} ([worker] gdb): install gdb on this worker "
                               f"(apt-get install gdb) or set [worker] gdb to its path (the attempt is retried)",
                               transient=True)
        if self.stopped():
            return self.failed(ABANDONED, transient=True)
        sysroot = self._sysroot()
        core = Path(req.core)
        summary = checks.check_core(core)
        self.note(f"core {core}: an ELF core of {summary.size} bytes, {summary.segments} segments, none cut short; "
                  f"signal {summary.signal if summary.signal is not None else 'not recorded'}")
        try:
            modules = coredump.modules(core)
        except coredump.CoreFileError as exc:
            raise CheckFailed(str(exc)) from None
        for module in modules:
            self.note(f"module at {module.start:#x}: {module.path or '[vdso]'} build-id {module.build_id}")
        main, how = checks.find_main(modules, req.executable)
        executable = symbols.module_file(req.executable, sysroot)
        where = f"in the sysroot {sysroot}" if sysroot else "on this worker"
        remedy = (f"install {req.package} {req.version} ({req.architecture}) {where}, the build that crashed, "
                  f"then `retracer retry {req.job}`")
        checks.check_executable(executable, main, core, how, remedy)
        self.note(f"executable {executable}: build-id {main.build_id}, the same as {how}")
        return self._symbols_and_gdb(gdb_path, core, executable, modules, main, summary.signal, sysroot)

    def _sysroot(self) -> str:
        template = str(self.settings["sysroot"])
        if not template:
            return ""
        release = self.request.release
        if not _RELEASE.fullmatch(release) or ".." in release:
            raise CheckFailed(f"release {release!r} cannot name a directory in [worker] sysroot ({template}): "
                              f"a release is a plain name such as bookworm or 24.04; correct the crash's "
                              f"release, then `retracer retry {self.request.job}`")
        root = template.replace("{release}", release).rstrip("/")
        if not os.path.isdir(root):
            raise CheckFailed(f"sysroot {root} for release {release} does not exist on this worker ([worker] "
                              f"sysroot = {template}): install that release's packages there, then "
                              f"`retracer retry {self.request.job}`")
        return root

    def _symbols_and_gdb(self, gdb_path: str, core: Path, executable: Path, modules: list[coredump.Module],
                         main: coredump.Module, signo: int | None, sysroot: str) -> Outcome:
        debug_dirs = [str(d) for d in self.settings["debug_dirs"]]
        urls = [str(u) for u in self.settings["debuginfod_urls"]]
        if self.index is not None:
            provided = self.index.provide([m.build_id for m in modules], self.workdir / "symbol-index")
            for line in provided.lines:
                self.note(line)
            if provided.directory is not None:
                debug_dirs.append(str(provided.directory))
        for found in symbols.local_sources(modules, debug_dirs, sysroot, main, executable):
            module = found.module
            self.note(f"symbols for {module.path} ({module.build_id}): "
                      f"{found.source or ('not on this worker; asking debuginfod' if urls else 'not on this worker')}")
        cache = debuginfod_cache(self.config) if urls else None
        if cache is not None:
            for line in symbols.prepare_cache(cache, [m.build_id for m in modules]):
                self.note(line)
        home = self.workdir / "home"
        home.mkdir(exist_ok=True)
        env = symbols.gdb_environment(home, urls, int(self.settings["debuginfod_timeout_s"]), cache)
        settings = symbols.gdb_settings(debug_dirs, sysroot, bool(urls))
        exe_path = os.path.realpath(executable)
        inv = gdb.invocation(gdb_path, exe_path, os.path.realpath(core), settings, env)
        shown_env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()) if k != "PATH")
        self.note(f"gdb: {shown_env} {shlex.join(inv.argv)}")
        if self.stopped():
            return self.failed(ABANDONED, transient=True)
        timeout = float(self.settings["gdb_timeout_s"])
        result = gdb.run(inv, self.workdir / "gdb.out", timeout, self.stop, cwd=self.workdir)
        text, truncated = gdb.read_output(self.workdir / "gdb.out")
        self.gdb_text = text
        status = (f"killed by signal {result.killed_by}" if result.killed_by
                  else f"exit status {result.returncode}")
        self.note(f"gdb (pid {result.pid}) ended after {result.elapsed_s:.2f} s, {status}"
                  + (f"; its output was cut at {gdb.MAX_OUTPUT_BYTES} bytes" if truncated else ""))
        if result.stopped:
            return self.failed(ABANDONED, transient=True)
        if result.timed_out:
            return self.failed(f"gdb did not finish within {timeout:g} s on core {core} (its process group was "
                               f"killed): a symbol server may be slow or the core very large; the attempt is "
                               f"retried; raise [worker] gdb_timeout_s if this repeats", transient=True)
        if result.killed_by is not None:
            name = _signal_name(result.killed_by)
            return self.failed(f"gdb was killed by {name} reading core {core} with executable {executable}: gdb "
                               f"crashed on this core (or was killed from outside, e.g. by the out-of-memory "
                               f"killer); see the gdb output in worker.log; once gdb is fixed or has more "
                               f"memory, `retracer retry {self.request.job}`", transient=False)
        output = gdb.split(text, inv.nonce, truncated)
        return self._judge(output, result.returncode, core, executable, exe_path, modules, main, signo)

    def _judge(self, output: gdb.GdbOutput, returncode: int | None, core: Path, executable: Path, exe_path: str,
               modules: list[coredump.Module], main: coredump.Module, signo: int | None) -> Outcome:
        req = self.request
        if not output.ended and not output.truncated and _disk_full(self.workdir):
            return self.failed(f"no space left on the worker's disk in {self.workdir}: gdb's output is cut "
                               f"short; free space there (the attempt is retried)", transient=True)
        if not output.sections:
            tail = " / ".join(output.preamble.strip().splitlines()[-3:]) or "no output"
            return self.failed(f"gdb ({self.settings['gdb']}) exited with status {returncode} before running its "
                               f"commands ({tail}); check that [worker] gdb is a working gdb (the attempt is "
                               f"retried)", transient=True)
        if "bt" not in output.sections:
            tail = " / ".join(text for section in output.sections.values() for text in section.splitlines())
            return self.failed(f"gdb stopped (exit status {returncode}) before printing the backtrace of core "
                               f"{core} (its last words: {tail[-300:] or 'none'}); see the gdb output in "
                               f"worker.log", transient=False)
        backtrace = output.sections["bt"]
        frames = parse_frames(backtrace)
        if not frames:
            said = " / ".join((backtrace or output.preamble).strip().splitlines()[-3:]) or "nothing"
            return self.failed(f"gdb found no stack for the crashing thread in core {core} (it said: {said}); "
                               f"the core holds no usable thread; ask for a new core", transient=False)
        main_ok = symbols.main_has_symbols(output, Path(exe_path))
        self.missing = ([] if main_ok else [Missing(main.build_id, main.path or req.executable)])
        self.missing += symbols.libraries_without_symbols(output, modules, main)
        downloads = symbols.download_failures(output.preamble)
        for what, why in downloads:
            self.note(f"debuginfod download failed for {what}: {why}")
        for missing in self.missing:
            self.note(f"no symbols for build-id {missing.build_id} ({missing.path})")
        named = ", ".join(f"build-id {m.build_id} ({m.path})" for m in self.missing)
        failures = symbols.failures_for(downloads, self.missing)
        # What failed this attempt, if it fails for symbols: the executable's own, the modules a symbol
        # server failed to send, or every module without symbols when no frame of the crash is known.
        # Libraries without symbols alone do not fail an attempt, so they are not what the job waits for.
        failed_names = {os.path.basename(what) for what, _ in downloads}
        self.blocking = [m for m in self.missing if (m.build_id == main.build_id and not main_ok)
                         or os.path.basename(m.path) in failed_names]
        if all(f.unknown or f.signal_handler for f in frames):
            self.blocking = list(self.missing)
        if failures:
            return self.failed(f"the symbol server failed ({failures[0]}), so {named} have no symbols: the "
                               f"server is unreachable or slow; the attempt is retried; check [worker] "
                               f"debuginfod_urls if this repeats", transient=True)
        if not main_ok:
            return self.failed(f"no symbols for build-id {main.build_id} ({main.path or req.executable}), the "
                               f"crashed executable{self._looked_in()}; import its debug package ({req.package} "
                               f"{req.version} debug symbols), then the retry will find them", transient=True)
        if all(f.unknown or f.signal_handler for f in frames):
            if self.missing:
                return self.failed(f"every frame of the crashing thread is unknown (??) and {named} have no "
                                   f"symbols; import their debug packages, then the retry will find them",
                                   transient=True)
            return self.failed(f"every frame of the crashing thread is unknown (??) although every module's "
                               f"symbols were found: the stack in core {core} is corrupt or cannot be unwound; "
                               f"ask for a new core", transient=False)
        if signo is None:
            found = _TERMINATED.search(output.preamble)
            signo = signal.Signals[found[1]].value if found and found[1] in signal.Signals.__members__ else None
        mappings = parse_mappings(output.sections.get("mappings", ""))
        retraced = Retraced(backtrace=backtrace, log="",
                            signature=crash_signature(req.executable, signo, frames),
                            address_signature=address_signature(frames, modules, mappings))
        self.note(f"retraced: {len(frames)} frames in the crashing thread; signature {retraced.signature}; "
                  f"address signature {retraced.address_signature}")
        retraced.log = self.log()
        return retraced

    def _looked_in(self) -> str:
        places = []
        if self.index is not None:
            places.append("retracer's symbol index")
        dirs = self.settings["debug_dirs"]
        if dirs:
            places.append("debug directories " + ", ".join(str(d) for d in dirs))
        urls = self.settings["debuginfod_urls"]
        if urls:
            places.append("debuginfod " + " ".join(str(u) for u in urls))
        return f" (looked in: {'; '.join(places)}, and the executable itself)" if places else \
            " (no [worker] debug_dirs or debuginfod_urls are configured, and the executable is stripped)"


def _signal_name(number: int) -> str:
    try:
        return f"{signal.Signals(number).name} (signal {number})"
    except ValueError:
        return f"signal {number}"


def _disk_full(directory: Path) -> bool:
    try:
        return os.statvfs(directory).f_bavail == 0
    except OSError:
        return False
