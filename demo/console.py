"""How the demo speaks to the person who runs it: numbered steps, indented detail lines, and progress that rewrites
one line in a terminal and prints plain lines into a file or pipe.

Colour (bold step titles) only for a terminal: never into a file, a pipe or a CI log, and never when ``NO_COLOR`` is
set to anything but the empty string (https://no-color.org) or the terminal is ``dumb``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import TextIO

_BOLD, _RESET = "\033[1m", "\033[0m"


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal a person watches (a closed or detached stream is not)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def wants_colour(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Colour for a terminal only, unless ``NO_COLOR`` (non-empty) or ``TERM=dumb`` says otherwise."""
    if environ.get("NO_COLOR") or environ.get("TERM") == "dumb":
        return False
    return is_terminal(stream)


class Console:
    """The demo's output: ``step`` for what happens next, ``detail`` for what it gave, ``progress`` for a counter."""

    def __init__(self, stream: TextIO | None = None, environ: Mapping[str, str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.colour = wants_colour(self.stream, os.environ if environ is None else environ)
        #: In a terminal a progress line is rewritten in place (carriage return, no escape sequence); elsewhere each
        #: progress report is its own line, so that a log file reads top to bottom.
        self.live = is_terminal(self.stream)
        self._open = 0  # length of a progress line not yet ended, 0 if none

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def step(self, number: int, text: str) -> None:
        """A step of the walk-through: what happens now and, in the same line, why it matters."""
        self.end_progress()
        title = f"{number:>2}. {text}"
        self._write(f"\n{_BOLD}{title}{_RESET}\n" if self.colour else f"\n{title}\n")

    def detail(self, text: str) -> None:
        """One indented line under the current step."""
        self.end_progress()
        self._write(f"    {text}\n")

    def progress(self, text: str) -> None:
        """A counter: rewritten in place in a terminal, a new line otherwise."""
        if not self.live:
            self._write(f"    {text}\n")
            return
        line = f"    {text}"
        self._write("\r" + line.ljust(self._open))
        self._open = len(line)

    def end_progress(self) -> None:
        """Leave the rewritten counter line as it last was and move below it."""
        if self._open:
            self._write("\n")
            self._open = 0
