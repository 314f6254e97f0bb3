"""certificate_requests: the units' requests for a renewed TLS certificate, and the certificates issued for them

A unit renews its server certificate with a key it makes itself: only its PKCS#10 request travels to the gateway (a
CERTIFICATE_REQUEST trust item, keys/csr.py) and only the certificate travels back. This table keeps each request the
gateway accepted, until the agency's operator signs it with the network CA ('hedui-gateway tls sign-requests', or
export-requests / import-certificates for a CA kept offline), and then the certificate issued for it. It holds
public material only: requests and certificates, never a private key. Creating a table rewrites nothing.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "certificate_requests",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("party_id", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.LargeBinary(length=32), nullable=False),
        sa.Column("key_sha256", sa.LargeBinary(length=32), nullable=False),
        sa.Column("csr", sa.LargeBinary(), nullable=False),
        sa.Column("names", sa.String(length=1100), nullable=False),
        sa.Column("usages", sa.String(length=24), nullable=False),
        sa.Column("received_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=12), nullable=False),
        sa.Column("decided_at_ms", sa.BigInteger(), nullable=True),
        sa.Column("decided_by", sa.String(length=64), nullable=True),
        sa.Column("serial", sa.String(length=40), nullable=True),
        sa.Column("certificate", sa.LargeBinary(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_certificate_requests")),
        sa.UniqueConstraint("sha256", name=op.f("uq_certificate_requests_sha256")),
    )
    op.create_index(
        op.f("ix_certificate_requests_party_id_state"), "certificate_requests", ["party_id", "state"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_certificate_requests_party_id_state"), table_name="certificate_requests")
    op.drop_table("certificate_requests")
