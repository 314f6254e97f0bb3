"""The archive of clause 17: a hash-chained audit log of every staff action and exchange event."""

__all__: list[str] = []
