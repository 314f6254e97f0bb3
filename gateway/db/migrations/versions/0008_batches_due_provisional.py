"""batches.due_provisional: due dates counted across a year without an official holiday schedule

Until now a connector refused every batch whose clause-12 due date fell in a year its calendar did not know
(``calendar_year_unknown``), so from late December the exchange stopped until each site installed the new year's
holiday file. Connectors now receipt such batches with a provisional due date (docs/exchange.md, "Provisional due
dates"); the gateway records that the date is provisional, does not mark the batch overdue on it, and fixes it once
its calendar knows the year. Every existing batch got its due date from a known year: they are all final.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The server default makes every existing row false (final) in the same statement, on SQLite and PostgreSQL.
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("due_provisional", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_column("due_provisional")
