"""The committed wire code in protos/generated matches protos/*.proto."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hedui.v1 import envelope_pb2, keys_pb2, media_pb2

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_up_to_date() -> None:
    # protoc-gen-mypy lives next to the interpreter; put that folder first on PATH even if the venv is not active.
    env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def test_generated_messages_are_importable_with_the_documented_fields() -> None:
    assert [f.name for f in media_pb2.SealedFile.DESCRIPTOR.fields] == ["file_name", "content", "media_type"]
    assert [f.number for f in envelope_pb2.EnvelopeHeader.DESCRIPTOR.fields] == list(range(1, 14))
    assert [f.name for f in envelope_pb2.Envelope.DESCRIPTOR.fields] == ["header", "ciphertext", "signature"]
    assert keys_pb2.KEY_STATE_REVOKED == 5
    assert envelope_pb2.SUITE_ED25519_X25519_HKDF_SHA256_XCHACHA20POLY1305 == 1
