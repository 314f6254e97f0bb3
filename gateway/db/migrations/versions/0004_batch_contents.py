"""batch_contents: the QueryBatch bytes of a batch in a table of their own

SQLite rewrites a whole record, overflow pages included, on every UPDATE that changes the record's size. A batch's
row changes state about six times (claimed, receipted, claimed for polling, answered, acknowledged, released), and
with its ~500 KB content in the row each change rewrote the content too (about 1.6 ms against a few µs). The
content moves to ``batch_contents``, written once when the batch is formed.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batch_contents",
        sa.Column("batch_id", sa.String(length=40), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.batch_id"], name=op.f("fk_batch_contents_batch_id_batches")),
        sa.PrimaryKeyConstraint("batch_id", name=op.f("pk_batch_contents")),
    )
    op.execute("INSERT INTO batch_contents (batch_id, content) SELECT batch_id, content FROM batches")
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_column("content")


def downgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("content", sa.LargeBinary(), nullable=True))
    op.execute(
        "UPDATE batches SET content = "
        "(SELECT content FROM batch_contents WHERE batch_contents.batch_id = batches.batch_id)"
    )
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.alter_column("content", existing_type=sa.LargeBinary(), nullable=False)
    op.drop_table("batch_contents")
