"""What every route shares: the configuration and a read-only database session per request."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import suppress
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from retracer.config import Config


def config(request: Request) -> Config:
    value: Config = request.app.state.config
    return value


def _factory(request: Request) -> sessionmaker[Session]:
    value: sessionmaker[Session] = request.app.state.factory
    return value


def session(request: Request) -> Iterator[Session]:
    """A session for one request, rolled back at its end: the web app changes nothing."""
    db = _factory(request)()
    try:
        yield db
    finally:
        # After the database went away the route's own error is the one to answer with (503); ending a
        # session on a dead connection must not turn it into another.
        with suppress(SQLAlchemyError):
            db.rollback()
        with suppress(SQLAlchemyError):
            db.close()


#: Route parameters: ``db: DB`` and ``cfg: Cfg``.
DB = Annotated[Session, Depends(session)]
Cfg = Annotated[Config, Depends(config)]
