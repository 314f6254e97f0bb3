"""Deterministic test vectors of approvals a unit verifies (docs/exchange.md, "Approvals a unit verifies"): a
commission of five subjects asking three units, its trees and root, each unit's proof, batches with a gapped subset
of subjects and the approvals of two staff members with their keys, and batches a unit must refuse.

:func:`build_vectors` returns the document that ``scripts/make_vectors.py`` writes to
``tests/vectors/approvals_v1.json``; ``tests/test_approval_vectors.py`` builds it again, compares the two byte for
byte, recomputes every vector from the specification with nothing but hashlib and an Ed25519 library, and has the
connector judge every batch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import date

from hedui.v1 import exchange_pb2, records_pb2

from keys.approvals import (
    RootHeader,
    multiproof,
    subject_leaf,
    subject_leaf_bytes,
    tree_levels,
    unit_leaf,
    unit_leaf_bytes,
)
from keys.fingerprint import Algorithm
from keys.handles import SigningKey, _load_private
from keys.statements import approval_message
from tests.vectorgen import Json

FORMAT = "hedui-approvals-v1-test-vectors"
SEED_DOMAIN = b"hedui.v1.test-vector-approvals\x00"

GATEWAY = "agency.220100"
REF = "C0f1e2d3c4b5a6978"
PROGRAMME = exchange_pb2.PROGRAMME_MINIMUM_LIVING_ALLOWANCE
INCOME_FROM = (2025, 9)
INCOME_TO = (2026, 2)
ASSETS_AS_OF = date(2026, 2, 28)
#: Approvals recorded at 2026-03-02 10:00 Beijing time; the batches are sealed five minutes later.
APPROVED_AT_MS = 1772416800000
SEALED_AT_MS = APPROVED_AT_MS + 300_000

#: Five members of two households (ID numbers valid under GB 11643; names in the characters the batch carries).
SUBJECTS = (
    ("220102198001011234", "张伟", "SQ-011234"),
    ("220102198202021244", "李娜", "SQ-021244"),
    ("220102200503031235", "张小明", "SQ-031235"),
    ("220104195504041231", "王秀英", "SQ-041231"),
    ("220104198312120019", "阿依古丽·买买提", "SQ-120019"),
)
#: (party id, categories asked, thresholds): in no particular order; the unit tree sorts them by party id.
UNITS = (
    ("unit.220100.tax", (records_pb2.DATA_CATEGORY_TAX,), ()),
    (
        "unit.220100.bank",
        (records_pb2.DATA_CATEGORY_LOANS, records_pb2.DATA_CATEGORY_DEPOSITS),
        ((records_pb2.DATA_CATEGORY_DEPOSITS, 5_000_000),),
    ),
    ("unit.220100.land", (records_pb2.DATA_CATEGORY_REAL_ESTATE,), ()),
)
STAFF = ("S-0001", "S-0002")


def seed(label: str) -> bytes:
    """SHAKE-256("hedui.v1.test-vector-approvals" || 0x00 || label): salts (16 bytes), keys and digests (32)."""
    return hashlib.shake_256(SEED_DOMAIN + label.encode()).digest(32)


def staff_key(staff_id: str) -> SigningKey:
    key = _load_private(Algorithm.ED25519, seed(f"staff/{staff_id}"))
    assert isinstance(key, SigningKey)
    return key


def salt(index: int) -> bytes:
    return seed(f"salt/{index}")[:16]


PACKAGE_DIGEST = seed("package")


def _subjects() -> list[exchange_pb2.QuerySubject]:
    return [
        exchange_pb2.QuerySubject(
            subject_ref=f"{101 + i}",
            id_number=id_number,
            name=name,
            authorisation=exchange_pb2.Authorisation(number=number, scan_sha256=seed(f"scan/{i}")),
            share_index=i,
            leaf_salt=salt(i),
        )
        for i, (id_number, name, number) in enumerate(SUBJECTS)
    ]


def _units() -> list[tuple[str, tuple[int, ...], dict[int, int]]]:
    return sorted((party, tuple(sorted(cats)), dict(limits)) for party, cats, limits in UNITS)


def _header(subject_levels: list[list[bytes]], unit_levels: list[list[bytes]]) -> RootHeader:
    return RootHeader(
        gateway=GATEWAY,
        commission_ref=REF,
        programme=PROGRAMME,
        income_from=INCOME_FROM,
        income_to=INCOME_TO,
        assets_as_of=ASSETS_AS_OF,
        package_digest=PACKAGE_DIGEST,
        subject_count=len(subject_levels[0]),
        subject_root=subject_levels[-1][0],
        unit_count=len(unit_levels[0]),
        unit_root=unit_levels[-1][0],
    )


def _batch(
    batch_id: str, unit_index: int, indices: list[int], approvals: list[exchange_pb2.StaffApproval]
) -> exchange_pb2.QueryBatch:
    subjects = _subjects()
    units = _units()
    _, categories, limits = units[unit_index]
    subject_levels = tree_levels([_leaf(s) for s in subjects])
    unit_levels = tree_levels([unit_leaf(p, c, t) for p, c, t in units])
    return exchange_pb2.QueryBatch(
        batch_id=batch_id,
        commission_ref=REF,
        purpose=PROGRAMME,
        categories=list(categories),  # type: ignore[arg-type]
        income_from=records_pb2.YearMonth(year=INCOME_FROM[0], month=INCOME_FROM[1]),
        income_to=records_pb2.YearMonth(year=INCOME_TO[0], month=INCOME_TO[1]),
        assets_as_of=records_pb2.Date(year=ASSETS_AS_OF.year, month=ASSETS_AS_OF.month, day=ASSETS_AS_OF.day),
        staff_ids=[a.staff_id for a in approvals],
        subjects=[subjects[i] for i in indices],
        thresholds=[
            exchange_pb2.ThresholdRequest(category=c, limit_fen=v)  # type: ignore[arg-type]
            for c, v in sorted(limits.items())
        ],
        approval=exchange_pb2.ApprovalProof(
            package_digest=PACKAGE_DIGEST,
            subject_count=len(subjects),
            unit_count=len(units),
            unit_index=unit_index,
            unit_proof=multiproof(unit_levels, [unit_index]),
            subject_proof=multiproof(subject_levels, indices),
            approvals=approvals,
        ),
    )


def _leaf(s: exchange_pb2.QuerySubject) -> bytes:
    return subject_leaf(s.leaf_salt, s.id_number, s.name, s.authorisation.number, s.authorisation.scan_sha256)


def _hex(items: list[bytes]) -> list[str]:
    return [x.hex() for x in items]


#: Batches a unit must refuse: (name, description, unit index, indices, change, reason).
Change = Callable[[exchange_pb2.QueryBatch], None]


def _set_name(b: exchange_pb2.QueryBatch) -> None:
    b.subjects[0].name = "张伟伟"


def _other_root(b: exchange_pb2.QueryBatch) -> None:
    message = approval_message(seed("another commission"))
    b.approval.approvals[1].signature = staff_key("S-0002").sign(message)


def _extra_hash(b: exchange_pb2.QueryBatch) -> None:
    b.approval.subject_proof.append(bytes(32))


def _same_person(b: exchange_pb2.QueryBatch) -> None:
    b.approval.approvals[1].CopyFrom(b.approval.approvals[0])
    b.staff_ids[1] = b.staff_ids[0]


def _other_categories(b: exchange_pb2.QueryBatch) -> None:
    b.categories.append(records_pb2.DATA_CATEGORY_SECURITIES)


def _added_subject(b: exchange_pb2.QueryBatch) -> None:
    extra = b.subjects.add()
    extra.CopyFrom(b.subjects[0])
    extra.share_index = 5


NEGATIVE: tuple[tuple[str, str, int, list[int], Change, str], ...] = (
    ("changed-name", "A subject's name changed after approval (a database writer): the root differs.", 2, [0, 2, 3],
     _set_name, "approval_signature_invalid"),
    ("approval-of-another-commission", "S-0002's signature over another commission's root.", 2, [0, 2, 3],
     _other_root, "approval_signature_invalid"),
    ("proof-hash-left-over", "One hash more than the multiproof of subjects 0, 2, 3 takes.", 2, [0, 2, 3],
     _extra_hash, "approval_proof_invalid"),
    ("same-person-twice", "S-0001's approval twice.", 2, [0, 2, 3], _same_person, "approver_duplicate"),
    ("another-category", "The bank asked for securities as well, which its leaf does not name.", 0, [1, 4],
     _other_categories, "approval_signature_invalid"),
    ("subject-added", "A sixth subject (share index 5) in a commission of five.", 0, [1, 4], _added_subject,
     "approval_proof_invalid"),
)  # fmt: skip


def build_vectors() -> Json:
    subjects = _subjects()
    units = _units()
    subject_levels = tree_levels([_leaf(s) for s in subjects])
    unit_levels = tree_levels([unit_leaf(p, c, t) for p, c, t in units])
    header = _header(subject_levels, unit_levels)
    root = header.root()
    approvals = [
        exchange_pb2.StaffApproval(
            staff_id=staff_id, signature=staff_key(staff_id).sign(approval_message(root)), approved_at_ms=APPROVED_AT_MS
        )
        for staff_id in STAFF
    ]
    batches = [
        ("land-all", "The land registry's batch of all five subjects: no subject proof.", 1, [0, 1, 2, 3, 4]),
        ("tax-gapped", "The tax bureau's batch of subjects 0, 2 and 3 (1 and 4 went elsewhere).", 2, [0, 2, 3]),
        ("bank-gapped", "The bank's batch of subjects 1 and 4, with a deposit threshold.", 0, [1, 4]),
        ("tax-one", "The tax bureau's batch of subject 4 alone, the promoted last leaf.", 2, [4]),
    ]
    negative = []
    for name, description, unit_index, indices, change, reason in NEGATIVE:
        batch = _batch(f"B-{name}", unit_index, indices, approvals)  # the batch holds copies
        change(batch)
        negative.append({
            "name": name, "description": description, "unit": units[unit_index][0],
            "batch": batch.SerializeToString(deterministic=True).hex(), "reason": reason,
        })  # fmt: skip
    return {
        "format": FORMAT,
        "description": (
            "docs/exchange.md, 'Approvals a unit verifies'. Hashes and byte strings in lower-case hex. Subject leaves "
            "and unit leaves are given as their bytes and their hashes (SHA-256 of 0x00 || bytes); tree levels from "
            "the leaves (level 0) up to the root. Staff keys are Ed25519 seeds (RFC 8032 secret keys). Batches are "
            "QueryBatch protobuf bytes (deterministic encoding) as the gateway seals them for the unit named; each "
            "positive batch's root equals the commission's root and both approvals verify over it."
        ),
        "commission": {
            "gateway": GATEWAY,
            "commission_ref": REF,
            "programme": PROGRAMME,
            "income_from": list(INCOME_FROM),
            "income_to": list(INCOME_TO),
            "assets_as_of": ASSETS_AS_OF.isoformat(),
            "package_digest": PACKAGE_DIGEST.hex(),
            "subjects": [
                {
                    "share_index": s.share_index,
                    "id_number": s.id_number,
                    "name": s.name,
                    "auth_number": s.authorisation.number,
                    "auth_sha256": s.authorisation.scan_sha256.hex(),
                    "leaf_salt": s.leaf_salt.hex(),
                    "leaf_bytes": subject_leaf_bytes(
                        s.leaf_salt, s.id_number, s.name, s.authorisation.number, s.authorisation.scan_sha256
                    ).hex(),
                    "leaf": _leaf(s).hex(),
                }
                for s in subjects
            ],
            "units": [
                {
                    "unit_index": i,
                    "party_id": party,
                    "categories": list(categories),
                    "thresholds": [{"category": c, "limit_fen": v} for c, v in sorted(limits.items())],
                    "leaf_bytes": unit_leaf_bytes(party, categories, limits).hex(),
                    "leaf": unit_leaf(party, categories, limits).hex(),
                    "unit_proof": _hex(multiproof(unit_levels, [i])),
                }
                for i, (party, categories, limits) in enumerate(units)
            ],
            "subject_levels": [_hex(level) for level in subject_levels],
            "unit_levels": [_hex(level) for level in unit_levels],
            "header": header.encode().hex(),
            "root": root.hex(),
        },
        "staff": [
            {
                "staff_id": staff_id,
                "seed": seed(f"staff/{staff_id}").hex(),
                "public_key": staff_key(staff_id).public.raw.hex(),
                "roles": ["exchange"],
            }
            for staff_id in STAFF
        ],
        "approvals": [
            {
                "staff_id": a.staff_id,
                "approved_at_ms": a.approved_at_ms,
                "message": approval_message(root).hex(),
                "signature": a.signature.hex(),
            }
            for a in approvals
        ],
        "sealed_at_ms": SEALED_AT_MS,
        "batches": [
            {
                "name": name,
                "description": description,
                "unit": units[unit_index][0],
                "share_indices": indices,
                "subject_proof": _hex(multiproof(subject_levels, indices)),
                "batch": _batch(f"B-{name}", unit_index, indices, approvals)
                .SerializeToString(deterministic=True)
                .hex(),
                "root": root.hex(),
            }
            for name, description, unit_index, indices in batches
        ],
        "negative": negative,
    }


def render(document: Json) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
