"""Alembic migrations of the gateway database (run with ``hedui-gateway migrate``)."""
