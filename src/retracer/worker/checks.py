"""The checks made before gdb sees a core: the file is there and readable, it is an ELF core, it is complete
(a core cut short silently loses the modules and stacks at its end), and the executable on this worker is
the build that crashed. Each failure says which file is wrong, how, and what to do.

The core is read with coreio's bounded reads (it comes from users); installed ELF files (the executable, the
libraries) by their headers only, every read checked against the file's size.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from retracer.errors import RetracerError
from retracer.worker import coredump
from retracer.worker.coredump import Module
from retracer.worker.coreio import CoreFile, CoreFileError, Layout, iter_notes, open_core

NT_PRSTATUS = 1
NT_SIGINFO = 0x53494749
#: elf_prstatus starts with elf_siginfo (three ints), then pr_cursig (a short), on every architecture.
PR_CURSIG_OFFSET = 12
SHT_NOBITS = 8
#: A section name table holds a few hundred bytes; what lies past this is not looked at.
MAX_SECTION_NAMES = 1 << 20


class CheckFailed(RetracerError):
    """Raised when a core or an executable fails a check; ``transient`` when a retry may find it fixed."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class CoreSummary:
    """What the checks learnt from a core's own headers."""

    size: int
    segments: int
    signal: int | None


def check_core(path: Path) -> CoreSummary:
    """The core's summary, or CheckFailed: transient when the file cannot be opened (its storage may be
    unmounted or still being written), permanent when it is not a complete ELF core."""
    try:
        fd = open_core(str(path))
    except OSError as exc:
        raise _unreadable(path, exc) from None
    try:
        return _Reader(CoreFile(fd, str(path))).summary()
    except CoreFileError as exc:
        raise CheckFailed(str(exc)) from None
    except OSError as exc:
        raise _unreadable(path, exc) from None
    except struct.error as exc:
        raise CheckFailed(f"core {path} is malformed ({exc}); the core cannot be used; ask for a new one") from None
    finally:
        os.close(fd)


def _unreadable(path: Path, exc: OSError) -> CheckFailed:
    if exc.errno == errno.ENOENT:
        return CheckFailed(f"core {path} does not exist on this worker: check that the crash storage is mounted "
                           f"here (the attempt is retried); if the file is gone for good, ask for a new core",
                           transient=True)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return CheckFailed(f"core {path} cannot be read by this worker (permission denied): give the worker's "
                           f"user read access to it (the attempt is retried)", transient=True)
    return CheckFailed(f"core {path} cannot be read: {exc.strerror}; check the disk or mount it is on (the "
                       f"attempt is retried)", transient=True)


class _Reader:
    def __init__(self, file: CoreFile) -> None:
        self.file = file
        self.name = file.name

    def summary(self) -> CoreSummary:
        file = self.file
        ident = file.read(0, 16, "the ELF identification") if file.size >= 16 else b""
        if ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) or ident[5] not in (1, 2):
            raise CheckFailed(f"core {self.name} is not a core dump: it is not an ELF file (it does not start "
                              f"with \\x7fELF, or its class is unknown); give the core itself, uncompressed")
        layout = Layout(ident[4] == 2, "<" if ident[5] == 1 else ">")
        header = file.read(0, layout.ehdr_size, "the ELF header")
        e_type, = layout.unpack("H", header, 16)
        if e_type != coredump.ET_CORE:
            raise CheckFailed(f"core {self.name} is not a core dump: it is an ELF file of type {e_type}, not "
                              f"{coredump.ET_CORE} (a program or library was given as the core); give the core")
        segments = loads = 0
        note_segments: list[tuple[int, int, int]] = []
        first_cut: str | None = None
        cut = 0
        for p_type, offset, vaddr, filesz, align in self._program_headers(layout, header):
            segments += 1
            if p_type not in (coredump.PT_LOAD, coredump.PT_NOTE) or filesz == 0:
                continue
            loads += p_type == coredump.PT_LOAD
            if offset + filesz > file.size:
                cut += 1
                if first_cut is None:
                    what = f"memory at {vaddr:#x}" if p_type == coredump.PT_LOAD else "its notes"
                    first_cut = f"segment {segments - 1} ({what}) needs bytes up to {offset + filesz}"
            elif p_type == coredump.PT_NOTE:
                note_segments.append((offset, filesz, 8 if align == 8 else 4))
        if first_cut is not None:
            raise CheckFailed(f"core {self.name} is truncated: the file has {file.size} bytes but its {first_cut} "
                              f"({cut} of its {segments} segments lie past the end): the upload or copy was cut "
                              f"short; ask for the complete core")
        if loads == 0:
            raise CheckFailed(f"core {self.name} holds no memory (no PT_LOAD segment with data); ask for a new "
                              f"core, written with the full memory of the crashed process")
        return CoreSummary(file.size, segments, self._signal(layout, note_segments))

    def _program_headers(self, layout: Layout, header: bytes) -> Iterator[tuple[int, int, int, int, int]]:
        if layout.is64:
            phoff, shoff = layout.unpack("QQ", header, 32)
            phentsize, phnum = layout.unpack("HH", header, 54)
        else:
            phoff, shoff = layout.unpack("II", header, 28)
            phentsize, phnum = layout.unpack("HH", header, 42)
        if phnum == coredump.PN_XNUM and shoff:
            # More than 65534 segments: the real count is in section header 0's sh_info.
            section0 = self.file.read(shoff, 64 if layout.is64 else 40, "section header 0")
            phnum, = layout.unpack("I", section0, 44 if layout.is64 else 28)
        if phnum and phentsize != layout.phdr_size:
            raise CheckFailed(f"core {self.name} has program headers of {phentsize} bytes, not "
                              f"{layout.phdr_size}: it is corrupt; ask for a new core")
        if phnum > coredump.MAX_SEGMENTS:
            raise CheckFailed(f"core {self.name} claims {phnum} segments, more than the {coredump.MAX_SEGMENTS} "
                              f"a real core has: it is corrupt; ask for a new core")
        if phoff + phnum * layout.phdr_size > self.file.size:
            raise CheckFailed(f"core {self.name} is truncated: its {phnum} program headers at offset {phoff} end "
                              f"past its {self.file.size} bytes; ask for the complete core")
        size = layout.phdr_size
        for first in range(0, phnum, coredump.PHDRS_PER_READ):
            count = min(coredump.PHDRS_PER_READ, phnum - first)
            yield from layout.phdrs(self.file.read(phoff + first * size, count * size, "the program headers"))

    def _signal(self, layout: Layout, segments: Sequence[tuple[int, int, int]]) -> int | None:
        """The signal that killed the process: the first thread's (the crashing one's) NT_PRSTATUS
        pr_cursig, else NT_SIGINFO's si_signo; None if the notes do not say."""
        prstatus: int | None = None
        siginfo: int | None = None
        total = 0
        for offset, size, align in segments:
            total += size
            if total > coredump.MAX_NOTES_BYTES or (prstatus and siginfo):
                break
            data = self.file.read(offset, size, f"the note segment at offset {offset}")
            for note_type, owner, start, end in iter_notes(layout, data, align, "the notes", self.file,
                                                           strict=False):
                if owner != b"CORE":
                    continue
                if note_type == NT_PRSTATUS and end - start >= PR_CURSIG_OFFSET + 2 and prstatus is None:
                    cursig, = layout.unpack("h", data, start + PR_CURSIG_OFFSET)
                    signo, = layout.unpack("i", data, start)
                    prstatus = cursig or signo
                elif note_type == NT_SIGINFO and end - start >= 4 and siginfo is None:
                    siginfo = layout.unpack("i", data, start)[0]
        return prstatus or siginfo or None


def find_main(modules: Sequence[Module], executable: str) -> tuple[Module, str]:
    """The module of the crashed executable among the core's, and how it was recognised: by its path, else
    by its file name, else as the first file-backed module (executables are mapped below libraries)."""
    files = [m for m in modules if m.path is not None]
    wanted = os.path.normpath(executable)
    for module in files:
        if module.path is not None and os.path.normpath(module.path) == wanted:
            return module, f"the module mapped from {executable}"
    name = os.path.basename(wanted)
    for module in files:
        if module.path is not None and os.path.basename(module.path) == name:
            return module, f"the module named {name} ({module.path})"
    if not files:
        raise CheckFailed("the core lists no module with a build-id: it cannot be matched with the executable; "
                          "ask for a new core")
    return files[0], f"the first module ({files[0].path}), as no module is mapped from {executable}"


@dataclass(frozen=True)
class ElfFacts:
    """What the checks need of an installed ELF file: its GNU build-id, and whether it carries DWARF."""

    build_id: str | None
    debug_info: bool


def elf_facts(path: Path) -> ElfFacts:
    """The facts of the ELF file at path; OSError if it cannot be read, ValueError if it is not a whole ELF
    file. Only its headers, notes and section names are read (a fraction of a millisecond, where pyelftools
    takes milliseconds a file: a desktop program's crash maps a hundred libraries)."""
    # Non-blocking and regular files only: the path comes from a request or a core, and a FIFO or a terminal
    # there must not stall the worker.
    fd = open_core(str(path))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("it is not a regular file")
        return _ElfHeaders(fd, info.st_size).facts()
    finally:
        os.close(fd)


class _ElfHeaders:
    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size

    def read(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise ValueError(f"it is truncated ({size} bytes at offset {offset} lie past its {self.size} bytes)")
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise ValueError("it shrank while it was read")
        return data

    def facts(self) -> ElfFacts:
        head = self.read(0, min(64, self.size))
        if len(head) < 52 or head[:4] != b"\x7fELF" or head[4] not in (1, 2) or head[5] not in (1, 2):
            raise ValueError("it does not start with an ELF header")
        layout = Layout(head[4] == 2, "<" if head[5] == 1 else ">")
        if len(head) < layout.ehdr_size:
            raise ValueError("its ELF header is cut short")
        if layout.is64:
            phoff, shoff = layout.unpack("QQ", head, 32)
            phentsize, phnum, shentsize, shnum, shstrndx = layout.unpack("HHHHH", head, 54)
        else:
            phoff, shoff = layout.unpack("II", head, 28)
            phentsize, phnum, shentsize, shnum, shstrndx = layout.unpack("HHHHH", head, 42)
        build_id = None
        if phnum and phentsize == layout.phdr_size:
            build_id = self._build_id(layout, self.read(phoff, phnum * phentsize))
        section_size = 64 if layout.is64 else 40
        debug_info = bool(shoff and shentsize == section_size and shstrndx < shnum) and self._has_dwarf(
            layout, self.read(shoff, shnum * shentsize), shentsize, shstrndx)
        return ElfFacts(build_id, debug_info)

    def _build_id(self, layout: Layout, table: bytes) -> str | None:
        for p_type, offset, _vaddr, filesz, align in layout.phdrs(table):
            if p_type != coredump.PT_NOTE or not 0 < filesz <= coredump.MAX_MODULE_NOTES_BYTES:
                continue
            data = self.read(offset, filesz)
            step = 8 if align == 8 else 4
            at = 0
            while at + 12 <= len(data):
                namesz, descsz, note_type = layout.unpack("III", data, at)
                desc = at + 12 + -(-namesz // step) * step
                if desc + descsz > len(data):
                    break
                if note_type == coredump.NT_GNU_BUILD_ID and data[at + 12:at + 12 + namesz].rstrip(b"\0") == b"GNU":
                    return data[desc:desc + descsz].hex()
                at = desc + -(-descsz // step) * step
        return None

    def _has_dwarf(self, layout: Layout, table: bytes, entsize: int, strndx: int) -> bool:
        fields = "IIQQQQ" if layout.is64 else "IIIIII"  # name, type, flags, addr, offset, size
        sections = [layout.unpack(fields, table, i * entsize) for i in range(len(table) // entsize)]
        _, _, _, _, names_at, names_size = sections[strndx]
        names = self.read(names_at, min(names_size, MAX_SECTION_NAMES))
        for name, sh_type, _flags, _addr, _offset, size in sections:
            end = names.find(b"\0", name)
            label = names[name:end] if 0 <= name < end else b""
            if label in (b".debug_info", b".zdebug_info") and sh_type != SHT_NOBITS and size > 0:
                return True
        return False


def check_executable(executable: Path, main: Module, core: Path, how: str, remedy: str) -> None:
    """CheckFailed (permanent) unless the executable exists on this worker and has the core's build-id."""
    try:
        build_id = elf_facts(executable).build_id
    except FileNotFoundError:
        raise CheckFailed(f"executable {executable} does not exist on this worker; {remedy}") from None
    except OSError as exc:
        raise CheckFailed(f"executable {executable} cannot be read ({exc.strerror}); {remedy}") from None
    except (ValueError, struct.error) as exc:
        raise CheckFailed(f"executable {executable} is not a valid ELF file ({exc}); {remedy}") from None
    if build_id is None:
        raise CheckFailed(f"executable {executable} has no GNU build-id, so it cannot be matched with the core "
                          f"{core} (build-id {main.build_id}); {remedy}")
    if build_id != main.build_id:
        raise CheckFailed(f"executable {executable} is not the build that crashed: its build-id is {build_id}, "
                          f"but the core {core} was made by build-id {main.build_id} ({how}); {remedy}")
