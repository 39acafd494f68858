"""The JSON API under /api: the documents `retracer status/jobs/show/rejected --json` print, read by the same
functions (retracer.reports) and written by the same encoder, so a script gets the same answer over HTTP as
on the command line.

The response models describe those documents for /openapi.json; the routes return the reports' dicts
rendered by ``reports.to_json`` rather than through the models, so that a datetime reads exactly as the
CLI prints it (pydantic would write UTC as ``Z``) and a page of jobs is not validated field by field twice.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations at definition time,
# and the page size in them is the router's own (a closure), which a string annotation could not name.
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from retracer import reports
from retracer.errors import JobNotFound
from retracer.store.models import STATES, utcnow
from retracer.web.deps import DB

#: The largest id a row can have (32-bit INTEGER columns on PostgreSQL) and the largest offset a page may
#: start at: beyond it a request is refused (422) rather than handed to the driver.
MAX_ID = 2**31 - 1

#: The workflow's states (from states/workflow.toml), as the type of the ``state`` filter: an unknown state
#: is refused with the list of the known ones.
State = StrEnum("State", {name: name for name in STATES})  # type: ignore[misc]


class JSONDocument(Response):
    """A report rendered with the CLI's JSON encoder."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return reports.to_json(content, indent=None).encode("utf-8")


# -- What the routes answer (documentation of the reports' dicts, for /openapi.json) ------------------------

class Error(BaseModel):
    """Every error: what was wrong and what to do, and the HTTP status again."""

    error: str
    status: int


class Job(BaseModel):
    """A job's fields, as `retracer jobs --json` gives them."""

    id: int
    state: State
    crash_id: str
    creator: str
    package: str
    version: str
    architecture: str
    release: str
    core: str
    executable: str
    build_ids: list[str]
    priority: int
    manual_priority: bool
    attempts: int
    not_before: datetime | None
    dispatched_at: datetime | None
    last_heartbeat: datetime | None
    worker: str | None
    upload_leaf: str | None
    upload_log: str | None
    hold_reason: str | None
    last_error: str | None
    failure_pattern: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    signature: str | None
    address_signature: str | None
    duplicate_of: int | None
    core_check: str | None


class Transition(BaseModel):
    """One recorded change of state: from, to, by which trigger, who or which event, why, when."""

    model_config = ConfigDict(populate_by_name=True)

    from_: State | None = Field(alias="from")
    to: State
    trigger: str
    by: str
    event_id: str | None
    reason: str | None
    at: datetime


class JobDetail(Job):
    """One job with its history, as `retracer show --json` gives it."""

    history: list[Transition]


class JobPage(BaseModel):
    """One page of jobs, newest first; ``next`` is the URL of the following page (null on the last)."""

    jobs: list[Job]
    total: int = Field(description="How many jobs match the filter, on all pages.")
    offset: int
    limit: int
    next: str | None


class Retracing(BaseModel):
    id: int
    package: str
    worker: str | None
    elapsed_s: int | None
    last_heartbeat: datetime | None


class Queued(BaseModel):
    id: int
    package: str
    priority: int
    manual: bool
    offered: bool


class Waiting(BaseModel):
    id: int
    package: str
    priority: int
    manual: bool
    not_before: datetime
    attempts: int


class Failure(BaseModel):
    job: int
    package: str
    trigger: str
    to: State
    reason: str | None
    at: datetime


class Held(BaseModel):
    id: int
    package: str
    reason: str | None


class Status(BaseModel):
    """The overview `retracer status --json` prints."""

    counts: dict[str, int] = Field(description="Jobs per state, every state of the workflow present.")
    retracing: list[Retracing]
    queue: list[Queued] = Field(description="The first jobs of the queue, in dispatch order.")
    queue_total: int
    waiting: list[Waiting] = Field(description="Queued jobs waiting for their retry time, the soonest first.")
    waiting_total: int
    recent_failures: list[Failure]
    on_hold: list[Held] = Field(description="The first jobs on hold, oldest first.")
    on_hold_total: int


class RejectedEvent(BaseModel):
    """An event that could not be applied, as `retracer rejected --json` gives it."""

    id: int
    event_id: str | None
    type: str | None
    job: int | None
    reason: str
    at: datetime
    replayed_at: datetime | None
    body: str
    body_bytes: int | None
    body_sha256: str | None
    truncated: bool


class RejectedPage(BaseModel):
    """One page of rejected events, oldest first; ``next`` is the URL of the following page."""

    rejected: list[RejectedEvent]
    total: int
    offset: int
    limit: int
    next: str | None


#: The errors every route may answer with, all of them {"error", "status"}.
ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"model": Error, "description": "A parameter is not valid: the reason names it and what it accepts."},
    503: {"model": Error, "description": "The database cannot be used right now; try again later."},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Error, "description": "There is no such job."}}


# -- The routes -----------------------------------------------------------------------------------------------

JobId = Annotated[int, Path(ge=1, le=MAX_ID, description="A job's id.")]
Offset = Annotated[int, Query(ge=0, le=MAX_ID, description="How many rows to skip (the page's first row).")]


def router(page_size: int) -> APIRouter:
    """The /api routes; a page holds at most ``page_size`` rows ([web] page_size), the default size."""
    api = APIRouter(prefix="/api", tags=["api"])
    Limit = Annotated[int, Query(ge=1, le=page_size, description=f"Rows per page, at most {page_size}.")]

    @api.get("/status", response_model=Status, responses=ERRORS, summary="The overview (retracer status --json)")
    def status(db: DB) -> Response:
        return JSONDocument(reports.status(db, utcnow()))

    @api.get("/jobs", response_model=JobPage, responses=ERRORS,
             summary="Jobs newest first, in one state or all (retracer jobs --json), a page at a time")
    def jobs(request: Request, db: DB, state: State | None = None, limit: Limit = page_size,
             offset: Offset = 0) -> Response:
        name = state.value if state is not None else None
        found = reports.jobs(db, name, limit, offset=offset)
        total = reports.count_jobs(db, name)
        return JSONDocument({"jobs": found, "total": total, "offset": offset, "limit": limit,
                             "next": _next(request, offset, limit, total, state=name)})

    @api.get("/jobs/{job_id}", response_model=JobDetail, responses={**NOT_FOUND, **ERRORS},
             summary="One job with its history (retracer show --json)")
    def job(job_id: JobId, db: DB) -> Response:
        try:
            return JSONDocument(reports.job_detail(db, job_id))
        except JobNotFound:
            raise HTTPException(404, f"job {job_id} does not exist (GET /api/jobs lists the jobs)") from None

    @api.get("/rejected", response_model=RejectedPage, responses=ERRORS,
             summary="Events that could not be applied, oldest first (retracer rejected --json), a page at a time")
    def rejected(request: Request, db: DB, limit: Limit = page_size, offset: Offset = 0,
                 include_replayed: Annotated[bool, Query(alias="all", description="Include events already "
                                                         "replayed (retracer rejected --all).")] = False,
                 ) -> Response:
        found = reports.rejected(db, include_replayed, limit, offset)
        total = reports.count_rejected(db, include_replayed)
        return JSONDocument({"rejected": found, "total": total, "offset": offset, "limit": limit,
                             "next": _next(request, offset, limit, total,
                                           all="true" if include_replayed else None)})

    return api


def _next(request: Request, offset: int, limit: int, total: int, **filters: str | None) -> str | None:
    """The following page's URL, relative to this server (right behind a proxy too), or None on the last."""
    if offset + limit >= total or offset + limit > MAX_ID:
        return None
    params = {k: v for k, v in filters.items() if v is not None} | {"limit": limit, "offset": offset + limit}
    return f"{request.url.path}?{urlencode(params)}"
