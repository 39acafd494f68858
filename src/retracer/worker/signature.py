"""Crash signatures from gdb's backtrace of the crashing thread: a symbolic one and an address one.

The symbolic signature is apport's form, ``<executable path>:<signal number>:<fn1>:...:<fn5>``: the top five
function names of the crashing thread once the frames of the crash machinery are left out (a signal handler
and what it called, raise/abort/assert and the like), so that two crashes at the same place get the same
signature whatever path led to the abort. It is None when one of those five frames is unknown (``??``):
a signature built on holes would merge unrelated crashes.

The address signature does not need symbols: each frame is written as ``<build-id>+0x<offset>``, the offset
of its program counter within the module that holds it, so it is the same for the same crash under any
address-space layout. It uses the raw frames (no name-based stripping, which would change with the symbols
found), only cut below a signal handler frame, which gdb recognises without symbols.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass

from retracer.worker.coredump import Module

#: Function names in the symbolic signature, as apport's StacktraceTop.
SIGNATURE_FRAMES = 5
#: Frames in the address signature: without names the machinery frames stay in, so more are taken.
ADDRESS_FRAMES = 10
#: Lower program counters are not code: gdb shows them when it unwinds garbage.
MIN_CODE_ADDRESS = 0x1000
#: The vdso has no file behind it, so no mapping names it; it is a few pages from its start.
VDSO_SPAN = 0x10000

SIGNAL_HANDLER = "<signal handler called>"
UNKNOWN = "??"

_FRAME_LINE = re.compile(r"^#(?P<index>\d+)\s+(?:(?P<pc>0x[0-9a-fA-F]+) in )?(?P<rest>.*)$")
#: What raises or reports the signal rather than causing it: glibc's abort, raise and assertion paths (with
#: their internal __GI_ aliases), the fortify/stack-protector reporters, and GLib's logging aborts.
_MACHINERY = re.compile(
    r"^(?:__GI_+)?_*(?:raise|gsignal|abort|pthread_kill(?:_implementation|_internal)?|"
    r"assert(?:_perror)?_fail(?:_base)?|libc_message(?:_impl)?|libc_fatal|fortify_fail|chk_fail|"
    r"stack_chk_fail|kernel_vsyscall)$"
    r"|^(?:IA__)?g_(?:logv?|assert_warning|assertion_message\w*)$"
)
#: Frames that come and go with the CPU the crash ran on (SSE variants of string functions) are skipped.
_JITTER = re.compile(r"^(?:__\w*_s?sse\d+(?:_\w+)?|__kernel_vsyscall)$")


@dataclass(frozen=True)
class Frame:
    """One frame line of a gdb backtrace: its number, program counter (when shown) and function name."""

    index: int
    pc: int | None
    function: str

    @property
    def unknown(self) -> bool:
        return self.function == UNKNOWN

    @property
    def signal_handler(self) -> bool:
        return self.function == SIGNAL_HANDLER


@dataclass(frozen=True)
class Mapping:
    """One file mapping of the crashed process (``info proc mappings``)."""

    start: int
    end: int
    path: str


def parse_frames(backtrace: str) -> list[Frame]:
    """The frames of one thread's backtrace (``bt`` or ``bt full``; local-variable lines are skipped)."""
    frames = []
    for line in backtrace.splitlines():
        match = _FRAME_LINE.match(line)
        if match is None:
            continue
        pc = match["pc"]
        frames.append(Frame(int(match["index"]), int(pc, 16) if pc else None, function_name(match["rest"])))
    return frames


def function_name(rest: str) -> str:
    """The function named by a frame line after its number and address: ``name (args) at file:line``.

    C++ names can hold spaces and parentheses (``(anonymous namespace)::f``, ``f<void (*)(int)>``,
    ``operator()``), so the argument list is the first `` (`` outside any brackets; a name with unbalanced
    angle brackets (``operator<``) falls back to the first `` (``.
    """
    rest = rest.strip()
    if rest.startswith(SIGNAL_HANDLER):
        return SIGNAL_HANDLER
    depth = 0
    split = -1
    for i, char in enumerate(rest):
        if char in "(<":
            if char == "(" and depth == 0 and i > 0 and rest[i - 1] == " ":
                split = i - 1
                break
            depth += 1
        elif char in ")>":
            depth = max(0, depth - 1)
    if split < 0:
        split = rest.find(" (")
    name = rest if split < 0 else rest[:split]
    return name.strip().lstrip("*") or UNKNOWN


def crash_frames(frames: Sequence[Frame]) -> list[Frame]:
    """The frames below the first signal handler frame (the handler and what it called are not the crash)."""
    for i, frame in enumerate(frames):
        if frame.signal_handler:
            return list(frames[i + 1:])
    return list(frames)


def top_functions(frames: Sequence[Frame], count: int = SIGNATURE_FRAMES) -> list[Frame]:
    """The top ``count`` frames that locate the crash: below a signal handler, past the abort machinery."""
    kept = crash_frames(frames)
    while kept and _MACHINERY.match(kept[0].function):
        kept.pop(0)
    return [f for f in kept if not _JITTER.match(f.function)][:count]


def crash_signature(executable: str, signal: int | None, frames: Sequence[Frame]) -> str | None:
    """``<executable>:<signal>:<fn1>:...`` (apport's form), or None without a signal, with fewer than two
    frames, or when one of the frames used is unknown (``??``)."""
    if signal is None:
        return None
    top = top_functions(frames)
    if len(top) < 2 or any(f.unknown or f.signal_handler for f in top):
        return None
    return ":".join([executable, str(signal), *(f.function for f in top)])


def parse_mappings(text: str) -> list[Mapping]:
    """The file mappings listed by gdb's ``info proc mappings`` (anonymous ones are left out)."""
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5 or not fields[0].startswith("0x") or not fields[1].startswith("0x"):
            continue
        try:
            start, end = int(fields[0], 16), int(fields[1], 16)
        except ValueError:
            continue
        # Newer gdbs add a permissions column before the file name ("r-xp").
        at = 5 if len(fields) > 5 and re.fullmatch(r"[r-][w-][x-][ps-]", fields[4]) else 4
        path = " ".join(fields[at:])
        if path.startswith("/") and start < end:
            found.append(Mapping(start, end, path))
    return sorted(found, key=lambda m: m.start)


class AddressResolver:
    """Turns a program counter into ``<build-id>+0x<offset>`` with the core's modules and mappings."""

    def __init__(self, modules: Sequence[Module], mappings: Sequence[Mapping]) -> None:
        self.by_path = {m.path: m for m in modules if m.path is not None}
        self.vdsos = [m for m in modules if m.path is None]
        self.mappings = sorted(mappings, key=lambda m: m.start)
        self.starts = [m.start for m in self.mappings]

    def module_of(self, pc: int) -> Module | None:
        i = bisect.bisect_right(self.starts, pc) - 1
        if i >= 0 and pc < self.mappings[i].end:
            return self.by_path.get(self.mappings[i].path)
        for vdso in self.vdsos:
            if vdso.start <= pc < vdso.start + VDSO_SPAN:
                return vdso
        return None

    def resolve(self, pc: int) -> str | None:
        module = self.module_of(pc)
        if module is None:
            return None
        return f"{module.build_id}+{pc - module.start:#x}"


def address_signature(frames: Sequence[Frame], modules: Sequence[Module], mappings: Sequence[Mapping],
                      count: int = ADDRESS_FRAMES) -> str | None:
    """``<build-id>+0x<offset>`` of the top ``count`` frames joined by ``:``; None when a frame's address is in
    no module of the core (JIT code, a corrupt stack) or no frame has an address."""
    resolver = AddressResolver(modules, mappings)
    parts = []
    for frame in crash_frames(frames):
        if frame.pc is None or frame.pc < MIN_CODE_ADDRESS:
            continue
        where = resolver.resolve(frame.pc)
        if where is None:
            return None
        parts.append(where)
        if len(parts) == count:
            break
    return ":".join(parts) or None
