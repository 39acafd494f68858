"""Running gdb on a core: the command line, a deadline enforced on its whole process group, bounded output,
and the split of that output into the sections asked for.

gdb runs in batch mode in its own session (so its process group is its own: ``shell`` commands, debuginfod
helpers and whatever else it starts die with it), with ``-nx`` and auto-load off (nothing from the home
directory, the core or the debug files is executed), its stdout and stderr going to one file in the
attempt's directory (an error message stays next to the command that caused it, and memory does not grow
with the output). Each section of the output follows an ``echo`` of a marker holding a random nonce, so a
string in the crashed program's memory, printed by ``bt full``, cannot pass for a section boundary.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: The gdb commands run after the executable and core are loaded, one section of the output each, in order.
#: The small sections the verdict needs come first and the threads last, so that output cut at
#: MAX_OUTPUT_BYTES (a recursion a million frames deep) loses only the end of the backtraces. gdb selects the
#: crashing thread when it loads a core, so ``bt full`` is that thread's.
SECTIONS: tuple[tuple[str, str], ...] = (
    ("sharedlibrary", "info sharedlibrary"),
    # Only the objfile headers, each marked when it has no debug information: a regex no file name matches.
    ("sources", "info sources -- ^$"),
    ("mappings", "info proc mappings"),
    ("registers", "info registers"),
    ("bt", "bt full"),
    ("threads", "thread apply all bt full"),
)
#: Settings for a reproducible, non-interactive output: no paging or wrapping, every frame with its address
#: (the address signature needs frame 0's, which gdb leaves out when it is at the start of a line).
BASE_SETTINGS: tuple[str, ...] = (
    "set auto-load off",
    "set width unlimited",
    "set height unlimited",
    "set pagination off",
    "set confirm off",
    "set print pretty off",
    "set print frame-info location-and-address",
)
#: Output read back from gdb's file at most: a 100,000-frame recursion stays far below it.
MAX_OUTPUT_BYTES = 8 << 20
#: After SIGTERM to an overdue gdb, how long its group gets before SIGKILL.
TERM_GRACE_S = 2.0
#: How often a running gdb is checked against the stop event.
POLL_S = 0.02


@dataclass(frozen=True)
class Invocation:
    """A gdb command line and the environment it runs in."""

    argv: list[str]
    env: dict[str, str]
    nonce: str


@dataclass
class RunResult:
    """How a gdb run ended."""

    returncode: int | None
    pid: int
    elapsed_s: float
    timed_out: bool = False
    stopped: bool = False

    @property
    def killed_by(self) -> int | None:
        """The signal that killed gdb, when not killed by us."""
        if self.timed_out or self.stopped or self.returncode is None or self.returncode >= 0:
            return None
        return -self.returncode


@dataclass
class GdbOutput:
    """gdb's output: what came before the first section (loading the files), then each section by name."""

    preamble: str
    sections: dict[str, str] = field(default_factory=dict)
    truncated: bool = False
    #: The last marker came: gdb ran every command.
    ended: bool = False


def marker(name: str, nonce: str) -> str:
    return f"==RETRACER-SECTION {name} {nonce}=="


def invocation(gdb: str, executable: str, core: str, settings: Sequence[str], env: Mapping[str, str],
               nonce: str | None = None) -> Invocation:
    """The gdb command line that loads ``executable`` and ``core`` after ``settings`` and runs SECTIONS."""
    nonce = nonce or secrets.token_hex(8)
    argv = [gdb, "-nx", "-batch"]
    for setting in (*BASE_SETTINGS, *settings):
        argv += ["-iex", setting]
    # Given as options, not `file`/`core-file` commands: those two commands parse quotes differently, and an
    # option takes any file name as it is. gdb loads them after the -iex settings and before the -ex commands.
    argv += [f"--se={executable}", f"--core={core}"]
    for name, command in SECTIONS:
        argv += ["-ex", f"echo \\n{marker(name, nonce)}\\n", "-ex", command]
    argv += ["-ex", f"echo \\n{marker('end', nonce)}\\n"]
    return Invocation(argv, dict(env), nonce)


def run(inv: Invocation, output: Path, timeout_s: float, stop: threading.Event | None = None,
        cwd: Path | None = None) -> RunResult:
    """Run gdb with its output in ``output``; past ``timeout_s``, or once ``stop`` is set, its process group
    is killed. Whatever happens, no process of the group is left alive on return."""
    started = time.monotonic()
    deadline = started + timeout_s
    with open(output, "wb") as out:
        proc = subprocess.Popen(inv.argv, stdin=subprocess.DEVNULL, stdout=out,  # noqa: S603  (no shell)
                                stderr=subprocess.STDOUT, env=inv.env, cwd=cwd, start_new_session=True)
    result = RunResult(None, proc.pid, 0.0)
    watch = _ExitWatch(proc.pid)
    try:
        while True:
            if stop is not None and stop.is_set():
                result.stopped = True
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                result.timed_out = True
                _kill_group(proc.pid, signal.SIGTERM)
                watch.exited(TERM_GRACE_S)
                break
            if watch.exited(min(remaining, POLL_S)):
                break
    finally:
        watch.close()
        # gdb is not reaped before this, so its process group id cannot have been reused: whatever gdb left
        # behind (a `shell` command, a helper) or whatever did not finish dies here.
        _kill_group(proc.pid, signal.SIGKILL)
        result.returncode = proc.wait()
        result.elapsed_s = time.monotonic() - started
    return result


class _ExitWatch:
    """Waits for a child to exit without reaping it (a pidfd where the kernel has them, else waitid)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.poller = select.poll()
        try:
            self.pidfd: int | None = os.pidfd_open(pid)
            self.poller.register(self.pidfd, select.POLLIN)
        except OSError:
            self.pidfd = None

    def exited(self, wait_s: float) -> bool:
        if self.pidfd is not None:
            # Wakes the moment gdb exits, so a finished run costs no polling delay (poll, not select: a busy
            # worker's descriptor numbers can pass select's 1024).
            return bool(self.poller.poll(max(wait_s, 0.0) * 1000))
        end = time.monotonic() + wait_s
        while True:
            if os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            if time.monotonic() >= end:
                return False
            time.sleep(min(POLL_S, max(end - time.monotonic(), 0.0)))

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    # Already gone: nothing to kill.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def read_output(path: Path, limit: int = MAX_OUTPUT_BYTES) -> tuple[str, bool]:
    """gdb's output as text (at most ``limit`` bytes of it) and whether it was longer."""
    try:
        with open(path, "rb") as file:
            data = file.read(limit + 1)
    except FileNotFoundError:
        return "", False
    return data[:limit].decode("utf-8", "replace"), len(data) > limit


def split(text: str, nonce: str, truncated: bool = False) -> GdbOutput:
    """The sections of gdb's output, by the markers holding ``nonce``; a section whose end marker never came
    (gdb died or the output was cut) is kept as far as it goes."""
    names = {marker(name, nonce): name for name, _ in SECTIONS}
    end = marker("end", nonce)
    result = GdbOutput("", truncated=truncated)
    current: str | None = None
    lines: list[str] = []
    for line in text.splitlines(keepends=True):
        stripped = line.rstrip("\r\n")
        if stripped in names or stripped == end:
            _store(result, current, lines)
            current, lines = names.get(stripped), []
            if stripped == end:
                result.ended = True
                break
            continue
        lines.append(line)
    else:
        _store(result, current, lines)
    return result


def _store(result: GdbOutput, current: str | None, lines: list[str]) -> None:
    text = "".join(lines)
    if current is None:
        result.preamble = text.rstrip("\n")
    else:
        # Each marker is echoed after a newline of its own: the blank lines around it are not content.
        result.sections[current] = text.strip("\n")
