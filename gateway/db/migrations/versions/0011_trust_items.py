"""trust items: what the gateway delivers to units over SyncTrust, and their acknowledgements

Rosters, key announcements and revocation lists are published once, for a set of units, and offered to each unit in
every trust synchronisation until it acknowledged them (gateway/trust/, docs/exchange.md "Trust synchronisation").
A command-line process can publish an item that the running gateway delivers.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "trust_items",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.Integer(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("sha256", sa.LargeBinary(length=32), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trust_items")),
        sa.UniqueConstraint("sha256", name=op.f("uq_trust_items_sha256")),
    )
    op.create_table(
        "trust_deliveries",
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("peer", sa.String(length=64), nullable=False),
        sa.Column("acked_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("applied", sa.Boolean(), nullable=True),
        sa.Column("reason", sa.String(length=40), nullable=True),
        sa.ForeignKeyConstraint(["item_id"], ["trust_items.id"], name=op.f("fk_trust_deliveries_item_id_trust_items")),
        sa.PrimaryKeyConstraint("item_id", "peer", name=op.f("pk_trust_deliveries")),
    )
    op.create_index("ix_trust_deliveries_pending", "trust_deliveries", ["peer", "acked_at_ms"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_trust_deliveries_pending", table_name="trust_deliveries")
    op.drop_table("trust_deliveries")
    op.drop_table("trust_items")
