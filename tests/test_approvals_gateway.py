"""The gateway's side of approvals a unit verifies (issue 11): the exchange digest staff sign is the root of the
commission's approval trees; every batch carries its unit's share, the subjects' leaves and the approvals; the units
(real connectors over mutual TLS on loopback) verify them and answer; a unit never receives another unit's categories
or leaf; proofs are read from a few stored nodes; commissions stored before approval trees get theirs at start."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hedui.v1 import agency_pb2, exchange_pb2
from sqlalchemy import delete, func, insert, select, update

from common.categories import UNIT_DATA
from gateway.db import schema
from gateway.exchange.approvals import NODE_CHUNK, batch_share
from gateway.procedure.approval_trees import complete_trees
from keys.approvals import batch_root, multiproof, subject_leaf, tree_levels
from tests.agency_world import agency_world
from tests.exchange_world import GATEWAY
from tests.gateway_drive import batch_rows, rows, settle
from tests.gateway_world import UNITS
from tests.test_agency import BACKOFFICE, COMMISSIONER, NOW, Agency


@pytest.fixture
def agency(tmp_path: Path) -> Iterator[Agency]:
    with agency_world(tmp_path) as world:
        yield world


def _reviewed(agency: Agency, households: int, start: int = 0) -> agency_pb2.Commission:
    commissioner, office = agency.stub(COMMISSIONER), agency.stub(BACKOFFICE)
    cid = commissioner.SubmitCommission(agency.package(households, start)).commission_id
    office.RecordIntake(agency.intake(cid, "S-0001"))
    return office.RecordReview(agency.review(cid, "S-0002"))


def _approve(agency: Agency, commission: agency_pb2.Commission, staff: tuple[str, ...] = ("S-0003", "S-0004")) -> None:
    office = agency.stub(BACKOFFICE)
    for staff_id in staff:
        office.ApproveExchange(
            agency_pb2.ExchangeApproval(
                commission_id=commission.commission_id,
                staff_id=staff_id,
                signature=agency.sign(staff_id, commission.exchange_digest),
            )
        )


def _contents(agency: Agency, commission_id: int) -> dict[str, list[bytes]]:
    c = schema.batch_contents.c
    b = schema.batches.c
    query = (
        select(b.unit_id, c.content)
        .join_from(schema.batches, schema.batch_contents, b.batch_id == c.batch_id)
        .where(b.commission_id == commission_id)
        .order_by(b.created_at_ms)
    )
    found: dict[str, list[bytes]] = {}
    for row in rows(agency.world, query):
        found.setdefault(row.unit_id, []).append(bytes(row.content))
    return found


def _commission_id(agency: Agency, ref: str) -> int:
    return int(rows(agency.world, select(schema.commissions.c.id).where(schema.commissions.c.ref == ref))[0].id)


def test_the_units_verify_what_the_staff_approved_and_answer(agency: Agency) -> None:
    """End to end: the exchange digest two staff sign is the root every unit recomputes from its own batches."""
    agency.world.engine.settings = type(agency.world.engine.settings)(
        **{**agency.world.engine.settings.__dict__, "batch_size": 7}
    )
    reviewed = _reviewed(agency, 6)
    _approve(agency, reviewed)
    settle(agency.world)
    commission_id = _commission_id(agency, reviewed.commission_id)
    assert {b.state for b in batch_rows(agency.world, commission_id)} == {"acknowledged"}
    contents = _contents(agency, commission_id)
    assert set(contents) == set(UNITS)
    for unit_id, batches in contents.items():
        assert len(batches) >= 2  # several batches per unit: each a (contiguous) part of the subject list
        for content in batches:
            batch = exchange_pb2.QueryBatch.FromString(content)
            assert batch_root(GATEWAY, unit_id, batch) == reviewed.exchange_digest
            assert [a.staff_id for a in batch.approval.approvals] == ["S-0003", "S-0004"]
            assert list(batch.staff_ids) == ["S-0003", "S-0004"]
            # Clause 16: the unit sees its own categories only, and no other unit's name.
            assert set(batch.categories) <= set(UNIT_DATA[UNITS[unit_id]])
            for other in UNITS:
                if other != unit_id:
                    assert other.encode() not in content
            assert len(batch.approval.subject_proof) <= 2 * 8
    for running in agency.world.connectors.values():
        accepted = [e for e in running.connector.store.audit_entries() if e["event"] == "accepted"]
        refused = [e for e in running.connector.store.audit_entries() if e["event"] == "refused"]
        assert accepted and not refused


def test_a_proof_is_read_from_a_few_stored_nodes_and_is_the_trees_own(agency: Agency) -> None:
    """For random gapped subsets of a large commission, the proof read from the stored node chunks is the
    multiproof of the full tree, and it reads at most two chunks per level."""
    world = agency.world
    commission_id = world.commission("WT-BIG", households=900)
    with world.store.engine.connect() as conn:
        commission = conn.execute(select(schema.commissions).where(schema.commissions.c.id == commission_id)).one()
        subjects = conn.execute(
            select(schema.subjects)
            .where(schema.subjects.c.commission_id == commission_id)
            .order_by(schema.subjects.c.id)
        ).all()
        count = len(subjects)
        assert count == commission.subject_count > 2 * NODE_CHUNK
        assert [s.share_index for s in subjects] == list(range(count))
        leaves = [subject_leaf(s.leaf_salt, s.id_number, s.name, s.auth_number, s.auth_digest) for s in subjects]
        levels = tree_levels(leaves)
        assert bytes(commission.subject_root) == levels[-1][0]
        chosen = random.Random(7)
        for _ in range(20):
            start = chosen.randrange(count - 300)
            indices = sorted(chosen.sample(range(start, start + 300), chosen.randrange(1, 300)))
            share = batch_share(conn, commission, "unit.220100.tax", indices)
            assert share is not None
            assert list(share.proof.subject_proof) == multiproof(levels, indices)
        nodes = conn.execute(
            select(func.count())
            .select_from(schema.approval_nodes)
            .where(schema.approval_nodes.c.commission_id == commission_id)
        ).scalar_one()
        assert nodes == sum((len(level) + NODE_CHUNK - 1) // NODE_CHUNK for level in levels)


def test_approval_is_refused_when_a_unit_of_the_tree_was_disabled(agency: Agency) -> None:
    """The approval tree names the units asked: a second land registry enabled at submission and disabled before
    the approvals is refused, although the first one still holds its category; nothing is recorded."""
    world = agency.world
    entries = [(u.unit_id, u.category, u.endpoint, u.exchange_mode, u.enabled) for u in world.store.units.all()]
    second = ("unit.220100.land2", UNITS["unit.220100.land"], "localhost:1", "system")
    world.store.units.sync([*entries, (*second, True)])
    reviewed = _reviewed(agency, 2)
    world.store.units.sync([*entries, (*second, False)])
    with pytest.raises(grpc.RpcError) as excinfo:
        _approve(agency, reviewed, ("S-0003",))
    assert excinfo.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "unit.220100.land2" in (excinfo.value.details() or "")
    assert rows(world, select(schema.approvals)) == []
    world.store.units.sync([*entries, (*second, True)])
    _approve(agency, reviewed, ("S-0003",))
    assert len(rows(world, select(schema.approvals))) == 1


def test_a_commission_stored_before_approval_trees_gets_them_at_start(agency: Agency) -> None:
    """Made as before migration 0014 (its exchange digest over the package, no trees) and half approved over that
    digest: at start the gateway builds its trees, the exchange digest becomes their root, the approval over the
    old digest is withdrawn with an audit entry, and two approvals over the new root go through to every unit."""
    world = agency.world
    reviewed = _reviewed(agency, 3, start=40)
    commission_id = _commission_id(agency, reviewed.commission_id)
    with world.store.engine.begin() as conn:
        old = conn.execute(
            select(schema.commissions.c.package_digest).where(schema.commissions.c.id == commission_id)
        ).scalar_one()
        conn.execute(delete(schema.approval_nodes).where(schema.approval_nodes.c.commission_id == commission_id))
        conn.execute(delete(schema.approval_units).where(schema.approval_units.c.commission_id == commission_id))
        conn.execute(
            update(schema.subjects)
            .where(schema.subjects.c.commission_id == commission_id)
            .values(share_index=None, leaf_salt=None)
        )
        conn.execute(
            update(schema.commissions)
            .where(schema.commissions.c.id == commission_id)
            .values(exchange_digest=old, subject_root=None, unit_root=None)
        )
        conn.execute(
            insert(schema.approvals).values(
                commission_id=commission_id, staff_id="S-0003", signature=agency.sign("S-0003", old), approved_at_ms=NOW
            )
        )
    assert (
        complete_trees(world.store.engine, agency.audit, gateway=GATEWAY, units=world.store.units.all(), now_ms=NOW)
        == 1
    )
    assert (
        complete_trees(world.store.engine, agency.audit, gateway=GATEWAY, units=world.store.units.all(), now_ms=NOW)
        == 0
    )
    commission = agency.stub(COMMISSIONER).GetCommission(agency_pb2.CommissionRef(commission_id=reviewed.commission_id))
    assert commission.exchange_digest not in (old, reviewed.exchange_digest)
    withdrawn = [e for e in agency.audit.entries() if e.action == "commission.approval_withdrawn"]
    assert [(e.actor, e.detail, e.commission_id) for e in withdrawn] == [
        ("upgrade", "staff=S-0003;reason=approval_tree", commission_id)
    ]
    _approve(agency, commission)
    settle(world)
    assert {b.state for b in batch_rows(world, commission_id)} == {"acknowledged"}
    for unit_id, batches in _contents(agency, commission_id).items():
        for content in batches:
            assert (
                batch_root(GATEWAY, unit_id, exchange_pb2.QueryBatch.FromString(content)) == commission.exchange_digest
            )
    assert agency.audit.verify() == []
