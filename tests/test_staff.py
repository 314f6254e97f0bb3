"""The staff register (Procedure V): admins only, the first one bootstrapped into an empty register, every change
audited without names, bad input refused with nothing changed, and exchange approvals checked against the register.
Runs on a real SQLite file and on the real PostgreSQL when it answers; the CLI round trip goes through hedui-keys
keystores exactly as staff members and an admin would use them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from gateway.archive.audit import AuditLog
from gateway.cli import main as gateway_main
from gateway.db.database import open_database
from gateway.procedure.staff import (
    APPROVAL_DOMAIN,
    BOOTSTRAP_ACTOR,
    StaffError,
    StaffMember,
    StaffRegister,
    approval_message,
)
from keys.cli import main as keys_main
from keys.handles import SigningKey
from keys.statements import staff_public_key
from tests.conftest import write_passphrase
from tests.test_audit import write_config

DAY_MS = 86_400_000
START_MS = 1_767_225_600_000
DIGEST = bytes(range(32))
#: A public key of small order (the identity point): it would "verify" signatures nobody made.
SMALL_ORDER_KEY = bytes([1]) + bytes(31)


@pytest.fixture
def engine(database_url: str | None, tmp_path: Path) -> Iterator[Engine]:
    engine = open_database(database_url or f"sqlite:///{tmp_path / 'gateway.db'}", migrate=True)
    yield engine
    engine.dispose()


@pytest.fixture
def register(engine: Engine) -> StaffRegister:
    return StaffRegister(engine, AuditLog(engine))


@dataclass
class Office:
    """A register with an admin (A-0001) and two exchange staff (S-0001, S-0002), each with their own key."""

    register: StaffRegister
    keys: dict[str, SigningKey]

    def approve(self, staff_id: str, digest: bytes = DIGEST) -> bytes:
        return self.keys[staff_id].sign(approval_message(digest))


@pytest.fixture
def office(register: StaffRegister) -> Office:
    keys = {s: SigningKey.generate() for s in ("A-0001", "S-0001", "S-0002")}
    register.bootstrap_admin(
        "A-0001", name="管理员", public_key=keys["A-0001"].public.raw, valid_from_ms=START_MS, now_ms=START_MS
    )
    for staff_id in ("S-0001", "S-0002"):
        register.register(
            "A-0001",
            staff_id,
            name=f"核对员 {staff_id}",
            roles=("exchange", "review"),
            public_key=keys[staff_id].public.raw,
            valid_from_ms=START_MS,
            valid_until_ms=START_MS + 365 * DAY_MS,
            now_ms=START_MS,
        )
    return Office(register, keys)


def snapshot(register: StaffRegister) -> tuple[list[StaffMember], int]:
    return register.list(), register.audit.count()


def test_bootstrap_admin_only_into_an_empty_register(register: StaffRegister) -> None:
    key = SigningKey.generate().public.raw
    admin = register.bootstrap_admin("A-0001", name="Admin", public_key=key, valid_from_ms=START_MS, now_ms=START_MS)
    assert admin.roles == {"admin"} and admin.registered_by == BOOTSTRAP_ACTOR
    assert register.get("A-0001") == admin
    before = snapshot(register)
    with pytest.raises(StaffError, match="not empty"):
        register.bootstrap_admin(
            "A-0002", name="Other", public_key=SigningKey.generate().public.raw, valid_from_ms=START_MS, now_ms=START_MS
        )
    assert snapshot(register) == before
    with pytest.raises(StaffError, match="admin role"):
        StaffRegister(register.engine, register.audit).bootstrap_admin(
            "A-0003", name="X", public_key=key, valid_from_ms=START_MS, now_ms=START_MS, roles=("exchange",)
        )


def test_changes_are_audited_with_roles_never_names(office: Office) -> None:
    register = office.register
    register.revoke("A-0001", "S-0002", now_ms=START_MS + DAY_MS, reason="left")
    entries = register.audit.entries()
    assert [(e.actor, e.action, e.before, e.after, e.detail) for e in entries] == [
        ("bootstrap", "staff.register", None, "active", "staff=A-0001;roles=admin"),
        ("A-0001", "staff.register", None, "active", "staff=S-0001;roles=review,exchange"),
        ("A-0001", "staff.register", None, "active", "staff=S-0002;roles=review,exchange"),
        ("A-0001", "staff.revoke", "active", "revoked", "staff=S-0002;reason=left"),
    ]
    assert register.audit.verify() == []
    member = register.get("S-0001")
    assert member is not None and "核对员" not in repr(member)


def test_only_an_active_admin_registers(office: Office) -> None:
    register = office.register
    new_key = SigningKey.generate().public.raw
    before = snapshot(register)

    def add(actor: str, at_ms: int = START_MS + DAY_MS) -> StaffMember:
        return register.register(
            actor, "S-0003", name="N", roles=("intake",), public_key=new_key, valid_from_ms=START_MS, now_ms=at_ms
        )

    for actor in ("S-0001", "nobody", "A-0001 ", "bootstrap", ""):
        with pytest.raises(StaffError, match="only an active admin"):
            add(actor)
    with pytest.raises(StaffError, match="only an active admin"):
        add("A-0001", at_ms=START_MS - 1)  # before the admin's validity began
    assert snapshot(register) == before

    register.register(
        "A-0001", "A-0002", name="Second", roles=("admin",), public_key=new_key, valid_from_ms=START_MS, now_ms=START_MS
    )
    register.revoke("A-0002", "A-0001", now_ms=START_MS + DAY_MS, reason="moved")
    with pytest.raises(StaffError, match="only an active admin"):
        register.register(
            "A-0001",
            "S-0004",
            name="N",
            roles=("intake",),
            public_key=SigningKey.generate().public.raw,
            valid_from_ms=START_MS,
            now_ms=START_MS + 2 * DAY_MS,
        )


def test_the_last_active_admin_cannot_be_revoked(office: Office) -> None:
    before = snapshot(office.register)
    with pytest.raises(StaffError, match="last active admin"):
        office.register.revoke("A-0001", "A-0001", now_ms=START_MS + DAY_MS, reason="left")
    assert snapshot(office.register) == before


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"staff_id": "S 0003"}, "staff id must be"),
        ({"staff_id": "S-" + "0" * 31}, "staff id must be"),
        ({"staff_id": "S-０００３"}, "staff id must be"),
        ({"name": ""}, "name must be"),
        ({"name": " padded"}, "name must be"),
        ({"name": "x" * 65}, "name must be"),
        ({"name": "tab\there"}, "control characters"),
        ({"roles": ()}, "at least one role"),
        ({"roles": ("exchange", "root")}, "unknown role"),
        ({"roles": "exchange,"}, None),  # accepted: a comma-separated string with an empty tail
        ({"public_key": bytes(31)}, "32 bytes"),
        ({"public_key": SMALL_ORDER_KEY}, "not a valid Ed25519 point"),
        ({"public_key": b"\xff" * 32}, "not a valid Ed25519 point"),
        ({"valid_until_ms": START_MS}, "valid_until must be later"),
        ({"valid_from_ms": -1}, "before 1970"),
        ({"staff_id": "S-0001"}, "registered already"),
    ],
)
def test_invalid_input_is_refused_and_changes_nothing(
    office: Office, changes: dict[str, Any], message: str | None
) -> None:
    register = office.register
    fields: dict[str, Any] = {
        "staff_id": "S-0003",
        "name": "张三",
        "roles": ("exchange",),
        "public_key": SigningKey.generate().public.raw,
        "valid_from_ms": START_MS,
        "valid_until_ms": None,
        "now_ms": START_MS,
        **changes,
    }
    before = snapshot(register)
    if message is None:
        assert register.register("A-0001", **fields).roles == {"exchange"}
        return
    with pytest.raises(StaffError, match=message) as caught:
        register.register("A-0001", **fields)
    assert "张三" not in caught.value.diagnostics()
    assert snapshot(register) == before


def test_one_key_serves_one_member_only(office: Office) -> None:
    # Procedure V.(二): two *distinct* staff members approve; one person under two ids would be one signer twice.
    before = snapshot(office.register)
    with pytest.raises(StaffError, match="registered for S-0002 already"):
        office.register.register(
            "A-0001",
            "S-0003",
            name="N",
            roles=("exchange",),
            public_key=office.keys["S-0002"].public.raw,
            valid_from_ms=START_MS,
            now_ms=START_MS,
        )
    assert snapshot(office.register) == before


def test_revoke_refusals_change_nothing(office: Office) -> None:
    register = office.register
    before = snapshot(register)
    for staff_id, reason, message in (
        ("S-0009", "left", "no staff member"),
        ("S-0001", "Left Office", "short lower-case code"),
        ("S 1", "left", "staff id must be"),
    ):
        with pytest.raises(StaffError, match=message):
            register.revoke("A-0001", staff_id, now_ms=START_MS + DAY_MS, reason=reason)
    with pytest.raises(StaffError, match="only an active admin"):
        register.revoke("S-0002", "S-0001", now_ms=START_MS + DAY_MS, reason="left")
    assert snapshot(register) == before
    register.revoke("A-0001", "S-0001", now_ms=START_MS + DAY_MS, reason="left")
    with pytest.raises(StaffError, match="revoked already"):
        register.revoke("A-0001", "S-0001", now_ms=START_MS + 2 * DAY_MS, reason="left")


def test_a_correct_approval_passes(office: Office) -> None:
    register = office.register
    at = START_MS + DAY_MS
    assert approval_message(DIGEST) == APPROVAL_DOMAIN + DIGEST == b"hedui.v1.exchange-approval\x00" + DIGEST
    for staff_id in ("S-0001", "S-0002"):
        assert register.verify_approval(staff_id, DIGEST, office.approve(staff_id), at)


def test_approvals_that_must_fail(office: Office) -> None:
    register = office.register
    at = START_MS + DAY_MS
    good = office.approve("S-0001")
    assert not register.verify_approval("S-0001", DIGEST, office.approve("S-0002"), at)  # another member's key
    assert not register.verify_approval("S-0001", DIGEST, SigningKey.generate().sign(approval_message(DIGEST)), at)
    assert not register.verify_approval("S-0001", bytes(32), good, at)  # another commission
    assert not register.verify_approval("S-0001", DIGEST, office.keys["S-0001"].sign(DIGEST), at)  # no domain
    assert not register.verify_approval("S-0001", DIGEST, good[:-1] + bytes([good[-1] ^ 1]), at)
    assert not register.verify_approval("S-0001", DIGEST, good[:63], at)
    assert not register.verify_approval("S-0009", DIGEST, good, at)  # not registered
    assert not register.verify_approval("S-0001 ", DIGEST, good, at)
    assert not register.verify_approval("S-0001", DIGEST, good, START_MS - 1)  # not yet valid
    assert not register.verify_approval("S-0001", DIGEST, good, START_MS + 365 * DAY_MS)  # expired
    # The admin may sign, but holds no exchange role; the role check can be waived by the caller.
    admin = office.approve("A-0001")
    assert not register.verify_approval("A-0001", DIGEST, admin, at)
    assert register.verify_approval("A-0001", DIGEST, admin, at, role=None)
    with pytest.raises(ValueError, match="32 bytes"):
        register.verify_approval("S-0001", DIGEST[:31], good, at)


def test_a_revoked_member_approves_nothing_from_then_on(office: Office) -> None:
    register = office.register
    revoked_at = START_MS + 10 * DAY_MS
    good = office.approve("S-0002")
    register.revoke("A-0001", "S-0002", now_ms=revoked_at, reason="key-lost")
    assert not register.verify_approval("S-0002", DIGEST, good, revoked_at)
    assert not register.verify_approval("S-0002", DIGEST, good, revoked_at + DAY_MS)
    assert register.active("S-0002", revoked_at) is None
    # An approval given before the revocation stays verifiable at the time it was given.
    assert register.verify_approval("S-0002", DIGEST, good, revoked_at - 1)


def test_approval_checked_inside_the_callers_transaction_does_not_wait_for_itself(office: Office) -> None:
    # Regression: on SQLite every transaction takes the write lock at BEGIN, so a lookup on a second connection
    # from inside the caller's transaction waited for that transaction (60 s busy timeout, then "locked").
    register = office.register
    with register.engine.begin() as conn:
        assert register.verify_approval("S-0001", DIGEST, office.approve("S-0001"), START_MS + 1, conn=conn)
        register.audit.append(conn, at_ms=START_MS + 1, actor="S-0001", action="commission.approve", commission_id=1)
    assert register.audit.verify() == []


def test_staff_public_key_accepts_real_keys_only() -> None:
    raw = SigningKey.generate().public.raw
    assert staff_public_key(raw).raw == raw
    for bad in (bytes(32), SMALL_ORDER_KEY, b"\xff" * 32, raw[:31]):
        with pytest.raises(ValueError):
            staff_public_key(bad)


# -- the command lines, as an admin and staff members use them ----------------------------------------------------


class Keystore:
    """One person's hedui-keys keystore."""

    def __init__(self, root: Path, party_id: str) -> None:
        self.party_id = party_id
        self.path = root / f"{party_id}.keystore.json"
        self.passfile = write_passphrase(root / f"{party_id}.passphrase", "correct horse battery staple")
        self.bundle = root / f"{party_id}.bundle"
        assert self.run("init", party_id) == 0
        assert self.run("export", "--out", str(self.bundle)) == 0

    def run(self, *args: str) -> int:
        return keys_main(["--keystore", str(self.path), "--passphrase-file", str(self.passfile), *args])


def bundle_fingerprint(capsys: pytest.CaptureFixture[str], bundle: Path) -> str:
    capsys.readouterr()
    assert keys_main(["inspect", str(bundle)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("bundle fingerprint: "))
    return line.removeprefix("bundle fingerprint: ")


def test_cli_register_staff_and_approve_with_a_staff_keystore(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # SQLite only: the keystores dominate the cost, and test_audit runs the same commands' database path on both.
    database_url = None
    config = write_config(tmp_path, database_url)
    assert gateway_main(["migrate", "--config", str(config)]) == 0
    people = {s: Keystore(tmp_path, f"staff.220100.{s.lower()}") for s in ("A-0001", "S-0001", "S-0002")}
    agency = Keystore(tmp_path, "agency.220100")

    def gateway(*args: str) -> int:
        capsys.readouterr()
        return gateway_main([*args, "--config", str(config)])

    def member_args(staff_id: str, *extra: str) -> list[str]:
        bundle = people[staff_id].bundle
        return ["--staff-id", staff_id, "--name", f"核对员{staff_id}", "--public-key-file", str(bundle), *extra]

    assert gateway("staff", "list") == 0
    assert "register is empty" in capsys.readouterr().out
    assert gateway("staff", "bootstrap-admin", *member_args("A-0001")) == 0
    out = capsys.readouterr().out
    assert "key of staff.220100.a-0001" in out and bundle_fingerprint(capsys, people["A-0001"].bundle) in out
    assert gateway("staff", "bootstrap-admin", *member_args("S-0001")) == 1
    assert "not empty" in capsys.readouterr().err

    for staff_id in ("S-0001", "S-0002"):
        fingerprint = bundle_fingerprint(capsys, people[staff_id].bundle)
        args = member_args(staff_id, "--roles", "exchange,review", "--admin", "A-0001", "--fingerprint", fingerprint)
        assert gateway("staff", "add", *args, "--valid-until", "2099-12-31") == 0
        assert f"registered {staff_id} (review,exchange) by A-0001" in capsys.readouterr().out

    entries = AuditLog(open_database(config_url(database_url, tmp_path))).entries()
    # Refusals: a bundle that is not the one read out, a bundle that is not a staff member's, a non-admin.
    wrong = ["--fingerprint", "12345 " * 8, "--roles", "exchange", "--admin", "A-0001"]
    assert gateway("staff", "add", *member_args("S-0001"), *wrong) == 1
    assert "fingerprint mismatch" in capsys.readouterr().err
    agency_args = ["--staff-id", "S-0003", "--name", "N", "--public-key-file", str(agency.bundle)]
    assert gateway("staff", "add", *agency_args, "--roles", "exchange", "--admin", "A-0001") == 1
    assert "not of a staff member" in capsys.readouterr().err
    assert gateway("staff", "add", *member_args("S-0002"), "--roles", "exchange", "--admin", "S-0001") == 1
    assert "only an active admin" in capsys.readouterr().err
    assert gateway("staff", "add", *member_args("S-0002"), "--roles", "exchange", "--admin", "A-0001",
                   "--valid-until", "31.12.2099") == 1  # fmt: skip
    assert "YYYY-MM-DD" in capsys.readouterr().err

    assert gateway("staff", "list") == 0
    listing = capsys.readouterr().out
    assert "A-0001       active   admin" in listing
    assert "S-0001       active   review,exchange" in listing and ".. 2100-01-01 00:00" in listing

    # A staff member signs the commission's exchange digest with hedui-keys; the register accepts it.
    engine = open_database(config_url(database_url, tmp_path))
    register = StaffRegister(engine, AuditLog(engine))
    assert register.audit.entries() == entries  # the refusals left no trace but their absence
    capsys.readouterr()
    assert people["S-0001"].run("sign-approval", "--digest", DIGEST.hex()) == 0
    signature = bytes.fromhex(capsys.readouterr().out.strip())
    now = register.get("S-0001")
    assert now is not None
    at = now.registered_at_ms + 1
    assert register.verify_approval("S-0001", DIGEST, signature, at)
    assert not register.verify_approval("S-0002", DIGEST, signature, at)
    assert not register.verify_approval("S-0001", bytes(32), signature, at)
    assert people["S-0001"].run("sign-approval", "--digest", "abc") == 1
    assert "64 hex digits" in capsys.readouterr().err

    assert gateway("staff", "revoke", "--staff-id", "S-0001", "--admin", "A-0001", "--reason", "left") == 0
    assert gateway("staff", "list") == 0
    assert "S-0001       revoked" in capsys.readouterr().out
    member = register.get("S-0001")
    assert member is not None and member.revoked_at_ms is not None
    assert not register.verify_approval("S-0001", DIGEST, signature, member.revoked_at_ms)

    assert gateway("audit", "verify") == 0
    assert "audit log intact: 4 entries" in capsys.readouterr().out
    engine.dispose()


def config_url(database_url: str | None, root: Path) -> str:
    return database_url or f"sqlite:///{root / 'gateway.db'}"
