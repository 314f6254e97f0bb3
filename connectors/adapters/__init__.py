"""Data adapters: how a connector reads its unit's own data. One small interface, three implementations."""

from connectors.adapters.base import Adapter, AdapterError, Finding, LookupContext

__all__ = ["Adapter", "AdapterError", "Finding", "LookupContext"]
