"""The schema's migrations (alembic): create or upgrade a database, and check that one is current."""

from __future__ import annotations

from importlib import resources
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from retracer.errors import DatabaseNotReady


def alembic_config(url: str) -> Any:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(resources.files("retracer.store.migrations")))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (alembic upgrade)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    if head is None:
        raise DatabaseNotReady("this retracer installation ships no migrations: reinstall the package")
    return head


def check_schema(engine: Engine) -> None:
    """Raise DatabaseNotReady unless the schema is at the shipped head revision."""
    from alembic.runtime.migration import MigrationContext

    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
            has_tables = inspect(conn).has_table("job")
    except OperationalError as exc:
        raise DatabaseNotReady(f"cannot open the database {engine.url!r}: {exc.orig}") from None
    head = head_revision()
    if current != head or not has_tables:
        raise DatabaseNotReady(
            f"the database {engine.url.render_as_string(hide_password=True)} is at schema revision "
            f"{current or 'none'}, retracer needs {head}: run `retracer db upgrade`"
        )
