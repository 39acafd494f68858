"""What an ELF file is, for the index: its GNU build-id, and whether it carries code, debug information or both.

pyelftools parses the headers, but every size and offset is checked against the file first: on hostile
input it allocates whatever a header claims and raises exceptions outside its own hierarchy."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import IO, Any

from elftools.elf.elffile import ELFFile

from retracer.errors import RetracerError

ELF_MAGIC = b"\x7fELF"
PT_NOTE = "PT_NOTE"
SHT_NOBITS = "SHT_NOBITS"
SHF_EXECINSTR = 0x4
SHN_XINDEX = 0xFFFF
#: Notes hold a few identifiers; a note table larger than this lies about its size.
MAX_NOTES_BYTES = 1 << 20
#: Section names of a real file take kilobytes.
MAX_NAMES_BYTES = 16 << 20
#: More sections than this in a file is a header lying (the format allows 2^32, no linker writes that many).
MAX_SECTIONS = 1 << 20
DEBUG_SECTIONS = (b".debug_info", b".zdebug_info")
#: The only object types the index holds: executables, shared libraries (and PIEs) and their debug files.
INDEXED_TYPES = ("ET_EXEC", "ET_DYN")


class BadElf(RetracerError):
    """Raised when a file starts like ELF but its headers lie (sizes or offsets past its end) or are garbled."""


@dataclass(frozen=True)
class ElfIdentity:
    """What the index needs of an ELF file."""

    build_id: str | None
    has_code: bool        # an executable section holds bytes (not NOBITS, as in a debug-only file)
    has_debug_info: bool  # .debug_info (or .zdebug_info) holds bytes

    def kinds(self, in_debug_tree: bool) -> tuple[str, ...]:
        """How the file is indexed: a file under /usr/lib/debug, or with DWARF and no code, is debug info;
        an unstripped program is both (what debuginfod serves it as, too)."""
        if in_debug_tree or (self.has_debug_info and not self.has_code):
            return ("debuginfo",)
        if self.has_debug_info:
            return ("executable", "debuginfo")
        return ("executable",)


def is_elf(head: bytes) -> bool:
    return head[:4] == ELF_MAGIC


def identify(stream: IO[bytes], size: int) -> ElfIdentity | None:
    """The identity of the ELF file in ``stream`` (``size`` bytes), None for object types the index does
    not hold (relocatable objects, cores); BadElf when its headers lie."""
    try:
        return _Reader(stream, size).identity()
    except BadElf:
        raise
    except Exception as exc:  # pyelftools and construct raise outside their own hierarchy
        raise BadElf(f"its ELF headers cannot be parsed ({type(exc).__name__}: {exc})") from None


class _Reader:
    def __init__(self, stream: IO[bytes], size: int) -> None:
        self.stream = stream
        self.size = size

    def read(self, offset: int, length: int, what: str) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise BadElf(f"its {what} ({length} bytes at offset {offset}) lies past its end ({self.size} bytes)")
        self.stream.seek(offset)
        data = self.stream.read(length)
        if len(data) != length:
            raise BadElf(f"its {what} is cut short")
        return data

    def identity(self) -> ElfIdentity | None:
        head = self.read(0, min(64, self.size), "ELF header")
        if len(head) < 52 or not is_elf(head) or head[4] not in (1, 2) or head[5] not in (1, 2):
            raise BadElf("it starts like ELF but its header is cut short or of an unknown class")
        if head[4] == 2 and len(head) < 64:
            raise BadElf("its 64-bit ELF header is cut short")
        self.stream.seek(0)
        elf = ELFFile(self.stream)
        header = elf.header
        if header["e_type"] not in INDEXED_TYPES:
            return None
        structs = elf.structs
        sections = self._sections(elf, header)
        names = self._names(elf, header, sections)
        notes: list[bytes] = []
        if header["e_phnum"]:
            entsize = int(header["e_phentsize"])
            if entsize != structs.Elf_Phdr.sizeof():
                raise BadElf(f"its program header size ({entsize}) is not its class's")
            table = self.read(int(header["e_phoff"]), entsize * int(header["e_phnum"]), "program header table")
            for i in range(int(header["e_phnum"])):
                phdr = structs.Elf_Phdr.parse(table[i * entsize:(i + 1) * entsize])
                if phdr["p_type"] == PT_NOTE and phdr["p_filesz"]:
                    notes.append(self._notes(int(phdr["p_offset"]), int(phdr["p_filesz"]), f"note segment {i}"))
        has_code = has_debug = False
        for index, shdr in enumerate(sections):
            name = _name(names, int(shdr["sh_name"]))
            if shdr["sh_type"] == SHT_NOBITS:
                continue
            if int(shdr["sh_offset"]) + int(shdr["sh_size"]) > self.size:
                raise BadElf(f"its section {name.decode('utf-8', 'replace') or index!s} claims "
                             f"{shdr['sh_size']} bytes at offset {shdr['sh_offset']}, past its end "
                             f"({self.size} bytes)")
            if int(shdr["sh_flags"]) & SHF_EXECINSTR and shdr["sh_size"]:
                has_code = True
            if name in DEBUG_SECTIONS and shdr["sh_size"]:
                has_debug = True
            if shdr["sh_type"] == "SHT_NOTE" and not notes and shdr["sh_size"]:
                notes.append(self._notes(int(shdr["sh_offset"]), int(shdr["sh_size"]), f"note section {index}"))
        build_id = None
        for data in notes:
            build_id = build_id or _build_id(elf, data)
        return ElfIdentity(build_id, has_code, has_debug)

    def _notes(self, offset: int, length: int, what: str) -> bytes:
        if length > MAX_NOTES_BYTES:
            raise BadElf(f"its {what} claims {length} bytes (notes take at most {MAX_NOTES_BYTES})")
        return self.read(offset, length, what)

    def _sections(self, elf: Any, header: Any) -> list[Any]:
        shoff = int(header["e_shoff"])
        if not shoff:
            return []
        entsize = int(header["e_shentsize"])
        if entsize != elf.structs.Elf_Shdr.sizeof():
            raise BadElf(f"its section header size ({entsize}) is not its class's")
        count = int(header["e_shnum"])
        if count == 0:
            # More sections than e_shnum holds: the count is in section 0's sh_size.
            first = elf.structs.Elf_Shdr.parse(self.read(shoff, entsize, "section header table"))
            count = int(first["sh_size"])
        if count > MAX_SECTIONS:
            raise BadElf(f"it claims {count} sections")
        table = self.read(shoff, count * entsize, "section header table")
        return [elf.structs.Elf_Shdr.parse(table[i * entsize:(i + 1) * entsize]) for i in range(count)]

    def _names(self, elf: Any, header: Any, sections: list[Any]) -> bytes:
        index = int(header["e_shstrndx"])
        if index == SHN_XINDEX and sections:
            index = int(sections[0]["sh_link"])
        if not sections or index == 0:
            return b""
        if index >= len(sections):
            raise BadElf(f"its section-name table index ({index}) is past its {len(sections)} sections")
        names = sections[index]
        if int(names["sh_size"]) > MAX_NAMES_BYTES:
            raise BadElf(f"its section-name table claims {names['sh_size']} bytes")
        return self.read(int(names["sh_offset"]), int(names["sh_size"]), "section-name table")


def _name(names: bytes, at: int) -> bytes:
    end = names.find(b"\0", at)
    return names[at:end] if 0 <= at < end else b""


def _build_id(elf: Any, data: bytes) -> str | None:
    """The GNU build-id among the notes in ``data``; BadElf for a note whose sizes run past the table."""
    little = elf.little_endian
    order = "<" if little else ">"
    at = 0
    while at + 12 <= len(data):
        namesz, descsz, note_type = struct.unpack_from(order + "III", data, at)
        name_end = at + 12 + namesz
        desc = at + 12 + (-(-namesz // 4) * 4)
        if name_end > len(data) or desc + descsz > len(data):
            raise BadElf(f"a note claims {namesz} + {descsz} bytes, past the end of its {len(data)}-byte table")
        if note_type == 3 and data[at + 12:name_end].rstrip(b"\0") == b"GNU" and descsz:
            if descsz > 64:
                raise BadElf(f"its GNU build-id note claims {descsz} bytes (a build-id has at most 64)")
            return data[desc:desc + descsz].hex()
        at = desc + (-(-descsz // 4) * 4)
    return None
