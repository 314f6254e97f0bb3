"""archive: outgoing envelopes and a place in the audit chain

The archive kept only the envelopes received from units. It now keeps each query batch envelope sent as well
(``direction`` "out"; every earlier row is "in"), and each envelope kept from now on is named by an audit chain entry
(``audit_seq``, the first entry that names it) that records its message id and SHA-256 (``sha256``). Rows from
before this revision keep both NULL: ``hedui-gateway archive verify`` checks their signatures and counts them as
kept before the archive was chained. Adding nullable columns and one with a default rewrites nothing.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("archive", schema=None) as batch_op:
        batch_op.add_column(sa.Column("direction", sa.String(length=3), server_default="in", nullable=False))
        batch_op.add_column(sa.Column("sha256", sa.LargeBinary(length=32), nullable=True))
        batch_op.add_column(sa.Column("audit_seq", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.execute("DELETE FROM archive WHERE direction = 'out'")
    with op.batch_alter_table("archive", schema=None) as batch_op:
        batch_op.drop_column("audit_seq")
        batch_op.drop_column("sha256")
        batch_op.drop_column("direction")
