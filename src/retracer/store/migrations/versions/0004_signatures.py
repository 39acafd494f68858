"""a job's crash signatures and the job it duplicates; whether serve could read its core

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.add_column(sa.Column('signature', sa.String(length=1024), nullable=True))
        batch_op.add_column(sa.Column('address_signature', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('duplicate_of', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('core_check', sa.String(length=20), nullable=True))
        batch_op.create_index('ix_job_signature', ['signature'], unique=False)
        batch_op.create_index('ix_job_duplicate_of', ['duplicate_of'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_index('ix_job_duplicate_of')
        batch_op.drop_index('ix_job_signature')
        batch_op.drop_column('core_check')
        batch_op.drop_column('duplicate_of')
        batch_op.drop_column('address_signature')
        batch_op.drop_column('signature')
