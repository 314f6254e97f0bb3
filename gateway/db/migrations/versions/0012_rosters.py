"""rosters, answer_staff: signed staff rosters (Procedure V.(三)) and the unit staff named by each answer

``rosters`` keeps every version of the gateway's own roster and of each unit's (keys/roster.py), as the SignedRoster
bytes accepted; ``answer_staff`` the unit's staff an answer set names as responsible and the roster version they
were checked against. New tables only: nothing existing is rewritten.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rosters",
        sa.Column("party_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("own", sa.Boolean(), nullable=False),
        sa.Column("signed", sa.LargeBinary(), nullable=False),
        sa.Column("sha256", sa.LargeBinary(length=32), nullable=False),
        sa.Column("issued_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("effective_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("admin_staff_id", sa.String(length=32), nullable=False),
        sa.Column("stored_at_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("party_id", "version", name=op.f("pk_rosters")),
    )
    op.create_table(
        "answer_staff",
        sa.Column("batch_id", sa.String(length=40), nullable=False),
        sa.Column("staff_ids", sa.String(length=300), nullable=False),
        sa.Column("roster_version", sa.BigInteger(), nullable=True),
        sa.Column("answered_at_ms", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.batch_id"], name=op.f("fk_answer_staff_batch_id_batches")),
        sa.PrimaryKeyConstraint("batch_id", name=op.f("pk_answer_staff")),
    )


def downgrade() -> None:
    op.drop_table("answer_staff")
    op.drop_table("rosters")
