"""The sharing unit's exchange server and its data adapters. Arrives with the connector issue."""

__all__: list[str] = []
