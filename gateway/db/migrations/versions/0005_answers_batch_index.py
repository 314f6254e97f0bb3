"""drop ix_answers_batch_id: no query reads answers by batch

Answers are read by item (reports, progress); the batch id on each answer stays (with its foreign key) for the
record, but keeping an index on it cost an index insert per stored answer for nothing.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("answers", schema=None) as batch_op:
        batch_op.drop_index("ix_answers_batch_id")


def downgrade() -> None:
    with op.batch_alter_table("answers", schema=None) as batch_op:
        batch_op.create_index("ix_answers_batch_id", ["batch_id"], unique=False)
