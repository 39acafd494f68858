"""The HTML pages: the status overview, one job in full, rejected events and the workflow diagram.

Read-only, and safe by construction: Jinja2 templates named ``*.html`` (autoescaped: select_autoescape looks
at the last extension) with StrictUndefined, no script anywhere (the app's CSP forbids every script), the
stylesheet served from this app (the CSP allows styles from 'self' only, so no inline style), every list
bounded by ``[web] page_size``. Where an admin would act, a page shows the command to paste, taken from the
admins' mail for the job's state (retracer.web.actions), so page and mail say the same thing.
"""

from __future__ import annotations

from datetime import datetime
from functools import cache
from http import HTTPStatus
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from retracer import __version__, reports
from retracer.config import Config
from retracer.store.models import Job, utcnow
from retracer.symbols import missing
from retracer.web import actions, diagram, humane
from retracer.web.deps import DB, Cfg
from retracer.workflow import load_spec

router = APIRouter(include_in_schema=False)

#: Path prefixes answered with JSON (the API, metrics, the symbol routes); every other path is a page.
MACHINE_PREFIXES = ("/api/", "/metrics", "/openapi.json", "/buildids/", "/buildid/", "/package/")
TEMPLATE_PACKAGE = "retracer.web_templates"
STYLESHEET = "retracer.css"
#: The largest id a job can have (the column is a 32-bit integer on PostgreSQL): a larger one is no job.
MAX_ID = 2**31 - 1
#: How much of a backtrace or log a job page shows; the rest stays in the results directory / the spool.
MAX_TEXT = 256 * 1024
#: The deepest page a list may be asked for: an offset past millions of rows costs a scan for nothing.
MAX_PAGE = 10_000

JobId = Annotated[int, Path(ge=1, le=MAX_ID, description="A job id, as `retracer jobs` lists them.")]
PageNo = Annotated[int, Query(ge=1, le=MAX_PAGE)]


def is_page(path: str) -> bool:
    """Whether an error at ``path`` is shown as an HTML page rather than as JSON."""
    return not path.startswith(MACHINE_PREFIXES)


@cache
def environment() -> Environment:
    """The one Jinja environment of the pages: package templates, autoescaped, strict about undefined names."""
    env = Environment(
        loader=PackageLoader(TEMPLATE_PACKAGE, "."),
        autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=True, default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,
    )
    env.filters["exact"] = humane.exact
    env.filters["span"] = humane.span
    env.filters["iso"] = lambda when: when.isoformat() if isinstance(when, datetime) else ""
    env.globals["version"] = __version__
    return env


def render(name: str, status: int = 200, **values: Any) -> HTMLResponse:
    spec = load_spec()
    now: datetime = values.pop("now", None) or utcnow()
    html = environment().get_template(name).render(
        now=now, ago=lambda when: humane.relative(when, now), states=spec.states, roles=spec.roles, **values)
    return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})


def error_page(request: Request, status: int, message: str) -> Response:
    """An error as a page that says what was wrong and where to go from there."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return render("error.html", status=status, status_code=status, phrase=phrase, message=message,
                  path=request.url.path)


@router.get("/", response_class=HTMLResponse)
def overview(db: DB, cfg: Cfg, queue_page: PageNo = 1) -> Response:
    size = _page_size(cfg)
    data = reports.overview(db, size, queue_page)
    held = data["on_hold"]["jobs"]
    last = reports.latest_history(db, [j.id for j in held])
    commands = {j.id: actions.for_job(cfg, j, last.get(j.id)) for j in held}
    return render("overview.html", now=data["now"], data=data, commands=commands, retracer=actions.prefix(cfg))


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: JobId, db: DB, cfg: Cfg) -> Response:
    job = db.get(Job, job_id)
    if job is None:
        raise HTTPException(404, f"There is no job {job_id}. `retracer jobs` lists the jobs there are; the "
                                 f"status page links each one.")
    history = reports.history_of(db, job_id)
    size = _page_size(cfg)
    duplicates = reports.jobs(db, limit=size, duplicates_of=job_id)
    duplicates_total = len(duplicates) if len(duplicates) < size else reports.count_duplicates(db, job_id)
    original = db.get(Job, job.duplicate_of) if job.duplicate_of is not None else None
    stored = cfg.results_dir / str(job_id) / "backtrace.txt"
    return render("job.html", job=job, fields=reports.job_dict(job), history=history,
                  mails=reports.mails_of(db, job_id), duplicates=duplicates, duplicates_total=duplicates_total,
                  original=original, actions=actions.for_job(cfg, job, history[-1] if history else None),
                  retracer=actions.prefix(cfg), result=_cut(job.result), upload_log=_cut(job.upload_log),
                  stored=str(stored), max_text=MAX_TEXT, missing=missing.of_job(db, job_id))


@router.get("/rejected", response_class=HTMLResponse)
def rejected_page(db: DB, cfg: Cfg, page: PageNo = 1,
                  replayed: Annotated[bool, Query(description="Include events already replayed.")] = False
                  ) -> Response:
    data = reports.rejected_page(db, page, _page_size(cfg), include_replayed=replayed)
    return render("rejected.html", data=data, replayed=replayed, retracer=actions.prefix(cfg))


@router.get("/workflow", response_class=HTMLResponse)
def workflow_page() -> Response:
    spec = load_spec()
    return render("workflow.html", diagram=Markup(diagram.svg(spec)),  # noqa: S704  (every text in it is escaped)
                  transitions=spec.transitions, initial=spec.initial)


@router.get("/static/retracer.css")
def stylesheet() -> Response:
    return Response(_stylesheet(), media_type="text/css; charset=utf-8",
                    headers={"Cache-Control": "public, max-age=3600"})


@cache
def _stylesheet() -> bytes:
    return resources.files(TEMPLATE_PACKAGE).joinpath(STYLESHEET).read_bytes()


def _page_size(cfg: Config) -> int:
    return int(cfg["web"]["page_size"])


def _cut(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    return {"text": text[:MAX_TEXT], "cut": len(text) > MAX_TEXT, "length": len(text)}

