"""bounds for hostile input: a digest per processed event (an id reused for other content is told from a
redelivery), rejected events kept as a bounded prefix with size and digest, actors as long as a source or an
admin's name makes them

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('processed_event', schema=None) as batch_op:
        batch_op.add_column(sa.Column('digest', sa.String(length=64), nullable=True))
    with op.batch_alter_table('rejected', schema=None) as batch_op:
        batch_op.add_column(sa.Column('body_bytes', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('body_sha256', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('truncated', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('minted', sa.Boolean(), server_default=sa.false(), nullable=False))
    for table, column in (('history', 'actor'), ('audit', 'actor'), ('spurious_pattern', 'added_by')):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column(column, existing_type=sa.String(length=200), type_=sa.String(length=255),
                                  existing_nullable=False)


def downgrade() -> None:
    for table, column in (('history', 'actor'), ('audit', 'actor'), ('spurious_pattern', 'added_by')):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column(column, existing_type=sa.String(length=255), type_=sa.String(length=200),
                                  existing_nullable=False)
    with op.batch_alter_table('rejected', schema=None) as batch_op:
        batch_op.drop_column('minted')
        batch_op.drop_column('truncated')
        batch_op.drop_column('body_sha256')
        batch_op.drop_column('body_bytes')
    with op.batch_alter_table('processed_event', schema=None) as batch_op:
        batch_op.drop_column('digest')
