"""The symbol index over HTTP: Darkserver's build-id lookups and the debuginfod protocol, from one store.

Darkserver's shapes answer "which package built this ELF file?" as JSON: ``GET /buildids/{id}[,{id}...]``
and ``GET /package/{name}/{version}/buildids``. The debuginfod protocol (``GET /buildid/{id}/debuginfo`` and
``/executable``) serves the files themselves, streamed out of the imported .deb/.ddeb (or loose file) where it
lies, so that gdb, ``debuginfod-find`` or another debuginfod server (as an upstream) can use retracer as a
symbol server: give its base URL (``http://host:port``) in DEBUGINFOD_URLS.

What real debuginfod (elfutils 0.188) sends is matched where its clients look: 200 with
``application/octet-stream``, Content-Length and the X-DEBUGINFOD-FILE/-SIZE/-ARCHIVE headers; 404 for a
build-id it does not have (the client caches that as a miss). A Range header is ignored there and here (the
client never sends one). Unlike it, HEAD answers with the headers alone (it answers 400), and a malformed
build-id gets 422 with the reason (it answers 503 "invalid buildid").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from email.utils import formatdate
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError

from retracer.errors import RetracerError
from retracer.symbols import members
from retracer.symbols.index import (
    KINDS,
    MAX_BUILD_ID_HEX,
    MIN_BUILD_ID_HEX,
    BadBuildId,
    Found,
    find,
    lookup,
    normalise_build_id,
    package_files,
)
from retracer.web.api import Error
from retracer.web.deps import DB

log = logging.getLogger("retracer.web")
router = APIRouter(tags=["symbols"])

#: Build-ids one ``/buildids/`` request may ask about: a client with more asks again (a URL of 100 SHA-1
#: build-ids is 4 KiB, within every proxy's limit on a request line).
MAX_IDS = 100
#: Bytes read from an archive and sent at a time.
CHUNK = 256 * 1024

IMPORT_HINT = "import the package that holds it with `retracer symbols import PACKAGE.deb`"
#: What a build-id looks like, for the description only: the routes check it themselves, to say what is wrong.
BUILD_ID_PATTERN = f"(?:[0-9a-fA-F]{{2}}){{{MIN_BUILD_ID_HEX // 2},{MAX_BUILD_ID_HEX // 2}}}"
ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"model": Error, "description": "Not a build-id, or too many: the reason says which and why."},
    503: {"model": Error, "description": "The index's database cannot be read right now; try again later."},
}


class DarkserverEntry(BaseModel):
    """One indexed ELF file, as Darkserver answered: its build-id, its path in the package, the package."""

    buildid: str
    elf: str
    package: str | None
    version: str | None
    architecture: str | None
    kind: str


def _unavailable(exc: SQLAlchemyError) -> HTTPException:
    # The details stay in the server's log; the client learns that asking again later is the remedy.
    log.warning("symbol index unreadable", extra={"error": str(exc).splitlines()[0][:500] if str(exc) else ""})
    return HTTPException(503, f"the symbol index's database cannot be read right now ({type(exc).__name__}); "
                              f"try again later")


def _build_ids(text: str) -> list[str]:
    parts = text.split(",")
    if not all(parts):
        raise HTTPException(422, "an empty build-id in the list (a comma too many?): ask for /buildids/ID or "
                                 "/buildids/ID1,ID2 (hex build-ids separated by single commas)")
    if len(parts) > MAX_IDS:
        raise HTTPException(422, f"{len(parts)} build-ids asked at once; at most {MAX_IDS} per request: split "
                                 f"the list over several requests")
    return [_build_id(p) for p in parts]


def _build_id(text: str) -> str:
    if text != text.strip():
        raise HTTPException(422, f"build-id {text[:80]!r} has spaces around it: give hex digits alone")
    try:
        return normalise_build_id(text)
    except BadBuildId as exc:
        raise HTTPException(422, str(exc)) from None


_IDS_PATTERN = f"^{BUILD_ID_PATTERN}(?:,{BUILD_ID_PATTERN}){{0,{MAX_IDS - 1}}}$"
_IDS = Annotated[str, Path(description=f"One build-id, or several separated by commas (at most {MAX_IDS}), as hex",
                           json_schema_extra={"pattern": _IDS_PATTERN})]


@router.get("/buildids/{build_ids}", response_model=list[DarkserverEntry], responses=ERRORS,
            summary="Which packages hold these build-ids (Darkserver)")
def buildids(build_ids: _IDS, db: DB) -> list[dict[str, str | None]]:
    """Every indexed ELF file with one of the build-ids, in the order asked; a build-id the index does not
    hold is simply absent from the list (an empty list when none is known)."""
    wanted = _build_ids(build_ids)
    try:
        return [found.darkserver() for found in lookup(db, wanted)]
    except SQLAlchemyError as exc:
        raise _unavailable(exc) from None


@router.get("/package/{name}/{version}/buildids", response_model=list[DarkserverEntry],
            responses={404: {"model": Error, "description": "The index holds no file of that package version."},
                       503: ERRORS[503]},
            summary="The build-ids of one version of a package (Darkserver)")
def package_buildids(name: str, version: str, db: DB) -> list[dict[str, str | None]]:
    """Every indexed ELF file of the package at this version (all its architectures); 404 when the index holds
    no file of it."""
    try:
        files = package_files(db, name, version)
    except SQLAlchemyError as exc:
        raise _unavailable(exc) from None
    if not files:
        raise HTTPException(404, f"the symbol index holds no ELF file of package {name[:200]!r} version "
                                 f"{version[:200]!r}: check the name and version (`retracer symbols package "
                                 f"NAME`), or import it with `retracer symbols import PACKAGE.deb`")
    return [found.darkserver() for found in files]


def _found(db: DB, build_id: str, kind: str) -> Found:
    value = _build_id(build_id)
    try:
        found = find(db, value, kind)
    except SQLAlchemyError as exc:
        raise _unavailable(exc) from None
    if found is None:
        what = "debug information" if kind == "debuginfo" else "executable or shared library"
        raise HTTPException(404, f"build-id {value} has no {what} in the symbol index: {IMPORT_HINT}")
    return found


def header_value(text: str) -> str:
    """``text`` as an HTTP header value: printable ASCII kept, anything else (a UTF-8 file name, a control
    character) percent-encoded, as a header carries neither."""
    return quote(text, safe="/!$&'()*+,;=:@~ ")


def _headers(found: Found) -> dict[str, str]:
    headers = {"Content-Length": str(found.size), "X-DEBUGINFOD-SIZE": str(found.size),
               "X-DEBUGINFOD-FILE": header_value(found.member), "Cache-Control": "public"}
    if found.archive_kind != "file":
        headers["X-DEBUGINFOD-ARCHIVE"] = header_value(found.archive_path)
    with suppress(OSError):  # the open below says what is wrong with the archive
        headers["Last-Modified"] = formatdate(os.stat(found.archive_path).st_mtime, usegmt=True)
    return headers


def _chunks(stack: ExitStack, stream: members.MemberReader, size: int) -> Iterator[bytes]:
    """The member's bytes, ``size`` of them at most (the Content-Length promised); closes the archive when done,
    or when the client goes away and the response is dropped."""
    with stack:
        left = size
        while left > 0:
            try:
                data = stream.read(min(CHUNK, left))
            except (RetracerError, OSError) as exc:
                log.warning("symbol file cut short", extra={"error": str(exc)[:500]})
                data = b""
            if not data:
                # The archive changed or broke under the index: the connection is closed short of
                # Content-Length, which every HTTP client reports as a failed download (not as a wrong file).
                return
            left -= len(data)
            yield data


def _serve(request: Request, db: DB, build_id: str, kind: str) -> Response:
    found = _found(db, build_id, kind)
    headers = _headers(found)
    if request.method == "HEAD":
        return Response(status_code=200, headers=headers, media_type="application/octet-stream")
    stack = ExitStack()
    try:
        stream = stack.enter_context(members.open_member(found))
    except (RetracerError, OSError) as exc:
        stack.close()
        where = found.archive_path
        raise HTTPException(404, f"build-id {found.build_id}'s {kind} is indexed in {where} ({found.member}), but "
                                 f"it cannot be read from there ({exc}); re-import the package where it now lies "
                                 f"with `retracer symbols import`") from None
    return StreamingResponse(_chunks(stack, stream, found.size), headers=headers,
                             media_type="application/octet-stream")


_ID = Annotated[str, Path(description="The GNU build-id, as hex",
                          json_schema_extra={"pattern": f"^{BUILD_ID_PATTERN}$"})]
_FILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}},
          "description": "The file, with X-DEBUGINFOD-FILE, X-DEBUGINFOD-SIZE and X-DEBUGINFOD-ARCHIVE"},
    404: {"model": Error, "description": "The index holds no such file (or its archive cannot be read)"},
    **ERRORS,
}


@router.get("/buildid/{build_id}/debuginfo", response_class=Response, responses=_FILE_RESPONSES,
            summary="The debug information of a build-id (debuginfod)")
def debuginfo(build_id: _ID, request: Request, db: DB) -> Response:
    """The separate debug file (from a -dbgsym .ddeb/.deb, or a loose .debug file) for the build-id."""
    return _serve(request, db, build_id, KINDS[1])


@router.get("/buildid/{build_id}/executable", response_class=Response, responses=_FILE_RESPONSES,
            summary="The executable or shared library of a build-id (debuginfod)")
def executable(build_id: _ID, request: Request, db: DB) -> Response:
    """The executable or shared library with the build-id, out of the package that ships it."""
    return _serve(request, db, build_id, KINDS[0])


# HEAD: the same answer without the body (left out of the description: one operation per route there).
for _path, _endpoint in (("/buildid/{build_id}/debuginfo", debuginfo), ("/buildid/{build_id}/executable", executable)):
    router.add_api_route(_path, _endpoint, methods=["HEAD"], response_class=Response, include_in_schema=False)


@router.get("/buildid/{build_id}/source/{path:path}", response_class=Response,
            responses={404: {"model": Error, "description": "Source files are not indexed"}},
            summary="Source files (not indexed: always 404)")
def source(build_id: str, path: str) -> Response:
    """Source files are not indexed (only ELF members are): always 404, so that a client with several servers
    asks the next one."""
    raise HTTPException(404, "retracer's symbol index holds debug information and executables, not source "
                             "files: add a debuginfod server that indexes source packages to DEBUGINFOD_URLS")


@router.get("/buildid/{build_id}/{artifact}", response_class=Response,
            responses={404: {"model": Error, "description": "Not an artifact this server serves"}},
            summary="Any other debuginfod artifact (404)")
def other(build_id: str, artifact: str) -> Response:
    """Artifacts other than debuginfo, executable and source (``section`` of newer servers among them)."""
    raise HTTPException(404, f"{artifact[:40]!r} is not served: ask /buildid/ID/debuginfo or "
                             f"/buildid/ID/executable")
