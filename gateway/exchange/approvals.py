"""The gateway's side of approvals a unit verifies (docs/exchange.md, "Approvals a unit verifies").

When a commission is stored, its subjects get their share index and a random leaf salt, the units it will ask are
fixed in party-id order with the data categories asked of each, and the approval trees are built (keys/approvals.py):
the subject tree's nodes are kept level by level in chunks (``approval_nodes``), the units' leaves in
``approval_units``, and the root becomes the commission's ``exchange_digest``, the digest two staff members sign
(Procedure V.(二)). When a batch is formed, its proof is read from the stored nodes: a few chunks per level, however
large the commission (O(batch · log n), never O(commission)).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from hedui.v1 import exchange_pb2
from sqlalchemy import Connection, select, tuple_, update

from common.categories import UNIT_DATA
from gateway.db import schema as s
from gateway.db.statements import bulk_insert
from keys.approvals import (
    HASH_BYTES,
    SALT_BYTES,
    RootHeader,
    multiproof,
    proof_positions,
    subject_leaf,
    tree_levels,
    unit_leaf,
)

#: Hashes per ``approval_nodes`` row (8 KiB): a batch's proof reads at most two rows per level.
NODE_CHUNK = 256
#: The digest of a package (keys of the one-letter-one-commission rule, and what the approval root binds of the
#: package): SHA-256 over this domain, the commission id, 0x00 and the package (gateway/procedure/submission.py).
PACKAGE_DOMAIN = b"hedui.v1.exchange-digest\x00"


def engine_package_digest(ref: str) -> bytes:
    """The package digest of a commission the engine was handed without a package (tests, benchmarks: the outbox's
    ``enqueue``): the package domain over the commission id alone."""
    return hashlib.sha256(PACKAGE_DOMAIN + ref.encode() + b"\x00").digest()


def new_salts(count: int) -> list[bytes]:
    """``count`` random 16-byte leaf salts."""
    pool = os.urandom(SALT_BYTES * count)
    return [pool[i : i + SALT_BYTES] for i in range(0, len(pool), SALT_BYTES)]


@dataclass(frozen=True)
class TreeUnit:
    """A unit of a commission's unit tree: what is asked of it."""

    unit_id: str
    #: Ascending, distinct.
    categories: tuple[int, ...]
    #: (category, limit in fen) for the thresholds of its categories, ascending.
    thresholds: tuple[tuple[int, int], ...] = ()

    @property
    def leaf(self) -> bytes:
        return unit_leaf(self.unit_id, self.categories, dict(self.thresholds))


def tree_units(
    unit_categories: Mapping[str, int], categories: Iterable[int], thresholds: Iterable[tuple[int, int]]
) -> list[TreeUnit]:
    """The unit tree's units, in party-id order, for units (party id -> unit category) asked the commission's
    ``categories``: each asked those of them it holds (clause 7), with their thresholds."""
    wanted = list(categories)
    limits = list(thresholds)
    units = []
    for unit_id in sorted(unit_categories):
        served = set(UNIT_DATA.get(unit_categories[unit_id], ()))
        mine = tuple(sorted({c for c in wanted if c in served}))
        units.append(TreeUnit(unit_id, mine, tuple(sorted((c, v) for c, v in limits if c in mine))))
    return units


@dataclass(frozen=True)
class CommissionFacts:
    """What the approval root binds of a commission besides its trees (keys.approvals.RootHeader)."""

    gateway: str
    ref: str
    programme: int
    income_from: tuple[int, int]
    income_to: tuple[int, int]
    assets_as_of: date
    package_digest: bytes


def leaf_of(salt: bytes, id_number: str, name: str, auth_number: str, auth_digest: bytes) -> bytes:
    """A subject's leaf hash from its stored fields (exactly what its QuerySubject carries)."""
    return subject_leaf(salt, id_number, name, auth_number, auth_digest)


def write_tree(
    conn: Connection,
    commission_id: int,
    facts: CommissionFacts,
    subject_leaves: Sequence[bytes],
    units: Sequence[TreeUnit],
) -> bytes:
    """Store the approval trees of a commission whose subjects have leaves ``subject_leaves`` (by share index) and
    which asks ``units`` (in party-id order), inside the caller's transaction; set its exchange digest to the root
    and return the root."""
    levels = tree_levels(subject_leaves)
    rows = [
        (commission_id, level, start // NODE_CHUNK, b"".join(nodes[start : start + NODE_CHUNK]))
        for level, nodes in enumerate(levels)
        for start in range(0, len(nodes), NODE_CHUNK)
    ]
    bulk_insert(conn, s.approval_nodes, ("commission_id", "level", "chunk", "hashes"), rows)
    unit_leaves = [u.leaf for u in units]
    conn.execute(
        s.approval_units.insert(),
        [
            {
                "commission_id": commission_id,
                "unit_index": index,
                "unit_id": unit.unit_id,
                "categories": ",".join(str(c) for c in unit.categories),
                "leaf": leaf,
            }
            for index, (unit, leaf) in enumerate(zip(units, unit_leaves, strict=True))
        ],
    )
    header = RootHeader(
        gateway=facts.gateway,
        commission_ref=facts.ref,
        programme=facts.programme,
        income_from=facts.income_from,
        income_to=facts.income_to,
        assets_as_of=facts.assets_as_of,
        package_digest=facts.package_digest,
        subject_count=len(subject_leaves),
        subject_root=levels[-1][0],
        unit_count=len(units),
        unit_root=tree_levels(unit_leaves)[-1][0],
    )
    root = header.root()
    conn.execute(
        update(s.commissions)
        .where(s.commissions.c.id == commission_id)
        .values(
            exchange_digest=root,
            package_digest=facts.package_digest,
            subject_root=header.subject_root,
            unit_root=header.unit_root,
            subject_count=len(subject_leaves),
        )
    )
    return root


def tree_unit_ids(conn: Connection, commission_id: int) -> list[str] | None:
    """The units of the commission's unit tree in tree order; None for a commission without trees (made before
    approval trees existed)."""
    rows = conn.execute(
        select(s.approval_units.c.unit_id)
        .where(s.approval_units.c.commission_id == commission_id)
        .order_by(s.approval_units.c.unit_index)
    ).all()
    return [r.unit_id for r in rows] or None


@dataclass(frozen=True)
class BatchShare:
    """What a batch of one unit carries of the commission's approval: the categories asked of that unit (as its
    leaf has them) and the proof with the staff approvals."""

    categories: tuple[int, ...]
    proof: exchange_pb2.ApprovalProof


def batch_share(conn: Connection, commission: Any, unit_id: str, share_indices: Sequence[int]) -> BatchShare | None:
    """The approval share of a batch of ``unit_id`` carrying the subjects at ``share_indices`` of ``commission`` (its
    row); None for a commission without trees, or a unit outside its unit tree (its batch then carries no proof,
    and a unit that verifies approvals refuses it)."""
    if commission.subject_root is None:
        return None
    units = conn.execute(
        select(s.approval_units.c.unit_id, s.approval_units.c.categories, s.approval_units.c.leaf)
        .where(s.approval_units.c.commission_id == commission.id)
        .order_by(s.approval_units.c.unit_index)
    ).all()
    index = next((i for i, u in enumerate(units) if u.unit_id == unit_id), None)
    if index is None:
        return None
    count = int(commission.subject_count)
    positions = proof_positions(count, share_indices)
    wanted = sorted({(level, position // NODE_CHUNK) for level, position in positions})
    chunks: dict[tuple[int, int], bytes] = {}
    if wanted:
        n = s.approval_nodes.c
        found = conn.execute(
            select(n.level, n.chunk, n.hashes).where(
                n.commission_id == commission.id, tuple_(n.level, n.chunk).in_(wanted)
            )
        )
        chunks = {(r.level, r.chunk): bytes(r.hashes) for r in found}
    subject_proof = []
    for level, position in positions:
        start = (position % NODE_CHUNK) * HASH_BYTES
        subject_proof.append(chunks[(level, position // NODE_CHUNK)][start : start + HASH_BYTES])
    approvals = conn.execute(
        select(s.approvals.c.staff_id, s.approvals.c.signature, s.approvals.c.approved_at_ms)
        .where(s.approvals.c.commission_id == commission.id)
        .order_by(s.approvals.c.approved_at_ms, s.approvals.c.staff_id)
    ).all()
    proof = exchange_pb2.ApprovalProof(
        package_digest=bytes(commission.package_digest),
        subject_count=count,
        unit_count=len(units),
        unit_index=index,
        unit_proof=multiproof(tree_levels([bytes(u.leaf) for u in units]), [index]),
        subject_proof=subject_proof,
        approvals=[
            exchange_pb2.StaffApproval(
                staff_id=a.staff_id, signature=bytes(a.signature), approved_at_ms=a.approved_at_ms
            )
            for a in approvals
        ],
    )
    categories = tuple(int(c) for c in units[index].categories.split(",") if c)
    return BatchShare(categories, proof)
