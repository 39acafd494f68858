"""an index on (state, not_before): the status report's queue and retry-time counts read it alone

With 1,000,000 jobs (20,000 queued) each of the three queries that split the queue by retry time scanned
every queued row in the table: ~29 ms each on SQLite, 0.5-2.4 ms with this index (bench/web.py).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.create_index('ix_job_retry_time', ['state', 'not_before'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_index('ix_job_retry_time')
