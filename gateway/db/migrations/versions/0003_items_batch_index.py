"""drop ix_items_batch: the items of a batch are found through ix_items_queue (unit, batch)

Every item's batch_id is set once, when its batch is formed, and each index on it costs a delete and an insert
per item then (and an insert at enqueue). The only query by batch reads the items of one batch of one unit, which
the queue index (unit_id, batch_id, commission_id, id) answers as well, so the second index is dropped.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.drop_index("ix_items_batch")


def downgrade() -> None:
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.create_index("ix_items_batch", ["batch_id"], unique=False)
