"""Where a demo run writes its files, and how it names them for the person who runs it.

Each run gets a folder of its own, so that a report always sits next to the key bundle that verifies it; a second run
never leaves an earlier report beside a newer bundle that no longer verifies it, and nothing of an earlier run is
deleted::

    demo-out/
      run-20261202-061500/     net/ (the loopback network: configs, keys, tls, data, logs),
                               report-<commission>.html, report-<commission>.hsr, agency.bundle
      latest -> run-20261202-061500

Paths and commands are shown as they work when pasted into a shell in the folder the demo was started from
(``make demo``: the repository root): relative where they lie below it, every argument quoted for the shell.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

#: What the first demo versions wrote straight into the output folder; seen there, the folder is an old demo's.
_EARLIER_LAYOUT = ("net", "agency.bundle")


def new_run_folder(out: Path, now: datetime) -> Path:
    """Create ``out/run-<date>-<time>`` (with a suffix if two runs start in the same second) and return it."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = now.strftime("%Y%m%d-%H%M%S")
    for attempt in range(100):
        folder = out / (f"run-{stamp}" if attempt == 0 else f"run-{stamp}-{attempt}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise FileExistsError(f"100 demo runs in {out} started at {stamp}")


def point_latest(out: Path, run: Path) -> Path | None:
    """Point ``out/latest`` at ``run`` (a relative symlink, replaced atomically) and return it; leave alone, and
    return None for, a ``latest`` that is not a symlink: the demo did not make it."""
    link = out / "latest"
    if link.exists() and not link.is_symlink():
        return None
    staging = out / f".latest.{os.getpid()}"
    staging.unlink(missing_ok=True)
    try:
        staging.symlink_to(run.name, target_is_directory=True)
        staging.replace(link)
    except OSError:  # a file system without symlinks: the run folder's own name is enough
        staging.unlink(missing_ok=True)
        return None
    return link


def has_earlier_layout(out: Path) -> bool:
    """Whether ``out`` still holds the files of a demo from before runs had folders of their own."""
    return any((out / name).exists() for name in _EARLIER_LAYOUT)


def shown(path: Path, cwd: Path | None = None) -> str:
    """``path`` as a person pastes it: relative to ``cwd`` (default: the current folder) when below it, else
    absolute. Paths are not resolved, so that ``.venv/bin/python`` stays the virtual environment's."""
    base = Path.cwd() if cwd is None else cwd
    absolute = path if path.is_absolute() else base / path
    return str(absolute.relative_to(base)) if absolute.is_relative_to(base) else str(absolute)


def console_script(name: str, module: str, cwd: Path | None = None) -> list[str]:
    """The command that runs one of Hedui's programs without ``.venv/bin`` on PATH: the script installed beside
    this Python (``.venv/bin/hedui-keys``), or ``python -m <module>`` where it is not installed."""
    script = Path(sys.executable).parent / name
    if script.is_file() and os.access(script, os.X_OK):
        return [shown(script, cwd)]
    return [shown(Path(sys.executable), cwd), "-m", module]


def shell_line(argv: Sequence[str]) -> str:
    """``argv`` as one line a POSIX shell splits back into exactly ``argv`` (fingerprints contain spaces)."""
    return shlex.join(argv)
