"""the dispatch index follows the dispatch order: priority, then age (an admin's priority is no trump card)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_index('ix_job_dispatch')
        batch_op.create_index('ix_job_dispatch', ['state', 'priority', 'id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_index('ix_job_dispatch')
        batch_op.create_index('ix_job_dispatch', ['state', 'manual_priority', 'priority', 'id'], unique=False)
