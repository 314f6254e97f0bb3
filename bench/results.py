"""Where a benchmark's results go: the revision they describe, and the block of docs/performance.md they replace.

Each benchmark owns one block of that file, between a begin and an end marker named after it; ``--write`` replaces
what lies between them and leaves the prose around them alone.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def revision(measured: Sequence[str]) -> str:
    """The commit measured, and whether the code under ``measured`` (folders) differs from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", *measured)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"`{head}`" + (f" with uncommitted changes in {', '.join(measured)}" if dirty else "")


class ResultsBlock:
    """The block of a file that benchmark ``name`` (e.g. ``bench_envelope``) writes."""

    def __init__(self, name: str) -> None:
        self.begin = f"<!-- {name}: begin (written by bench/{name}.py --write) -->"
        self.end = f"<!-- {name}: end -->"

    def find(self, path: Path) -> tuple[str, int, int]:
        """The text of ``path`` and where the block lies in it; exits with a message if it has none."""
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SystemExit(f"cannot read {path}: {exc}") from exc
        begin, end = text.find(self.begin), text.find(self.end)
        if begin < 0 or end < begin:
            raise SystemExit(f"{path} lacks the lines {self.begin!r} and {self.end!r}; paste the block by hand")
        return text, begin + len(self.begin), end

    def write(self, path: Path, block: str) -> None:
        """Replace what lies between the two markers in ``path``."""
        text, begin, end = self.find(path)
        path.write_text(f"{text[:begin]}\n{block}\n{text[end:]}", encoding="utf-8")

    def publish(self, block: str, write_to: Path | None) -> None:
        """Print the block, and put it into ``write_to`` (``--write``) when given."""
        print(block)
        if write_to is not None:
            self.write(write_to, block)
            print(f"\nwrote the results block of {write_to}", file=sys.stderr)
