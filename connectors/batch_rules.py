"""The whole-batch rules a unit checks before it accepts a query batch: any failure refuses the batch, with a reason
code and nothing stored (docs/exchange.md, "Refusals"). Per-subject problems are answered, not refused. The exchange
approvals are verified among them (connectors/approvals.py; Procedure V.(二) and V.(三)).
"""

from __future__ import annotations

import re

import grpc
from hedui.v1 import exchange_pb2

from common.dates import from_pb, year_month
from connectors.answering import is_authorised
from connectors.approvals import ApprovalCheck
from connectors.errors import Refusal

BATCH_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
MAX_REF_LENGTH = 64
MAX_NAME_LENGTH = 64


def invalid(message: str, reason: str) -> Refusal:
    """A refusal of a malformed request (INVALID_ARGUMENT) with ``reason``."""
    return Refusal(grpc.StatusCode.INVALID_ARGUMENT, message, reason)


def check_batch(
    batch: exchange_pb2.QueryBatch,
    *,
    served: frozenset[int],
    max_subjects: int,
    threshold_categories: frozenset[int],
    approvals: ApprovalCheck,
    gateway: str,
    unit: str,
    created_at_ms: int,
) -> None:
    """Refuse ``batch`` (from ``gateway`` to ``unit``, in an envelope made at ``created_at_ms``) unless it passes every
    whole-batch rule: for a unit holding the data categories ``served``, taking ``max_subjects`` at most, answering
    ``threshold_categories`` as threshold flags, and verifying the approvals with ``approvals``."""
    if not BATCH_ID_RE.match(batch.batch_id):
        raise invalid("batch_id must be 1-64 characters of A-Z a-z 0-9 . _ : -", "bad_batch_id")
    if not 0 < len(batch.commission_ref) <= MAX_REF_LENGTH:
        raise invalid("commission_ref must be 1-64 characters", "bad_commission_ref")
    if batch.purpose not in exchange_pb2.Programme.values() or batch.purpose == 0:
        raise invalid("purpose (assistance programme) is missing", "no_purpose")
    if not batch.subjects:
        raise invalid("batch has no subjects", "empty_batch")
    if len(batch.subjects) > max_subjects:
        raise Refusal(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"batch has {len(batch.subjects)} subjects; this unit accepts at most {max_subjects}",
            "batch_too_large",
        )
    categories = list(batch.categories)
    if not categories or len(set(categories)) != len(categories):
        raise invalid("categories must be listed once each, at least one", "bad_categories")
    not_served = [c for c in categories if c not in served]
    if not_served:
        raise invalid(f"this unit does not hold data categories {sorted(not_served)}", "category_not_served")
    limits = {int(t.category): t.limit_fen for t in batch.thresholds}
    for category in threshold_categories & set(categories):
        if limits.get(category, 0) <= 0:
            raise invalid(
                f"this unit answers data category {category} as a threshold flag; send a positive limit",
                "threshold_missing",
            )
    try:
        start, end = year_month(batch.income_from), year_month(batch.income_to)
        from_pb(batch.assets_as_of)
    except ValueError as exc:
        raise invalid(f"income period or asset date: {exc}", "bad_period") from exc
    if start > end:
        raise invalid("income period ends before it starts", "bad_period")
    approvals.check(batch, gateway=gateway, unit=unit, created_at_ms=created_at_ms)
    refs = [s.subject_ref for s in batch.subjects]
    if any(not 0 < len(r) <= MAX_REF_LENGTH for r in refs) or len(set(refs)) != len(refs):
        raise invalid("every subject needs a unique subject_ref of 1-64 characters", "bad_subject_ref")
    if any(len(s.name) > MAX_NAME_LENGTH or len(s.id_number) > MAX_REF_LENGTH for s in batch.subjects):
        raise invalid("a subject's name or ID number field is too long", "field_too_long")
    if not any(is_authorised(s) for s in batch.subjects):
        raise Refusal(
            grpc.StatusCode.FAILED_PRECONDITION,
            "no subject carries an authorisation reference; nobody may be queried without one",
            "no_authorisation",
        )
