"""What a submitted crash's core says before any worker sees it: its build-ids, or that it is no core.

A core that is a readable file where the crash is submitted (`retracer submit`, or `serve` applying a
published crash.submitted) is read: its build-ids replace what the submitter listed, and a file that is not a
core is refused. A path that cannot be read here is accepted as given: workers may see storage that serve does
not, and `retracer show` says the core was not read.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from retracer.worker.coredump import CoreFileError, build_ids

READ = "read"
UNREADABLE = "unreadable"

@dataclass(frozen=True)
class CoreCheck:
    """``status`` is READ (``build_ids`` from the core) or UNREADABLE; ``refused`` says why it is no core."""

    status: str
    build_ids: tuple[str, ...] = ()
    refused: str | None = None


def check_core(path: str) -> CoreCheck:
    """Read the core at ``path`` if it is visible here; never raises."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):  # missing, not permitted, a name too long: not visible from here
        return CoreCheck(UNREADABLE)
    if not stat.S_ISREG(info.st_mode):
        return CoreCheck(UNREADABLE, refused=f"core {path} is not a regular file; give the path of the core "
                                             f"dump itself")
    if not os.access(path, os.R_OK):
        return CoreCheck(UNREADABLE)
    try:
        found = build_ids(path)
    except CoreFileError as exc:
        if "cannot be read" in str(exc):
            return CoreCheck(UNREADABLE)
        return CoreCheck(UNREADABLE, refused=f"core {path} is not a usable core dump: {exc}")
    return CoreCheck(READ, tuple(found))
