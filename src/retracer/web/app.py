"""The ASGI app: FastAPI (typed routes give the OpenAPI description at /openapi.json for free, and it is
Starlette underneath for the HTML pages), with the security headers every response carries and JSON errors
for every machine-read route."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DatabaseError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint

from retracer import __version__
from retracer.config import Config
from retracer.web import api, metrics, pages, symbols

log = logging.getLogger(__name__)

#: No script from anywhere, styles only from this server, no framing, no plugins: a value that slipped past
#: escaping still could not run. Pages carry no script at all.
CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")


class SecurityHeaders(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("X-Frame-Options", "DENY")
        return response


def create_app(config: Config, factory: sessionmaker[Session]) -> FastAPI:
    """The whole web app on one database: pages, /api, /metrics, the symbol routes."""
    app = FastAPI(title="retracer", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json",
                  description="Read-only status of a retracer instance, and its symbol index.")
    app.state.config = config
    app.state.factory = factory
    app.add_middleware(SecurityHeaders)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    for unusable in (DatabaseError, InterfaceError, PoolTimeout):
        app.add_exception_handler(unusable, _database_down)
    app.add_exception_handler(Exception, _bug)
    app.include_router(pages.router)
    app.include_router(api.router(config["web"]["page_size"]))
    app.include_router(metrics.router)
    app.include_router(symbols.router)
    return app


def _wants_html(request: Request) -> bool:
    return pages.is_page(request.url.path)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)  # noqa: S101  (registered for this class only)
    if _wants_html(request):
        return pages.error_page(request, exc.status_code, str(exc.detail))
    return JSONResponse({"error": exc.detail, "status": exc.status_code}, status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def _invalid_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)  # noqa: S101  (registered for this class only)
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
    if _wants_html(request):
        return pages.error_page(request, 422, problems)
    return JSONResponse({"error": problems, "status": 422}, status_code=422)


def _error(request: Request, status: int, message: str) -> Response:
    if _wants_html(request):
        return pages.error_page(request, status, message)
    return JSONResponse({"error": message, "status": status}, status_code=status)


async def _database_down(request: Request, exc: Exception) -> Response:
    """The database went away, refuses connections, is locked for too long or is not a database (a damaged
    SQLite file): a 503 that says so, never a traceback."""
    if isinstance(exc, DatabaseError) and type(exc) is not DatabaseError and not isinstance(exc, OperationalError):
        raise exc  # a constraint or SQL error is a bug of ours, not an outage: the 500 handler answers it
    reason = str(getattr(exc, "orig", None) or exc).strip()
    first = reason.splitlines()[0] if reason else type(exc).__name__
    log.warning("database unusable while serving %s", request.url.path, extra={"error": first})
    return _error(request, 503, f"the database cannot be used right now ({first}); try again in a moment. "
                                f"If it lasts, an admin can check it with `retracer check-config`.")


async def _bug(request: Request, exc: Exception) -> Response:
    # Starlette logs the traceback after this answer; the client gets the same JSON shape as every error.
    return _error(request, 500, "internal error: the server's log has the details")
