"""The core reader on hostile cores: claims of huge sizes on sparse files, and structures that alias each other.

The cores are built here with ``struct`` (ELF64, little-endian), so these tests need neither gcc nor gdb. A
reader that allocates what a header claims, or parses the same bytes again for every header pointing at them,
is caught in a child process with an address-space limit and a timeout, so a regression fails the test
instead of taking the machine's memory or hanging the run.
"""

from __future__ import annotations

import json
import os
import re
import resource
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retracer.worker import coredump
from retracer.worker.coredump import CoreFileError

PT_LOAD, PT_NOTE = coredump.PT_LOAD, coredump.PT_NOTE
ET_DYN = 3
PHDR = struct.Struct("<IIQQQQQQ")
#: Where the modules of the synthetic cores are mapped; each gets a MiB of address space.
BASE = 0x7F0000000000
#: The address-space limit of the child that reads a hostile core: a bounded reader needs a few tens of MiB.
CHILD_MEMORY = 512 << 20
#: Generous: a bounded reader answers in well under a second; the old one took minutes or was killed.
CHILD_TIMEOUT = 30.0
#: How long one small core may take in process (real runs take milliseconds).
SMALL_CORE_SECONDS = 10.0  # a hang guard on a noisy machine, not a speed claim (old code took 5-200 s)

CHILD = """
import json, resource, sys, time
from retracer.worker import coredump
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
started = time.monotonic()
try:
    result = {"outcome": "ok", "build_ids": coredump.build_ids(sys.argv[1])}
except coredump.CoreFileError as exc:
    result = {"outcome": "CoreFileError", "message": str(exc)}
except BaseException as exc:
    result = {"outcome": type(exc).__name__, "message": str(exc)[:300]}
result["seconds"] = time.monotonic() - started
result["max_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(result))
"""


def read_in_child(path: Path, memory: int = CHILD_MEMORY, timeout: float = CHILD_TIMEOUT) -> dict[str, Any]:
    """The reader's outcome on path, run in a child with at most memory bytes of address space."""
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, str(path), str(memory)], capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {path.name} took more than {timeout} s: the reader does unbounded work")
    if done.returncode != 0 or not done.stdout.strip():
        pytest.fail(f"the reader's child died (exit {done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def assert_refused(result: dict[str, Any], pattern: str) -> None:
    """The child refused the core with a CoreFileError whose message matches pattern."""
    assert result["outcome"] == "CoreFileError", result
    assert re.search(pattern, result["message"]), result["message"]


# -- building cores ----------------------------------------------------------------------------------------


def note(name: bytes, note_type: int, desc: bytes) -> bytes:
    """One ELF note, 4-byte aligned."""
    owner = name + b"\x00"
    return struct.pack("<III", len(owner), len(desc), note_type) + pad(owner, 4) + pad(desc, 4)


def pad(data: bytes, align: int) -> bytes:
    return data + b"\x00" * (-len(data) % align)


def nt_file(mappings: list[tuple[int, int, int, str]]) -> bytes:
    """The NT_FILE descriptor: (start, end, page offset, file name) for each mapping."""
    table = b"".join(struct.pack("<QQQ", start, end, page) for start, end, page, _ in mappings)
    names = b"".join(path.encode() + b"\x00" for *_, path in mappings)
    return struct.pack("<QQ", len(mappings), 4096) + table + names


def auxv(vdso: int) -> bytes:
    return struct.pack("<QQQQ", coredump.AT_SYSINFO_EHDR, vdso, coredump.AT_NULL, 0)


def elf_header(e_type: int, phoff: int, phnum: int, phentsize: int = PHDR.size, shoff: int = 0,
               shnum: int = 0) -> bytes:
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    return ident + struct.pack("<HHIQQQIHHHHHH", e_type, 62, 1, 0, phoff, shoff, 0, 64, phentsize, phnum,
                               64 if shnum else 0, shnum, 0)


def build_id_of(i: int) -> bytes:
    return bytes((i + k) % 256 for k in range(20))


def module_image(build_id: bytes | None, note_headers: int = 1, junk_notes: int = 0, shift: int = 0) -> bytes:
    """A shared object's first page: its ELF header, program headers, and its notes (junk, then the build-id).

    note_headers PT_NOTE headers describe the note region; header i starts shift * i bytes further in, so
    with shift 0 they all alias the same bytes.
    """
    junk = struct.pack("<III", 0, 0, 0x99) * junk_notes  # 12 bytes each: no owner, no descriptor
    notes = junk + (note(b"GNU", coredump.NT_GNU_BUILD_ID, build_id) if build_id else b"")
    notes_at = 64 + (1 + note_headers) * PHDR.size
    notes_at += -notes_at % 8
    size = notes_at + len(notes)
    phdrs = PHDR.pack(PT_LOAD, 5, 0, 0, 0, size, size, 4096)
    for i in range(note_headers):
        at = notes_at + shift * i
        phdrs += PHDR.pack(PT_NOTE, 4, at, at, at, len(notes) - shift * i, len(notes) - shift * i, 4)
    head = elf_header(ET_DYN, 64, 1 + note_headers) + phdrs
    return head + bytes(notes_at - len(head)) + notes


@dataclass
class Draft:
    """A core being assembled: data placed after the ELF header, program headers written last at the end.

    The program header table goes at the end of the file so tests can add headers pointing at bytes
    already placed without moving them.
    """

    body: bytearray = field(default_factory=lambda: bytearray(64))
    phdrs: list[tuple[int, int, int, int, int]] = field(default_factory=list)  # type, offset, vaddr, size, align

    def place(self, data: bytes, align: int = 8) -> int:
        self.body += b"\x00" * (-len(self.body) % align)
        at = len(self.body)
        self.body += data
        return at

    def finish(self, phnum: int | None = None, phentsize: int = PHDR.size, shoff: int = 0, shnum: int = 0) -> bytes:
        self.body += b"\x00" * (-len(self.body) % 8)
        phoff = len(self.body)
        table = b"".join(PHDR.pack(t, 4, off, vaddr, 0, size, size, align)
                         for t, off, vaddr, size, align in self.phdrs)
        head = elf_header(coredump.ET_CORE, phoff, len(self.phdrs) if phnum is None else phnum, phentsize,
                          shoff, shnum)
        return head + bytes(self.body[64:]) + table


def valid_core(modules: int = 2) -> tuple[Draft, list[str]]:
    """A core mapping modules shared objects and a vdso, each with a build-id; and those build-ids in order."""
    draft = Draft()
    mappings = []
    expected = []
    for i in range(modules + 1):
        start = BASE + i * 0x100000
        image = module_image(build_id_of(i))
        draft.phdrs.append((PT_LOAD, draft.place(image, 4096), start, len(image), 4096))
        expected.append(build_id_of(i).hex())
        if i < modules:
            mappings.append((start, start + 0x1000, 0, f"/usr/lib/lib{i}.so"))
    notes = note(b"CORE", coredump.NT_FILE, nt_file(mappings)) + note(b"CORE", coredump.NT_AUXV, auxv(start))
    draft.phdrs.insert(0, (PT_NOTE, draft.place(notes), 0, len(notes), 4))
    return draft, expected


def sparse(path: Path, data: bytes, size: int) -> Path:
    """path holding data, then extended with a hole to size bytes (skip where the filesystem cannot)."""
    path.write_bytes(data)
    try:
        os.truncate(path, size)
    except OSError:
        pytest.skip(f"this filesystem cannot hold a sparse file of {size} bytes")
    return path


# -- the tests ---------------------------------------------------------------------------------------------


class TestSyntheticCore:
    def test_valid_core_read(self, tmp_path: Path) -> None:
        """The synthetic core is one the reader understands: the modules and the vdso, with their build-ids."""
        draft, expected = valid_core()
        path = tmp_path / "core"
        path.write_bytes(draft.finish())
        found = coredump.modules(path)
        assert [m.build_id for m in found] == expected
        assert [m.path for m in found] == ["/usr/lib/lib0.so", "/usr/lib/lib1.so", None]


class TestHugeClaimsOnSparseFiles:
    """A sparse file has a huge size and few real bytes: what a header claims must not be allocated."""

    def test_program_header_table_of_64_gib(self, tmp_path: Path) -> None:
        """2^20 program headers (through PN_XNUM) of 65535 bytes each, in a 72 GiB sparse file."""
        section0 = bytearray(64)
        section0[44:48] = struct.pack("<I", coredump.MAX_SEGMENTS)  # sh_info: the real e_phnum
        head = elf_header(coredump.ET_CORE, phoff=128, phnum=coredump.PN_XNUM, phentsize=0xFFFF, shoff=64,
                          shnum=1)
        path = sparse(tmp_path / "core", head + bytes(section0), 72 << 30)
        assert_refused(read_in_child(path), r"core: .*program headers of 65535 bytes")

    def test_program_header_table_of_4_gib_without_pn_xnum(self, tmp_path: Path) -> None:
        """65534 program headers of 65535 bytes each (4 GiB), in an 8 GiB sparse file."""
        head = elf_header(coredump.ET_CORE, phoff=64, phnum=0xFFFE, phentsize=0xFFFF)
        path = sparse(tmp_path / "core", head, 8 << 30)
        assert_refused(read_in_child(path), r"core: .*program headers of 65535 bytes")

    def test_note_segment_of_zeros(self, tmp_path: Path) -> None:
        """A 64 MiB note segment in a hole: millions of empty notes, which must not all be kept."""
        draft = Draft()
        draft.phdrs.append((PT_NOTE, 1 << 30, 0, coredump.MAX_NOTES_BYTES, 4))
        path = sparse(tmp_path / "core", draft.finish(), 64 << 30)
        result = read_in_child(path)
        assert_refused(result, r"core: .*notes")
        assert result["seconds"] < SMALL_CORE_SECONDS * 2

    def test_nt_file_names_in_a_hole(self, tmp_path: Path) -> None:
        """An NT_FILE of 64 MiB whose file names lie in a hole: tens of millions of empty names."""
        count = 1 << 20
        desc_size = coredump.MAX_NOTES_BYTES - 64
        header = struct.pack("<III", 5, desc_size, coredump.NT_FILE) + b"CORE\x00\x00\x00\x00"
        desc_head = struct.pack("<QQ", count, 4096)
        notes_at = 1 << 20
        draft = Draft()
        draft.phdrs.append((PT_NOTE, notes_at, 0, 20 + desc_size, 4))
        data = bytearray(draft.finish())
        data += bytes(notes_at - len(data)) + header + desc_head
        path = sparse(tmp_path / "core", bytes(data), 64 << 30)
        result = read_in_child(path)
        assert_refused(result, r"core: NT_FILE mapping 0 runs from 0x0 to 0x0, which is empty")


class TestAliasing:
    """Headers that point at bytes already parsed: each piece of the core must be parsed once."""

    def test_many_note_headers_on_one_nt_file(self, tmp_path: Path) -> None:
        """~640 PT_NOTE headers all describing one NT_FILE of 4000 mappings: 64 MiB of notes in a 140 KB core."""
        draft = Draft()
        mappings = [(BASE + i * 0x1000, BASE + i * 0x1000 + 0x1000, 0, "/") for i in range(4000)]
        notes = note(b"CORE", coredump.NT_FILE, nt_file(mappings))
        at = draft.place(notes)
        # As many as fit under the cap on the notes' size, so only parsing each piece once keeps this cheap.
        draft.phdrs += [(PT_NOTE, at, 0, len(notes), 4)] * (coredump.MAX_NOTES_BYTES // len(notes))
        path = tmp_path / "core"
        path.write_bytes(draft.finish())
        result = read_in_child(path)
        assert (result["outcome"], result.get("build_ids")) == ("ok", []), result  # the core holds no memory
        assert result["seconds"] < SMALL_CORE_SECONDS, result

    def test_overlapping_note_segments_refused(self, tmp_path: Path) -> None:
        """Note segments that overlap without being the same (each 4 bytes further in): no writer makes them,
        the core is refused."""
        draft, _ = valid_core()
        kind, at, vaddr, size, align = draft.phdrs[0]
        draft.phdrs += [(kind, at + 4 * i, vaddr, size - 4 * i, align) for i in range(1, size // 4)]
        path = tmp_path / "core"
        path.write_bytes(draft.finish())
        with pytest.raises(CoreFileError, match=r"core: the note segment at offset \d+ \(\d+ bytes\) overlaps"):
            coredump.build_ids(path)

    def test_nt_file_entries_all_on_one_module(self, tmp_path: Path) -> None:
        """1000 mappings at different addresses whose PT_LOADs all alias one module with 200 aliased notes."""
        draft = Draft()
        image = module_image(None, note_headers=200, junk_notes=1000)
        at = draft.place(image, 4096)
        mappings = []
        for i in range(1000):
            start = BASE + i * 0x100000
            draft.phdrs.append((PT_LOAD, at, start, len(image), 4096))
            mappings.append((start, start + 0x1000, 0, f"/l{i}"))
        notes = note(b"CORE", coredump.NT_FILE, nt_file(mappings))
        draft.phdrs.insert(0, (PT_NOTE, draft.place(notes), 0, len(notes), 4))
        path = tmp_path / "core"
        path.write_bytes(draft.finish())
        result = read_in_child(path)
        assert (result["outcome"], result.get("build_ids")) == ("ok", []), result
        assert result["seconds"] < SMALL_CORE_SECONDS, result

    @pytest.mark.parametrize("shift", [0, 12], ids=["same-range", "shifted-ranges"])
    def test_module_notes_alias_themselves(self, tmp_path: Path, shift: int) -> None:
        """A module whose 1100 PT_NOTE headers all cover its 60 KB of notes (identical or shifted by a note)."""
        draft, expected = valid_core(modules=1)
        image = module_image(None, note_headers=1100, junk_notes=5000, shift=shift)
        start = BASE + 0x10000000
        draft.phdrs.append((PT_LOAD, draft.place(image, 4096), start, len(image), 4096))
        notes = note(b"CORE", coredump.NT_FILE, nt_file([(start, start + 0x1000, 0, "/hostile.so")]))
        draft.phdrs.append((PT_NOTE, draft.place(notes), 0, len(notes), 4))
        path = tmp_path / "core"
        path.write_bytes(draft.finish())
        result = read_in_child(path)
        # The hostile module has no build-id, and searching it must not hide the others'.
        assert (result["outcome"], result.get("build_ids")) == ("ok", expected), result
        assert result["seconds"] < SMALL_CORE_SECONDS, result


    def test_modules_sharing_shifted_notes_exhaust_the_budget(self, tmp_path: Path) -> None:
        """2000 modules whose note segments cover one 60 KB region, each 12 bytes further in: all different
        ranges, so no answer is reused, and reading them (72 MB from a 0.5 MB core) runs out of budget."""
        count, stride, size = 2000, 192, 36_000
        region = count * stride  # where the shared notes start, after the modules' headers
        memory = bytearray()
        for i in range(count):
            at = region + 12 * i - i * stride  # the note vaddr that the module's load bias takes to region + 12 i
            head = elf_header(ET_DYN, 64, 2) + PHDR.pack(PT_LOAD, 5, 0, 0, 0, stride, stride, 4096) \
                + PHDR.pack(PT_NOTE, 4, at, at, at, size, size, 4)
            memory += head + bytes(stride - len(head))
        memory += struct.pack("<III", 0, 0, 0x99) * 5000
        draft = Draft()
        draft.phdrs.append((PT_LOAD, draft.place(bytes(memory), 4096), BASE, len(memory), 4096))
        notes = note(b"CORE", coredump.NT_FILE, nt_file([(BASE + i * stride, BASE + (i + 1) * stride, 0, f"/l{i}")
                                                         for i in range(count)]))
        draft.phdrs.insert(0, (PT_NOTE, draft.place(notes), 0, len(notes), 4))
        path = tmp_path / "core"
        path.write_bytes(draft.finish())
        result = read_in_child(path)
        assert_refused(result, r"core: reading the module notes at 0x[0-9a-f]+ would take the bytes read past \d+")
        assert result["seconds"] < SMALL_CORE_SECONDS, result


class TestOtherFiles:
    def test_fifo_is_refused_without_blocking(self, tmp_path: Path) -> None:
        """A named pipe would block open() forever waiting for a writer; it is not a core."""
        path = tmp_path / "core"
        os.mkfifo(path)
        result = read_in_child(path, timeout=10)
        assert_refused(result, r"core is not a regular file")



# -- mutations of a small valid core -----------------------------------------------------------------------

_DRAFT, _ = valid_core(modules=3)
SMALL_CORE = _DRAFT.finish()
#: Values that make a size, a count or an offset hostile: zero, one, just past a power of two, the caps, the
#: maximum of each width.
INTERESTING = [0, 1, 4, 12, 56, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, coredump.MAX_SEGMENTS,
               coredump.MAX_NOTES_BYTES - 64, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 2**63 - 1, 2**63, 2**64 - 1]
#: Sizes a mutated core may be extended to with a hole: none, 1 GiB, 64 GiB.
SPARSE_SIZES = [0, 1 << 30, 64 << 30]


def fields_of(core: bytes) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(offset, width) of the fields of a core built by valid_core and of its modules: the sizes, counts and
    offsets the reader trusts least; and all the fields."""
    sizes = [(32, 8), (40, 8), (54, 2), (56, 2)]
    others = [(16, 2), (60, 2)]
    phoff, = struct.unpack_from("<Q", core, 32)
    phnum, = struct.unpack_from("<H", core, 56)
    for i in range(phnum):
        at = phoff + i * PHDR.size
        sizes += [(at + 8, 8), (at + 32, 8)]
        others += [(at, 4), (at + 16, 8), (at + 48, 8)]
        p_type, _, offset, _, _, filesz, _, _ = PHDR.unpack_from(core, at)
        if p_type == PT_NOTE:
            sizes += notes_fields(core, offset, offset + filesz)
            continue
        sizes += [(offset + 32, 8), (offset + 54, 2), (offset + 56, 2)]
        m_phoff, = struct.unpack_from("<Q", core, offset + 32)
        m_phnum, = struct.unpack_from("<H", core, offset + 56)
        for k in range(m_phnum):
            m_at = offset + m_phoff + k * PHDR.size
            sizes += [(m_at + 8, 8), (m_at + 16, 8), (m_at + 32, 8)]
            others.append((m_at, 4))
            m_type, _, m_offset, _, _, m_size, _, _ = PHDR.unpack_from(core, m_at)
            if m_type == PT_NOTE:
                sizes += notes_fields(core, offset + m_offset, offset + m_offset + m_size)
    return sizes, sizes + others


def notes_fields(core: bytes, at: int, end: int) -> list[tuple[int, int]]:
    """The size fields of the notes in core[at:end], and the count and first entry of an NT_FILE."""
    fields = []
    while at + 12 <= end:
        namesz, descsz, note_type = struct.unpack_from("<III", core, at)
        fields += [(at, 4), (at + 4, 4)]
        desc = at + 12 + namesz + -namesz % 4
        if note_type == coredump.NT_FILE:
            fields += [(desc, 8), (desc + 16, 8), (desc + 24, 8), (desc + 32, 8)]
        at = desc + descsz + -descsz % 4
    return fields


SIZE_FIELDS, ALL_FIELDS = fields_of(SMALL_CORE)
#: The fields a reader allocates from: e_phentsize, e_phnum, the PT_NOTE's p_filesz, the first note's descsz and
#: the NT_FILE count; and the claims made in them, large enough to cost seconds or gigabytes if believed.
_PHOFF = struct.unpack_from("<Q", SMALL_CORE, 32)[0]
_NOTES = PHDR.unpack_from(SMALL_CORE, _PHOFF)[2]  # valid_core puts the PT_NOTE first, and NT_FILE first in it
CLAIM_FIELDS = [(54, 2), (56, 2), (_PHOFF + 32, 8), (_NOTES + 4, 4), (_NOTES + 20, 8)]
CLAIMS = [0xFFFE, 0xFFFF, 1 << 24, 1 << 25, coredump.MAX_NOTES_BYTES - 64]


class Mutation:
    """A mutated core and the steps that made it, which are what a failing example prints."""

    def __init__(self, core: bytes, extend_to: int, steps: list[str]) -> None:
        self.core = core
        self.extend_to = extend_to
        self.steps = steps

    def __repr__(self) -> str:
        return f"Mutation({len(self.core)} bytes, extended to {self.extend_to}: {'; '.join(self.steps)})"


@st.composite
def mutated_cores(draw: st.DrawFn) -> Mutation:
    """SMALL_CORE with size fields made to claim much, fields overwritten, bytes changed, program headers
    repeated, maybe cut short; and a size to extend it to with a hole (0: none)."""
    data = bytearray(SMALL_CORE)
    steps = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["claim", "field", "field", "byte", "alias"]))
        if kind in ("claim", "field"):
            at, width = draw(st.sampled_from(CLAIM_FIELDS) if kind == "claim"
                             else st.sampled_from(SIZE_FIELDS) | st.sampled_from(ALL_FIELDS))
            top = 2 ** (8 * width) - 1
            value = draw(st.sampled_from(CLAIMS) if kind == "claim"
                         else st.sampled_from(INTERESTING) | st.sampled_from([top, top - 1, top // 2 + 1])
                         | st.integers(0, top))
            data[at:at + width] = (value & top).to_bytes(width, "little")
            steps.append(f"{width} bytes at {at} = {value & top:#x}")
        elif kind == "byte":
            at, value = draw(st.integers(0, len(data) - 1)), draw(st.integers(0, 255))
            data[at] = value
            steps.append(f"byte at {at} = {value:#x}")
        else:
            # Repeat one program header (the table is last in the file, so nothing else moves).
            phoff, = struct.unpack_from("<Q", SMALL_CORE, 32)
            phnum, = struct.unpack_from("<H", SMALL_CORE, 56)
            source, copies = draw(st.integers(0, phnum - 1)), draw(st.integers(1, 2000))
            data[phoff:phoff] = SMALL_CORE[phoff + source * PHDR.size:phoff + (source + 1) * PHDR.size] * copies
            data[56:58] = struct.pack("<H", phnum + copies)
            steps.append(f"program header {source} repeated {copies} times")
    if draw(st.booleans()):
        keep = draw(st.integers(0, len(data)))
        del data[keep:]
        steps.append(f"cut to {keep} bytes")
    return Mutation(bytes(data), draw(st.sampled_from(SPARSE_SIZES)), steps)


@contextmanager
def address_space_growth(limit: int) -> Iterator[None]:
    """Let this process's address space grow by at most limit bytes inside the block (Linux only)."""
    try:
        status = Path("/proc/self/status").read_text(encoding="ascii")
    except OSError:
        yield
        return
    vm_kib = int(re.search(r"^VmSize:\s+(\d+) kB", status, re.MULTILINE).group(1))  # type: ignore[union-attr]
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    wanted = vm_kib * 1024 + limit
    resource.setrlimit(resource.RLIMIT_AS, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


class TestMutations:
    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(mutation=mutated_cores())
    def test_mutated_core_returns_or_refuses_quickly(self, tmp_path: Path, mutation: Mutation) -> None:
        """Every mutation of a small core, sparse-extended or not, gives build-ids or a CoreFileError naming
        the file, within SMALL_CORE_SECONDS and 512 MiB more address space."""
        path = tmp_path / "core"
        path.write_bytes(mutation.core)
        if mutation.extend_to:
            sparse(path, mutation.core, mutation.extend_to)
        refusal = ""
        started = time.monotonic()
        with address_space_growth(CHILD_MEMORY):
            try:
                found = coredump.build_ids(path)
            except CoreFileError as exc:
                refusal = str(exc)
        assert time.monotonic() - started < SMALL_CORE_SECONDS
        if refusal:
            assert refusal.startswith(str(path)), f"the message does not name the file: {refusal}"
        else:
            assert all(isinstance(b, str) for b in found)
