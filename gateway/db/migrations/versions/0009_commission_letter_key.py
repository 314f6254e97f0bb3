"""commissions.letter_key and the ListCommissions indexes

One letter, one commission: the rule compared letter numbers byte for byte, which was enough while they could only
be ASCII. Official numbers are Chinese (长南民核委〔2026〕12号) and typed in several ways (full-width digits, [] or ()
for 〔〕), so the rule now compares ``gateway.procedure.intake.letter_key`` of the number, stored here and filled
for every existing row. ``ix_commissions_letter`` finds a commissioner's letter without a scan;
``ix_commissions_listing`` and ``ix_commissions_created`` serve ListCommissions' pages (newest first, by created
time then id) for one commissioner and for the staff system.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gateway.procedure.intake import letter_key

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

#: Rows updated per statement while filling letter_key.
_CHUNK = 1000


def upgrade() -> None:
    with op.batch_alter_table("commissions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("letter_key", sa.String(length=64), nullable=True))
        batch_op.create_index("ix_commissions_letter", ["commissioner", "letter_key"], unique=False)
        batch_op.create_index("ix_commissions_listing", ["commissioner", "created_at_ms", "id"], unique=False)
        batch_op.create_index("ix_commissions_created", ["created_at_ms", "id"], unique=False)
    conn = op.get_bind()
    table = sa.table("commissions", sa.column("id", sa.Integer), sa.column("letter_number", sa.String),
                     sa.column("letter_key", sa.String))  # fmt: skip
    rows = conn.execute(sa.select(table.c.id, table.c.letter_number).where(table.c.letter_number.is_not(None))).all()
    # Numbers stored so far are ASCII of at most 64 characters: their key is never longer.
    values = [{"row_id": row.id, "key": letter_key(row.letter_number)[:64]} for row in rows]
    update = table.update().where(table.c.id == sa.bindparam("row_id")).values(letter_key=sa.bindparam("key"))
    for start in range(0, len(values), _CHUNK):
        conn.execute(update, values[start : start + _CHUNK])


def downgrade() -> None:
    with op.batch_alter_table("commissions", schema=None) as batch_op:
        batch_op.drop_index("ix_commissions_created")
        batch_op.drop_index("ix_commissions_listing")
        batch_op.drop_index("ix_commissions_letter")
        batch_op.drop_column("letter_key")
