"""Approvals a unit verifies: the Merkle trees behind a commission's exchange digest (docs/exchange.md, "Approvals
a unit verifies").

Two staff members approve an exchange (Procedure V.(二)) by signing the commission's *approval root*
(keys/statements.py ``approval_message``). The root commits to

* every subject of the commission, each as a leaf of the **subject tree** (salted, so that a sibling hash a unit
  receives never confirms a guessed ID number), in the commission's member order (``share_index`` 0, 1, ...);
* every sharing unit asked, each as a leaf of the **unit tree** (its party id, the data categories asked of it and
  their thresholds), in party-id order;
* the commission's facts (gateway, commission reference, programme, period, asset date) and the agency-only digest
  of its whole package.

A unit receives its own leaf's proof and a multiproof of the batch's subjects, recomputes the root from what the
batch carries and checks the signatures over it against the agency's roster. It never sees another unit's
categories or another unit's leaf, only hashes.

Trees: SHA-256; a leaf hashes ``0x00 || leaf bytes``, an inner node ``0x01 || left || right``; a level of odd width
promotes its last node unchanged. A multiproof for a set of leaf indices lists, level by level from the leaves up
and within a level by ascending position, the sibling of every node the verifier can compute whose sibling exists
and cannot be computed from the indices given.

No network, no database: the gateway builds trees and proofs (gateway/exchange/approvals.py), the connector verifies
(connectors/approvals.py), both with these functions.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date

from hedui.v1 import exchange_pb2

from keys.errors import KeysError

#: Domains: the first bytes of each kind of leaf and of the root's header, so that no such bytes can pass for
#: another kind (or for any other signed or hashed statement of the project).
SUBJECT_DOMAIN = b"hedui.v1.approval-subject\x00"
UNIT_DOMAIN = b"hedui.v1.approval-unit\x00"
ROOT_DOMAIN = b"hedui.v1.approval-root\x00"
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
HASH_BYTES = 32
SALT_BYTES = 16
#: Leaves of one tree at most (counts are encoded in 32 bits; a commission has far fewer subjects).
MAX_LEAVES = 0xFFFF_FFFF

_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")


class ApprovalProofError(KeysError):
    """A proof or the facts it is given do not form a valid approval proof (wrong lengths, an index out of range, too
    many or too few proof hashes). Says which, without personal data."""

    code = "approval_proof_invalid"


def _lp(data: bytes) -> bytes:
    """Length-prefixed: u32 big-endian length, then the bytes."""
    return _U32.pack(len(data)) + data


def _text(value: str, field: str) -> bytes:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates cannot come from a parsed protobuf string; be explicit
        raise ApprovalProofError(f"{field} is not valid text") from exc


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# -- leaves ----------------------------------------------------------------------------------------------------------


def subject_leaf_bytes(salt: bytes, id_number: str, name: str, auth_number: str, auth_sha256: bytes) -> bytes:
    """The bytes of a subject's leaf: SUBJECT_DOMAIN || salt (16 bytes) || lp(ID number) || lp(name) ||
    lp(authorisation number) || lp(authorisation scan SHA-256); strings in UTF-8, exactly as the batch carries
    them (QuerySubject fields)."""
    if len(salt) != SALT_BYTES:
        raise ApprovalProofError(f"a leaf salt is {SALT_BYTES} bytes, not {len(salt)}")
    return b"".join(
        (
            SUBJECT_DOMAIN,
            salt,
            _lp(_text(id_number, "ID number")),
            _lp(_text(name, "name")),
            _lp(_text(auth_number, "authorisation number")),
            _lp(bytes(auth_sha256)),
        )
    )


def subject_leaf(salt: bytes, id_number: str, name: str, auth_number: str, auth_sha256: bytes) -> bytes:
    """The hash of a subject's leaf: SHA-256(0x00 || :func:`subject_leaf_bytes`)."""
    if len(salt) != SALT_BYTES:
        raise ApprovalProofError(f"a leaf salt is {SALT_BYTES} bytes, not {len(salt)}")
    return _subject_hash(
        salt,
        _text(id_number, "ID number"),
        _text(name, "name"),
        _text(auth_number, "authorisation number"),
        bytes(auth_sha256),
    )


_SUBJECT_HEAD = LEAF_PREFIX + SUBJECT_DOMAIN


def _subject_hash(salt: bytes, id_number: bytes, name: bytes, auth_number: bytes, auth_sha256: bytes) -> bytes:
    """:func:`subject_leaf` of checked parts, in one concatenation: a unit hashes thousands per batch."""
    pack = _U32.pack
    return hashlib.sha256(
        _SUBJECT_HEAD
        + salt
        + pack(len(id_number))
        + id_number
        + pack(len(name))
        + name
        + pack(len(auth_number))
        + auth_number
        + pack(len(auth_sha256))
        + auth_sha256
    ).digest()


def unit_leaf_bytes(party_id: str, categories: Iterable[int], thresholds: Mapping[int, int]) -> bytes:
    """The bytes of a unit's leaf: UNIT_DOMAIN || lp(party id) || u32(n) || n x u32(category) || u32(m) ||
    m x (u32(category) || i64(limit in fen)), categories ascending and distinct, thresholds ascending by category and
    only for categories asked of the unit."""
    cats = sorted(categories)
    if len(set(cats)) != len(cats):
        raise ApprovalProofError("a unit's categories are listed once each")
    if any(not 0 <= c <= 0xFFFF_FFFF for c in cats):
        raise ApprovalProofError("a data category is a 32-bit number")
    limits = sorted(thresholds.items())
    if any(c not in cats for c, _ in limits):
        raise ApprovalProofError("a threshold is given for a category not asked of the unit")
    if any(not -(2**63) <= v < 2**63 for _, v in limits):
        raise ApprovalProofError("a threshold limit is a 64-bit number")
    parts = [UNIT_DOMAIN, _lp(_text(party_id, "party id")), _U32.pack(len(cats))]
    parts += [_U32.pack(c) for c in cats]
    parts.append(_U32.pack(len(limits)))
    parts += [_U32.pack(c) + _I64.pack(v) for c, v in limits]
    return b"".join(parts)


def unit_leaf(party_id: str, categories: Iterable[int], thresholds: Mapping[int, int]) -> bytes:
    """The hash of a unit's leaf: SHA-256(0x00 || :func:`unit_leaf_bytes`)."""
    return _sha256(LEAF_PREFIX + unit_leaf_bytes(party_id, categories, thresholds))


# -- the root ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RootHeader:
    """What the approval root commits to besides the two trees: the commission as the batches carry it."""

    gateway: str
    commission_ref: str
    programme: int
    income_from: tuple[int, int]
    income_to: tuple[int, int]
    assets_as_of: date
    #: The agency-only commitment to the whole package (letter, households, relations): opaque to units.
    package_digest: bytes
    subject_count: int
    subject_root: bytes
    unit_count: int
    unit_root: bytes

    def encode(self) -> bytes:
        """ROOT_DOMAIN || lp(gateway) || lp(commission ref) || u32(programme) || u32 year, u32 month of income from
        and of income to || u32 year, month, day of the asset date || package digest (32) || u32(subject count) ||
        subject root (32) || u32(unit count) || unit root (32)."""
        for name in ("package_digest", "subject_root", "unit_root"):
            if len(getattr(self, name)) != HASH_BYTES:
                raise ApprovalProofError(f"{name.replace('_', ' ')} is {HASH_BYTES} bytes")
        for name in ("subject_count", "unit_count"):
            if not 1 <= getattr(self, name) <= MAX_LEAVES:
                raise ApprovalProofError(f"{name.replace('_', ' ')} must be 1 to {MAX_LEAVES}")
        numbers = (
            self.programme,
            *self.income_from,
            *self.income_to,
            self.assets_as_of.year,
            self.assets_as_of.month,
            self.assets_as_of.day,
        )
        if any(not 0 <= n <= 0xFFFF_FFFF for n in numbers):
            raise ApprovalProofError("programme, period and date are 32-bit numbers")
        return b"".join(
            (
                ROOT_DOMAIN,
                _lp(_text(self.gateway, "gateway")),
                _lp(_text(self.commission_ref, "commission ref")),
                *(_U32.pack(n) for n in numbers),
                self.package_digest,
                _U32.pack(self.subject_count),
                self.subject_root,
                _U32.pack(self.unit_count),
                self.unit_root,
            )
        )

    def root(self) -> bytes:
        """The approval root: SHA-256 of :meth:`encode`. This is the commission's exchange digest, what staff sign."""
        return _sha256(self.encode())


# -- trees -------------------------------------------------------------------------------------------------------------


def node(left: bytes, right: bytes) -> bytes:
    """An inner node: SHA-256(0x01 || left || right)."""
    return _sha256(NODE_PREFIX + left + right)


def tree_levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """Every level of the tree over ``leaves`` (leaf hashes), from the leaves (level 0) up to the root (a level of
    one node). A level of odd width promotes its last node unchanged."""
    if not leaves:
        raise ApprovalProofError("a tree needs at least one leaf")
    if len(leaves) > MAX_LEAVES:
        raise ApprovalProofError("too many leaves")
    levels = [list(leaves)]
    current = levels[0]
    while len(current) > 1:
        pairs = len(current) // 2
        upper = [_sha256(NODE_PREFIX + current[2 * i] + current[2 * i + 1]) for i in range(pairs)]
        if len(current) % 2:
            upper.append(current[-1])
        levels.append(upper)
        current = upper
    return levels


def tree_root(leaves: Sequence[bytes]) -> bytes:
    """The root of the tree over ``leaves``."""
    return tree_levels(leaves)[-1][0]


def _check_indices(count: int, indices: Iterable[int]) -> list[int]:
    if not 1 <= count <= MAX_LEAVES:
        raise ApprovalProofError(f"a tree has 1 to {MAX_LEAVES} leaves, not {count}")
    known = sorted(indices)
    if not known:
        raise ApprovalProofError("a proof is for at least one leaf")
    if known[0] < 0 or known[-1] >= count:
        raise ApprovalProofError("a leaf index lies outside the tree")
    if len(set(known)) != len(known):
        raise ApprovalProofError("a leaf index is given twice")
    return known


def proof_positions(count: int, indices: Iterable[int]) -> list[tuple[int, int]]:
    """The (level, position) of every node a multiproof for the leaves at ``indices`` of a tree of ``count`` leaves
    carries, in proof order. Depends only on the indices and the count: the gateway reads exactly these nodes."""
    known = _check_indices(count, indices)
    width, level, out = count, 0, []
    while width > 1:
        first, last = known[0], known[-1]
        if last - first == len(known) - 1:  # a run: only its ends can lack their siblings
            if first & 1:
                out.append((level, first - 1))
            if not last & 1 and last + 1 < width:
                out.append((level, last + 1))
            known = list(range(first >> 1, (last >> 1) + 1))
            width, level = (width + 1) >> 1, level + 1
            continue
        upper: list[int] = []
        j = 0
        while j < len(known):
            i = known[j]
            sibling = i ^ 1
            if sibling >= width:
                pass  # the last node of an odd level: promoted unchanged
            elif j + 1 < len(known) and known[j + 1] == sibling:
                j += 1  # both children known
            else:
                out.append((level, sibling))
            upper.append(i >> 1)
            j += 1
        known, width, level = upper, (width + 1) >> 1, level + 1
    return out


def multiproof(levels: Sequence[Sequence[bytes]], indices: Iterable[int]) -> list[bytes]:
    """The multiproof for the leaves at ``indices`` of the tree whose levels are ``levels`` (:func:`tree_levels`)."""
    return [levels[level][position] for level, position in proof_positions(len(levels[0]), indices)]


def root_from_proof(count: int, leaves: Mapping[int, bytes], proof: Sequence[bytes]) -> bytes:
    """The root of a tree of ``count`` leaves computed from the leaves at some indices (index -> leaf hash) and the
    multiproof for them. Raises ApprovalProofError when the proof has a hash of the wrong length, too few hashes or
    hashes left over; a proof of the right shape with wrong hashes gives another root (the signatures over the
    root then fail)."""
    known = _check_indices(count, leaves)
    if any(len(p) != HASH_BYTES for p in proof):
        raise ApprovalProofError(f"every proof hash is {HASH_BYTES} bytes")
    if any(len(leaves[i]) != HASH_BYTES for i in known):
        raise ApprovalProofError(f"every leaf hash is {HASH_BYTES} bytes")
    hashes = [leaves[i] for i in known]
    width, taken = count, 0
    while width > 1:
        if known[-1] - known[0] == len(known) - 1:
            # A run of consecutive nodes (a batch of one unit usually is): the same walk, pairs hashed in one go.
            known, hashes, taken = _run_up(known[0], hashes, width, proof, taken)
            width = (width + 1) >> 1
            continue
        upper_known: list[int] = []
        upper_hashes: list[bytes] = []
        j = 0
        while j < len(known):
            i, h = known[j], hashes[j]
            sibling = i ^ 1
            if sibling >= width:
                parent = h
            elif j + 1 < len(known) and known[j + 1] == sibling:
                parent = _sha256(NODE_PREFIX + h + hashes[j + 1])
                j += 1
            else:
                if taken >= len(proof):
                    raise ApprovalProofError("the proof has too few hashes")
                other = proof[taken]
                taken += 1
                parent = _sha256(NODE_PREFIX + other + h) if i & 1 else _sha256(NODE_PREFIX + h + other)
            upper_known.append(i >> 1)
            upper_hashes.append(parent)
            j += 1
        known, hashes, width = upper_known, upper_hashes, (width + 1) >> 1
    if taken != len(proof):
        raise ApprovalProofError("the proof has hashes left over")
    return hashes[0]


def _run_up(
    first: int, hashes: list[bytes], width: int, proof: Sequence[bytes], taken: int
) -> tuple[list[int], list[bytes], int]:
    """One level of :func:`root_from_proof` for the known nodes ``first``, ``first + 1``, ... (``hashes``): a proof
    hash for the left end when it is a right child, the pairs, then the right end (its sibling from the proof, or
    promoted at the end of an odd level). Returns the next level's positions, hashes and proof hashes used."""
    last = first + len(hashes) - 1
    head: list[bytes] = []
    start = 0
    if first & 1:
        if taken >= len(proof):
            raise ApprovalProofError("the proof has too few hashes")
        head.append(_sha256(NODE_PREFIX + proof[taken] + hashes[0]))
        taken, start = taken + 1, 1
    paired_end = start + ((len(hashes) - start) & ~1)
    sha, node_prefix = hashlib.sha256, NODE_PREFIX
    upper = head + [sha(node_prefix + hashes[j] + hashes[j + 1]).digest() for j in range(start, paired_end, 2)]
    if paired_end < len(hashes):  # the right end is a left child without its sibling
        if last + 1 >= width:
            upper.append(hashes[-1])
        else:
            if taken >= len(proof):
                raise ApprovalProofError("the proof has too few hashes")
            upper.append(_sha256(NODE_PREFIX + hashes[-1] + proof[taken]))
            taken += 1
    return list(range(first >> 1, (last >> 1) + 1)), upper, taken


# -- a query batch -----------------------------------------------------------------------------------------------------


def batch_root(gateway: str, unit: str, batch: exchange_pb2.QueryBatch) -> bytes:
    """The approval root a query batch from ``gateway`` to ``unit`` stands for: the unit's leaf from the batch's
    categories and thresholds, the subjects' leaves from their fields, share indices and salts, both completed to
    their tree roots with the batch's proofs, and the header from the batch. The staff approvals in the batch must be
    signatures over this root. Raises ApprovalProofError (naming what, never a subject's data) when the batch
    carries no approval proof or one of the wrong shape."""
    if not batch.HasField("approval"):
        raise ApprovalProofError("the batch carries no approval proof")
    proof = batch.approval
    if not batch.subjects:
        raise ApprovalProofError("the batch has no subjects")
    subject_leaves: dict[int, bytes] = {}
    for position, subject in enumerate(batch.subjects):
        index, salt, authorisation = subject.share_index, subject.leaf_salt, subject.authorisation
        if index in subject_leaves:
            raise ApprovalProofError(f"two subjects of the batch have share index {index}")
        if len(salt) != SALT_BYTES:
            raise ApprovalProofError(f"subject {position + 1} of the batch has no {SALT_BYTES}-byte leaf salt")
        # Parsed protobuf strings are valid UTF-8: they always encode.
        subject_leaves[index] = _subject_hash(
            salt,
            subject.id_number.encode(),
            subject.name.encode(),
            authorisation.number.encode(),
            authorisation.scan_sha256,
        )
    if proof.unit_index >= proof.unit_count:
        raise ApprovalProofError("the unit index lies outside the unit tree")
    limits: dict[int, int] = {}
    for threshold in batch.thresholds:
        if threshold.category in limits:
            raise ApprovalProofError("a threshold is given twice for one category")
        limits[threshold.category] = threshold.limit_fen
    mine = unit_leaf(unit, list(batch.categories), limits)
    try:
        asset_date = date(batch.assets_as_of.year, batch.assets_as_of.month, batch.assets_as_of.day)
    except ValueError as exc:
        raise ApprovalProofError("the batch's asset date is not a date") from exc
    header = RootHeader(
        gateway=gateway,
        commission_ref=batch.commission_ref,
        programme=batch.purpose,
        income_from=(batch.income_from.year, batch.income_from.month),
        income_to=(batch.income_to.year, batch.income_to.month),
        assets_as_of=asset_date,
        package_digest=bytes(proof.package_digest),
        subject_count=proof.subject_count,
        subject_root=root_from_proof(proof.subject_count, subject_leaves, proof.subject_proof),
        unit_count=proof.unit_count,
        unit_root=root_from_proof(proof.unit_count, {proof.unit_index: mine}, proof.unit_proof),
    )
    return header.root()
