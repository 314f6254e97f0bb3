"""workflow, staff register, audit log, reports, feedback

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("at_ms", sa.BigInteger(), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=48), nullable=False),
        sa.Column("commission_id", sa.Integer(), nullable=True),
        sa.Column("before", sa.String(length=32), nullable=True),
        sa.Column("after", sa.String(length=32), nullable=True),
        sa.Column("detail", sa.String(length=255), nullable=True),
        sa.Column("prev_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("hash", sa.LargeBinary(length=32), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_log")),
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_log_commission_id"), ["commission_id"], unique=False)

    op.create_table(
        "staff",
        sa.Column("staff_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("roles", sa.String(length=64), nullable=False),
        sa.Column("public_key", sa.LargeBinary(length=32), nullable=False),
        sa.Column("valid_from_ms", sa.BigInteger(), nullable=False),
        sa.Column("valid_until_ms", sa.BigInteger(), nullable=True),
        sa.Column("registered_by", sa.String(length=32), nullable=False),
        sa.Column("registered_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("revoked_at_ms", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("staff_id", name=op.f("pk_staff")),
    )
    op.create_table(
        "approvals",
        sa.Column("commission_id", sa.Integer(), nullable=False),
        sa.Column("staff_id", sa.String(length=32), nullable=False),
        sa.Column("signature", sa.LargeBinary(length=64), nullable=False),
        sa.Column("approved_at_ms", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["commission_id"], ["commissions.id"], name=op.f("fk_approvals_commission_id_commissions")
        ),
        sa.ForeignKeyConstraint(["staff_id"], ["staff.staff_id"], name=op.f("fk_approvals_staff_id_staff")),
        sa.PrimaryKeyConstraint("commission_id", "staff_id", name=op.f("pk_approvals")),
    )
    op.create_table(
        "reports",
        sa.Column("commission_id", sa.Integer(), nullable=False),
        sa.Column("report", sa.LargeBinary(), nullable=False),
        sa.Column("signer_key_id", sa.LargeBinary(length=16), nullable=False),
        sa.Column("signature", sa.LargeBinary(length=64), nullable=False),
        sa.Column("html", sa.Text(), nullable=False),
        sa.Column("partial", sa.Boolean(), nullable=False),
        sa.Column("issued_at_ms", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["commission_id"], ["commissions.id"], name=op.f("fk_reports_commission_id_commissions")
        ),
        sa.PrimaryKeyConstraint("commission_id", name=op.f("pk_reports")),
    )
    op.create_table(
        "feedback",
        sa.Column("subject_id", sa.Integer(), nullable=False),
        sa.Column("commission_id", sa.Integer(), nullable=False),
        sa.Column("decision", sa.Integer(), nullable=False),
        sa.Column("recorded_at_ms", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["commission_id"], ["commissions.id"], name=op.f("fk_feedback_commission_id_commissions")
        ),
        sa.ForeignKeyConstraint(["subject_id"], ["subjects.id"], name=op.f("fk_feedback_subject_id_subjects")),
        sa.PrimaryKeyConstraint("subject_id", name=op.f("pk_feedback")),
    )
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_feedback_commission_id"), ["commission_id"], unique=False)

    with op.batch_alter_table("commissions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("letter_number", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("letter_date", sa.Date(), nullable=True))
        batch_op.add_column(sa.Column("commissioner", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("state", sa.String(length=24), server_default="exchanging", nullable=False))
        batch_op.add_column(sa.Column("reason", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("from_lower_agency", sa.Boolean(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("intake_staff", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("review_staff", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("report_staff", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("exchange_digest", sa.LargeBinary(length=32), nullable=True))
        batch_op.add_column(sa.Column("household_count", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("subject_count", sa.Integer(), server_default="0", nullable=False))

    with op.batch_alter_table("subjects", schema=None) as batch_op:
        batch_op.add_column(sa.Column("household_ref", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("member_index", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("relation", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("id_copy_digest", sa.LargeBinary(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("subjects", schema=None) as batch_op:
        batch_op.drop_column("id_copy_digest")
        batch_op.drop_column("relation")
        batch_op.drop_column("member_index")
        batch_op.drop_column("household_ref")

    with op.batch_alter_table("commissions", schema=None) as batch_op:
        batch_op.drop_column("subject_count")
        batch_op.drop_column("household_count")
        batch_op.drop_column("exchange_digest")
        batch_op.drop_column("report_staff")
        batch_op.drop_column("review_staff")
        batch_op.drop_column("intake_staff")
        batch_op.drop_column("from_lower_agency")
        batch_op.drop_column("reason")
        batch_op.drop_column("state")
        batch_op.drop_column("commissioner")
        batch_op.drop_column("letter_date")
        batch_op.drop_column("letter_number")

    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_feedback_commission_id"))

    op.drop_table("feedback")
    op.drop_table("reports")
    op.drop_table("approvals")
    op.drop_table("staff")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_log_commission_id"))

    op.drop_table("audit_log")
