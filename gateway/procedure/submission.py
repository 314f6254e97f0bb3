"""Submission of a commission (clause 11; Procedure III): the data package validated, stored with its subjects, and
its approval trees built (gateway/exchange/approvals.py), so that the units asked are fixed before any staff member
approves the exchange (Procedure V.(二)). One letter makes one commission: a package sent again is a retry.

The submission and its audit entry are one transaction: a refused submission stores nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from datetime import date
from typing import cast

import grpc
from hedui.v1 import agency_pb2
from sqlalchemy import Connection, Engine, func, insert, select

from common.dates import from_pb, year_month
from common.idnumber import parse_id_number
from common.workdays import CHINA_TZ
from gateway.archive.audit import AuditLog
from gateway.db import schema as s
from gateway.exchange.approvals import PACKAGE_DOMAIN, CommissionFacts, leaf_of, new_salts, tree_units, write_tree
from gateway.exchange.store import GatewayStore
from gateway.procedure.commission import INTAKE_PASSED, RECEIVED, RETURNED, Caller, WorkflowError, denied
from gateway.procedure.intake import letter_key, trim, validate_package
from gateway.procedure.queries import CommissionQueries
from gateway.procedure.routing import category_names, route, unserved
from keys.clock import Clock, from_ms
from keys.identity import PartyKeys

#: PostgreSQL advisory lock under which submissions take turns (see Submissions.submit).
SUBMIT_LOCK = 0x4845_4455_4902


def package_digest(ref: str, request: agency_pb2.SubmitCommissionRequest) -> bytes:
    """The agency-only commitment to a commission's whole package (letter, households, relations, everything): the
    commission id and the package. A commission stores it once, at submission, over :func:`stored_package` (the
    package with its letter number as stored); a package sent again is recognised as a retry by it. Until approval
    trees existed this was the exchange digest staff signed; now the approval root binds it (as ``package_digest``,
    opaque to units), and the root is the exchange digest (gateway/exchange/approvals.py)."""
    package = request.SerializeToString(deterministic=True)
    return hashlib.sha256(PACKAGE_DOMAIN + ref.encode() + b"\x00" + package).digest()


def stored_package(
    request: agency_pb2.SubmitCommissionRequest, letter_number: str
) -> agency_pb2.SubmitCommissionRequest:
    """``request`` with its letter number written ``letter_number`` (as the commission stores it: surrounding spaces
    removed), so that the same package sent again under a differently written number of the same letter (spaces,
    full-width digits, another bracket kind) digests alike and is recognised as a retry."""
    package = agency_pb2.SubmitCommissionRequest()
    package.CopyFrom(request)
    package.letter.number = letter_number
    return package


class Submissions:
    """Commissions as they come in from commissioners and lower-level agencies."""

    def __init__(
        self, *, store: GatewayStore, audit: AuditLog, clock: Clock, agency: PartyKeys, queries: CommissionQueries
    ) -> None:
        self.store = store
        self.engine: Engine = store.engine
        self.audit = audit
        self.clock = clock
        self.agency = agency
        self.queries = queries

    def _now(self) -> int:
        return self.clock.now_ms()

    def _today(self) -> date:
        return from_ms(self._now()).astimezone(CHINA_TZ).date()

    def submit(self, request: agency_pb2.SubmitCommissionRequest, caller: Caller) -> agency_pb2.Commission:
        """Validate and store a data package; a lower-level agency's commission enters at review. A package sent
        again (the same letter and package) is answered with the commission it made."""
        if caller.role not in {"commissioner", "lower_agency"}:
            raise denied("only commissioners and lower-level agencies submit commissions")
        validate_package(request, today=self._today())
        letter_number = trim(request.letter.number)
        units = self.store.units.all()
        missing = unserved(request.categories, units)
        if missing:
            raise WorkflowError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"no sharing unit registered with this gateway holds {category_names(missing)}: nobody would be "
                "asked, and the report would show nothing found. Remove these categories, or have the gateway's "
                "operator register the unit that holds them; nothing was stored",
            )
        today = self._today()
        ref = "C" + os.urandom(8).hex()
        lower = caller.role == "lower_agency"
        state = INTAKE_PASSED if lower else RECEIVED  # Procedure III.(二)2: straight to second review
        now = self._now()
        members = [(h, i, m) for h in request.households for i, m in enumerate(h.members)]
        salts = new_salts(len(members))
        subjects = [
            {
                "subject_ref": f"{h.household_ref}/{i + 1}",
                # The number as validated: full-width digits as ASCII, lower-case x as X, spaces around removed.
                "id_number": parse_id_number(m.id_number, today=today).value,
                "name": trim(m.name),
                "auth_number": trim(m.authorisation.number),
                "auth_digest": m.authorisation.scan_sha256,
                "household_ref": h.household_ref,
                "member_index": i + 1,
                "relation": m.relation,
                "id_copy_digest": m.id_copy_sha256,
                # The subject's leaf in the approval tree: its place in the commission and a random salt.
                "share_index": share_index,
                "leaf_salt": salts[share_index],
            }
            for share_index, (h, i, m) in enumerate(members)
        ]
        start, end = year_month(request.income_from), year_month(request.income_to)
        # The units asked are fixed now, in the approval tree the staff sign (Procedure V.(二)).
        targets = set(route(request.categories, units))
        asked = {u.unit_id: u.category for u in units if u.unit_id in targets}
        thresholds = [(int(t.category), int(t.limit_fen)) for t in request.thresholds]
        with self.engine.begin() as conn:
            if self.store.is_postgres:
                # Replicas share the database: submissions take turns so that the letter check below sees a
                # concurrent submission of the same letter (on SQLite the engine's transactions already take turns).
                conn.execute(select(func.pg_advisory_xact_lock(SUBMIT_LOCK)))
            earlier = self._same_letter(conn, request, caller)
            if earlier is not None:
                ref = earlier  # the same letter and package again: a retry, answered with what it made
            else:
                key = conn.execute(
                    insert(s.commissions).values(
                        ref=ref,
                        purpose=request.programme,
                        income_from=f"{start[0]:04d}-{start[1]:02d}",
                        income_to=f"{end[0]:04d}-{end[1]:02d}",
                        assets_as_of=from_pb(request.assets_as_of),
                        staff_ids="",
                        categories=",".join(str(c) for c in request.categories),
                        thresholds=",".join(f"{t.category}:{t.limit_fen}" for t in request.thresholds),
                        created_at_ms=now,
                        letter_number=letter_number,
                        letter_key=letter_key(letter_number),
                        letter_date=from_pb(request.letter.date),
                        commissioner=caller.party_id,
                        state=state,
                        from_lower_agency=lower,
                        household_count=len(request.households),
                        subject_count=len(subjects),
                    )
                ).inserted_primary_key
                assert key is not None
                commission_id = int(key[0])
                first = conn.execute(select(func.coalesce(func.max(s.subjects.c.id), 0))).scalar_one() + 1
                conn.execute(
                    insert(s.subjects),
                    [{"id": first + i, "commission_id": commission_id, **row} for i, row in enumerate(subjects)],
                )
                facts = CommissionFacts(
                    gateway=self.agency.party_id,
                    ref=ref,
                    programme=request.programme,
                    income_from=start,
                    income_to=end,
                    assets_as_of=from_pb(request.assets_as_of),
                    package_digest=package_digest(ref, stored_package(request, letter_number)),
                )
                leaves = [
                    leaf_of(
                        cast(bytes, x["leaf_salt"]),
                        cast(str, x["id_number"]),
                        cast(str, x["name"]),
                        cast(str, x["auth_number"]),
                        cast(bytes, x["auth_digest"]),
                    )
                    for x in subjects
                ]
                write_tree(conn, commission_id, facts, leaves, tree_units(asked, request.categories, thresholds))
                self.audit.append(
                    conn,
                    at_ms=now,
                    actor=caller.party_id,
                    action="commission.submit",
                    commission_id=commission_id,
                    after=state,
                    detail=f"households={len(request.households)} subjects={len(subjects)}",
                )
        return self.queries.view(ref, caller)

    @staticmethod
    def _same_letter(conn: Connection, request: agency_pb2.SubmitCommissionRequest, caller: Caller) -> str | None:
        """The commission this caller already made from the same letter, for a submission sent again (a retry
        after a lost reply must not query the same people twice); None for a new letter. A letter whose
        commission was returned may come again with a corrected package. ALREADY_EXISTS for the same letter number
        with another package: one letter, one commission. Numbers are compared as ``letter_key`` normalises them
        (full-width digits, case, spaces and the bracket kind do not make another letter), and so is a retry: the
        package is compared with the letter number replaced by the one the earlier commission stored."""
        rows = conn.execute(
            select(s.commissions.c.ref, s.commissions.c.package_digest, s.commissions.c.letter_number).where(
                s.commissions.c.commissioner == caller.party_id,
                s.commissions.c.letter_key == letter_key(request.letter.number),
                s.commissions.c.state != RETURNED,
            )
        ).all()
        for earlier in rows:
            stored_digest = bytes(earlier.package_digest or b"")
            retry = package_digest(earlier.ref, stored_package(request, earlier.letter_number))
            # Commissions stored before the digest was taken over the stored number hold one over the number as it
            # was sent then, spaces around it included: the same package sent exactly alike is still a retry.
            if hmac.compare_digest(stored_digest, retry) or hmac.compare_digest(
                stored_digest, package_digest(earlier.ref, request)
            ):
                return str(earlier.ref)
        if rows:
            sent, stored = trim(request.letter.number), rows[0].letter_number
            spelt = "" if sent == stored else f" (written {sent} this time)"
            raise WorkflowError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"letter {stored}{spelt} already made commission {rows[0].ref}, with another package: one letter, one "
                "commission. Give a new letter its own number; nothing was stored",
            )
        return None
