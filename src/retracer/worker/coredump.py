"""The GNU build-ids of the modules mapped in an ELF core file, read without trusting the core.

The method is eu-unstrip's (``eu-unstrip -n --core``): the core's NT_FILE note lists the mapped files; for each
mapping at file offset 0 the module's first page is found in the core's PT_LOAD segments, its program headers
are read and its PT_NOTE searched for NT_GNU_BUILD_ID. The vdso, which no file backs, is found through the
auxiliary vector (AT_SYSINFO_EHDR).

Cores come from crashed programs and from users, so this is a small parser with ``struct`` rather than
pyelftools: pyelftools allocates whatever a note claims (a 152-byte file asked it for 2 GiB), raises
OverflowError and construct errors besides ELFError, and fails on ET_CORE files with a build-id note (an open
bug upstream). Every size read from the core is checked against the file size and a fixed cap before use.
"""

from __future__ import annotations

import bisect
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from retracer.errors import RetracerError

ET_CORE = 4
PT_LOAD = 1
PT_NOTE = 4
NT_AUXV = 6
NT_FILE = 0x46494C45
NT_GNU_BUILD_ID = 3
AT_NULL = 0
AT_SYSINFO_EHDR = 33
PN_XNUM = 0xFFFF

#: Real cores have one segment per mapping, rarely more than a few ten thousands; a sparse file could claim 2^32.
MAX_SEGMENTS = 1 << 20
#: A core's notes hold registers for each thread and one entry per mapping: tens of MiB would be extraordinary.
MAX_NOTES_BYTES = 64 * 1024 * 1024
#: A module's ELF header and program headers: real ones take a few hundred bytes.
MAX_MODULE_PHDRS_BYTES = 64 * 1024
#: A module's PT_NOTE segment searched for the build-id.
MAX_MODULE_NOTES_BYTES = 64 * 1024
#: SHA-1 build-ids are 20 bytes; events accept 4 to 64.
MIN_BUILD_ID, MAX_BUILD_ID = 4, 64


class CoreFileError(RetracerError):
    """Raised when a core file is not an ELF core, or is truncated or malformed where it matters."""


@dataclass(frozen=True)
class Module:
    """One module mapped in the crashed process: where it starts, its file (None for the vdso), its build-id."""

    start: int
    path: str | None
    build_id: str


@dataclass(frozen=True)
class _Layout:
    """Word size and byte order of an ELF file."""

    is64: bool
    order: str

    def word(self) -> str:
        return "Q" if self.is64 else "I"

    def unpack(self, fmt: str, data: bytes, offset: int = 0) -> tuple[int, ...]:
        return struct.unpack_from(self.order + fmt, data, offset)


@dataclass(frozen=True)
class _Segment:
    type: int
    offset: int
    vaddr: int
    filesz: int
    align: int


def build_ids(core_path: str | os.PathLike[str]) -> list[str]:
    """The GNU build-ids of the modules mapped in a core, in address order, each once."""
    seen: dict[str, None] = {}
    for module in modules(core_path):
        seen.setdefault(module.build_id, None)
    return list(seen)


def modules(core_path: str | os.PathLike[str]) -> list[Module]:
    """The modules mapped in a core that carry a GNU build-id, in address order."""
    path = Path(core_path)
    try:
        with open(path, "rb") as stream:
            return _Core(stream, os.fstat(stream.fileno()).st_size, str(path)).modules()
    except OSError as exc:
        raise CoreFileError(f"core file {path} cannot be read: {exc.strerror}") from None
    except struct.error as exc:
        raise CoreFileError(f"core file {path} is malformed ({exc})") from None


class _Core:
    def __init__(self, stream: BinaryIO, size: int, name: str) -> None:
        self.stream = stream
        self.size = size
        self.name = name
        ident = self._read(0, 16, "the ELF identification")
        if ident[:4] != b"\x7fELF":
            raise CoreFileError(f"{name} is not an ELF file (it does not start with \\x7fELF)")
        if ident[4] not in (1, 2) or ident[5] not in (1, 2):
            raise CoreFileError(f"{name} has an unknown ELF class {ident[4]} or byte order {ident[5]}")
        self.layout = _Layout(ident[4] == 2, "<" if ident[5] == 1 else ">")
        header = self._read(0, 64 if self.layout.is64 else 52, "the ELF header")
        e_type, phoff, shoff, phentsize, phnum = self._header(header)
        if e_type != ET_CORE:
            raise CoreFileError(f"{name} is an ELF file of type {e_type}, not a core (type {ET_CORE})")
        if phnum == PN_XNUM:
            # More than 65534 segments: the real count is in section header 0's sh_info.
            phnum = self._extended_phnum(shoff)
        self.segments = self._segments(self.layout, phoff, phentsize, phnum, self.size, "the core")
        loads = sorted((s for s in self.segments if s.type == PT_LOAD and s.filesz), key=lambda s: s.vaddr)
        self.loads = loads
        self.load_starts = [s.vaddr for s in loads]

    def modules(self) -> list[Module]:
        mappings: list[tuple[int, str | None]] = []
        for note_type, name, desc in self._core_notes():
            if name == b"CORE" and note_type == NT_FILE:
                mappings += self._file_note(desc)
            elif note_type == NT_AUXV:
                vdso = self._vdso(desc)
                if vdso is not None:
                    mappings.append((vdso, None))
        found: list[Module] = []
        for start, path in sorted(set(mappings), key=lambda m: (m[0], m[1] or "")):
            build_id = self._module_build_id(start)
            if build_id is not None:
                found.append(Module(start, path, build_id))
        return found

    # -- the core's own structure ----------------------------------------------------------------------------

    def _header(self, header: bytes) -> tuple[int, int, int, int, int]:
        if self.layout.is64:
            e_type, = self.layout.unpack("H", header, 16)
            phoff, shoff = self.layout.unpack("QQ", header, 32)
            phentsize, phnum = self.layout.unpack("HH", header, 54)
        else:
            e_type, = self.layout.unpack("H", header, 16)
            phoff, shoff = self.layout.unpack("II", header, 28)
            phentsize, phnum = self.layout.unpack("HH", header, 42)
        return e_type, phoff, shoff, phentsize, phnum

    def _extended_phnum(self, shoff: int) -> int:
        if self.layout.is64:
            return self.layout.unpack("I", self._read(shoff, 64, "section header 0"), 44)[0]
        return self.layout.unpack("I", self._read(shoff, 40, "section header 0"), 28)[0]

    def _segments(self, layout: _Layout, phoff: int, phentsize: int, phnum: int, limit: int,
                  what: str, data: bytes | None = None) -> list[_Segment]:
        """Program headers, from the core file (data None) or from a module's bytes."""
        need = 56 if layout.is64 else 32
        if phnum and phentsize < need:
            raise CoreFileError(f"{self.name}: {what} has program headers of {phentsize} bytes, "
                                f"less than the {need} an ELF{64 if layout.is64 else 32} one takes")
        if phnum > MAX_SEGMENTS:
            raise CoreFileError(f"{self.name}: {what} claims {phnum} program headers, more than the "
                                f"{MAX_SEGMENTS} a real core has")
        total = phnum * phentsize
        if phoff + total > limit:
            raise CoreFileError(f"{self.name}: {what} claims {phnum} program headers at offset {phoff}, "
                                f"beyond its {limit} bytes (truncated or corrupt)")
        table = self._read(phoff, total, "the program headers") if data is None else data[phoff:phoff + total]
        out: list[_Segment] = []
        for i in range(phnum):
            at = i * phentsize
            if layout.is64:
                p_type, _flags, offset, vaddr, _paddr, filesz, _memsz, align = layout.unpack("IIQQQQQQ", table, at)
            else:
                p_type, offset, vaddr, _paddr, filesz, _memsz, _flags, align = layout.unpack("IIIIIIII", table, at)
            out.append(_Segment(p_type, offset, vaddr, filesz, align))
        return out

    def _core_notes(self) -> list[tuple[int, bytes, bytes]]:
        notes: list[tuple[int, bytes, bytes]] = []
        budget = MAX_NOTES_BYTES
        for segment in self.segments:
            if segment.type != PT_NOTE:
                continue
            if segment.offset + segment.filesz > self.size:
                raise CoreFileError(f"{self.name}: a note segment of {segment.filesz} bytes at offset "
                                    f"{segment.offset} runs past the end of the file ({self.size} bytes): "
                                    f"the core is truncated")
            budget -= segment.filesz
            if budget < 0:
                raise CoreFileError(f"{self.name}: its notes take more than {MAX_NOTES_BYTES} bytes; "
                                    f"that is not a real core")
            data = self._read(segment.offset, segment.filesz, "a note segment")
            notes += _parse_notes(self.layout, data, 8 if segment.align == 8 else 4, self.name)
        return notes

    def _file_note(self, desc: bytes) -> list[tuple[int, str | None]]:
        """The mappings at file offset 0 listed by NT_FILE: (start address, file name)."""
        word = 8 if self.layout.is64 else 4
        w = self.layout.word()
        count, _page_size = self.layout.unpack(w + w, desc)
        table_end = 2 * word + count * 3 * word
        if table_end > len(desc):
            raise CoreFileError(f"{self.name}: NT_FILE claims {count} mappings, more than its {len(desc)} bytes "
                                f"hold")
        names = desc[table_end:].split(b"\x00")
        if len(names) < count:
            raise CoreFileError(f"{self.name}: NT_FILE lists {count} mappings but only {len(names)} file names")
        out: list[tuple[int, str | None]] = []
        for i in range(count):
            start, _end, page_offset = self.layout.unpack(w * 3, desc, 2 * word + i * 3 * word)
            if page_offset == 0:
                out.append((start, names[i].decode("utf-8", "replace")))
        return out

    def _vdso(self, desc: bytes) -> int | None:
        word = 8 if self.layout.is64 else 4
        w = self.layout.word()
        for at in range(0, len(desc) - 2 * word + 1, 2 * word):
            key, value = self.layout.unpack(w + w, desc, at)
            if key == AT_NULL:
                return None
            if key == AT_SYSINFO_EHDR:
                return value
        return None

    # -- a module, read out of the core's memory -------------------------------------------------------------

    def _memory(self, address: int, size: int) -> bytes | None:
        """size bytes of the process's memory at address, or None if the core does not hold all of them."""
        i = bisect.bisect_right(self.load_starts, address) - 1
        if i < 0:
            return None
        segment = self.loads[i]
        start = address - segment.vaddr
        available = min(segment.filesz, self.size - segment.offset) - start
        if start < 0 or available <= 0:
            return None
        data = self._read(segment.offset + start, min(size, available), "process memory")
        return data if len(data) == size else None

    def _module_build_id(self, start: int) -> str | None:
        """The build-id of the ELF image mapped at start, or None if its headers are not in the core."""
        ident = self._memory(start, 16)
        if ident is None or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) or ident[5] not in (1, 2):
            return None
        layout = _Layout(ident[4] == 2, "<" if ident[5] == 1 else ">")
        head = self._memory(start, 64 if layout.is64 else 52)
        if head is None:
            return None
        if layout.is64:
            phoff, = layout.unpack("Q", head, 32)
            phentsize, phnum = layout.unpack("HH", head, 54)
        else:
            phoff, = layout.unpack("I", head, 28)
            phentsize, phnum = layout.unpack("HH", head, 42)
        end = phoff + phnum * phentsize
        if end > MAX_MODULE_PHDRS_BYTES or phnum == PN_XNUM:
            return None
        image = self._memory(start, end)
        if image is None:
            return None
        try:
            segments = self._segments(layout, phoff, phentsize, phnum, end, f"the module at {start:#x}", image)
        except CoreFileError:
            return None  # one damaged module must not hide the others' build-ids
        loads = [s for s in segments if s.type == PT_LOAD]
        if not loads:
            return None
        first = min(loads, key=lambda s: s.vaddr)
        # The mapping at file offset 0 starts at the first PT_LOAD's page: that fixes the load bias.
        bias = start - (first.vaddr - first.offset)
        for segment in segments:
            if segment.type != PT_NOTE or not 0 < segment.filesz <= MAX_MODULE_NOTES_BYTES:
                continue
            data = self._memory((bias + segment.vaddr) & ((1 << 64) - 1), segment.filesz)
            if data is None:
                continue
            try:
                notes = _parse_notes(layout, data, 8 if segment.align == 8 else 4, self.name)
            except CoreFileError:
                continue
            for note_type, name, desc in notes:
                if name == b"GNU" and note_type == NT_GNU_BUILD_ID and MIN_BUILD_ID <= len(desc) <= MAX_BUILD_ID:
                    return desc.hex()
        return None

    def _read(self, offset: int, size: int, what: str) -> bytes:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise CoreFileError(f"{self.name}: {what} ({size} bytes at offset {offset}) lies beyond the end of "
                                f"the file ({self.size} bytes): the core is truncated or corrupt")
        self.stream.seek(offset)
        data = self.stream.read(size)
        if len(data) != size:
            raise CoreFileError(f"{self.name}: {what} could not be read whole (the file shrank?)")
        return data


def _parse_notes(layout: _Layout, data: bytes, align: int, name: str) -> list[tuple[int, bytes, bytes]]:
    """(type, owner name without NUL, descriptor) for each note in a note segment."""
    notes: list[tuple[int, bytes, bytes]] = []
    at = 0
    while at + 12 <= len(data):
        namesz, descsz, note_type = layout.unpack("III", data, at)
        name_at = at + 12
        desc_at = name_at + _round_up(namesz, align)
        end = desc_at + _round_up(descsz, align)
        if desc_at + descsz > len(data):
            raise CoreFileError(f"{name}: a note claims {namesz} + {descsz} bytes, more than its segment holds")
        notes.append((note_type, data[name_at:name_at + namesz].rstrip(b"\x00"), data[desc_at:desc_at + descsz]))
        at = end
    return notes


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) & ~(align - 1)
