"""Alembic environment: runs migrations on the URL that `retracer db upgrade` passes in."""

from __future__ import annotations

from alembic import context

from retracer.store import make_engine
from retracer.store.models import Base

config = context.config
url = config.get_main_option("sqlalchemy.url") or ""
engine = make_engine(url, create=True)  # migrating is how a database comes to be
with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite cannot ALTER most things; batch mode copies the table (needs named constraints).
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
