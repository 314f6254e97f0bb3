"""The shape every service command line shares: logging options, and one error line instead of a traceback."""

from __future__ import annotations

import argparse
import getpass
import os
import re
import sys
from importlib.metadata import PackageNotFoundError, version

from common.errors import HeduiError
from common.logs import configure_logging

#: The distribution the programs are installed from (pyproject.toml).
DISTRIBUTION = "hedui"
_LOGIN_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")


def operator() -> str:
    """Who runs the command, for an audit log: the login behind sudo (the helpers in docs/operations.md run the
    programs as hedui), else the current user; ``operator`` when neither is a plain login name."""
    try:
        login = os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):
        login = ""
    return f"operator:{login}" if _LOGIN_RE.fullmatch(login) else "operator"


def add_version(parser: argparse.ArgumentParser) -> None:
    """``--version``: the installed release, what an operator quotes when reporting a problem."""
    try:
        release = version(DISTRIBUTION)
    except PackageNotFoundError:
        release = "unknown (not installed)"
    parser.add_argument("--version", action="version", version=f"%(prog)s {release}")


def service_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the common ``--log-level`` and ``--log-format`` options."""
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").splitlines()[0])
    add_version(parser)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="json: one JSON object per line (collectors)"
    )
    return parser


def run(prog: str, args: argparse.Namespace) -> int:
    """Configure logging and run ``args.func(args)``; expected failures print ``prog: error: …`` and return 1."""
    configure_logging(args.log_level, json_lines=args.log_format == "json")
    try:
        args.func(args)
    except BrokenPipeError:
        # The reader went away (``status | head``): what it wanted was printed. Python would complain again when it
        # flushes stdout at exit, so stdout is pointed at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (HeduiError, ValueError, OSError) as exc:
        message = exc.diagnostics() if isinstance(exc, HeduiError) else str(exc)
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 1
    return 0
