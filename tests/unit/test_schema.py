"""The migrations and the models describe the same schema: a database migrated to head differs in nothing."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from retracer import store
from retracer.store.models import Base


def test_migrated_database_matches_the_models(db_url: str) -> None:
    """Every table, column, index and constraint the models declare is what `retracer db upgrade` made, on
    SQLite and on PostgreSQL (a model changed without its migration fails here)."""
    engine = store.make_engine(db_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []
