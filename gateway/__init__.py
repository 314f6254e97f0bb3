"""The agency-side gateway (the appliance). The exchange engine and the agency API arrive with later issues."""

__all__: list[str] = []
