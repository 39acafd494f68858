"""A retraced crash as an upload in the spool.

The upload is written as ``incoming/.tmp-<leaf>/`` and renamed to ``incoming/<leaf>/`` once complete, so that
`serve` never reads half of one. Every file and both directories are fsynced before the worker acknowledges
the work request: after a power cut the upload is either whole in incoming/ or not there at all, and in the
second case the request is still on the queue (RabbitMQ) or the job's heartbeats stop (embedded mode), so
the crash is retraced again either way.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from retracer.errors import RetracerError
from retracer.uploads.files import (
    BACKTRACE,
    DIR_FLAGS,
    INCOMING,
    MANIFEST,
    WORKER_LOG,
    leaf_name_problem,
    rename_noreplace,
)
from retracer.worker.request import Request, Retraced

FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def leaf_for(request: Request) -> str:
    """A fresh upload name for one attempt: the job and attempt for whoever reads the spool, and a random part
    so that a request delivered twice (at-least-once) never collides with the upload of the first delivery."""
    return f"job{request.job}-attempt{request.attempt}-{uuid.uuid4().hex[:12]}"


def manifest_for(request: Request, outcome: Retraced, worker: str) -> dict[str, Any]:
    """What manifest.json holds: the request's job, crash and build-ids, who retraced it, which attempt, and
    the crash's signatures when the engine found them."""
    manifest: dict[str, Any] = {"job": request.job, "crash_id": request.crash_id,
                                "build_ids": list(request.build_ids), "worker": worker,
                                "attempt": request.attempt}
    if outcome.signature:
        manifest["signature"] = outcome.signature
    if outcome.address_signature:
        manifest["address_signature"] = outcome.address_signature
    return manifest


def _utf8(text: str) -> bytes:
    # gdb's output may carry bytes that are not UTF-8 (decoded as surrogate escapes): the spool takes UTF-8
    # only, and an escaped byte stays visible to whoever reads the backtrace.
    return text.encode("utf-8", "backslashreplace")


def _write_file(dir_fd: int, name: str, data: bytes) -> None:
    fd = os.open(name, FILE_FLAGS, 0o644, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_upload(spool_dir: Path, leaf: str, manifest: dict[str, Any], backtrace: str, log: str) -> Path:
    """Write the upload durably and return its path in incoming/; RetracerError if the spool refuses it."""
    problem = leaf_name_problem(leaf)
    if problem is not None:
        raise RetracerError(problem)
    incoming = spool_dir / INCOMING
    tmp = f".tmp-{leaf}"
    files = ((MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")),
             (BACKTRACE, _utf8(backtrace)), (WORKER_LOG, _utf8(log)))
    try:
        incoming_fd = os.open(incoming, DIR_FLAGS)
    except OSError as exc:
        raise RetracerError(f"the spool's {incoming} cannot be opened ({exc.strerror}); check [spool] path and "
                            f"that this worker may write there (shared storage mounted?)") from None
    try:
        try:
            os.mkdir(tmp, 0o755, dir_fd=incoming_fd)
            tmp_fd = os.open(tmp, DIR_FLAGS, dir_fd=incoming_fd)
            try:
                for name, data in files:
                    _write_file(tmp_fd, name, data)
                os.fsync(tmp_fd)
            finally:
                os.close(tmp_fd)
            rename_noreplace(tmp, leaf, incoming_fd, incoming_fd)
            os.fsync(incoming_fd)
        except OSError as exc:
            shutil.rmtree(incoming / tmp, ignore_errors=True)
            raise RetracerError(f"the upload {incoming / leaf} could not be written ({exc.strerror}); check the "
                                f"spool's disk (space, permissions) and [spool] path") from None
    finally:
        os.close(incoming_fd)
    return incoming / leaf
