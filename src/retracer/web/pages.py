"""The HTML pages (placeholder: filled in by its owner)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

router = APIRouter()

#: Path prefixes answered with JSON (the API, metrics, the symbol routes); every other path is a page.
MACHINE_PREFIXES = ("/api/", "/metrics", "/openapi.json", "/buildids/", "/buildid/", "/package/")


def is_page(path: str) -> bool:
    """Whether an error at ``path`` is shown as an HTML page rather than as JSON."""
    return not path.startswith(MACHINE_PREFIXES)


def error_page(request: Request, status: int, message: str) -> Response:
    from html import escape
    return HTMLResponse(f"<!doctype html><title>{status}</title><p>{escape(message)}</p>", status_code=status)
