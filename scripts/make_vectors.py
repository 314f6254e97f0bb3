"""Write the sealed-envelope v1 test vectors to tests/vectors/envelope_v1.json.

Usage: python scripts/make_vectors.py [--check]

The vectors are built by tests/vectorgen.py (the only implementation; tests/test_vectors.py imports it too). They
are deterministic, so running this twice gives the same file. Regenerate them only when the format or the reference
implementation changed on purpose, and say so in the commit: other implementations test against this file.
With --check nothing is written; the script exits 1 when the committed file differs from what it would write.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "vectors" / "envelope_v1.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="compare with the committed file, write nothing")
    args = parser.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # tests/ is not an installed package
    from tests.vectorgen import build_vectors, render  # noqa: PLC0415 - needs the path set above

    data = render(build_vectors()).encode()
    if args.check:
        if not OUT.exists() or OUT.read_bytes() != data:
            print(f"{OUT.relative_to(ROOT)} is stale: run python scripts/make_vectors.py", file=sys.stderr)
            return 1
        print(f"{OUT.relative_to(ROOT)} is up to date")
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(data)
    print(f"wrote {OUT.relative_to(ROOT)} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
