"""Write the test vectors to tests/vectors/: envelope_v1.json, formats_v1.json, steps_v1.json, rosters_v1.json,
approvals_v1.json, trust_sync_v1.json and certificate_requests_v1.json.

Usage: python scripts/make_vectors.py [--check]

The vectors are built by tests/vectorgen.py (the sealed envelope), tests/vectorgen_formats.py (fingerprints,
armour, parser strictness, the payload limit, sealed files), tests/vectorgen_steps.py (signed procedure steps),
tests/vectorgen_rosters.py (signed staff rosters), tests/vectorgen_approvals.py (approvals a unit verifies),
tests/vectorgen_trust.py (trust synchronisation) and tests/vectorgen_csr.py (certificate requests);
tests/test_vectors.py, tests/test_approval_vectors.py, tests/test_trust_vectors.py and tests/test_csr_vectors.py
import them too. They are deterministic, so running this
twice gives the same file. Regenerate them only when the format or the reference implementation changed on purpose,
and say so in the commit: other implementations test against this file. With --check nothing is written; the script
exits 1 when a committed file differs from what it would write.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="compare with the committed file, write nothing")
    args = parser.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # tests/ is not an installed package
    from tests import (  # noqa: PLC0415 - needs the path set above
        vectorgen,
        vectorgen_approvals,
        vectorgen_csr,
        vectorgen_formats,
        vectorgen_rosters,
        vectorgen_steps,
        vectorgen_trust,
    )

    outputs = {
        VECTORS / "envelope_v1.json": vectorgen.render(vectorgen.build_vectors()).encode(),
        VECTORS / "formats_v1.json": vectorgen_formats.render(vectorgen_formats.build_vectors()).encode(),
        VECTORS / "steps_v1.json": vectorgen_steps.render(vectorgen_steps.build_vectors()).encode(),
        VECTORS / "rosters_v1.json": vectorgen_rosters.render(vectorgen_rosters.build_vectors()).encode(),
        VECTORS / "approvals_v1.json": vectorgen_approvals.render(vectorgen_approvals.build_vectors()).encode(),
        VECTORS / "trust_sync_v1.json": vectorgen_trust.render(vectorgen_trust.build_vectors()).encode(),
        VECTORS / "certificate_requests_v1.json": vectorgen_csr.render(vectorgen_csr.build_vectors()).encode(),
    }
    if args.check:
        stale = [path for path, data in outputs.items() if not path.exists() or path.read_bytes() != data]
        for path in stale:
            print(f"{path.relative_to(ROOT)} is stale: run python scripts/make_vectors.py", file=sys.stderr)
        if stale:
            return 1
        print("tests/vectors is up to date")
        return 0
    VECTORS.mkdir(parents=True, exist_ok=True)
    for path, data in outputs.items():
        path.write_bytes(data)
        print(f"wrote {path.relative_to(ROOT)} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
