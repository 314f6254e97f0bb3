"""approval trees: the exchange digest becomes a root a unit can verify; units' signed refusals kept

A commission's ``exchange_digest`` (what two staff sign, Procedure V.(二)) was one hash over the whole package: a
unit could check the approvers' ids but not their signatures, as it must not see the package. It is now the root of
the approval trees (docs/exchange.md, "Approvals a unit verifies"): ``package_digest`` keeps the package's digest
(for commissions made before, the old exchange digest, copied here), ``subject_root`` and ``unit_root`` the trees'
roots, ``subjects.share_index`` and ``subjects.leaf_salt`` each subject's leaf, ``approval_units`` the units in tree
order and ``approval_nodes`` the subject tree's nodes in chunks, so that a batch's proof reads a few rows.
``batches.refusal_message_id`` names the unit's signed refusal of a batch, kept in the archive.

Commissions made before keep NULL in the new columns. The root names the gateway's party id, which the database
does not hold: the gateway completes the trees of the commissions not yet approved for exchange when it starts
(gateway/exchange/approvals.py ``complete_trees``). Commissions approved before go on without proofs; their batches
are accepted only by units that allow unverified approvals during migration (docs/operations.md).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("commissions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("package_digest", sa.LargeBinary(length=32), nullable=True))
        batch_op.add_column(sa.Column("subject_root", sa.LargeBinary(length=32), nullable=True))
        batch_op.add_column(sa.Column("unit_root", sa.LargeBinary(length=32), nullable=True))
    with op.batch_alter_table("subjects", schema=None) as batch_op:
        batch_op.add_column(sa.Column("share_index", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("leaf_salt", sa.LargeBinary(length=16), nullable=True))
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("refusal_message_id", sa.LargeBinary(length=16), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_batches_refusal_message_id_archive"), "archive", ["refusal_message_id"], ["message_id"]
        )
    op.create_table(
        "approval_units",
        sa.Column("commission_id", sa.Integer(), nullable=False),
        sa.Column("unit_index", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("unit_id", sa.String(length=64), nullable=False),
        sa.Column("categories", sa.String(length=255), nullable=False),
        sa.Column("leaf", sa.LargeBinary(length=32), nullable=False),
        sa.ForeignKeyConstraint(
            ["commission_id"], ["commissions.id"], name=op.f("fk_approval_units_commission_id_commissions")
        ),
        sa.PrimaryKeyConstraint("commission_id", "unit_index", name=op.f("pk_approval_units")),
    )
    op.create_table(
        "approval_nodes",
        sa.Column("commission_id", sa.Integer(), nullable=False),
        sa.Column("level", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("chunk", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("hashes", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["commission_id"], ["commissions.id"], name=op.f("fk_approval_nodes_commission_id_commissions")
        ),
        sa.PrimaryKeyConstraint("commission_id", "level", "chunk", name=op.f("pk_approval_nodes")),
    )
    op.execute("UPDATE commissions SET package_digest = exchange_digest WHERE exchange_digest IS NOT NULL")


def downgrade() -> None:
    # The trees' roots were the exchange digests staff signed since; the package digest is the one of before.
    op.execute("UPDATE commissions SET exchange_digest = package_digest WHERE package_digest IS NOT NULL")
    op.drop_table("approval_nodes")
    op.drop_table("approval_units")
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_batches_refusal_message_id_archive"), type_="foreignkey")
        batch_op.drop_column("refusal_message_id")
    with op.batch_alter_table("subjects", schema=None) as batch_op:
        batch_op.drop_column("leaf_salt")
        batch_op.drop_column("share_index")
    with op.batch_alter_table("commissions", schema=None) as batch_op:
        batch_op.drop_column("unit_root")
        batch_op.drop_column("subject_root")
        batch_op.drop_column("package_digest")
