"""Crashes made for real, for the tests, the benchmarks and the demo: a C program compiled with debug
information, that information split off into a ``.build-id`` tree (where gdb and debuginfod look), the program
stripped, and a core of its crash written by gdb (no ulimit needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from retracer.errors import RetracerError
from retracer.worker.checks import elf_facts

#: A NULL dereference five calls deep, so that the top five frames are all the program's own functions.
CRASH_SOURCE = """\
#include <stdio.h>
#include <stdlib.h>
struct thing { int value; };
int read_value(struct thing *t) { return t->value; }
int compute(struct thing *t, int n) { return read_value(t) * n; }
int parse(struct thing *t, int n) { return compute(t, n + 1) + 1; }
int handle(struct thing *t, int n) { return parse(t, n) - 1; }
int main(int argc, char **argv) {
    struct thing *t = argc > 5 ? malloc(sizeof *t) : NULL;
    printf("%d\\n", handle(t, argc));
    return argv == NULL;
}
"""

#: What making a crash takes.
TOOLS = ("gcc", "gdb", "objcopy")


class CrashNotMade(RetracerError):
    """A step of making the crash failed here (a tool missing or failing, ptrace refused)."""


@dataclass(frozen=True)
class Program:
    """A compiled program: stripped, its unstripped build kept, its debug file apart."""

    executable: Path
    unstripped: Path
    debug_file: Path
    build_id: str

    def install_debug(self, debug_dir: Path) -> Path:
        """Put the debug file at ``debug_dir/.build-id/xx/rest.debug``; returns ``debug_dir``."""
        target = debug_dir / ".build-id" / self.build_id[:2] / f"{self.build_id[2:]}.debug"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.debug_file, target)
        return debug_dir


def missing_tools(*extra: str) -> list[str]:
    return [tool for tool in (*TOOLS, *extra) if shutil.which(tool) is None]


def run(argv: Sequence[str], cwd: Path, what: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    # Without DEBUGINFOD_URLS gdb never asks a server about the system libraries: the core is local business.
    env = {k: v for k, v in os.environ.items() if k != "DEBUGINFOD_URLS"}
    tool = shutil.which(argv[0]) or argv[0]
    try:
        proc = subprocess.run([tool, *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True,  # noqa: S603
                              timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CrashNotMade(f"{what} failed ({exc})") from None
    if check and proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise CrashNotMade(f"{what} failed with status {proc.returncode}: {last}")
    return proc


def build(where: Path, source: str = CRASH_SOURCE, name: str = "prog", libraries: Sequence[str] = ()) -> Program:
    """Compile ``source`` as ``where/name.c`` (PIE, with a build-id), keep its debug information apart, and strip
    the executable (``where/bin/name``)."""
    where.mkdir(parents=True, exist_ok=True)
    (where / f"{name}.c").write_text(source, encoding="utf-8")
    full = where / f"{name}.full"
    run(["gcc", "-g", "-O0", "-fPIE", "-pie", "-Wl,--build-id", "-o", str(full), str(where / f"{name}.c"), *libraries],
        where, "gcc")
    try:
        build_id = elf_facts(full).build_id
    except (OSError, ValueError) as exc:
        raise CrashNotMade(f"gcc's output {full} cannot be read as ELF ({exc})") from None
    if not build_id:
        raise CrashNotMade(f"gcc wrote {full} without a GNU build-id (the linker ignored --build-id)")
    # Outside bin/: gdb would also find a debug file lying next to the executable.
    keep = where / "keep"
    keep.mkdir(exist_ok=True)
    debug = keep / f"{name}.debug"
    run(["objcopy", "--only-keep-debug", str(full), str(debug)], where, "objcopy --only-keep-debug")
    bin_dir = where / "bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / name
    run(["objcopy", "--strip-all", str(full), str(exe)], where, "objcopy --strip-all")
    return Program(exe, full, debug, build_id)


def make_core(argv: Sequence[str | Path], core: Path) -> Path:
    """A core of the crash of ``argv`` written by gdb, with address-space randomisation left on."""
    proc = run(["gdb", "-nx", "-batch", "-ex", "set disable-randomization off", "-ex", "run",
                "-ex", f"generate-core-file {core}", "--args", *map(str, argv)], core.parent,
               "gdb (running the program to write its core)", check=False)
    if not core.exists():
        said = (proc.stderr.strip().splitlines() or ["nothing on stderr"])[-1]
        raise CrashNotMade(f"gdb wrote no core of {argv[0]} ({said}); gdb needs ptrace, which this machine or "
                           f"container may refuse")
    return core
