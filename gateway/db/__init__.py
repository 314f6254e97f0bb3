"""The gateway's database: the SQLAlchemy schema, the engine, and the Alembic migrations that keep existing data."""

__all__: list[str] = []
