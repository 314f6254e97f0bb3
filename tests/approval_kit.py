"""Exchange approvals for tests, made the way the real parties make them: staff members with their own signing keys,
the gateway's roster as a unit holds it (an in-memory history built from trust.proto RosterMember data, answering
``member_at`` as keys.roster.RosterHistory does), approvals signed over a commission's exchange digest and recorded
in the gateway's database, and query batches with valid approval proofs for tests that talk to a connector
directly."""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date

from hedui.v1 import exchange_pb2, records_pb2, trust_pb2
from sqlalchemy import Engine, insert, select, update

from common.dates import to_pb
from connectors.approvals import (
    APPROVER_EXPIRED,
    APPROVER_NOT_YET_EFFECTIVE,
    APPROVER_REVOKED,
    APPROVER_UNKNOWN,
    ApproverHistory,
)
from gateway.db import schema as s
from gateway.exchange.approvals import CommissionFacts, TreeUnit, engine_package_digest
from keys.approvals import RootHeader, multiproof, subject_leaf, tree_levels
from keys.fingerprint import Algorithm
from keys.handles import PublicKey, SigningKey
from keys.identity import PartyKeys
from keys.roster import RosterMember
from keys.statements import approval_message

EXCHANGE = ("exchange",)


class MemoryRoster:
    """A gateway's roster history in memory: versions (effective from, members), judged as keys.roster judges them.

    ``member_at(staff_id, at_ms)``: the version in force at ``at_ms`` (the latest effective at or before it) must list
    the member, and the member's own window (valid from / until, revoked at) must contain ``at_ms``.
    """

    def __init__(self, members: Iterable[trust_pb2.RosterMember] = (), *, effective_at_ms: int = 0) -> None:
        self.versions: list[tuple[int, dict[str, trust_pb2.RosterMember]]] = [
            (effective_at_ms, {m.staff_id: m for m in members})
        ]

    def publish(self, members: Iterable[trust_pb2.RosterMember], *, effective_at_ms: int) -> None:
        """A new version, in force from ``effective_at_ms`` (later than every version before)."""
        assert effective_at_ms > self.versions[-1][0]
        self.versions.append((effective_at_ms, {m.staff_id: m for m in members}))

    def put(self, member: trust_pb2.RosterMember) -> None:
        """Add or replace a member in the latest version (a test's shortcut for a roster prepared in advance)."""
        self.versions[-1][1][member.staff_id] = member

    @property
    def members(self) -> list[trust_pb2.RosterMember]:
        return list(self.versions[-1][1].values())

    def in_force(self, at_ms: int) -> object | None:
        """The version in force at ``at_ms`` (its members), None before the first one."""
        starts = [v[0] for v in self.versions]
        index = bisect.bisect_right(starts, at_ms) - 1
        return None if index < 0 else self.versions[index][1]

    def member_at(self, staff_id: str, at_ms: int) -> tuple[RosterMember | None, str | None]:
        starts = [v[0] for v in self.versions]
        index = bisect.bisect_right(starts, at_ms) - 1
        if index < 0:
            return None, APPROVER_UNKNOWN
        member = self.versions[index][1].get(staff_id)
        if member is None:
            return None, APPROVER_UNKNOWN
        if at_ms < member.valid_from_ms:
            return None, APPROVER_NOT_YET_EFFECTIVE
        if member.revoked_at_ms and at_ms >= member.revoked_at_ms:
            return None, APPROVER_REVOKED
        if member.valid_until_ms and at_ms >= member.valid_until_ms:
            return None, APPROVER_EXPIRED
        # Converted without RosterMember.check: some tests list members a real roster would refuse (a key twice).
        return (
            RosterMember(
                staff_id=member.staff_id,
                name=member.name,
                roles=tuple(member.roles),
                public_key=PublicKey(Algorithm.ED25519, bytes(member.public_key)),
                valid_from_ms=member.valid_from_ms,
                valid_until_ms=member.valid_until_ms or None,
                revoked_at_ms=member.revoked_at_ms or None,
            ),
            None,
        )


@dataclass
class MemoryRosters:
    """The gateways' rosters a unit holds (connectors.approvals.GatewayRosters)."""

    by_gateway: dict[str, MemoryRoster] = field(default_factory=dict)

    def history(self, gateway_party: str) -> ApproverHistory | None:
        return self.by_gateway.get(gateway_party)


@dataclass
class StaffKit:
    """A gateway's staff members with their own signing keys, and the roster of them the units hold."""

    gateway: str
    now_ms: int
    roster: MemoryRoster = field(default_factory=MemoryRoster)
    keys: dict[str, PartyKeys] = field(default_factory=dict)

    def key(self, staff_id: str) -> SigningKey:
        """The staff member's signing key (made on first use: a person who exists, on a roster or not)."""
        if staff_id not in self.keys:
            self.keys[staff_id] = PartyKeys.create(f"staff.220100.{staff_id.lower()}", now_ms=self.now_ms - 1)
        return self.keys[staff_id].signing_key(self.now_ms)

    def public_key(self, staff_id: str) -> bytes:
        return self.key(staff_id).public.raw

    def member(self, staff_id: str, roles: Sequence[str] = EXCHANGE, **window: int) -> trust_pb2.RosterMember:
        """The staff member as a roster lists them (valid from a day before ``now_ms`` unless told otherwise)."""
        values = {"valid_from_ms": self.now_ms - 86_400_000, **window}
        return trust_pb2.RosterMember(
            staff_id=staff_id,
            name=f"工作人员{staff_id[-1]}",
            roles=sorted(roles),
            public_key=self.public_key(staff_id),
            **values,
        )

    def enrol(self, staff_id: str, roles: Sequence[str] = EXCHANGE, **window: int) -> trust_pb2.RosterMember:
        """Put the staff member on the roster the units hold."""
        member = self.member(staff_id, roles, **window)
        self.roster.put(member)
        return member

    def rosters(self) -> MemoryRosters:
        return MemoryRosters({self.gateway: self.roster})

    def sign(self, staff_id: str, root: bytes) -> bytes:
        return self.key(staff_id).sign(approval_message(root))

    def approvals(self, root: bytes, staff: Sequence[str], at_ms: int) -> list[exchange_pb2.StaffApproval]:
        return [
            exchange_pb2.StaffApproval(staff_id=i, signature=self.sign(i, root), approved_at_ms=at_ms) for i in staff
        ]


def approve(engine: Engine, commission_id: int, kit: StaffKit, staff: Sequence[str], *, at_ms: int) -> bytes:
    """Record exchange approvals of ``staff`` for a commission, each signed over its exchange digest with the
    member's own key, as the workflow records them (the staff register gets the members it lacks); returns the
    exchange digest. ``commissions.staff_ids`` names them."""
    with engine.begin() as conn:
        digest = bytes(
            conn.execute(
                select(s.commissions.c.exchange_digest).where(s.commissions.c.id == commission_id)
            ).scalar_one()
        )
        known = {r.staff_id for r in conn.execute(select(s.staff.c.staff_id))}
        for staff_id in staff:
            if staff_id not in known:
                conn.execute(
                    insert(s.staff).values(
                        staff_id=staff_id, name=f"工作人员{staff_id[-1]}", roles="exchange",
                        public_key=kit.public_key(staff_id), valid_from_ms=at_ms - 86_400_000, valid_until_ms=None,
                        registered_by="test", registered_at_ms=at_ms - 86_400_000,
                    )
                )  # fmt: skip
            conn.execute(
                insert(s.approvals).values(
                    commission_id=commission_id, staff_id=staff_id, signature=kit.sign(staff_id, digest),
                    approved_at_ms=at_ms,
                )
            )  # fmt: skip
        conn.execute(update(s.commissions).where(s.commissions.c.id == commission_id).values(staff_ids=",".join(staff)))
    return digest


# -- batches with proofs, for tests that talk to a connector directly ------------------------------------------------


@dataclass
class ProvedCommission:
    """A commission as the gateway would store it, in memory: its subjects (with share indices and salts), its units
    and its trees, from which a batch for any unit and any subset of subjects gets its approval proof."""

    gateway: str
    ref: str
    subjects: list[exchange_pb2.QuerySubject]
    units: list[TreeUnit]
    facts: CommissionFacts
    subject_levels: list[list[bytes]]
    unit_levels: list[list[bytes]]

    @property
    def root(self) -> bytes:
        return RootHeader(
            gateway=self.facts.gateway,
            commission_ref=self.facts.ref,
            programme=self.facts.programme,
            income_from=self.facts.income_from,
            income_to=self.facts.income_to,
            assets_as_of=self.facts.assets_as_of,
            package_digest=self.facts.package_digest,
            subject_count=len(self.subjects),
            subject_root=self.subject_levels[-1][0],
            unit_count=len(self.units),
            unit_root=self.unit_levels[-1][0],
        ).root()

    def unit(self, unit_id: str) -> TreeUnit:
        return next(u for u in self.units if u.unit_id == unit_id)

    def batch(
        self,
        batch_id: str,
        unit_id: str,
        indices: Sequence[int],
        approvals: Sequence[exchange_pb2.StaffApproval],
    ) -> exchange_pb2.QueryBatch:
        """A batch of the subjects at ``indices`` for ``unit_id``, with the unit's categories and thresholds, its
        proof and ``approvals``; ``staff_ids`` names the approvers."""
        index = next(i for i, u in enumerate(self.units) if u.unit_id == unit_id)
        unit = self.units[index]
        batch = exchange_pb2.QueryBatch(
            batch_id=batch_id,
            commission_ref=self.ref,
            purpose=self.facts.programme,  # type: ignore[arg-type]
            categories=list(unit.categories),  # type: ignore[arg-type]
            income_from=records_pb2.YearMonth(year=self.facts.income_from[0], month=self.facts.income_from[1]),
            income_to=records_pb2.YearMonth(year=self.facts.income_to[0], month=self.facts.income_to[1]),
            assets_as_of=to_pb(self.facts.assets_as_of),
            staff_ids=[a.staff_id for a in approvals],
            subjects=[self.subjects[i] for i in indices],
            thresholds=[
                exchange_pb2.ThresholdRequest(category=c, limit_fen=v)  # type: ignore[arg-type]
                for c, v in unit.thresholds
            ],
        )
        batch.approval.CopyFrom(
            exchange_pb2.ApprovalProof(
                package_digest=self.facts.package_digest,
                subject_count=len(self.subjects),
                unit_count=len(self.units),
                unit_index=index,
                unit_proof=multiproof(self.unit_levels, [index]),
                subject_proof=multiproof(self.subject_levels, indices),
                approvals=approvals,
            )
        )
        return batch


def prove(
    gateway: str,
    ref: str,
    subjects: Sequence[exchange_pb2.QuerySubject],
    units: Sequence[TreeUnit],
    *,
    programme: int = exchange_pb2.PROGRAMME_MINIMUM_LIVING_ALLOWANCE,
    income_from: tuple[int, int] = (2025, 9),
    income_to: tuple[int, int] = (2026, 2),
    assets_as_of: date = date(2026, 2, 28),
    salt: bytes = b"",
) -> ProvedCommission:
    """The commission of ``subjects`` asking ``units`` (any order: sorted here), each subject given its share index
    and a leaf salt (derived from ``salt`` and the index, so vectors are reproducible)."""
    placed = []
    for i, subject in enumerate(subjects):
        copy = exchange_pb2.QuerySubject()
        copy.CopyFrom(subject)
        copy.share_index = i
        copy.leaf_salt = hashlib.sha256(b"salt" + salt + i.to_bytes(4, "big")).digest()[:16]
        placed.append(copy)
    ordered = sorted(units, key=lambda u: u.unit_id)
    leaves = [
        subject_leaf(x.leaf_salt, x.id_number, x.name, x.authorisation.number, x.authorisation.scan_sha256)
        for x in placed
    ]
    facts = CommissionFacts(
        gateway=gateway,
        ref=ref,
        programme=programme,
        income_from=income_from,
        income_to=income_to,
        assets_as_of=assets_as_of,
        package_digest=engine_package_digest(ref),
    )
    return ProvedCommission(
        gateway, ref, placed, ordered, facts, tree_levels(leaves), tree_levels([u.leaf for u in ordered])
    )
