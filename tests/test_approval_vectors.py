"""Approval test vectors (tests/vectors/approvals_v1.json, docs/exchange.md "Approvals a unit verifies").

The committed file must be exactly what tests/vectorgen_approvals.py builds; every value in it must follow from the
specification with nothing but hashlib and an Ed25519 library (a second implementation, written from the text, in
this file); and the connector must accept every positive batch and refuse every negative one with its reason."""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hedui.v1 import exchange_pb2, trust_pb2

from connectors.approvals import ApprovalCheck
from connectors.errors import Refusal
from keys.approvals import batch_root
from tests import vectorgen_approvals
from tests.approval_kit import MemoryRoster, MemoryRosters

Json = dict[str, Any]
ROOT = Path(__file__).resolve().parent.parent
VECTOR_FILE = ROOT / "tests" / "vectors" / "approvals_v1.json"
GATEWAY = "agency.220100"


@functools.cache
def document() -> Json:
    loaded: Json = json.loads(VECTOR_FILE.read_text(encoding="utf-8"))
    return loaded


def test_committed_vectors_are_what_the_generator_builds() -> None:
    expected = vectorgen_approvals.render(vectorgen_approvals.build_vectors()).encode()
    assert VECTOR_FILE.read_bytes() == expected, (
        "tests/vectors/approvals_v1.json is not what tests/vectorgen_approvals.py builds: regenerate with "
        "python scripts/make_vectors.py (and say why in the commit: other implementations test against it)"
    )


# --- the specification, implemented again from docs/exchange.md ---------------------------------------------------


def h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def spec_subject_leaf(s: Json) -> bytes:
    return (
        b"hedui.v1.approval-subject\x00"
        + bytes.fromhex(s["leaf_salt"])
        + lp(s["id_number"].encode())
        + lp(s["name"].encode())
        + lp(s["auth_number"].encode())
        + lp(bytes.fromhex(s["auth_sha256"]))
    )


def spec_unit_leaf(u: Json) -> bytes:
    categories = sorted(u["categories"])
    limits = sorted((t["category"], t["limit_fen"]) for t in u["thresholds"])
    return (
        b"hedui.v1.approval-unit\x00"
        + lp(u["party_id"].encode())
        + struct.pack(">I", len(categories))
        + b"".join(struct.pack(">I", c) for c in categories)
        + struct.pack(">I", len(limits))
        + b"".join(struct.pack(">Iq", c, v) for c, v in limits)
    )


def spec_levels(leaves: list[bytes]) -> list[list[bytes]]:
    levels = [leaves]
    while len(levels[-1]) > 1:
        level = levels[-1]
        upper = [h(b"\x01" + level[i] + level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            upper.append(level[-1])
        levels.append(upper)
    return levels


def spec_proof(levels: list[list[bytes]], indices: list[int]) -> list[bytes]:
    """Level by level, ascending: the sibling of each known node whose sibling exists and is not known."""
    known, proof = sorted(indices), []
    for level in levels[:-1]:
        for i in known:
            sibling = i ^ 1
            if sibling < len(level) and sibling not in known:
                proof.append(level[sibling])
        known = sorted({i // 2 for i in known})
    return proof


def spec_root_from_proof(count: int, leaves: dict[int, bytes], proof: list[bytes]) -> bytes:
    known, width, proof = dict(leaves), count, list(proof)
    while width > 1:
        upper: dict[int, bytes] = {}
        for i in sorted(known):
            if i // 2 in upper:
                continue
            sibling = i ^ 1
            if sibling >= width:
                upper[i // 2] = known[i]
                continue
            other = known[sibling] if sibling in known else proof.pop(0)
            left, right = (other, known[i]) if i & 1 else (known[i], other)
            upper[i // 2] = h(b"\x01" + left + right)
        known, width = upper, (width + 1) // 2
    assert not proof
    return known[0]


def spec_header(c: Json, subject_root: bytes, unit_root: bytes) -> bytes:
    asset = [int(x) for x in c["assets_as_of"].split("-")]
    numbers = [c["programme"], *c["income_from"], *c["income_to"], *asset]
    return (
        b"hedui.v1.approval-root\x00"
        + lp(c["gateway"].encode())
        + lp(c["commission_ref"].encode())
        + b"".join(struct.pack(">I", n) for n in numbers)
        + bytes.fromhex(c["package_digest"])
        + struct.pack(">I", len(c["subjects"]))
        + subject_root
        + struct.pack(">I", len(c["units"]))
        + unit_root
    )


def test_the_commission_follows_from_the_specification() -> None:
    c = document()["commission"]
    subject_leaves = []
    for s in c["subjects"]:
        assert spec_subject_leaf(s).hex() == s["leaf_bytes"]
        subject_leaves.append(h(b"\x00" + spec_subject_leaf(s)))
        assert subject_leaves[-1].hex() == s["leaf"]
    assert [u["party_id"] for u in c["units"]] == sorted(u["party_id"] for u in c["units"])
    unit_leaves = []
    for u in c["units"]:
        assert spec_unit_leaf(u).hex() == u["leaf_bytes"]
        unit_leaves.append(h(b"\x00" + spec_unit_leaf(u)))
        assert unit_leaves[-1].hex() == u["leaf"]
    subject_levels, unit_levels = spec_levels(subject_leaves), spec_levels(unit_leaves)
    assert [[x.hex() for x in level] for level in subject_levels] == c["subject_levels"]
    assert [[x.hex() for x in level] for level in unit_levels] == c["unit_levels"]
    for i, u in enumerate(c["units"]):
        assert [x.hex() for x in spec_proof(unit_levels, [i])] == u["unit_proof"]
        assert (
            spec_root_from_proof(len(unit_leaves), {i: unit_leaves[i]}, spec_proof(unit_levels, [i]))
            == (unit_levels[-1][0])
        )
    header = spec_header(c, subject_levels[-1][0], unit_levels[-1][0])
    assert header.hex() == c["header"] and h(header).hex() == c["root"]


def test_the_approvals_are_signatures_over_the_root_with_the_staff_keys() -> None:
    doc = document()
    keys = {s["staff_id"]: ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(s["seed"])) for s in doc["staff"]}
    message = b"hedui.v1.exchange-approval\x00" + bytes.fromhex(doc["commission"]["root"])
    for approval in doc["approvals"]:
        key = keys[approval["staff_id"]]
        assert approval["message"] == message.hex()
        assert key.sign(message).hex() == approval["signature"]  # Ed25519 is deterministic
        key.public_key().verify(bytes.fromhex(approval["signature"]), message)


@pytest.mark.parametrize("vector", document()["batches"], ids=lambda v: v["name"])
def test_every_batch_proves_the_root_from_what_it_carries(vector: Json) -> None:
    doc = document()
    c = doc["commission"]
    batch = exchange_pb2.QueryBatch.FromString(bytes.fromhex(vector["batch"]))
    assert [s.share_index for s in batch.subjects] == vector["share_indices"]
    assert [p.hex() for p in batch.approval.subject_proof] == vector["subject_proof"]
    levels = [[bytes.fromhex(x) for x in level] for level in c["subject_levels"]]
    assert [x.hex() for x in spec_proof(levels, vector["share_indices"])] == vector["subject_proof"]
    leaves = {
        s.share_index: h(b"\x00" + spec_subject_leaf(
            {"leaf_salt": s.leaf_salt.hex(), "id_number": s.id_number, "name": s.name,
             "auth_number": s.authorisation.number, "auth_sha256": s.authorisation.scan_sha256.hex()}
        ))
        for s in batch.subjects
    }  # fmt: skip
    subject_root = spec_root_from_proof(batch.approval.subject_count, leaves, list(batch.approval.subject_proof))
    unit = next(u for u in c["units"] if u["party_id"] == vector["unit"])
    assert batch.approval.unit_index == unit["unit_index"]
    mine = spec_unit_leaf(
        {
            "party_id": vector["unit"],
            "categories": list(batch.categories),
            "thresholds": [{"category": t.category, "limit_fen": t.limit_fen} for t in batch.thresholds],
        }
    )
    unit_root = spec_root_from_proof(
        batch.approval.unit_count, {batch.approval.unit_index: h(b"\x00" + mine)}, list(batch.approval.unit_proof)
    )
    assert h(spec_header(c, subject_root, unit_root)).hex() == vector["root"] == c["root"]
    assert batch_root(c["gateway"], vector["unit"], batch).hex() == c["root"]  # the reference implementation


def _check() -> ApprovalCheck:
    doc = document()
    members = [
        trust_pb2.RosterMember(
            staff_id=s["staff_id"], name="-", roles=s["roles"], public_key=bytes.fromhex(s["public_key"])
        )
        for s in doc["staff"]
    ]
    roster = MemoryRoster(members, effective_at_ms=doc["approvals"][0]["approved_at_ms"] - 86_400_000)
    return ApprovalCheck(MemoryRosters({doc["commission"]["gateway"]: roster}))


@pytest.mark.parametrize("vector", document()["batches"], ids=lambda v: v["name"])
def test_the_connector_accepts_every_positive_batch(vector: Json) -> None:
    doc = document()
    batch = exchange_pb2.QueryBatch.FromString(bytes.fromhex(vector["batch"]))
    verdict = _check().check(
        batch, gateway=doc["commission"]["gateway"], unit=vector["unit"], created_at_ms=doc["sealed_at_ms"]
    )
    assert verdict.verified and verdict.staff_ids == ("S-0001", "S-0002")


@pytest.mark.parametrize("vector", document()["negative"], ids=lambda v: v["name"])
def test_the_connector_refuses_every_negative_batch_for_its_reason(vector: Json) -> None:
    doc = document()
    batch = exchange_pb2.QueryBatch.FromString(bytes.fromhex(vector["batch"]))
    with pytest.raises(Refusal) as refused:
        _check().check(
            batch, gateway=doc["commission"]["gateway"], unit=vector["unit"], created_at_ms=doc["sealed_at_ms"]
        )
    assert refused.value.reason == vector["reason"]


def test_a_batch_for_one_unit_does_not_verify_for_another() -> None:
    doc = document()
    vector = next(v for v in doc["batches"] if v["name"] == "tax-gapped")
    batch = exchange_pb2.QueryBatch.FromString(bytes.fromhex(vector["batch"]))
    with pytest.raises(Refusal) as refused:
        _check().check(
            batch, gateway=doc["commission"]["gateway"], unit="unit.220100.land", created_at_ms=doc["sealed_at_ms"]
        )
    assert refused.value.reason == "approval_signature_invalid"
