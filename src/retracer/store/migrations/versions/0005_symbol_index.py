"""the symbol index: imported archives, their ELF members by build-id, and the build-ids jobs miss

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'symbol_archive',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('path', sa.Text(), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('kind', sa.String(length=10), nullable=False),
        sa.Column('package', sa.String(length=200), nullable=True),
        sa.Column('version', sa.String(length=200), nullable=True),
        sa.Column('architecture', sa.String(length=50), nullable=True),
        sa.Column('imported_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('imported_by', sa.String(length=255), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_symbol_archive')),
        sa.UniqueConstraint('sha256', name=op.f('uq_symbol_archive_sha256')),
    )
    op.create_index('ix_symbol_archive_package', 'symbol_archive', ['package', 'version'], unique=False)
    op.create_table(
        'symbol_file',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('archive_id', sa.Integer(), nullable=False),
        sa.Column('build_id', sa.String(length=128), nullable=False),
        sa.Column('kind', sa.String(length=10), nullable=False),
        sa.Column('member', sa.Text(), nullable=False),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(['archive_id'], ['symbol_archive.id'], ondelete='CASCADE',
                                name=op.f('fk_symbol_file_archive_id_symbol_archive')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_symbol_file')),
    )
    op.create_index('ix_symbol_file_build_id', 'symbol_file', ['build_id', 'kind'], unique=False)
    op.create_index(op.f('ix_symbol_file_archive_id'), 'symbol_file', ['archive_id'], unique=False)
    op.create_table(
        'missing_symbol',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('job_id', sa.Integer(), nullable=False),
        sa.Column('build_id', sa.String(length=128), nullable=False),
        sa.Column('module', sa.Text(), nullable=True),
        sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['job.id'], ondelete='CASCADE',
                                name=op.f('fk_missing_symbol_job_id_job')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_missing_symbol')),
        sa.UniqueConstraint('job_id', 'build_id', name=op.f('uq_missing_symbol_job_id')),
    )
    op.create_index(op.f('ix_missing_symbol_job_id'), 'missing_symbol', ['job_id'], unique=False)
    op.create_index(op.f('ix_missing_symbol_build_id'), 'missing_symbol', ['build_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_missing_symbol_build_id'), table_name='missing_symbol')
    op.drop_index(op.f('ix_missing_symbol_job_id'), table_name='missing_symbol')
    op.drop_table('missing_symbol')
    op.drop_index(op.f('ix_symbol_file_archive_id'), table_name='symbol_file')
    op.drop_index('ix_symbol_file_build_id', table_name='symbol_file')
    op.drop_table('symbol_file')
    op.drop_index('ix_symbol_archive_package', table_name='symbol_archive')
    op.drop_table('symbol_archive')
