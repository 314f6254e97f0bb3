"""The approval trees (keys/approvals.py): every multiproof of every subset of small trees verifies to the root;
any changed leaf, proof hash, index or count gives another root or is refused; malformed input is refused with
ApprovalProofError."""

from __future__ import annotations

import hashlib
import itertools
from datetime import date

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keys.approvals import (
    HASH_BYTES,
    ApprovalProofError,
    RootHeader,
    multiproof,
    node,
    proof_positions,
    root_from_proof,
    subject_leaf,
    subject_leaf_bytes,
    tree_levels,
    tree_root,
    unit_leaf,
    unit_leaf_bytes,
)


def leaves(count: int) -> list[bytes]:
    return [hashlib.sha256(b"leaf %d" % i).digest() for i in range(count)]


def subsets(count: int) -> list[tuple[int, ...]]:
    return [c for r in range(1, count + 1) for c in itertools.combinations(range(count), r)]


@pytest.mark.parametrize("count", range(1, 10))
def test_every_proof_of_every_subset_verifies(count: int) -> None:
    tree = leaves(count)
    levels = tree_levels(tree)
    root = levels[-1][0]
    for subset in subsets(count):
        proof = multiproof(levels, subset)
        assert root_from_proof(count, {i: tree[i] for i in subset}, proof) == root
        # The proof carries exactly the positions proof_positions names, and never a node it could compute.
        assert len(proof) == len(proof_positions(count, subset))


def test_the_tree_is_the_one_the_spec_describes() -> None:
    a, b, c, d, e = leaves(5)
    # Width 5: the fifth leaf is promoted twice, unchanged.
    assert tree_root([a, b, c, d, e]) == node(node(node(a, b), node(c, d)), e)
    assert tree_root([a, b, c]) == node(node(a, b), c)
    assert tree_root([a]) == a
    assert node(a, b) == hashlib.sha256(b"\x01" + a + b).digest()


def test_a_proof_lists_siblings_level_by_level_in_ascending_order() -> None:
    # Seven leaves, subjects 1, 2 and 6: level 0 needs 0 and 3 (6's sibling 7 does not exist), level 1 needs
    # nothing (0-1 and 2-3 both known, 6 promoted as 3), level 2: 1 (the pair 4-5) is needed for 3's parent.
    assert proof_positions(7, [6, 2, 1]) == [(0, 0), (0, 3), (1, 2)]
    assert proof_positions(7, range(7)) == []
    assert proof_positions(1, [0]) == []


@pytest.mark.parametrize("count", [2, 3, 5, 8])
def test_a_changed_leaf_or_proof_hash_gives_another_root(count: int) -> None:
    tree = leaves(count)
    levels = tree_levels(tree)
    root = levels[-1][0]
    other = hashlib.sha256(b"other").digest()
    for subset in subsets(count):
        proof = multiproof(levels, subset)
        known = {i: tree[i] for i in subset}
        for i in subset:
            assert root_from_proof(count, {**known, i: other}, proof) != root
        for k in range(len(proof)):
            changed = [*proof[:k], other, *proof[k + 1 :]]
            assert root_from_proof(count, known, changed) != root
        if len(proof) > 1:
            assert root_from_proof(count, known, list(reversed(proof))) != root or proof[0] == proof[-1]


def test_leaves_moved_to_other_indices_give_another_root() -> None:
    tree = leaves(6)
    levels = tree_levels(tree)
    root = levels[-1][0]
    proof = multiproof(levels, [1, 4])
    assert root_from_proof(6, {4: tree[1], 1: tree[4]}, proof) != root
    # The same leaves claimed at indices whose proof has the same shape do not verify either.
    assert root_from_proof(6, {0: tree[1], 5: tree[4]}, multiproof(levels, [0, 5])) != root


def test_the_tree_alone_does_not_bind_its_width_so_the_header_does() -> None:
    # A proof for leaf 2 of six leaves has the shape of a proof for leaf 2 of five: the subject tree's root alone
    # does not say how many subjects there are. The root header commits to the count (and the unit count), so a
    # batch that claims another count gives another approval root.
    tree = leaves(6)
    levels = tree_levels(tree)
    proof = multiproof(levels, [2])
    assert root_from_proof(5, {2: tree[2]}, proof) == levels[-1][0]
    assert root_from_proof(8, {2: tree[2]}, proof) == levels[-1][0]
    assert _header(subject_count=5).root() != _header(subject_count=6).root()
    with pytest.raises(ApprovalProofError, match="too few"):
        root_from_proof(12, {2: tree[2]}, proof)


@pytest.mark.parametrize(
    ("count", "known", "proof", "message"),
    [
        (0, {0: b"\x00" * 32}, [], "1 to"),
        (4, {}, [], "at least one leaf"),
        (4, {4: b"\x00" * 32}, [], "outside the tree"),
        (4, {-1: b"\x00" * 32}, [], "outside the tree"),
        (4, {0: b"\x00" * 31}, [b"\x00" * 32] * 2, "leaf hash"),
        (4, {0: b"\x00" * 32}, [b"\x00" * 32], "too few"),
        (4, {0: b"\x00" * 32}, [b"\x00" * 32] * 3, "left over"),
        (4, {0: b"\x00" * 32}, [b"\x00" * 32, b"\x00" * 33], "proof hash"),
    ],
)
def test_malformed_proofs_are_refused(count: int, known: dict[int, bytes], proof: list[bytes], message: str) -> None:
    with pytest.raises(ApprovalProofError, match=message):
        root_from_proof(count, known, proof)


def test_an_index_given_twice_is_refused() -> None:
    with pytest.raises(ApprovalProofError, match="twice"):
        proof_positions(4, [1, 1])


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1), min_size=1))))
def test_random_trees_and_subsets_round_trip(case: tuple[int, set[int]]) -> None:
    count, subset = case
    tree = leaves(count)
    levels = tree_levels(tree)
    proof = multiproof(levels, subset)
    assert root_from_proof(count, {i: tree[i] for i in subset}, proof) == levels[-1][0]
    # A contiguous run of leaves needs at most two hashes per level.
    run = range(min(subset), max(subset) + 1)
    assert len(proof_positions(count, run)) <= 2 * len(levels)


def test_subject_leaf_is_salted_and_length_prefixed() -> None:
    salt = bytes(range(16))
    scan = hashlib.sha256(b"scan").digest()
    data = subject_leaf_bytes(salt, "110101199003076513", "张三", "AUTH-1", scan)
    name = "张三".encode()
    assert data == (
        b"hedui.v1.approval-subject\x00"
        + salt
        + b"\x00\x00\x00\x12110101199003076513"
        + len(name).to_bytes(4, "big")
        + name
        + b"\x00\x00\x00\x06AUTH-1"
        + b"\x00\x00\x00\x20"
        + scan
    )
    assert subject_leaf(salt, "110101199003076513", "张三", "AUTH-1", scan) == hashlib.sha256(b"\x00" + data).digest()
    # Another salt, or a field boundary moved, is another leaf.
    assert subject_leaf(bytes(16), "110101199003076513", "张三", "AUTH-1", scan) != subject_leaf(
        salt, "110101199003076513", "张三", "AUTH-1", scan
    )
    assert subject_leaf(salt, "1", "23", "", scan) != subject_leaf(salt, "12", "3", "", scan)
    with pytest.raises(ApprovalProofError, match="salt"):
        subject_leaf(bytes(15), "1", "2", "3", scan)


def test_unit_leaf_sorts_categories_and_binds_thresholds() -> None:
    assert unit_leaf("unit.220100.bank", [12, 11], {}) == unit_leaf("unit.220100.bank", [11, 12], {})
    assert unit_leaf("unit.220100.bank", [11], {11: 500_000}) != unit_leaf("unit.220100.bank", [11], {11: 500_001})
    assert unit_leaf("unit.220100.bank", [11], {}) != unit_leaf("unit.220100.tax", [11], {})
    assert unit_leaf_bytes("u", [2, 1], {2: -1}) == (
        b"hedui.v1.approval-unit\x00\x00\x00\x00\x01u"
        + b"\x00\x00\x00\x02\x00\x00\x00\x01\x00\x00\x00\x02"
        + b"\x00\x00\x00\x01\x00\x00\x00\x02"
        + b"\xff" * 8
    )
    with pytest.raises(ApprovalProofError, match="once each"):
        unit_leaf("u", [1, 1], {})
    with pytest.raises(ApprovalProofError, match="not asked"):
        unit_leaf("u", [1], {2: 5})


def _header(**changes: object) -> RootHeader:
    values: dict[str, object] = {
        "gateway": "agency.220100",
        "commission_ref": "C0011223344556677",
        "programme": 1,
        "income_from": (2025, 9),
        "income_to": (2026, 2),
        "assets_as_of": date(2026, 2, 28),
        "package_digest": b"\x01" * HASH_BYTES,
        "subject_count": 5,
        "subject_root": b"\x02" * HASH_BYTES,
        "unit_count": 3,
        "unit_root": b"\x03" * HASH_BYTES,
    }
    values.update(changes)
    return RootHeader(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "change",
    [
        {"gateway": "agency.220200"},
        {"commission_ref": "C0011223344556678"},
        {"programme": 2},
        {"income_from": (2025, 8)},
        {"income_to": (2026, 3)},
        {"assets_as_of": date(2026, 2, 27)},
        {"package_digest": b"\x04" * HASH_BYTES},
        {"subject_count": 6},
        {"subject_root": b"\x04" * HASH_BYTES},
        {"unit_count": 2},
        {"unit_root": b"\x04" * HASH_BYTES},
    ],
)
def test_the_root_binds_every_header_field(change: dict[str, object]) -> None:
    assert _header(**change).root() != _header().root()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"package_digest": b"\x01" * 31}, "package digest"),
        ({"subject_root": b""}, "subject root"),
        ({"subject_count": 0}, "subject count"),
        ({"unit_count": 0}, "unit count"),
        ({"programme": -1}, "32-bit"),
    ],
)
def test_a_malformed_header_is_refused(change: dict[str, object], message: str) -> None:
    with pytest.raises(ApprovalProofError, match=message):
        _header(**change).root()
