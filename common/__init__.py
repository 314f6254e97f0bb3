"""Code that the gateway, the connectors and the trust core all need, kept in one place.

Today: the project's base error. The working-day calendar, ID-number validation and config loading join it as the
issues that need them land.
"""

from common.errors import HeduiError

__all__ = ["HeduiError"]
