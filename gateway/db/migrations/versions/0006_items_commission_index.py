"""ix_items_commission: a commission's items without reading every item of every commission

Progress (GetProgress) and reports select a commission's items. No index led with the commission, so each of those
queries read the whole items table, which grows by millions of rows a month — and on SQLite every transaction,
reads included, holds the write lock, so a slow progress query held up the exchange. The index holds the
commission and the unit, which never change after enqueue, so forming batches does not touch it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.create_index("ix_items_commission", ["commission_id", "unit_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.drop_index("ix_items_commission")
