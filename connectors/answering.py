"""Turning an adapter's findings into answers: statuses, name matching and threshold flags.

Done once here for every adapter: a subject is looked up only if its ID number is valid (GB 11643) and it carries
an authorisation reference; a finding counts only when the unit's name for that ID number is the queried name —
an ID number on file under another name is NAME_MISMATCH, never a silent hit.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from datetime import date

from hedui.v1 import exchange_pb2, records_pb2

from common.idnumber import is_valid_id_number
from connectors.adapters.base import Adapter, Finding, LookupContext

#: Variants of the middle dot in names of ethnic minorities and transliterated names, all compared as one.
_DOTS = str.maketrans({"•": "·", "・": "·", "．": "·", ".": "·", "‧": "·", "∙": "·"})
LOOKUP_CHUNK = 1000
SCAN_DIGEST_BYTES = 32


def normalize_name(name: str) -> str:
    """Compare names after NFKC folding (full-width forms), unifying middle dots and dropping white space."""
    return "".join(unicodedata.normalize("NFKC", name).translate(_DOTS).split())


def is_authorised(subject: exchange_pb2.QuerySubject) -> bool:
    """The subject carries an authorisation reference: its number and the SHA-256 of the signed scan."""
    auth = subject.authorisation
    return bool(auth.number.strip()) and len(auth.scan_sha256) == SCAN_DIGEST_BYTES


def _threshold(records: list[records_pb2.Record], limit_fen: int, as_of: date, at_ms: int) -> records_pb2.Record:
    total = sum(r.deposit.balance_fen for r in records if r.WhichOneof("body") == "deposit")
    return records_pb2.Record(
        category=records_pb2.DATA_CATEGORY_DEPOSITS,
        produced_at_ms=at_ms,
        deposit_threshold=records_pb2.DepositThreshold(
            limit_fen=limit_fen,
            above_limit=total > limit_fen,
            as_of=records_pb2.Date(year=as_of.year, month=as_of.month, day=as_of.day),
        ),
    )


def answer_subjects(
    subjects: Sequence[exchange_pb2.QuerySubject],
    adapter: Adapter,
    context: LookupContext,
    thresholds: Mapping[int, int],
    *,
    today: date,
) -> exchange_pb2.BatchAnswer:
    """A BatchAnswer holding the subjects' answers in query order (the caller fills in the batch fields).
    ``thresholds`` maps the categories answered as flags to their limits."""
    # Each subject is checked once: after the adapter's look-up the GB 11643 check is the costliest step.
    refused = [_refusal(s, today) for s in subjects]
    ids = sorted({s.id_number.strip().upper() for s, r in zip(subjects, refused, strict=True) if r is None})
    findings: dict[str, list[Finding]] = {}
    for start in range(0, len(ids), LOOKUP_CHUNK):
        findings.update(adapter.fetch(ids[start : start + LOOKUP_CHUNK], context))
    batch = exchange_pb2.BatchAnswer()
    # Answers are added in place: building them apart and then putting them in the batch would copy each again.
    add = batch.subjects.add
    for subject, refusal in zip(subjects, refused, strict=True):
        if refusal is not None:
            add(subject_ref=subject.subject_ref, status=refusal)
        elif not (held := findings.get(subject.id_number.strip().upper())):
            add(subject_ref=subject.subject_ref, status=exchange_pb2.SUBJECT_STATUS_NO_RECORD)
        else:
            wanted = normalize_name(subject.name)
            records = [f.record for f in held if normalize_name(f.name) == wanted]
            if records:
                add(
                    subject_ref=subject.subject_ref,
                    status=exchange_pb2.SUBJECT_STATUS_FOUND,
                    records=_minimised(records, thresholds, context),
                )
            else:
                add(subject_ref=subject.subject_ref, status=exchange_pb2.SUBJECT_STATUS_NAME_MISMATCH)
    return batch


def _refusal(subject: exchange_pb2.QuerySubject, today: date) -> exchange_pb2.SubjectStatus.ValueType | None:
    """Why the subject is not looked up at all, or None when it is."""
    if not is_valid_id_number(subject.id_number, today=today):
        return exchange_pb2.SUBJECT_STATUS_INVALID_ID
    if not is_authorised(subject):
        return exchange_pb2.SUBJECT_STATUS_NOT_AUTHORISED
    return None


def _minimised(
    records: list[records_pb2.Record], thresholds: Mapping[int, int], context: LookupContext
) -> list[records_pb2.Record]:
    out = [r for r in records if r.category not in thresholds]
    for category, limit in sorted(thresholds.items()):
        # Only deposits support flags (common.categories.THRESHOLD_CAPABLE); amounts never leave the unit.
        if category == records_pb2.DATA_CATEGORY_DEPOSITS and category in context.categories:
            out.append(_threshold([r for r in records if r.category == category], limit, context.assets_as_of,
                                  context.produced_at_ms))  # fmt: skip
    return out
