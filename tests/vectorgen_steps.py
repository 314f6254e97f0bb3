"""Deterministic test vectors of signed procedure steps (docs/agency-api.md, "Signed procedure steps").

:func:`build_vectors` returns the document that ``scripts/make_vectors.py`` writes to ``tests/vectors/steps_v1.json``;
``tests/test_vectors.py`` builds it again, compares the two byte for byte, and checks every vector against the
reference implementation (keys/steps.py) and against the specification with nothing but protobuf and an Ed25519
library. Ed25519 signatures are deterministic, so nothing varies between runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from hedui.v1 import agency_pb2

from keys import _canonical
from keys.fingerprint import Algorithm
from keys.handles import SigningKey, _load_private
from keys.steps import STEP_DOMAIN, StepKind, build_step, sign_step, step_bytes
from tests.vectorgen import Json
from tests.vectorgen_formats import KEY_SEED_DOMAIN, key_seed

FORMAT = "hedui-steps-v1-test-vectors"
AGENCY = "agency.220100"
COMMISSION = "C0123456789abcdef"
OTHER_COMMISSION = "Cfedcba9876543210"
#: The commission's exchange digest in every vector: SHA-256 of this text (any 32 bytes would do).
DIGEST = hashlib.sha256(b"hedui.v1 test vector exchange digest").digest()
STAFF = ("S-0001", "S-0002", "S-0005", "S-0006")


def staff_key(staff_id: str) -> SigningKey:
    """The vector key of ``staff_id``: seed SHAKE-256('hedui.v1.test-vector-key' || 0x00 || 'steps/' + staff id)."""
    key = _load_private(Algorithm.ED25519, key_seed(f"steps/{staff_id}"))
    assert isinstance(key, SigningKey)
    return key


def _key(staff_id: str) -> Json:
    public = staff_key(staff_id).public
    return {
        "staff_id": staff_id,
        "seed": key_seed(f"steps/{staff_id}").hex(),
        "public": public.raw.hex(),
        "key_id": public.key_id.hex(),
        "fingerprint": public.fingerprint,
    }


@dataclass(frozen=True)
class StepCase:
    name: str
    description: str
    kind: StepKind
    staff_id: str
    passed: bool = True
    reason: str = ""
    partial: bool = False


POSITIVE = (
    StepCase("intake-passed", "Intake review passed: no reason.", agency_pb2.STEP_KIND_INTAKE, "S-0001"),
    StepCase(
        "intake-returned",
        "Intake review returned the package. The reason is signed exactly as the request sends it, spaces around it "
        "included (the gateway records it without them).",
        agency_pb2.STEP_KIND_INTAKE,
        "S-0001",
        passed=False,
        reason=" 纸质材料与电子数据包不一致 ",
    ),
    StepCase(
        "review-terminated",
        "Second review terminated the commission, with its reason.",
        agency_pb2.STEP_KIND_REVIEW,
        "S-0002",
        passed=False,
        reason="授权书不完整",
    ),
    StepCase("review-passed", "Second review passed.", agency_pb2.STEP_KIND_REVIEW, "S-0002"),
    StepCase(
        "report-partial",
        "Report issue with the request's partial flag set: passed is always true, the reason always empty.",
        agency_pb2.STEP_KIND_REPORT,
        "S-0005",
        partial=True,
    ),
    StepCase("report-complete", "Report issue, complete.", agency_pb2.STEP_KIND_REPORT, "S-0005"),
)


def _step(case: StepCase, commission: str = COMMISSION) -> agency_pb2.ProcedureStep:
    return build_step(
        agency=AGENCY,
        commission_id=commission,
        kind=case.kind,
        staff_id=case.staff_id,
        exchange_digest=DIGEST,
        passed=case.passed,
        reason=case.reason,
        partial=case.partial,
    )


def _positive(case: StepCase) -> Json:
    step = _step(case)
    data = step_bytes(step)
    return {
        "name": case.name,
        "description": case.description,
        "fields": {
            "agency": step.agency,
            "commission_id": step.commission_id,
            "step": agency_pb2.StepKind.Name(step.step),
            "passed": step.passed,
            "reason": step.reason,
            "staff_id": step.staff_id,
            "exchange_digest": step.exchange_digest.hex(),
            "partial": step.partial,
        },
        "step": data.hex(),
        "message": (STEP_DOMAIN + data).hex(),
        "signer": case.staff_id,
        "signature": sign_step(step, staff_key(case.staff_id)).hex(),
        "step_sha256": hashlib.sha256(data).hexdigest(),
    }


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    key = bytes([number << 3 | wire_type])
    if wire_type == 2:
        return key + bytes([len(payload)]) + payload
    return key + payload


def _negative(name: str, description: str, data: bytes, signer: str, signature: bytes, error: str) -> Json:
    return {
        "name": name,
        "description": description,
        "step": data.hex(),
        "signer": signer,
        "signature": signature.hex(),
        "error": error,
    }


def _signed_raw(data: bytes, staff_id: str) -> bytes:
    """A valid signature over bytes that are not a canonical step: what a careless or hostile signer makes."""
    return staff_key(staff_id).sign(STEP_DOMAIN + data)


def _negatives() -> list[Json]:
    intake = _step(POSITIVE[0])
    good = step_bytes(intake)
    fields = [
        _field(1, 2, AGENCY.encode()),
        _field(2, 2, COMMISSION.encode()),
        _field(3, 0, b"\x01"),
        _field(4, 0, b"\x01"),
        _field(6, 2, b"S-0001"),
        _field(7, 2, DIGEST),
    ]
    assert b"".join(fields) == good  # the canonical encoding, field by field
    reordered = fields[4:5] + fields[:4] + fields[5:]
    unknown = good + _field(15, 0, b"\x01")
    kind_zero = step_bytes(agency_pb2.ProcedureStep(agency=AGENCY, commission_id=COMMISSION, passed=True,
                                                    staff_id="S-0001", exchange_digest=DIGEST))  # fmt: skip
    short = _canonical.encode(
        agency_pb2.ProcedureStep(agency=AGENCY, commission_id=COMMISSION, step=agency_pb2.STEP_KIND_INTAKE,
                                 passed=True, staff_id="S-0001", exchange_digest=DIGEST[:31])
    )  # fmt: skip
    failed_report = _canonical.encode(
        agency_pb2.ProcedureStep(agency=AGENCY, commission_id=COMMISSION, step=agency_pb2.STEP_KIND_REPORT,
                                 passed=False, reason="x", staff_id="S-0005", exchange_digest=DIGEST)
    )  # fmt: skip
    other = step_bytes(_step(POSITIVE[0], OTHER_COMMISSION))
    return [
        _negative("fields-out-of-order", "The fields of intake-passed with staff_id first: the same step, not its "
                  "canonical bytes. Signed over these bytes; refused before the signature is looked at.",
                  b"".join(reordered), "S-0001", _signed_raw(b"".join(reordered), "S-0001"), "not_canonical"),
        _negative("unknown-field", "intake-passed with an unknown field 15 appended, signed over these bytes.",
                  unknown, "S-0001", _signed_raw(unknown, "S-0001"), "not_canonical"),
        _negative("step-unspecified", "No step kind (STEP_KIND_UNSPECIFIED).", kind_zero, "S-0001",
                  _signed_raw(kind_zero, "S-0001"), "not_a_step"),
        _negative("digest-31-bytes", "An exchange digest of 31 bytes.", short, "S-0001", _signed_raw(short, "S-0001"),
                  "not_a_step"),
        _negative("report-not-passed", "A report step that does not pass, with a reason.", failed_report, "S-0005",
                  _signed_raw(failed_report, "S-0005"), "not_a_step"),
        _negative("signature-of-another-commission", "intake-passed with the signature of the same step of another "
                  "commission (a replayed step).", good, "S-0001", _signed_raw(other, "S-0001"), "bad_signature"),
        _negative("signature-without-domain", "intake-passed signed without the domain prefix.", good, "S-0001",
                  staff_key("S-0001").sign(good), "bad_signature"),
        _negative("signature-by-another-member", "intake-passed signed by S-0006's key; the step names S-0001.", good,
                  "S-0001", _signed_raw(good, "S-0006"), "bad_signature"),
    ]  # fmt: skip


def build_vectors() -> Json:
    """The whole vector document, as written to tests/vectors/steps_v1.json."""
    return {
        "format": FORMAT,
        "specification": 'docs/agency-api.md, "Signed procedure steps"',
        "regenerate": "python scripts/make_vectors.py",
        "conventions": [
            "Byte strings are lower-case hex, texts JSON strings. Staff keys are Ed25519 keys made from the seed "
            "SHAKE-256('hedui.v1.test-vector-key' || 0x00 || 'steps/' || staff id), 32 bytes (RFC 8032 private key).",
            "steps: 'step' is the canonical (deterministic) protobuf encoding of hedui.v1.ProcedureStep with "
            "'fields'; 'message' = step_domain || step is what the staff member signs; 'signature' is the Ed25519 "
            "signature of 'signer' over 'message'; 'step_sha256' is what the audit chain entry names (step=).",
            "steps_negative: the verifier refuses 'step' with 'signature' of 'signer': 'not_canonical' (the bytes "
            "are not the canonical encoding of what they parse to), 'not_a_step' (a field outside the rules of "
            "the specification) or 'bad_signature' (a canonical step the signature does not verify over).",
        ],
        "constants": {"step_domain": STEP_DOMAIN.hex(), "key_seed_domain": KEY_SEED_DOMAIN.hex()},
        "keys": [_key(staff_id) for staff_id in STAFF],
        "steps": [_positive(case) for case in POSITIVE],
        "steps_negative": _negatives(),
    }


def render(vectors: Json) -> str:
    """The exact text of the vector file."""
    return json.dumps(vectors, indent=2, ensure_ascii=False) + "\n"
