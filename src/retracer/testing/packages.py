"""Debian packages made for real, for the tests and the benchmarks: a program built by gcc (the crash of
retracer.testing.crashes), its debug information split off, the stripped program packed into a .deb at
/usr/bin/NAME and its debug file into a .ddeb at /usr/lib/debug/.build-id/xx/rest.debug, both by
``dpkg-deb -b`` as a Debian or Ubuntu build would."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from retracer.testing.crashes import CRASH_SOURCE, CrashNotMade, Program, build, run

#: What making packages takes, besides what making a crash takes.
TOOLS = ("gcc", "objcopy", "dpkg-deb")


@dataclass(frozen=True)
class Packages:
    """A .deb with a program and the .ddeb with its debug information."""

    deb: Path
    ddeb: Path
    build_id: str
    name: str
    version: str
    architecture: str
    executable_member: str   # "/usr/bin/NAME" inside the .deb
    debug_member: str        # "/usr/lib/debug/.build-id/xx/rest.debug" inside the .ddeb
    program: Program         # the files the packages were made from (the unstripped build among them)

    @property
    def dbgsym(self) -> str:
        return f"{self.name}-dbgsym"


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def debug_member(build_id: str) -> str:
    return f"/usr/lib/debug/.build-id/{build_id[:2]}/{build_id[2:]}.debug"


def _architecture() -> str:
    try:
        out = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,  # noqa: S607
                             timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "amd64"
    return out or "amd64"


def _control(fields: dict[str, str]) -> str:
    return "".join(f"{key}: {value}\n" for key, value in fields.items())


def _pack(root: Path, control: dict[str, str], out: Path, compression: str) -> Path:
    debian = root / "DEBIAN"
    debian.mkdir(parents=True, exist_ok=True)
    (debian / "control").write_text(_control(control), encoding="utf-8")
    # dpkg-deb refuses a control directory a umask left group-writable or too closed.
    for directory, _, _ in os.walk(root):
        os.chmod(directory, 0o755)  # noqa: S103 - dpkg-deb wants exactly this mode
    run(["dpkg-deb", "--root-owner-group", f"-Z{compression}", "-b", str(root), str(out)], root.parent,
        f"dpkg-deb -b {out.name}")
    return out


def make_packages(where: Path, name: str = "crashy", version: str = "1.0-1", architecture: str | None = None,
                  source: str = CRASH_SOURCE, variant: int | None = None, compression: str = "xz") -> Packages:
    """Build ``source`` under ``where`` and pack it: ``where/NAME_VERSION_ARCH.deb`` and ``.ddeb``.

    ``variant`` adds a global to the source so that each variant gets its own build-id (the benchmark makes
    many packages of one program). ``compression`` is dpkg-deb's -Z (xz, gzip, zstd, none)."""
    if missing_tools():
        raise CrashNotMade(f"making packages needs {', '.join(missing_tools())}")
    arch = architecture or _architecture()
    if variant is not None:
        source = f"{source}int retracer_variant_{variant} = {variant};\n"
    work = where / f"{name}-build"
    program = build(work, source=source, name=name)
    full = program.unstripped
    build_id = program.build_id
    exe_root = work / "deb-root"
    dbg_root = work / "ddeb-root"
    for root in (exe_root, dbg_root):
        if root.exists():
            shutil.rmtree(root)
    exe = exe_root / "usr" / "bin" / name
    exe.parent.mkdir(parents=True)
    dbg = dbg_root / debug_member(build_id).lstrip("/")
    dbg.parent.mkdir(parents=True)
    run(["objcopy", "--only-keep-debug", str(full), str(dbg)], work, "objcopy --only-keep-debug")
    run(["objcopy", "--strip-debug", str(full), str(exe)], work, "objcopy --strip-debug")
    exe.chmod(0o755)
    dbg.chmod(0o644)
    file_version = version.split(":", 1)[-1]
    deb = _pack(exe_root, {"Package": name, "Version": version, "Architecture": arch,
                           "Maintainer": "Retracer Tests <tests@example.invalid>", "Section": "devel",
                           "Priority": "optional", "Description": "a program that crashes, for the tests"},
                where / f"{name}_{file_version}_{arch}.deb", compression)
    ddeb = _pack(dbg_root, {"Package": f"{name}-dbgsym", "Source": name, "Version": version,
                            "Architecture": arch, "Maintainer": "Retracer Tests <tests@example.invalid>",
                            "Section": "debug", "Priority": "optional", "Depends": f"{name} (= {version})",
                            "Auto-Built-Package": "debug-symbols", "Build-Ids": build_id,
                            "Description": f"debug symbols for {name}"},
                 where / f"{name}-dbgsym_{file_version}_{arch}.ddeb", compression)
    return Packages(deb=deb, ddeb=ddeb, build_id=build_id, name=name, version=version, architecture=arch,
                    executable_member=f"/usr/bin/{name}", debug_member=debug_member(build_id), program=program)
