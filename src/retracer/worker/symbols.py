"""Debug symbols by build-id: where each module of a core may get them, how gdb is told about those places,
and which modules gdb ended up without.

Before gdb runs, the worker looks for each module's symbols itself (a ``.build-id/xx/rest.debug`` file in a
debug directory, or debug information inside the module) only to say in the log where they should come
from. Whether symbols were found is then taken from gdb: ``info sources`` marks an objfile without debug
information and ``info sharedlibrary`` a library, whatever the source (a debug directory, a debug link,
debuginfod), and a debug file gdb rejected (a wrong CRC, another build) counts as missing, as it is.

The debuginfod client keeps its downloads in one cache shared by every attempt of the worker (a library's
debug file, tens of MiB, is fetched once, not at every attempt), but it also remembers a miss, as an empty
file, for ``cache_miss_s`` seconds (600 by default): an admin who imports the symbols after a failed
attempt would see the retry fail again from the cache without the server being asked. So the cache's
``cache_miss_s`` is set to 0 and the misses recorded for this core's build-ids are removed before gdb runs:
every attempt asks the servers again for what it lacks, and reuses what it has.
"""

from __future__ import annotations

import os
import re
import struct
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from retracer.worker import checks
from retracer.worker.coredump import Module
from retracer.worker.gdb import GdbOutput
from retracer.worker.request import Missing

#: Environment variables passed on to gdb from the worker's own (a debuginfod server behind a proxy).
PASSED_ENV = ("PATH", "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
NO_DEBUG_INFO = "(Objfile has no debug information.)"
NO_SYMBOLS_AT_ALL = "No symbol table is loaded."

_SHAREDLIBRARY = re.compile(r"^\s*(?:(?P<low>0x[0-9a-fA-F]+)\s+0x[0-9a-fA-F]+\s+)?"
                            r"(?P<read>Yes \(\*\)|Yes|No)\s+(?P<path>\S.*?)\s*$")
_DOWNLOAD_FAILED = re.compile(r"^Download failed: (?P<why>.*?)\.\s+Continuing without .*? for (?P<what>.*?)\.?$")


@dataclass(frozen=True)
class SymbolSource:
    """Where a module's debug symbols were found on this worker before gdb ran (None: not here)."""

    module: Module
    file: Path | None
    source: str | None


def debug_file(build_id: str, debug_dirs: Iterable[str]) -> Path | None:
    """The first ``<dir>/.build-id/xx/rest.debug`` for build_id among debug_dirs."""
    for directory in debug_dirs:
        candidate = Path(directory) / ".build-id" / build_id[:2] / f"{build_id[2:]}.debug"
        if candidate.is_file():
            return candidate
    return None


def has_debug_info(path: Path) -> bool:
    """Whether the ELF file at path carries DWARF (not stripped); an unreadable file has none."""
    try:
        return checks.elf_facts(path).debug_info
    except (OSError, ValueError, struct.error):
        return False


def module_file(path: str, sysroot: str) -> Path:
    """Where this worker holds the file a module was mapped from (under the sysroot when there is one)."""
    return Path(sysroot, path.lstrip("/")) if sysroot else Path(path)


def local_sources(modules: Sequence[Module], debug_dirs: Sequence[str], sysroot: str,
                  main: Module, executable: Path) -> list[SymbolSource]:
    """Each file-backed module and where its symbols are on this worker, if anywhere."""
    found = []
    for module in modules:
        if module.path is None:
            continue
        file = executable if module == main else module_file(module.path, sysroot)
        debug = debug_file(module.build_id, debug_dirs)
        if debug is not None:
            source: str | None = f"debug file {debug}"
        elif has_debug_info(file):
            source = f"its own debug information ({file})"
        else:
            source = None
        found.append(SymbolSource(module, file, source))
    return found


def gdb_settings(debug_dirs: Sequence[str], sysroot: str, debuginfod: bool) -> list[str]:
    """The gdb settings (``-iex``) that point it at the symbols."""
    # Only the configured directories: the worker's own /usr/lib/debug holds its release's symbols, not the
    # crash's, and would make results depend on what happens to be installed on the worker.
    settings = [f"set debug-file-directory {':'.join(debug_dirs)}".rstrip()]
    if sysroot:
        settings.append(f"set sysroot {sysroot}")
    # Without URLs gdb would still ask (in batch mode, answered "no") or use its default; it is said outright.
    settings.append(f"set debuginfod enabled {'on' if debuginfod else 'off'}")
    return settings


def gdb_environment(home: Path, urls: Sequence[str], timeout_s: int, cache: Path | None) -> dict[str, str]:
    """gdb's environment: an empty home, the C locale (the output is parsed), and the debuginfod client's
    servers, timeout and cache; nothing else of the worker's, so no DEBUGINFOD_URLS of its own leaks in."""
    env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
    env.setdefault("PATH", os.defpath)
    env.update({"HOME": str(home), "LC_ALL": "C", "LANG": "C"})
    if urls and cache is not None:
        env.update({"DEBUGINFOD_URLS": " ".join(urls), "DEBUGINFOD_TIMEOUT": str(timeout_s),
                    "DEBUGINFOD_CACHE_PATH": str(cache)})
    return env


def prepare_cache(cache: Path, build_ids: Iterable[str]) -> list[str]:
    """Make the shared debuginfod cache forget its misses (see the module docstring); the log lines."""
    cache.mkdir(parents=True, exist_ok=True)
    setting = cache / "cache_miss_s"
    try:
        current = setting.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        current = None
    if current != "0":
        # Replaced whole, so a client reading it concurrently never sees it empty (and falls back to 600 s).
        fd, temporary = tempfile.mkstemp(prefix=".cache_miss_s.", dir=cache)
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write("0")
        os.chmod(temporary, 0o644)
        os.replace(temporary, setting)
    lines = []
    for build_id in build_ids:
        entry = cache / build_id / "debuginfo"
        try:
            if entry.stat().st_size == 0:
                entry.unlink()
                lines.append(f"debuginfod cache: forgot the recorded miss for build-id {build_id}")
        except FileNotFoundError:
            continue
    return lines


def download_failures(text: str) -> list[tuple[str, str]]:
    """(file, reason) of each debuginfod download gdb reports as failed (a server that does not have a file
    is not a failure: gdb says nothing then)."""
    failures = []
    for line in text.splitlines():
        match = _DOWNLOAD_FAILED.match(line.strip())
        if match:
            failures.append((match["what"], match["why"]))
    return failures


def failures_for(failures: Sequence[tuple[str, str]], missing: Sequence[Missing]) -> list[str]:
    """The download failures of modules that ended without symbols, as ``file: reason``. gdb names a library
    as the loader found it (/lib/...), the core as it was mapped (/usr/lib/...): they are matched by name."""
    names = {os.path.basename(m.path) for m in missing}
    return [f"{what}: {why}" for what, why in failures if os.path.basename(what) in names]


def objfiles_without_debug_info(sources: str) -> set[str] | None:
    """The objfiles ``info sources`` marks as having no debug information; None when it says no objfile has
    any."""
    if NO_SYMBOLS_AT_ALL in sources:
        return None
    marked = set()
    header: str | None = None
    for line in sources.splitlines():
        text = line.strip()
        if not text:
            continue
        if text == NO_DEBUG_INFO and header is not None:
            marked.add(header)
        elif not line[0].isspace() and text.endswith(":") and not text.startswith("("):
            header = text[:-1]
    return marked


def objfile_headers(sources: str) -> set[str]:
    """Every objfile ``info sources`` lists."""
    return {line.strip()[:-1] for line in sources.splitlines()
            if line and not line[0].isspace() and line.strip().endswith(":") and not line.startswith("(")}


def main_has_symbols(output: GdbOutput, executable: Path) -> bool:
    """Whether gdb found debug information for the executable (by its objfile in ``info sources``)."""
    sources = output.sections.get("sources", "")
    marked = objfiles_without_debug_info(sources)
    if marked is None:
        return False
    names = {str(executable), os.path.realpath(executable)}
    return bool(names & objfile_headers(sources)) and not names & marked


def libraries_without_symbols(output: GdbOutput, modules: Sequence[Module], main: Module) -> list[Missing]:
    """The libraries ``info sharedlibrary`` shows without debug information (``Yes (*)``) or not loaded at
    all (``No``: the file was not found, under the sysroot if there is one), by their modules' build-ids."""
    libraries = [m for m in modules if m.path is not None and m != main]
    starts = sorted(libraries, key=lambda m: m.start)
    missing: dict[str, Missing] = {}
    for line in output.sections.get("sharedlibrary", "").splitlines():
        match = _SHAREDLIBRARY.match(line)
        if match is None or match["read"] == "Yes":
            continue
        module = _library_module(match["low"], match["path"], starts)
        if module is not None and module.path is not None:
            missing.setdefault(module.build_id, Missing(module.build_id, module.path))
    return list(missing.values())


def _library_module(start: str | None, path: str, libraries: Sequence[Module]) -> Module | None:
    if start is not None:
        # A library's code lies after its first mapping and before the next module's.
        address = int(start, 16)
        below = [m for m in libraries if m.start <= address]
        if below:
            return below[-1]
    for module in libraries:
        if module.path == path:
            return module
    # The loader's name (/lib/...) and the mapped file's (/usr/lib/... after a /usr merge) can differ.
    name = os.path.basename(path)
    return next((m for m in libraries if m.path is not None and os.path.basename(m.path) == name), None)
