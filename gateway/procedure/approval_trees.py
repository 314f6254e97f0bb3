"""Approval trees for commissions stored before they existed (migration 0014).

A commission made before approval trees has an exchange digest over its whole package, which no unit can verify.
The root of its trees names the gateway's party id, which the database does not hold, so the migration cannot build
them; the gateway does at start, for every commission not yet approved for exchange (received, intake passed,
review passed), with the units that hold its categories now, before the API serves anyone: from then on its
exchange digest is the root, and staff sign that. An approval recorded over the old digest (a commission half
approved at the upgrade) cannot stand for the root: it is withdrawn with an audit entry
(``commission.approval_withdrawn``), and the staff member approves again. Commissions approved before the upgrade
keep their digest and go on without proofs (docs/operations.md, "Upgrading to approval trees").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy import Engine, delete, select, update

from gateway.archive.audit import AuditLog
from gateway.db import schema as s
from gateway.exchange.approvals import (
    CommissionFacts,
    engine_package_digest,
    leaf_of,
    new_salts,
    tree_units,
    write_tree,
)
from gateway.exchange.units import UnitRow
from gateway.procedure.commission import INTAKE_PASSED, RECEIVED, REVIEW_PASSED
from gateway.procedure.routing import route

log = logging.getLogger("hedui.gateway.procedure")

#: The actor of the audit entries written at start.
UPGRADE_ACTOR = "upgrade"


def _ym(text: str) -> tuple[int, int]:
    year, month = text.split("-")
    return int(year), int(month)


def complete_trees(engine: Engine, audit: AuditLog, *, gateway: str, units: Sequence[UnitRow], now_ms: int) -> int:
    """Build the approval trees of every commission not yet approved for exchange that has none; returns how many.
    Each commission in a transaction of its own; idempotent (a commission with trees is left alone)."""
    c = s.commissions.c
    with engine.connect() as conn:
        todo = [
            r.id
            for r in conn.execute(
                select(c.id).where(c.subject_root.is_(None), c.state.in_((RECEIVED, INTAKE_PASSED, REVIEW_PASSED)))
            )
        ]
    for commission_id in todo:
        with engine.begin() as conn:
            query = select(s.commissions).where(c.id == commission_id)
            if engine.dialect.name == "postgresql":
                query = query.with_for_update()  # replicas starting together: one builds, the other waits and skips
            row = conn.execute(query).one()
            if row.subject_root is not None:
                continue  # another replica did it meanwhile
            subjects = conn.execute(
                select(
                    s.subjects.c.id, s.subjects.c.id_number, s.subjects.c.name, s.subjects.c.auth_number,
                    s.subjects.c.auth_digest,
                )
                .where(s.subjects.c.commission_id == commission_id)
                .order_by(s.subjects.c.id)
            ).all()  # fmt: skip
            salts = new_salts(len(subjects))
            for index, (subject, salt) in enumerate(zip(subjects, salts, strict=True)):
                conn.execute(
                    update(s.subjects).where(s.subjects.c.id == subject.id).values(share_index=index, leaf_salt=salt)
                )
            leaves = [
                leaf_of(salt, x.id_number, x.name, x.auth_number, bytes(x.auth_digest))
                for x, salt in zip(subjects, salts, strict=True)
            ]
            categories = [int(x) for x in row.categories.split(",") if x]
            thresholds = [(int(a), int(b)) for a, b in (t.split(":") for t in row.thresholds.split(",") if t)]
            asked = {u.unit_id: u.category for u in units if u.unit_id in set(route(categories, units))}
            facts = CommissionFacts(
                gateway=gateway,
                ref=row.ref,
                programme=row.purpose,
                income_from=_ym(row.income_from),
                income_to=_ym(row.income_to),
                assets_as_of=row.assets_as_of,
                package_digest=bytes(row.package_digest or row.exchange_digest or engine_package_digest(row.ref)),
            )
            write_tree(conn, commission_id, facts, leaves, tree_units(asked, categories, thresholds))
            withdrawn = conn.execute(
                select(s.approvals.c.staff_id).where(s.approvals.c.commission_id == commission_id)
            ).all()
            for approval in withdrawn:
                audit.append(
                    conn, at_ms=now_ms, actor=UPGRADE_ACTOR, action="commission.approval_withdrawn",
                    commission_id=commission_id, detail=f"staff={approval.staff_id};reason=approval_tree",
                )  # fmt: skip
            conn.execute(delete(s.approvals).where(s.approvals.c.commission_id == commission_id))
    if todo:
        log.info("approval trees built for commissions stored before them", extra={"commissions": len(todo)})
    return len(todo)
