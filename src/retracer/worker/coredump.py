"""The GNU build-ids of the modules mapped in an ELF core file, read without trusting the core.

The method is eu-unstrip's (``eu-unstrip -n --core``): the core's NT_FILE note lists the mapped files; for each
mapping at file offset 0 the module's first page is found in the core's PT_LOAD segments, its program headers
are read and its PT_NOTE searched for NT_GNU_BUILD_ID. The vdso, which no file backs, is found through the
auxiliary vector (AT_SYSINFO_EHDR).

Cores come from crashed programs and from users, so this is a small parser with ``struct`` rather than
pyelftools: pyelftools allocates whatever a note claims (a 152-byte file asked it for 2 GiB), raises
OverflowError and construct errors besides ELFError, and fails on ET_CORE files with a build-id note (an open
bug upstream). Every size read from the core is checked against the file size and a fixed cap before use, all
reads are charged to a budget proportional to the file size (coreio), and bytes that several headers point
at are parsed once: the same note segment, the same module image mapped at several addresses, the same
module notes.
"""

from __future__ import annotations

import bisect
import os
import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from retracer.worker.coreio import NEW_CORE, CoreFile, CoreFileError, Layout, iter_notes, open_core

__all__ = ["CoreFileError", "Module", "build_ids", "modules"]

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
#: Kernels and gdb write one note segment; each distinct one is remembered until all are parsed.
MAX_NOTE_SEGMENTS = 4096
#: NT_FILE has one entry per mapping: as many as segments.
MAX_MAPPINGS = MAX_SEGMENTS
#: A module's ELF header and program headers: real ones take a few hundred bytes.
MAX_MODULE_PHDRS_BYTES = 64 * 1024
#: A module's PT_NOTE segments searched for the build-id, in all: real ones take a few hundred bytes.
MAX_MODULE_NOTES_BYTES = 64 * 1024
#: SHA-1 build-ids are 20 bytes; events accept 4 to 64.
MIN_BUILD_ID, MAX_BUILD_ID = 4, 64
#: Program headers are read this many at a time, so a table of a million costs no more than its segments.
PHDRS_PER_READ = 4096
ADDRESS_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class Module:
    """One module mapped in the crashed process: where it starts, its file (None for the vdso), its build-id."""

    start: int
    path: str | None
    build_id: str


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
        fd = open_core(str(path))
    except OSError as exc:
        raise CoreFileError(f"core file {path} cannot be read: {exc.strerror}; check that the path names the "
                            f"core and that retracer may read it") from None
    try:
        return _Core(CoreFile(fd, str(path))).modules()
    except OSError as exc:
        raise CoreFileError(f"core file {path} cannot be read: {exc.strerror}; check the disk it is on, then "
                            f"read it again") from None
    except struct.error as exc:
        raise CoreFileError(f"core file {path} is malformed ({exc}); {NEW_CORE}") from None
    finally:
        os.close(fd)


class _Core:
    def __init__(self, file: CoreFile) -> None:
        self.file = file
        name = self.name = file.name
        ident = file.read(0, 16, "the ELF identification")
        if ident[:4] != b"\x7fELF":
            raise CoreFileError(f"{name} is not an ELF file (it does not start with \\x7fELF): a core dump is "
                                f"one; give the core itself, uncompressed")
        if ident[4] not in (1, 2) or ident[5] not in (1, 2):
            raise CoreFileError(f"{name} has an unknown ELF class {ident[4]} or byte order {ident[5]}; {NEW_CORE}")
        self.layout = _layout(ident)
        e_type, phoff, shoff, phentsize, phnum = self._header(file.read(0, self.layout.ehdr_size, "the ELF header"))
        if e_type != ET_CORE:
            raise CoreFileError(f"{name} is an ELF file of type {e_type}, not a core (type {ET_CORE}): give the "
                                f"core dump, not the program or a library")
        if phnum == PN_XNUM:
            # More than 65534 segments: the real count is in section header 0's sh_info.
            phnum = self._extended_phnum(shoff)
        self.note_segments: dict[tuple[int, int], int] = {}  # (offset, size): alignment
        vaddrs, offsets, sizes = array("Q"), array("Q"), array("Q")
        for p_type, offset, vaddr, filesz, align in self._program_headers(phoff, phentsize, phnum):
            if p_type == PT_NOTE and filesz:
                # Headers describing the same bytes describe the same notes: they are parsed once.
                self.note_segments.setdefault((offset, filesz), align)
                if len(self.note_segments) > MAX_NOTE_SEGMENTS:
                    raise CoreFileError(f"{name}: the core has more than {MAX_NOTE_SEGMENTS} note segments; a real "
                                        f"one has one; {NEW_CORE}")
            elif p_type == PT_LOAD and filesz:
                vaddrs.append(vaddr)
                offsets.append(offset)
                sizes.append(filesz)
        order = sorted(range(len(vaddrs)), key=vaddrs.__getitem__)
        self.load_vaddrs = array("Q", (vaddrs[i] for i in order))
        self.load_offsets = array("Q", (offsets[i] for i in order))
        self.load_sizes = array("Q", (sizes[i] for i in order))
        self.mappings_listed = 0
        # Answers by the file offset of the bytes parsed, so bytes reached through several addresses are
        # parsed once: a module image (by its first byte) and a module note segment (by offset, size, format).
        self.module_answers: dict[int, str | None] = {}
        self.note_answers: dict[tuple[int, int, int, Layout], str | None] = {}

    def modules(self) -> list[Module]:
        mappings: set[tuple[int, str | None]] = set()
        for data, align, what in self._note_segments():
            for note_type, owner, start, end in iter_notes(self.layout, data, align, what, self.file, strict=True):
                if owner == b"CORE" and note_type == NT_FILE:
                    mappings.update(self._file_note(data, start, end))
                elif note_type == NT_AUXV:
                    vdso = self._vdso(data, start, end)
                    if vdso is not None:
                        mappings.add((vdso, None))
        found: list[Module] = []
        for start, path in sorted(mappings, key=lambda m: (m[0], m[1] or "")):
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
        if shoff == 0:
            raise CoreFileError(f"{self.name}: e_phnum is PN_XNUM (the count is in section header 0) but the "
                                f"core has no section headers; {NEW_CORE}")
        if self.layout.is64:
            return self.layout.unpack("I", self.file.read(shoff, 64, "section header 0"), 44)[0]
        return self.layout.unpack("I", self.file.read(shoff, 40, "section header 0"), 28)[0]

    def _program_headers(self, phoff: int, phentsize: int, phnum: int) -> Iterator[tuple[int, int, int, int, int]]:
        """(type, offset, vaddr, filesz, align) of each of the core's program headers."""
        size = self.layout.phdr_size
        if phnum and phentsize != size:
            # libelf reads entries sizeof(Phdr) apart whatever e_phentsize says, and every writer uses that
            # size: a different one is corruption, and believing a larger one multiplies what is read.
            raise CoreFileError(f"{self.name}: the core has program headers of {phentsize} bytes, not the "
                                f"{size} an ELF{64 if self.layout.is64 else 32} one takes; {NEW_CORE}")
        if phnum > MAX_SEGMENTS:
            raise CoreFileError(f"{self.name}: the core claims {phnum} program headers, more than the "
                                f"{MAX_SEGMENTS} a real core has; {NEW_CORE}")
        if phoff + phnum * size > self.file.size:
            raise CoreFileError(f"{self.name}: the core claims {phnum} program headers at offset {phoff}, "
                                f"beyond its {self.file.size} bytes (truncated or corrupt); {NEW_CORE}")
        for first in range(0, phnum, PHDRS_PER_READ):
            count = min(PHDRS_PER_READ, phnum - first)
            yield from self.layout.phdrs(self.file.read(phoff + first * size, count * size, "the program headers"))

    def _note_segments(self) -> Iterator[tuple[bytes, int, str]]:
        """(bytes, alignment, description) of each distinct note segment of the core, in file order."""
        total = 0
        previous_end, previous = 0, ""
        for (offset, size), align in sorted(self.note_segments.items()):
            what = f"the note segment at offset {offset} ({size} bytes)"
            if offset < previous_end:
                raise CoreFileError(f"{self.name}: {what} overlaps {previous}, which no core writer makes; "
                                    f"{NEW_CORE}")
            if offset + size > self.file.size:
                raise CoreFileError(f"{self.name}: {what} runs past the end of the file ({self.file.size} bytes): "
                                    f"the core is truncated; {NEW_CORE}")
            total += size
            if total > MAX_NOTES_BYTES:
                raise CoreFileError(f"{self.name}: its notes take more than {MAX_NOTES_BYTES} bytes; that is not "
                                    f"a real core; {NEW_CORE}")
            previous_end, previous = offset + size, what
            yield self.file.read(offset, size, what), 8 if align == 8 else 4, what

    def _file_note(self, data: bytes, start: int, end: int) -> Iterator[tuple[int, str | None]]:
        """The mappings at file offset 0 listed by the NT_FILE note in data[start:end]: (start, file name)."""
        word, w = self.layout.word_size, self.layout.word
        if end - start < 2 * word:
            raise CoreFileError(f"{self.name}: its NT_FILE note of {end - start} bytes is shorter than the count "
                                f"and page size it starts with; {NEW_CORE}")
        count, _page_size = self.layout.unpack(w + w, data, start)
        if count > MAX_MAPPINGS:
            raise CoreFileError(f"{self.name}: NT_FILE claims {count} mappings, more than the {MAX_MAPPINGS} a "
                                f"real core has; {NEW_CORE}")
        table = start + 2 * word
        names = table + count * 3 * word
        if names > end:
            raise CoreFileError(f"{self.name}: NT_FILE claims {count} mappings, more than its {end - start} bytes "
                                f"hold; {NEW_CORE}")
        self.mappings_listed += count
        if self.mappings_listed > MAX_MAPPINGS:
            raise CoreFileError(f"{self.name}: its NT_FILE notes list more than {MAX_MAPPINGS} mappings in all, "
                                f"more than a real core has; {NEW_CORE}")
        entry = struct.Struct(self.layout.order + w * 3)
        for i in range(count):
            if names > end:
                raise CoreFileError(f"{self.name}: NT_FILE lists {count} mappings but only {i} file names; "
                                    f"{NEW_CORE}")
            nul = data.find(b"\x00", names, end)
            name_end = end if nul < 0 else nul
            low, high, page_offset = entry.unpack_from(data, table + i * 3 * word)
            if low >= high:
                # Also what zeros read as (a hole of a sparse file): refused before a million are listed.
                raise CoreFileError(f"{self.name}: NT_FILE mapping {i} runs from {low:#x} to {high:#x}, which is "
                                    f"empty or reversed; {NEW_CORE}")
            if page_offset == 0:
                yield low, data[names:name_end].decode("utf-8", "replace")
            names = name_end + 1

    def _vdso(self, data: bytes, start: int, end: int) -> int | None:
        pair = 2 * self.layout.word_size
        fmt = self.layout.word * 2
        for at in range(start, end - pair + 1, pair):
            key, value = self.layout.unpack(fmt, data, at)
            if key == AT_NULL:
                return None
            if key == AT_SYSINFO_EHDR:
                return value
        return None

    # -- a module, read out of the core's memory -------------------------------------------------------------

    def _locate(self, address: int) -> tuple[int, int] | None:
        """(file offset, bytes the core holds from there on) of a process address, or None if it holds none."""
        i = bisect.bisect_right(self.load_vaddrs, address) - 1
        if i < 0:
            return None
        into = address - self.load_vaddrs[i]
        # A truncated core's last segments claim more than the file holds: only what it holds is read.
        available = min(self.load_sizes[i], self.file.size - self.load_offsets[i]) - into
        return (self.load_offsets[i] + into, available) if available > 0 else None

    def _memory(self, address: int, size: int, what: str) -> bytes | None:
        """size bytes of the process's memory at address, or None if the core does not hold all of them."""
        where = self._locate(address & ADDRESS_MASK)
        if where is None or where[1] < size:
            return None
        return self.file.read(where[0], size, what)

    def _module_build_id(self, start: int) -> str | None:
        """The build-id of the ELF image mapped at start, or None if its headers are not in the core."""
        where = self._locate(start)
        if where is None:
            return None
        # Only a hostile core maps the same bytes at two addresses: the image there was answered already.
        if where[0] not in self.module_answers:
            self.module_answers[where[0]] = self._read_module(start, where[1])
        return self.module_answers[where[0]]

    def _read_module(self, start: int, available: int) -> str | None:
        head = self._memory(start, min(64, available), f"the ELF header of the module at {start:#x}")
        if head is None or len(head) < 52 or head[:4] != b"\x7fELF" or head[4] not in (1, 2) \
                or head[5] not in (1, 2):
            return None
        layout = _layout(head)
        if len(head) < layout.ehdr_size:
            return None
        if layout.is64:
            phoff, = layout.unpack("Q", head, 32)
            phentsize, phnum = layout.unpack("HH", head, 54)
        else:
            phoff, = layout.unpack("I", head, 28)
            phentsize, phnum = layout.unpack("HH", head, 42)
        table_size = phnum * layout.phdr_size
        if phentsize != layout.phdr_size or phnum == PN_XNUM or phoff + table_size > MAX_MODULE_PHDRS_BYTES:
            return None
        table = self._memory(start + phoff, table_size, f"the program headers of the module at {start:#x}")
        if table is None:
            return None
        segments = list(layout.phdrs(table))
        loads = [s for s in segments if s[0] == PT_LOAD]
        if not loads:
            return None
        _, first_offset, first_vaddr, _, _ = min(loads, key=lambda s: s[2])
        # The mapping at file offset 0 starts at the first PT_LOAD's page: that fixes the load bias.
        bias = start - (first_vaddr - first_offset)
        searched = 0
        for p_type, _, vaddr, filesz, align in segments:
            if p_type != PT_NOTE or not 0 < filesz <= MAX_MODULE_NOTES_BYTES:
                continue
            searched += filesz
            if searched > MAX_MODULE_NOTES_BYTES:
                return None  # more notes than any module has: it is not searched further
            build_id = self._notes_build_id(layout, (bias + vaddr) & ADDRESS_MASK, filesz, 8 if align == 8 else 4)
            if build_id is not None:
                return build_id
        return None

    def _notes_build_id(self, layout: Layout, address: int, size: int, align: int) -> str | None:
        """The GNU build-id in the module notes at address, or None."""
        where = self._locate(address)
        if where is None or where[1] < size:
            return None
        key = (where[0], size, align, layout)
        if key not in self.note_answers:
            self.note_answers[key] = None
            data = self.file.read(where[0], size, f"the module notes at {address:#x}")
            for note_type, owner, begin, end in iter_notes(layout, data, align, f"the module notes at {address:#x}",
                                                           self.file, strict=False):
                if owner == b"GNU" and note_type == NT_GNU_BUILD_ID and MIN_BUILD_ID <= end - begin <= MAX_BUILD_ID:
                    self.note_answers[key] = data[begin:end].hex()
                    break
        return self.note_answers[key]


def _layout(ident: bytes) -> Layout:
    return Layout(ident[4] == 2, "<" if ident[5] == 1 else ">")
