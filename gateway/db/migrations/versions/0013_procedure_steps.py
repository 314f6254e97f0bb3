"""procedure_steps: intake, second review and report issue as the staff member signed them

Procedure V.(一) has intake review, second review and report issue done by three different staff members. Each of
these steps now comes with the staff member's signature over the step (keys/steps.py; docs/agency-api.md "Signed
procedure steps"), which the gateway verifies before it records the step; this table keeps the signed bytes, so
that ``hedui-gateway archive steps`` can prove later who took each step. Commissions from before this revision have
no rows here: their steps were recorded unsigned. Creating a table rewrites nothing.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "procedure_steps",
        sa.Column("commission_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.Integer(), nullable=False),
        sa.Column("staff_id", sa.String(length=32), nullable=False),
        sa.Column("step", sa.LargeBinary(), nullable=False),
        sa.Column("signature", sa.LargeBinary(length=64), nullable=False),
        sa.Column("key_id", sa.LargeBinary(length=16), nullable=False),
        sa.Column("recorded_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("audit_seq", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["commission_id"], ["commissions.id"], name=op.f("fk_procedure_steps_commission_id_commissions")
        ),
        sa.ForeignKeyConstraint(["staff_id"], ["staff.staff_id"], name=op.f("fk_procedure_steps_staff_id_staff")),
        sa.PrimaryKeyConstraint("commission_id", "kind", name=op.f("pk_procedure_steps")),
    )


def downgrade() -> None:
    op.drop_table("procedure_steps")
