"""Persistence: the schema (models), engines and sessions, bulk writes, and migrations.

Both databases go through here: SQLite (the embedded default) and PostgreSQL (at scale).
"""

from retracer.store.engine import SQLITE_BUSY_TIMEOUT_MS, make_engine, session_factory, transaction
from retracer.store.schema import alembic_config, check_schema, head_revision, upgrade

__all__ = ["SQLITE_BUSY_TIMEOUT_MS", "alembic_config", "check_schema", "head_revision", "make_engine",
           "session_factory", "transaction", "upgrade"]
