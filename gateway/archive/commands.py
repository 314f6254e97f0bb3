"""The ``audit`` and ``archive`` commands of hedui-gateway (clause 17), kept together here so that the command line
module only wires them in.

    audit verify [--expected-head SEQ:HEX | --checkpoint FILE] [--require-attested]
    audit head                  print SEQ:HEX of the newest entry
    audit checkpoint            sign a checkpoint of the head now
    audit export-head [--out FILE]   sign a checkpoint if needed and write the newest one, to keep off the machine
    archive verify              re-check every archived envelope's signature and its place in the chain
    archive steps COMMISSION [--export-keys FILE]
                                re-verify a commission's signed steps and approvals: three people, two approvers
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import Engine, func, select

from common.db import reading
from common.errors import HeduiError
from gateway.archive.audit import AuditError, AuditHead, AuditLog
from gateway.archive.checkpoints import (
    CHECKPOINT_ACTION,
    MAX_EXPORT_BYTES,
    ChainReport,
    Checkpointer,
    ExportedCheckpoint,
    examine,
    latest_checkpoint,
)
from gateway.archive.steps import CommissionProof, ProvenSignature, prove_commission
from gateway.archive.verify import verify_archive
from gateway.config import GatewayConfig
from gateway.db import schema
from gateway.db.database import open_database
from keys import keystore
from keys.clock import SystemClock
from keys.errors import KeystoreError
from keys.identity import PartyKeys
from keys.keyring import Keyring
from keys.steps import staff_keys_text
from keys.truststore import TrustStore

_CHINA_TIME = timezone(timedelta(hours=8), "CST")


class ArchiveError(HeduiError):
    """The archive failed verification, or an archive command cannot run as asked."""

    code = "archive"


@contextmanager
def _opened(config_path: str) -> Iterator[tuple[GatewayConfig, Engine]]:
    config = GatewayConfig.load(Path(config_path))
    engine = open_database(config.database.url)
    try:
        yield config, engine
    finally:
        engine.dispose()


def _keys(config: GatewayConfig) -> tuple[PartyKeys, TrustStore]:
    passphrase = keystore.read_passphrase_file(config.keys.passphrase_file)
    party, trust = keystore.load(config.keys.keystore, passphrase)
    if party.party_id != config.agency.party_id:
        raise KeystoreError(f"keystore belongs to {party.party_id}, config says {config.agency.party_id}")
    return party, trust


def _checkpoints(engine: Engine) -> int:
    with reading(engine) as conn:
        query = select(func.count()).where(schema.audit_log.c.action == CHECKPOINT_ACTION)
        return int(conn.execute(query.select_from(schema.audit_log)).scalar_one())


def _moment(moment_ms: int) -> str:
    return datetime.fromtimestamp(moment_ms / 1000, _CHINA_TIME).strftime("%Y-%m-%d %H:%M:%S")


def _verify(args: argparse.Namespace) -> None:
    expected = AuditHead.parse(args.expected_head) if args.expected_head else None
    exported = None
    if args.checkpoint:
        path = Path(args.checkpoint)
        if path.stat().st_size > MAX_EXPORT_BYTES:
            raise AuditError(f"{path} is too large to be an exported checkpoint")
        exported = ExportedCheckpoint.loads(path.read_text(encoding="utf-8", errors="replace"))
    with _opened(args.config) as (config, engine):
        try:
            keys = Keyring(_keys(config)[0].records())
        except KeystoreError:
            # A chain without checkpoints (from before they existed) needs no keys; one with them does.
            if _checkpoints(engine) or exported is not None:
                raise
            keys = Keyring()
        report = examine(engine, keys=keys, party_id=config.agency.party_id, expected_head=expected, exported=exported)
        head = AuditLog(engine).head()
    _print_chain(report, head, expected, exported)
    if report.problems:
        raise AuditError(
            f"the audit log failed verification ({len(report.problems)} problem(s)): it was changed outside the "
            "gateway or damaged; keep the database as it is (copy it) for the investigation"
        )
    if args.require_attested and report.unattested:
        raise AuditError(
            "entries after the last checkpoint are unattested (--require-attested): look at them with the "
            "database's tools, then sign them with 'hedui-gateway audit checkpoint' if they are the gateway's"
        )


def _print_chain(
    report: ChainReport, head: AuditHead, expected: AuditHead | None, exported: ExportedCheckpoint | None
) -> None:
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    for note in report.notes:
        print(f"note: {note}")
    if report.problems:
        return
    anchor = exported.head if exported is not None else expected
    checked = f"; the recorded head {anchor} is in it" if anchor and anchor.seq else ""
    print(f"audit log intact: {head.seq} entries{checked}; head {head}")
    if report.checkpoints:
        last = report.checkpoints[-1]
        print(
            f"checkpoints: {len(report.checkpoints)} with valid signatures; the last is entry {last.seq} "
            f"({_moment(last.at_ms)} Beijing time, {last.reason})"
        )
    else:
        print("checkpoints: none yet")
    unattested = report.unattested
    if unattested:
        count, first, last_seq = unattested
        print(
            f"UNATTESTED: {count} entries ({first}-{last_seq}) after the last checkpoint: no signature of the "
            "gateway vouches for them yet (the next checkpoint will, within [archive] checkpoint_interval_seconds); "
            "a database writer could have added them"
        )
    else:
        print("unattested: none (every entry is covered by a signed checkpoint)")


def _checkpoint(args: argparse.Namespace) -> None:
    with _opened(args.config) as (config, engine):
        seq = Checkpointer(AuditLog(engine), _keys(config)[0], SystemClock(), reason="operator").sign()
    print(f"checkpoint signed as entry {seq}" if seq else "the head is a checkpoint already; nothing to sign")


def _export_head(args: argparse.Namespace) -> None:
    with _opened(args.config) as (config, engine):
        party = _keys(config)[0]
        Checkpointer(AuditLog(engine), party, SystemClock(), reason="operator").sign()
        checkpoint = latest_checkpoint(engine, Keyring(party.records()), party.party_id)
    if checkpoint is None:
        raise AuditError("the audit log is empty: there is no head to export yet")
    text = checkpoint.export() + "\n"
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"checkpoint entry {checkpoint.seq} written to {args.out}: keep it off this machine", file=sys.stderr)
    else:
        sys.stdout.write(text)


def _archive_verify(args: argparse.Namespace) -> None:
    with _opened(args.config) as (config, engine):
        party, trust = _keys(config)
        report = verify_archive(engine, party=party, trust=trust)
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    for note in report.revoked:
        print(f"note: {note}")
    print(
        f"archive: {report.checked} envelopes ({report.incoming} received, {report.outgoing} sent); "
        f"{report.references} chain references found"
    )
    if report.unchained:
        print(f"{report.unchained} envelopes kept before migration 0007 have no chain entry (signatures checked)")
    if report.problems:
        raise ArchiveError(
            f"the archive failed verification ({len(report.problems)} problem(s)): keep the database as it is "
            "(copy it) for the investigation"
        )
    print("archive intact: every envelope verifies and has its place in the chain ('audit verify' checks the chain)")


def _signature_line(signed: ProvenSignature) -> str:
    decision = "" if signed.label in {"report", "approval"} else ("passed" if signed.passed else "not passed")
    return (
        f"  {signed.label:8} {signed.staff_id:12} {decision:10} {_moment(signed.at_ms)} Beijing time, entry "
        f"{signed.seq}, key {signed.key_id.hex()}: signature verifies"
    )


def _print_proof(proof: CommissionProof) -> None:
    lower = " (entered at review from a lower-level agency)" if proof.from_lower_agency else ""
    print(f"commission {proof.commission}: {proof.state or 'no state in the chain'}{lower}")
    for signed in (*proof.steps, *proof.approvals):
        print(_signature_line(signed))
    for problem in proof.problems:
        print(f"PROBLEM: {problem}")
    for note in proof.notes:
        print(f"note: {note}")
    people = ", ".join(f"{s.label} {s.staff_id}" for s in proof.steps)
    if not proof.ended:
        print(f"Procedure V.(一): not yet provable: the commission is {proof.state or 'unknown'}, its steps go on")
    elif proof.three_different_people:
        print(f"Procedure V.(一): every step signed, by {len(proof.required_steps)} different people: yes ({people})")
    else:
        needed = ", ".join(proof.required_steps)
        print(f"Procedure V.(一): NOT shown: steps {needed} needed, proven: {people or 'none'}")
    approvers = ", ".join(a.staff_id for a in proof.approvals)
    if proof.two_distinct_approvers:
        print(f"Procedure V.(二): the exchange approved by {len(proof.approvals)} distinct staff members: yes "
              f"({approvers})")  # fmt: skip
    elif proof.approvals_needed:
        print(f"Procedure V.(二): NOT shown: approvals proven: {approvers or 'none'}")
    else:
        print("Procedure V.(二): no exchange was approved for this commission")
    print("the chain as a whole (links, signed checkpoints, a head kept off the machine): 'hedui-gateway audit verify'")


def _archive_steps(args: argparse.Namespace) -> None:
    with _opened(args.config) as (config, engine):
        proof = prove_commission(engine, args.commission, config.agency.party_id)
    if proof is None:
        raise ArchiveError(f"no commission {args.commission[:64]!r} in this gateway's database")
    _print_proof(proof)
    if args.export_keys:
        path = Path(args.export_keys)
        text = staff_keys_text(sorted(proof.keys.items()))
        with path.open("x", encoding="utf-8") as handle:  # never overwrite: it may be someone's kept evidence
            handle.write(text)
        print(f"the signers' registered keys written to {path} (for 'hedui-keys verify-report --staff-keys')")
    if proof.problems:
        raise ArchiveError(
            f"the signed steps of {proof.commission} failed verification ({len(proof.problems)} problem(s)): keep the "
            "database as it is (copy it) for the investigation"
        )
    if not proof.proven:
        raise ArchiveError(f"{proof.commission}: Procedure V.(一) and V.(二) are not (yet) shown for this commission")


def _head(args: argparse.Namespace) -> None:
    with _opened(args.config) as (_, engine):
        print(AuditLog(engine).head())


def add_audit_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``audit`` (verify, head, checkpoint, export-head) and ``archive`` (verify) to hedui-gateway."""
    audit = sub.add_parser("audit", help="the hash-chained audit log: verify, head, checkpoint, export-head")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="AUDIT_COMMAND")
    verify = audit_sub.add_parser(
        "verify", help="check every entry, the chain and its signed checkpoints; exit status 1 on any problem"
    )
    anchor = verify.add_mutually_exclusive_group()
    anchor.add_argument("--expected-head", help="SEQ:HEX recorded earlier from 'audit head' (detects cut-off ends)")
    anchor.add_argument(
        "--checkpoint", help="a file from 'audit export-head' kept off the machine (detects cut-off ends)"
    )
    verify.add_argument(
        "--require-attested", action="store_true", help="exit status 1 also when entries follow the last checkpoint"
    )
    verify.set_defaults(func=_verify)
    audit_sub.add_parser("head", help="print SEQ:HEX of the newest entry, to record out of band").set_defaults(
        func=_head
    )
    audit_sub.add_parser("checkpoint", help="sign a checkpoint of the head now (needs the keystore)").set_defaults(
        func=_checkpoint
    )
    export = audit_sub.add_parser(
        "export-head", help="sign a checkpoint if the head is not one, and write the newest checkpoint (JSON)"
    )
    export.add_argument("--out", help="file to write (default: standard output)")
    export.set_defaults(func=_export_head)
    for command in audit_sub.choices.values():
        command.add_argument("--config", required=True)
    archive = sub.add_parser("archive", help="the message archive: verify; a commission's signed steps: steps")
    archive_sub = archive.add_subparsers(dest="archive_command", required=True, metavar="ARCHIVE_COMMAND")
    archive_verify = archive_sub.add_parser(
        "verify", help="re-check every archived envelope's signature and its place in the chain; exit 1 on problems"
    )
    archive_verify.add_argument("--config", required=True)
    archive_verify.set_defaults(func=_archive_verify)
    steps = archive_sub.add_parser(
        "steps",
        help="re-verify a commission's signed steps and approvals from the archive (Procedure V.(一)(二)); "
        "exit 1 unless three different people and two approvers are shown",
    )
    steps.add_argument("commission", help="the commission id, e.g. C0123456789abcdef")
    steps.add_argument("--config", required=True)
    steps.add_argument(
        "--export-keys", metavar="FILE", help="also write the signers' registered keys (a new file) for verify-report"
    )
    steps.set_defaults(func=_archive_steps)
