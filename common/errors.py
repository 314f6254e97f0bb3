"""The root of every error this project raises on purpose."""

from __future__ import annotations


class HeduiError(Exception):
    """Base class of all Hedui errors.

    ``str(error)`` is safe to show to an operator and to log: subclasses never put personal data (ID numbers, names,
    findings) or secret material into it. ``diagnostics()`` adds what an operator needs to act on the error.
    """

    #: One short, stable, machine-readable word for metrics labels and audit entries.
    code: str = "error"

    def diagnostics(self) -> str:
        """A human-readable explanation with the likely cause and what to do about it (subclasses add hints)."""
        return str(self)
