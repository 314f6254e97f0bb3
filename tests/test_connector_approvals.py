"""A unit verifies the agency's exchange approvals itself (issue 11; Procedure V.(二), V.(三)): over real mutual TLS
on loopback, real envelopes and a real store, the connector accepts a batch whose two approvals verify over the
root it recomputes, against the gateway's roster as it was when each approval was given, and refuses — with a
signed refusal naming the reason — forged approvals, approvals of another commission, approvers unknown, not yet
effective, expired or revoked, the same person twice, and proofs that do not verify."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hedui.v1 import exchange_pb2, records_pb2, trust_pb2
from prometheus_client import CollectorRegistry

from common.rpc import MAX_SIGNED_REFUSAL_BYTES, REFUSAL_REASON_KEY, REFUSAL_SIGNED_KEY
from connectors.approvals import REASONS, ApprovalCheck, NoRosters
from connectors.metrics import ConnectorMetrics
from connectors.store import ConnectorStore
from gateway.exchange.approvals import TreeUnit
from gateway.exchange.transport import is_transient
from keys.clock import DAY_MS, HOUR_MS, MINUTE_MS
from keys.envelope import message_id_of
from keys.identity import PartyKeys
from keys.statements import approval_message
from tests.approval_kit import EXCHANGE, MemoryRoster, MemoryRosters, prove
from tests.exchange_world import GATEWAY, NEIGHBOUR, STAFF, UNIT, World, beijing_ms, exchange_world

MONDAY = beijing_ms(2026, 3, 2)
REFUSAL = {trust_pb2.Refusal.DESCRIPTOR.full_name: trust_pb2.Refusal}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with exchange_world(tmp_path, now_ms=MONDAY) as w:
        w.connector.metrics = ConnectorMetrics(CollectorRegistry())
        yield w


@dataclasses.dataclass
class Refused:
    status: grpc.StatusCode
    reason: str
    signed: trust_pb2.Refusal
    envelope: bytes


def refused(world: World, batch: exchange_pb2.QueryBatch) -> Refused:
    """Submit ``batch`` and return the refusal, after checking it changed nothing and came signed: a Refusal the
    gateway opens with the unit's keys, answering this very envelope, naming the batch, its digest and the reason."""
    before = world.connector.store.batch_count()
    envelope = world.seal(batch)
    with pytest.raises(grpc.RpcError) as excinfo:
        world.stub.SubmitBatch(exchange_pb2.SealedMessage(envelope=envelope))
    assert world.connector.store.batch_count() == before
    trailing = {m.key: m.value for m in excinfo.value.trailing_metadata() or ()}
    reason = trailing[REFUSAL_REASON_KEY]
    signed = trailing[REFUSAL_SIGNED_KEY]
    assert isinstance(reason, str) and isinstance(signed, bytes) and len(signed) <= MAX_SIGNED_REFUSAL_BYTES
    opened = world.gateway.open(signed, expect=REFUSAL)
    assert opened.header.sender == UNIT and opened.header.correlation_id == message_id_of(envelope)
    refusal = opened.message
    assert isinstance(refusal, trust_pb2.Refusal)
    assert refusal.request_message_id == message_id_of(envelope)
    assert refusal.request_type == exchange_pb2.QueryBatch.DESCRIPTOR.full_name
    assert refusal.batch_id == batch.batch_id
    assert refusal.batch_digest == hashlib.sha256(batch.SerializeToString(deterministic=True)).digest()
    assert refusal.reason == reason and refusal.refused_at_ms == world.clock.now_ms()
    last = list(world.connector.store.audit_entries())[-1]
    assert (last["event"], last["reason"]) == ("refused", reason)
    return Refused(excinfo.value.code(), reason, refusal, signed)


def expect(world: World, batch: exchange_pb2.QueryBatch, reason: str, detail: str = "") -> Refused:
    result = refused(world, batch)
    assert (result.reason, result.status) == (reason, REASONS[reason])
    assert result.signed.detail == detail
    return result


# -- accepted ------------------------------------------------------------------------------------------------------


def test_two_approvals_that_verify_are_accepted(world: World) -> None:
    batch = world.batch("B-OK", world.subjects(7))
    assert len(batch.approval.approvals) == 2 and batch.approval.unit_count == 2
    assert world.submit(batch).batch_id == "B-OK"


def test_a_gapped_subset_of_a_large_commission_is_accepted(world: World) -> None:
    """A batch carries some subjects of a commission (with gaps: the others went in other batches or were
    withdrawn); its multiproof covers exactly them."""

    subjects = world.subjects(40)
    template = world.batch("B-T", subjects)
    unit = TreeUnit(UNIT, tuple(template.categories))
    proved = prove(GATEWAY, template.commission_ref, subjects, [unit, NEIGHBOUR])
    indices = [1, 2, 3, 9, 17, 18, 33, 39]
    approvals = world.staff.approvals(proved.root, STAFF, MONDAY)
    batch = proved.batch("B-GAP", UNIT, indices, approvals)
    assert [s.share_index for s in batch.subjects] == indices
    assert world.submit(batch).subject_count == len(indices)


def test_an_approval_given_before_the_approver_was_revoked_stays_valid(world: World) -> None:
    world.staff.enrol("S-0002", revoked_at_ms=MONDAY - MINUTE_MS)
    batch = world.batch("B-R", world.subjects(2))
    world.approve(batch, at_ms=MONDAY - 2 * MINUTE_MS)
    assert world.submit(batch).batch_id == "B-R"


# -- refused: approvals --------------------------------------------------------------------------------------------


def test_no_approvals_is_refused(world: World) -> None:
    batch = world.batch("B-NONE", world.subjects(2))
    batch.ClearField("approval")
    expect(world, batch, "approval_missing")
    batch = world.batch("B-EMPTY", world.subjects(2))
    del batch.approval.approvals[:]
    batch.ClearField("staff_ids")
    expect(world, batch, "approval_missing")


def test_a_forged_approval_is_refused(world: World) -> None:
    batch = world.batch("B-FORGED", world.subjects(3))
    impostor = PartyKeys.create("staff.220100.impostor", now_ms=MONDAY - 1).signing_key(MONDAY)
    good = batch.approval.approvals[1].signature
    batch.approval.approvals[1].signature = impostor.sign(approval_message(hashlib.sha256(good).digest()))
    expect(world, batch, "approval_signature_invalid", "S-0002")
    batch.approval.approvals[1].signature = b"\x00" * 64
    expect(world, batch, "approval_signature_invalid", "S-0002")


def test_approvals_reused_from_another_commission_are_refused(world: World) -> None:
    other = world.batch("B-OTHER", world.subjects(3), commission_ref="WT-2026-0002")
    batch = world.batch("B-REUSE", world.subjects(3))
    batch.approval.ClearField("approvals")
    batch.approval.approvals.extend(other.approval.approvals)
    expect(world, batch, "approval_signature_invalid", "S-0001")


def test_an_approver_not_on_the_roster_is_refused(world: World) -> None:
    expect(
        world, world.batch("B-9999", world.subjects(2), staff_ids=["S-0001", "S-9999"]), "approver_unknown", "S-9999"
    )


def test_the_same_person_twice_is_refused(world: World) -> None:
    expect(
        world, world.batch("B-TWICE", world.subjects(2), staff_ids=["S-0001", "S-0001"]), "approver_duplicate", "S-0001"
    )
    # Two staff ids with one key are one person.
    shared = world.staff.member("S-0001")
    world.staff.roster.put(trust_pb2.RosterMember(staff_id="S-0007", roles=["exchange"], public_key=shared.public_key))
    world.staff.keys["S-0007"] = world.staff.keys["S-0001"]
    expect(
        world,
        world.batch("B-SHARED", world.subjects(2), staff_ids=["S-0001", "S-0007"]),
        "approver_duplicate",
        "S-0007",
    )


def test_one_approval_is_too_few(world: World) -> None:
    expect(world, world.batch("B-ONE", world.subjects(2), staff_ids=["S-0001"]), "approvals_too_few")


@pytest.mark.parametrize(
    ("window", "reason"),
    [
        ({"valid_from_ms": MONDAY + MINUTE_MS}, "approver_not_yet_effective"),
        ({"valid_until_ms": MONDAY - MINUTE_MS}, "approver_expired"),
        ({"revoked_at_ms": MONDAY - MINUTE_MS}, "approver_revoked"),
    ],
)
def test_an_approver_outside_their_window_is_refused(world: World, window: dict[str, int], reason: str) -> None:
    world.staff.enrol("S-0002", EXCHANGE, **window)
    expect(world, world.batch("B-W", world.subjects(2)), reason, "S-0002")


def test_the_roster_in_force_when_the_approval_was_given_judges_it(world: World) -> None:
    """A member removed by a roster version effective from Monday noon: approvals given before still verify, one
    given after is of an unknown approver; a member added from noon cannot have approved before."""
    noon = MONDAY + 2 * 60 * MINUTE_MS
    world.staff.key("S-0003")
    world.staff.roster.publish([world.staff.member("S-0001"), world.staff.member("S-0003")], effective_at_ms=noon)
    world.clock.set(noon + MINUTE_MS)
    before = world.batch("B-BEFORE", world.subjects(2))
    world.approve(before, at_ms=noon - MINUTE_MS)
    assert world.submit(before).batch_id == "B-BEFORE"
    expect(world, world.batch("B-AFTER", world.subjects(2)), "approver_unknown", "S-0002")
    early = world.batch("B-EARLY", world.subjects(2), staff_ids=["S-0001", "S-0003"])
    world.approve(early, at_ms=noon - MINUTE_MS)
    expect(world, early, "approver_unknown", "S-0003")
    assert world.submit(world.batch("B-NEW", world.subjects(2), staff_ids=["S-0001", "S-0003"])).batch_id == "B-NEW"


def test_an_approver_without_the_exchange_role_is_refused(world: World) -> None:
    world.staff.enrol("S-0002", roles=("review",))
    expect(world, world.batch("B-ROLE", world.subjects(2)), "approver_not_exchange_staff", "S-0002")


def test_an_approval_dated_after_the_envelope_is_refused(world: World) -> None:
    batch = world.batch("B-LATE", world.subjects(2))
    world.approve(batch, at_ms=MONDAY + 6 * MINUTE_MS)  # beyond the 5 minutes of clock slack
    expect(world, batch, "approval_time_invalid", "S-0001")
    world.approve(batch, at_ms=MONDAY + 4 * MINUTE_MS)
    assert world.submit(batch).batch_id == "B-LATE"


def test_staff_ids_that_do_not_name_the_approvers_are_refused(world: World) -> None:
    batch = world.batch("B-IDS", world.subjects(2))
    batch.staff_ids[1] = "S-0003"
    expect(world, batch, "approval_proof_invalid")


# -- refused: proofs and content ---------------------------------------------------------------------------------


GAPPED = [1, 2, 3, 5, 8]


def _tampered(world: World, name: str, change: object) -> exchange_pb2.QueryBatch:
    """Subjects 1, 2, 3, 5 and 8 of a commission of nine (so that both proofs carry hashes), changed."""
    subjects = world.subjects(9)
    template = world.batch("B-T", subjects)
    proved = prove(GATEWAY, template.commission_ref, subjects, [TreeUnit(UNIT, tuple(template.categories)), NEIGHBOUR])
    batch = proved.batch(name, UNIT, GAPPED, world.staff.approvals(proved.root, STAFF, MONDAY))
    assert batch.approval.subject_proof and batch.approval.unit_proof
    assert world.submit(proved.batch(name + "-OK", UNIT, GAPPED, batch.approval.approvals)).subject_count == 5
    change(batch)  # type: ignore[operator]
    return batch


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        # Proofs of the wrong shape.
        (lambda b: b.approval.subject_proof.append(b"\x00" * 32), "approval_proof_invalid"),
        (lambda b: b.approval.subject_proof.pop(), "approval_proof_invalid"),
        (lambda b: b.approval.unit_proof.append(b"\x00" * 32), "approval_proof_invalid"),
        (lambda b: setattr(b.approval, "unit_index", 2), "approval_proof_invalid"),
        (lambda b: setattr(b.approval, "subject_count", 8), "approval_proof_invalid"),
        (lambda b: setattr(b.subjects[2], "share_index", 9), "approval_proof_invalid"),
        (lambda b: setattr(b.subjects[2], "share_index", 1), "approval_proof_invalid"),
        (lambda b: setattr(b.subjects[2], "leaf_salt", b"\x00" * 15), "approval_proof_invalid"),
        (lambda b: b.approval.subject_proof.__setitem__(0, b"\x00" * 31), "approval_proof_invalid"),
        # Proofs and content of the right shape that are not what was approved: the root differs.
        (lambda b: b.approval.subject_proof.__setitem__(0, b"\x00" * 32), "approval_signature_invalid"),
        (lambda b: b.approval.unit_proof.__setitem__(0, b"\x00" * 32), "approval_signature_invalid"),
        (lambda b: setattr(b.approval, "package_digest", b"\x00" * 32), "approval_signature_invalid"),
        (lambda b: setattr(b.approval, "subject_count", 10), "approval_proof_invalid"),
        (lambda b: setattr(b.approval, "unit_count", 3), "approval_proof_invalid"),
        (lambda b: setattr(b.subjects[3], "name", "李四"), "approval_signature_invalid"),
        (lambda b: setattr(b.subjects[3].authorisation, "number", "AUTH-X"), "approval_signature_invalid"),
        (lambda b: setattr(b.subjects[3], "leaf_salt", b"\x01" * 16), "approval_signature_invalid"),
        (lambda b: setattr(b.income_to, "month", 3), "approval_signature_invalid"),
        (lambda b: setattr(b, "purpose", exchange_pb2.PROGRAMME_MEDICAL_AID), "approval_signature_invalid"),
        (lambda b: setattr(b, "commission_ref", "WT-2026-0009"), "approval_signature_invalid"),
    ],
)
def test_a_proof_or_content_that_does_not_verify_is_refused(world: World, change: object, reason: str) -> None:
    batch = _tampered(world, "B-T", change)
    result = refused(world, batch)
    assert result.reason == reason, result.reason


def test_a_subject_added_after_approval_is_refused(world: World) -> None:
    """A database writer who adds a person to a commission after the staff approved it: the added subject has no
    leaf in the tree the staff signed."""
    batch = world.batch("B-ADD", world.subjects(4))
    extra = world.subjects(1, start=50)[0]
    extra.share_index, extra.leaf_salt = 4, b"\x02" * 16
    batch.subjects.append(extra)
    assert refused(world, batch).reason == "approval_proof_invalid"  # index outside the tree of 4
    batch.approval.subject_count = 5
    assert refused(world, batch).reason in {"approval_proof_invalid", "approval_signature_invalid"}


def test_a_unit_does_not_accept_another_units_share(world: World) -> None:
    """The categories and leaf of another unit, with that unit's proof: the connector computes its own leaf from
    its own party id, so the root differs."""

    subjects = world.subjects(3)
    template = world.batch("B-T", subjects)
    proved = prove(GATEWAY, template.commission_ref, subjects, [TreeUnit(UNIT, tuple(template.categories)), NEIGHBOUR])
    approvals = world.staff.approvals(proved.root, STAFF, MONDAY)
    theirs = proved.batch("B-THEIRS", NEIGHBOUR.unit_id, [0, 1, 2], approvals)
    theirs.ClearField("categories")
    theirs.categories.append(records_pb2.DATA_CATEGORY_TAX)
    assert refused(world, theirs).reason == "approval_signature_invalid"


# -- no roster, and the migration rule ---------------------------------------------------------------------------


def test_a_unit_without_the_gateways_roster_refuses(world: World) -> None:
    world.connector.approvals = dataclasses.replace(world.connector.approvals, rosters=MemoryRosters())
    expect(world, world.batch("B-NOROSTER", world.subjects(2)), "approver_unknown", "S-0001")
    world.connector.approvals = dataclasses.replace(world.connector.approvals, rosters=NoRosters())
    batch = world.batch("B-NOROSTER-2", world.subjects(2))
    batch.ClearField("approval")
    expect(world, batch, "approval_missing")


def test_the_migration_rule_checks_staff_ids_only_where_allowed(world: World) -> None:
    world.connector.approvals = ApprovalCheck(
        NoRosters(), legacy_staff={GATEWAY: frozenset(STAFF)}, allow_unverified=True
    )
    unsigned = world.batch("B-LEGACY", world.subjects(2))
    unsigned.ClearField("approval")
    assert world.submit(unsigned).batch_id == "B-LEGACY"
    assert world.submit(world.batch("B-LEGACY-PROOF", world.subjects(2))).batch_id == "B-LEGACY-PROOF"
    expect(
        world, world.batch("B-LEGACY-BAD", world.subjects(2), staff_ids=["S-0001", "S-9999"]), "staff_not_registered"
    )
    broken = world.batch("B-LEGACY-SHAPE", world.subjects(2))
    broken.approval.subject_proof.append(b"\x00" * 32)
    expect(world, broken, "approval_proof_invalid")
    # With the gateway's roster held, the signatures are verified even where the migration rule is allowed.
    world.connector.approvals = dataclasses.replace(world.connector.approvals, rosters=world.staff.rosters())
    forged = world.batch("B-LEGACY-FORGED", world.subjects(2))
    forged.approval.approvals[0].signature = b"\x00" * 64
    expect(world, forged, "approval_signature_invalid", "S-0001")


def test_a_batch_stripped_of_its_proof_is_refused_once_the_gateways_roster_is_held(world: World) -> None:
    """Security review 4: with the migration flag on and the gateway's roster held, a batch without an approval
    proof must not fall back to the unsigned [[staff]] rule."""
    world.connector.approvals = ApprovalCheck(
        world.staff.rosters(), legacy_staff={GATEWAY: frozenset(STAFF)}, allow_unverified=True
    )
    assert world.connector.approvals.rosters.history(GATEWAY) is not None
    stripped = world.batch("B-STRIPPED", world.subjects(2))
    stripped.ClearField("approval")
    expect(world, stripped, "approval_missing")


# -- signed refusals of other requests, metrics --------------------------------------------------------------------


def test_every_refusal_after_the_envelope_opened_is_signed_and_counted(world: World) -> None:
    expect(world, world.batch("B-ONE", world.subjects(2), staff_ids=["S-0001"]), "approvals_too_few")
    batch = world.batch("B-CAT", world.subjects(2), categories=[records_pb2.DATA_CATEGORY_VEHICLES])
    assert refused(world, batch).reason == "category_not_served"
    request = exchange_pb2.FetchAnswers()
    envelope = world.seal(request)
    with pytest.raises(grpc.RpcError) as excinfo:
        world.stub.FetchAnswers(exchange_pb2.SealedMessage(envelope=envelope))
    trailing = {m.key: m.value for m in excinfo.value.trailing_metadata() or ()}
    opened = world.gateway.open(trailing[REFUSAL_SIGNED_KEY], expect=REFUSAL)
    assert isinstance(opened.message, trust_pb2.Refusal)
    assert opened.message.reason == "bad_fetch" and opened.message.request_message_id == message_id_of(envelope)
    assert opened.message.batch_id == "" and opened.message.batch_digest == b""
    registry = world.connector.metrics.registry  # type: ignore[union-attr]
    assert registry.get_sample_value("hedui_connector_refusals_total", {"reason": "approvals_too_few"}) == 1
    assert registry.get_sample_value("hedui_connector_refusals_total", {"reason": "bad_fetch"}) == 1


def test_an_envelope_that_does_not_open_gets_no_signed_refusal(world: World) -> None:
    """A refusal the unit cannot attribute to an authenticated gateway is not signed for anyone."""
    envelope = bytearray(world.seal(world.batch("B-X", world.subjects(2))))
    envelope[-1] ^= 1
    with pytest.raises(grpc.RpcError) as excinfo:
        world.stub.SubmitBatch(exchange_pb2.SealedMessage(envelope=bytes(envelope)))
    keys = [m.key for m in excinfo.value.trailing_metadata() or ()]
    assert keys == [REFUSAL_REASON_KEY]


def test_approvals_given_long_before_the_batch_are_judged_by_their_time(world: World) -> None:
    """A batch formed days after the approvals (a unit that was down): judged by the roster of the approvals' day."""
    batch = world.batch("B-OLD", world.subjects(2))
    world.approve(batch, at_ms=MONDAY - DAY_MS // 2)
    world.staff.enrol("S-0001", valid_until_ms=MONDAY - DAY_MS // 4)  # left since
    assert world.submit(batch).batch_id == "B-OLD"


# -- security review 6: approvals too old, approved subjects queried again ----------------------------------------


def test_an_approval_older_than_the_maximum_age_is_refused(world: World) -> None:
    """A member revoked an hour ago: approvals dated days before the revocation (signed with the revoked, possibly
    leaked key) pass only within ``[exchange] approval_max_age_days`` of the envelope's time."""
    world.staff.enrol(STAFF[0], valid_from_ms=MONDAY - 90 * DAY_MS, revoked_at_ms=MONDAY - 60 * MINUTE_MS)
    world.staff.enrol(STAFF[1], valid_from_ms=MONDAY - 90 * DAY_MS)
    world.connector.approvals = dataclasses.replace(world.connector.approvals, rosters=world.staff.rosters())
    assert world.connector.approvals.max_age_ms == 45 * DAY_MS  # the default
    old = world.batch("B-OLD-46", world.subjects(2))
    world.approve(old, at_ms=MONDAY - 46 * DAY_MS)
    expect(world, old, "approval_time_invalid", STAFF[0])
    within = world.batch("B-OLD-44", world.subjects(2))
    world.approve(within, at_ms=MONDAY - 44 * DAY_MS)
    assert world.submit(within).batch_id == "B-OLD-44"
    # The review's attack: ten days back, refused where the unit allows a week.
    world.connector.approvals = dataclasses.replace(world.connector.approvals, max_age_ms=7 * DAY_MS)
    backdated = world.batch("B-BACKDATED", world.subjects(2))
    world.approve(backdated, at_ms=MONDAY - 10 * DAY_MS)
    expect(world, backdated, "approval_time_invalid", STAFF[0])


def test_approved_subjects_are_not_queried_again_under_another_batch_id(world: World) -> None:
    """Clause 16: the subjects of a commission are received once. The same approved batch under new batch ids, or a
    batch whose share indices overlap one received before, is refused; other subjects of the same commission and
    the same batch sent again under its own id are not."""
    subjects = world.subjects(8)
    template = world.batch("B-T", subjects)
    proved = prove(GATEWAY, template.commission_ref, subjects, [TreeUnit(UNIT, tuple(template.categories)), NEIGHBOUR])
    approvals = world.staff.approvals(proved.root, STAFF, MONDAY)
    first = proved.batch("B-ONCE", UNIT, [0, 1, 2, 3], approvals)
    assert world.submit(first).batch_id == "B-ONCE"
    assert world.submit(first).batch_id == "B-ONCE"  # the same batch again: its stored receipt
    for batch_id in ("B-AGAIN-1", "B-AGAIN-2"):
        again = exchange_pb2.QueryBatch()
        again.CopyFrom(first)
        again.batch_id = batch_id
        expect(world, again, "subject_already_queried")
    expect(world, proved.batch("B-OVERLAP", UNIT, [3, 4], approvals), "subject_already_queried")
    expect(world, proved.batch("B-INSIDE", UNIT, [2], approvals), "subject_already_queried")
    assert world.submit(proved.batch("B-REST", UNIT, [4, 5, 7], approvals)).batch_id == "B-REST"
    expect(world, proved.batch("B-GAP", UNIT, [6], approvals), "subject_already_queried")  # inside 4..7
    # Another commission of the same people is a new query.
    assert world.submit(world.batch("B-OTHER", subjects[:4])).batch_id == "B-OTHER"


def test_the_unit_remembers_queried_subjects_after_purging_and_restarting(world: World) -> None:
    """The record outlives the batch's content (purged after retention) and a restart of the store."""
    first = world.batch("B-PURGED", world.subjects(2))
    assert world.submit(first).batch_id == "B-PURGED"
    store = world.connector.store
    with store.engine.begin() as conn:  # answered and acknowledged long ago
        conn.exec_driver_sql(
            "UPDATE batches SET state = 'acknowledged', acknowledged_at_ms = 1 WHERE batch_id = 'B-PURGED'"
        )
    assert store.purge(MONDAY, MONDAY) == 1
    world.connector.store = ConnectorStore(store.engine)
    again = exchange_pb2.QueryBatch()
    again.CopyFrom(first)
    again.batch_id = "B-LATER"
    expect(world, again, "subject_already_queried")


def test_the_gateway_takes_a_repeat_refusal_as_final() -> None:
    """``subject_already_queried`` fails the batch for good: sending it again changes nothing."""
    assert not is_transient(REASONS["subject_already_queried"], "subject_already_queried")
    assert not is_transient(grpc.StatusCode.UNAVAILABLE, "subject_already_queried")


def test_during_migration_approvals_given_before_the_roster_was_in_force_are_judged_by_the_toml_ids(
    world: World,
) -> None:
    """On-call review H3: the gateway's first roster version is held but waits out its notice. With the migration flag
    on, approvals given before it was in force are judged by [[staff]] (nothing could verify them), also when the
    batch is sent after the roster took effect; without the flag, or for someone not in [[staff]], refused."""
    now = world.clock.now_ms()
    rosters = MemoryRosters({GATEWAY: MemoryRoster(world.staff.roster.members, effective_at_ms=now + HOUR_MS)})

    def approved_now(batch_id: str) -> exchange_pb2.QueryBatch:
        batch = world.batch(batch_id, world.subjects(2), approval=exchange_pb2.ApprovalProof())
        world.approve(batch, at_ms=now)
        return batch

    world.connector.approvals = ApprovalCheck(rosters, legacy_staff={GATEWAY: frozenset(STAFF)}, allow_unverified=True)
    assert world.submit(approved_now("B-MIGRATING")).batch_id == "B-MIGRATING"
    late = approved_now("B-MIGRATING-2")
    world.clock.advance(2 * HOUR_MS)  # the roster is in force now; the approvals were given before
    assert world.submit(late).batch_id == "B-MIGRATING-2"
    world.connector.approvals = ApprovalCheck(
        rosters, legacy_staff={GATEWAY: frozenset({"S-0001"})}, allow_unverified=True
    )
    expect(world, approved_now("B-NOT-LISTED"), "staff_not_registered", "S-0002")
    world.connector.approvals = ApprovalCheck(rosters, legacy_staff={GATEWAY: frozenset(STAFF)})
    expect(world, approved_now("B-NO-FLAG"), "approver_unknown", "S-0001")
