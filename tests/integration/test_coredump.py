"""Build-ids from a real core: a tiny C program is compiled and made to abort, and its core is read."""

from __future__ import annotations

import os
import random
import resource
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import NoteSection

from retracer.worker import coredump
from retracer.worker.coredump import CoreFileError
from tests.unit.clirun import Retracer

from ..conftest import IN_CI

PROGRAM = "#include <stdlib.h>\nint main(void) { abort(); }\n"


def _unlimited_core() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


@pytest.fixture(scope="module", params=["-pie", "-no-pie"])
def crash(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(executable, core): the kernel's core of an abort(), or gdb's gcore where cores are piped elsewhere.

    Both a position-independent executable (loaded anywhere) and a fixed-address one (a different load bias).
    """
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    where = tmp_path_factory.mktemp("crash")
    (where / "crash.c").write_text(PROGRAM, encoding="utf-8")
    exe = where / "crash"
    subprocess.run(["gcc", "-g", request.param, "-Wl,--build-id", "-o", str(exe), str(where / "crash.c")],
                   check=True)
    subprocess.run([str(exe)], cwd=where, preexec_fn=_unlimited_core, check=False)
    cores = sorted(where.glob("core*"))
    if cores:
        return exe, cores[0]
    # core_pattern pipes cores to systemd-coredump or apport here: ask gdb for one instead.
    if shutil.which("gdb") is None:
        pytest.skip("no core was written (core_pattern is a pipe?) and gdb is not installed")
    core = where / "gcore"
    subprocess.run(["gdb", "-batch", "-ex", "run", "-ex", f"gcore {core}", str(exe)], cwd=where,
                   capture_output=True, check=False, timeout=120)
    if not core.exists():
        pytest.skip("neither the kernel nor gdb wrote a core")
    return exe, core


def executable_build_id(exe: Path) -> str:
    """The executable's build-id, read by pyelftools from the file itself (not from the core)."""
    with open(exe, "rb") as stream:
        for section in ELFFile(stream).iter_sections():
            if isinstance(section, NoteSection):
                for note in section.iter_notes():
                    if note["n_type"] == "NT_GNU_BUILD_ID":
                        return str(note["n_desc"])
    raise AssertionError(f"{exe} has no build-id")


def find_nt_file(core: bytes | bytearray) -> int:
    """The offset of the NT_FILE descriptor (just after its 'CORE' name) in a little-endian 64-bit core."""
    at = core.find(struct.pack("<I", coredump.NT_FILE) + b"CORE\x00")
    assert at > 0, "no NT_FILE note in the core"
    return at + 4 + 8


class TestRealCore:
    def test_executable_build_id_found(self, crash: tuple[Path, Path]) -> None:
        """The crashed executable's build-id is among the core's, with its path."""
        exe, core = crash
        found = coredump.modules(core)
        assert executable_build_id(exe) in [m.build_id for m in found]
        assert any(m.path is not None and Path(m.path).name == "crash" for m in found)

    def test_libc_and_vdso(self, crash: tuple[Path, Path]) -> None:
        """The dynamic libraries and the vdso (no file behind it) are listed too."""
        found = coredump.modules(crash[1])
        names = {Path(m.path).name for m in found if m.path}
        assert any(n.startswith("libc.so") for n in names), names
        assert any(m.path is None for m in found), "no vdso"
        assert [m.start for m in found] == sorted(m.start for m in found)

    def test_same_as_eu_unstrip(self, crash: tuple[Path, Path]) -> None:
        """The build-ids are exactly those `eu-unstrip -n --core` reports."""
        if shutil.which("eu-unstrip") is None:
            (pytest.fail if IN_CI else pytest.skip)("eu-unstrip is not installed (apt-get install elfutils)")
        out = subprocess.run(["eu-unstrip", "-n", "--core", str(crash[1])], capture_output=True, text=True,
                             check=True).stdout
        expected = {line.split()[1].split("@")[0] for line in out.splitlines() if line.strip()}
        expected.discard("-")
        assert set(coredump.build_ids(crash[1])) == expected
        assert len(coredump.build_ids(crash[1])) == len(expected)


class TestHostileCores:
    def test_not_elf(self, tmp_path: Path) -> None:
        """A file that is not ELF is refused by name."""
        path = tmp_path / "core"
        path.write_bytes(b"MZ" + b"\x00" * 200)
        with pytest.raises(CoreFileError, match=r"is not an ELF file"):
            coredump.build_ids(path)

    def test_executable_is_not_a_core(self, crash: tuple[Path, Path]) -> None:
        """An ELF executable is not a core."""
        with pytest.raises(CoreFileError, match=r"is an ELF file of type [23], not a core \(type 4\)"):
            coredump.build_ids(crash[0])

    def test_missing_file(self, tmp_path: Path) -> None:
        """A core that does not exist is a CoreFileError, not an OSError."""
        with pytest.raises(CoreFileError, match=r"cannot be read"):
            coredump.build_ids(tmp_path / "nope")

    @pytest.mark.parametrize("keep", [10, 64, 200, 0x600])
    def test_truncated(self, crash: tuple[Path, Path], tmp_path: Path, keep: int) -> None:
        """A core cut inside its headers or notes is refused as truncated."""
        path = tmp_path / "core"
        path.write_bytes(crash[1].read_bytes()[:keep])
        with pytest.raises(CoreFileError, match=r"truncated|beyond the end"):
            coredump.build_ids(path)

    def test_nt_file_claiming_billions_of_mappings(self, crash: tuple[Path, Path], tmp_path: Path) -> None:
        """An NT_FILE note whose count would make a parser allocate gigabytes is refused from its size."""
        data = bytearray(crash[1].read_bytes())
        desc = find_nt_file(data)
        data[desc:desc + 8] = struct.pack("<Q", 2**62)
        path = tmp_path / "core"
        path.write_bytes(data)
        with pytest.raises(CoreFileError, match=r"NT_FILE claims 4611686018427387904 mappings"):
            coredump.build_ids(path)

    def test_huge_phnum_in_sparse_file(self, crash: tuple[Path, Path], tmp_path: Path) -> None:
        """A sparse 1 TiB core claiming 2^32-1 program headers is refused without reading them."""
        data = bytearray(crash[1].read_bytes()[:64])
        data[60:62] = struct.pack("<H", 1)  # e_shnum
        data[58:60] = struct.pack("<H", 64)  # e_shentsize
        data[56:58] = struct.pack("<H", coredump.PN_XNUM)  # e_phnum: the count is in section 0
        data[40:48] = struct.pack("<Q", 64)  # e_shoff
        section0 = bytearray(64)
        section0[44:48] = struct.pack("<I", 2**32 - 1)  # sh_info
        path = tmp_path / "core"
        path.write_bytes(bytes(data) + bytes(section0))
        try:
            os.truncate(path, 2**40)
        except OSError:
            pytest.skip("this filesystem cannot hold a 1 TiB sparse file")
        with pytest.raises(CoreFileError, match=r"claims 4294967295 program headers, more than"):
            coredump.build_ids(path)

    def test_fuzzed_cores_raise_only_core_file_error(self, crash: tuple[Path, Path], tmp_path: Path) -> None:
        """300 mutated cores each give build-ids or a CoreFileError, quickly, never another exception."""
        original = crash[1].read_bytes()
        rnd = random.Random(20261121)
        path = tmp_path / "core"
        started = time.monotonic()
        refused = 0
        for _ in range(300):
            data = bytearray(original)
            for _ in range(rnd.randrange(1, 12)):
                at = rnd.randrange(min(len(data), 0x2000))  # the headers and notes, where parsing happens
                data[at:at + 4] = struct.pack("<I", rnd.choice([0, 0xFF, 0x7FFFFFFF, 0xFFFFFFFF, rnd.getrandbits(32)]))
            path.write_bytes(data)
            try:
                coredump.build_ids(path)
            except CoreFileError:
                refused += 1
        assert refused > 0, "no mutation was refused: the fuzzing reached nothing"
        assert time.monotonic() - started < 30



class TestSubmission:
    def test_a_visible_core_gives_the_build_ids(self, crash: tuple[Path, Path], tmp_path: Path) -> None:
        """A core readable where the crash is submitted is read: the job's build-ids are the core's, whatever
        the submitter listed, and show says the core was read."""
        exe, core = crash
        rt = Retracer({"RETRACER__SERVICE__DATA_DIR": str(tmp_path / "data"),
                       "RETRACER__MAIL__ADMINS": "celso@example.com"})
        assert rt.run("db upgrade").exit_code == 0
        job = int(rt.args(
            "submit", "--crash-id", "c1", "--creator", "m@example.org", "--package", "crashy", "--version", "1",
            "--architecture", "amd64", "--release", "r", "--core", str(core), "--executable", str(exe),
            "--build-id", "0123abcd"))
        shown = rt.json(f"show {job}")
        assert shown["core_check"] == "read"
        assert shown["build_ids"] == coredump.build_ids(core)
        assert executable_build_id(exe) in shown["build_ids"]
        assert "not readable" not in rt.ok(f"show {job}")
