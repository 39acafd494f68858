"""Reading an untrusted core file in bounded work and memory: the reads, the word layout and the notes.

A hostile core can claim any size in its headers, point many headers at the same bytes, or be a sparse file
whose size is terabytes while it holds a few kilobytes. So every read here is checked against the file's
size and charged to a budget: the bytes read in all may be a small multiple of the file size, and never more
than an absolute cap, because a sparse file's size says nothing about how much it really holds. A reader
that parses the same bytes again and again, or believes a size it was told, runs out of budget and stops
with a CoreFileError instead of running for minutes or taking gigabytes.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from retracer.errors import RetracerError

#: The bytes read may total READ_FACTOR times the file size plus READ_SLACK. Reading a real core takes a small
#: part of it (headers, notes, about a KiB per module, whose first page the core holds), so only a core whose
#: structures send the reader over the same bytes again and again runs out.
READ_FACTOR = 2
READ_SLACK = 1 << 20
#: Whatever the file size: the notes' 64 MiB, the program headers of a million segments and the modules'.
MAX_READ_BYTES = 256 << 20
#: Notes in all, whatever the file size: real cores have about ten per thread.
MAX_NOTES = 1 << 20

#: What to do about a core refused as malformed: it cannot be repaired here.
NEW_CORE = "the core cannot be used; ask for a new one"


class CoreFileError(RetracerError):
    """Raised when a core file is not an ELF core, or is truncated or malformed where it matters."""


@dataclass(frozen=True)
class Layout:
    """Word size and byte order of an ELF file."""

    is64: bool
    order: str

    @property
    def word(self) -> str:
        return "Q" if self.is64 else "I"

    @property
    def word_size(self) -> int:
        return 8 if self.is64 else 4

    @property
    def ehdr_size(self) -> int:
        return 64 if self.is64 else 52

    @property
    def phdr_size(self) -> int:
        return 56 if self.is64 else 32

    @property
    def phdr(self) -> str:
        """The struct format of one program header."""
        return "IIQQQQQQ" if self.is64 else "IIIIIIII"

    def unpack(self, fmt: str, data: bytes, offset: int = 0) -> tuple[int, ...]:
        return struct.unpack_from(self.order + fmt, data, offset)

    def phdrs(self, table: bytes) -> Iterator[tuple[int, int, int, int, int]]:
        """(type, offset, vaddr, filesz, align) of each entry of a program header table of phdr_size entries."""
        for entry in struct.iter_unpack(self.order + self.phdr, table):
            if self.is64:
                p_type, _flags, offset, vaddr, _paddr, filesz, _memsz, align = entry
            else:
                p_type, offset, vaddr, _paddr, filesz, _memsz, _flags, align = entry
            yield p_type, offset, vaddr, filesz, align


class CoreFile:
    """A regular file opened for bounded reads: none past its end, and all of them within a budget."""

    def __init__(self, fd: int, name: str) -> None:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CoreFileError(f"{name} is not a regular file (a pipe, a device or a directory): a core is "
                                f"uploaded as a file; {NEW_CORE}")
        self.fd = fd
        self.name = name
        self.size = info.st_size
        self.budget = min(READ_FACTOR * self.size + READ_SLACK, MAX_READ_BYTES)
        self.spent = 0
        self.notes = 0

    def read(self, offset: int, size: int, what: str) -> bytes:
        """size bytes at offset, all of them, charged to the budget."""
        if offset < 0 or size < 0 or offset + size > self.size:
            raise CoreFileError(f"{self.name}: {what} ({size} bytes at offset {offset}) lies beyond the end of "
                                f"the file ({self.size} bytes): the core is truncated or corrupt; {NEW_CORE}")
        self.spend(size, what)
        chunks = []
        done = 0
        while done < size:
            # pread rather than seek and read: no position to keep right, and short reads are retried.
            chunk = os.pread(self.fd, size - done, offset + done)
            if not chunk:
                raise CoreFileError(f"{self.name}: {what} could not be read whole: the file shrank while it was "
                                    f"read; read it again once it is complete")
            chunks.append(chunk)
            done += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def spend(self, size: int, what: str) -> None:
        self.spent += size
        if self.spent > self.budget:
            raise CoreFileError(f"{self.name}: reading {what} would take the bytes read past {self.budget} "
                                f"({READ_FACTOR} times the file's size plus {READ_SLACK}, at most "
                                f"{MAX_READ_BYTES}): its headers claim more than the file holds or send the reader "
                                f"over the same bytes again and again, which no real core does; {NEW_CORE}")

    def count_note(self) -> None:
        self.notes += 1
        if self.notes > MAX_NOTES:
            raise CoreFileError(f"{self.name}: it holds more than {MAX_NOTES} notes, far more than a real core "
                                f"(about ten per thread); {NEW_CORE}")


def open_core(path: str) -> int:
    """A read-only descriptor of path; O_NONBLOCK so that a named pipe is refused instead of waited on."""
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))


def iter_notes(layout: Layout, data: bytes, align: int, what: str, core: CoreFile, strict: bool,
               ) -> Iterator[tuple[int, bytes, int, int]]:
    """(type, owner name without NULs, descriptor start, descriptor end) of each note in data.

    The descriptor is given as offsets into data rather than sliced out, so that a note segment's bytes are
    held once however many notes it has. strict (the core's own notes) refuses a note that overruns its
    segment, and one without an owner name: every note a kernel or gdb writes in a core has one, and zeros (a
    hole of a sparse file) would otherwise read as millions of 12-byte notes. Otherwise (a module's notes,
    searched for a build-id) a note that overruns its segment ends the search there.
    """
    at = 0
    while at + 12 <= len(data):
        core.count_note()
        namesz, descsz, note_type = layout.unpack("III", data, at)
        if strict and namesz == 0:
            raise CoreFileError(f"{core.name}: the note at byte {at} of {what} has no owner name, which no core "
                                f"writer makes: the notes are zeros (a hole?) or corrupt; {NEW_CORE}")
        name_at = at + 12
        desc_at = name_at + _round_up(namesz, align)
        if desc_at + descsz > len(data):
            if not strict:
                return
            raise CoreFileError(f"{core.name}: a note in {what} claims {namesz} + {descsz} bytes, more than "
                                f"its segment holds; {NEW_CORE}")
        yield note_type, data[name_at:name_at + namesz].rstrip(b"\x00"), desc_at, desc_at + descsz
        at = desc_at + _round_up(descsz, align)


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) & ~(align - 1)
