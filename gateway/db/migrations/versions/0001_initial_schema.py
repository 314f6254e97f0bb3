"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "archive",
        sa.Column("message_id", sa.LargeBinary(length=16), nullable=False),
        sa.Column("sender", sa.String(length=64), nullable=False),
        sa.Column("message_type", sa.String(length=128), nullable=False),
        sa.Column("received_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("envelope", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("message_id", name=op.f("pk_archive")),
    )
    with op.batch_alter_table("archive", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_archive_received_at_ms"), ["received_at_ms"], unique=False)

    op.create_table(
        "commissions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("ref", sa.String(length=64), nullable=False),
        sa.Column("purpose", sa.Integer(), nullable=False),
        sa.Column("income_from", sa.String(length=7), nullable=False),
        sa.Column("income_to", sa.String(length=7), nullable=False),
        sa.Column("assets_as_of", sa.Date(), nullable=False),
        sa.Column("staff_ids", sa.String(length=255), nullable=False),
        sa.Column("categories", sa.String(length=255), nullable=False),
        sa.Column("thresholds", sa.String(length=255), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("cancelled_at_ms", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_commissions")),
        sa.UniqueConstraint("ref", name=op.f("uq_commissions_ref")),
    )
    op.create_table(
        "jobs",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_until_ms", sa.BigInteger(), nullable=False),
        sa.Column("last_started_ms", sa.BigInteger(), nullable=True),
        sa.Column("last_finished_ms", sa.BigInteger(), nullable=True),
        sa.Column("last_status", sa.String(length=16), nullable=True),
        sa.Column("runs", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_jobs")),
    )
    op.create_table(
        "seen_messages",
        sa.Column("sender", sa.String(length=64), nullable=False),
        sa.Column("message_id", sa.LargeBinary(length=16), nullable=False),
        sa.Column("keep_until_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("sender", "message_id", name=op.f("pk_seen_messages")),
    )
    with op.batch_alter_table("seen_messages", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_seen_messages_keep_until_ms"), ["keep_until_ms"], unique=False)

    op.create_table(
        "units",
        sa.Column("unit_id", sa.String(length=64), nullable=False),
        sa.Column("category", sa.Integer(), nullable=False),
        sa.Column("endpoint", sa.String(length=255), nullable=False),
        sa.Column("exchange_mode", sa.String(length=16), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("next_attempt_ms", sa.BigInteger(), nullable=False),
        sa.Column("last_success_ms", sa.BigInteger(), nullable=True),
        sa.Column("last_error", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("unit_id", name=op.f("pk_units")),
    )
    op.create_table(
        "batches",
        sa.Column("batch_id", sa.String(length=40), nullable=False),
        sa.Column("unit_id", sa.String(length=64), nullable=False),
        sa.Column("commission_id", sa.Integer(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("digest", sa.LargeBinary(length=32), nullable=False),
        sa.Column("subject_count", sa.Integer(), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_ms", sa.BigInteger(), nullable=False),
        sa.Column("last_error", sa.String(length=64), nullable=True),
        sa.Column("claimed_by", sa.String(length=64), nullable=True),
        sa.Column("claim_until_ms", sa.BigInteger(), nullable=True),
        sa.Column("received_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("original_due", sa.Date(), nullable=True),
        sa.Column("due", sa.Date(), nullable=True),
        sa.Column("delay_reason", sa.String(length=32), nullable=True),
        sa.Column("overdue", sa.Boolean(), nullable=False),
        sa.Column("receipt_envelope", sa.LargeBinary(), nullable=True),
        sa.Column("answer_message_id", sa.LargeBinary(length=16), nullable=True),
        sa.Column("answered_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("acknowledged_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("next_poll_ms", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["answer_message_id"], ["archive.message_id"], name=op.f("fk_batches_answer_message_id_archive")
        ),
        sa.ForeignKeyConstraint(
            ["commission_id"], ["commissions.id"], name=op.f("fk_batches_commission_id_commissions")
        ),
        sa.ForeignKeyConstraint(["unit_id"], ["units.unit_id"], name=op.f("fk_batches_unit_id_units")),
        sa.PrimaryKeyConstraint("batch_id", name=op.f("pk_batches")),
    )
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.create_index("ix_batches_work", ["unit_id", "state", "next_attempt_ms"], unique=False)

    op.create_table(
        "subjects",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("commission_id", sa.Integer(), nullable=False),
        sa.Column("subject_ref", sa.String(length=64), nullable=False),
        sa.Column("id_number", sa.String(length=18), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("auth_number", sa.String(length=64), nullable=False),
        sa.Column("auth_digest", sa.LargeBinary(length=32), nullable=False),
        sa.ForeignKeyConstraint(
            ["commission_id"], ["commissions.id"], name=op.f("fk_subjects_commission_id_commissions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subjects")),
    )
    with op.batch_alter_table("subjects", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_subjects_commission_id"), ["commission_id"], unique=False)

    op.create_table(
        "items",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("commission_id", sa.Integer(), nullable=False),
        sa.Column("subject_id", sa.Integer(), nullable=False),
        sa.Column("unit_id", sa.String(length=64), nullable=False),
        sa.Column("batch_id", sa.String(length=40), nullable=True),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("cancelled_at_ms", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.batch_id"], name=op.f("fk_items_batch_id_batches")),
        sa.ForeignKeyConstraint(["commission_id"], ["commissions.id"], name=op.f("fk_items_commission_id_commissions")),
        sa.ForeignKeyConstraint(["subject_id"], ["subjects.id"], name=op.f("fk_items_subject_id_subjects")),
        sa.ForeignKeyConstraint(["unit_id"], ["units.unit_id"], name=op.f("fk_items_unit_id_units")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_items")),
    )
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.create_index("ix_items_batch", ["batch_id"], unique=False)
        batch_op.create_index("ix_items_queue", ["unit_id", "batch_id", "commission_id", "id"], unique=False)

    op.create_table(
        "answers",
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.String(length=40), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("stored_at_ms", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.batch_id"], name=op.f("fk_answers_batch_id_batches")),
        sa.ForeignKeyConstraint(["item_id"], ["items.id"], name=op.f("fk_answers_item_id_items")),
        sa.PrimaryKeyConstraint("item_id", name=op.f("pk_answers")),
    )
    with op.batch_alter_table("answers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_answers_batch_id"), ["batch_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("answers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_answers_batch_id"))

    op.drop_table("answers")
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.drop_index("ix_items_queue")
        batch_op.drop_index("ix_items_batch")

    op.drop_table("items")
    with op.batch_alter_table("subjects", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_subjects_commission_id"))

    op.drop_table("subjects")
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_index("ix_batches_work")

    op.drop_table("batches")
    op.drop_table("units")
    with op.batch_alter_table("seen_messages", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_seen_messages_keep_until_ms"))

    op.drop_table("seen_messages")
    op.drop_table("jobs")
    op.drop_table("commissions")
    with op.batch_alter_table("archive", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_archive_received_at_ms"))

    op.drop_table("archive")
