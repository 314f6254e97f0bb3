"""The gateway's tables (SQLAlchemy Core). Alembic migrations in gateway/db/migrations create and change them; a test
fails when this module and the migrations disagree.

Personal data (ID numbers, names, findings) lives only in ``subjects`` and in the ``body`` of ``answers``, and in
the batch content (``batch_contents``) that travels to the unit. Everything else holds ids, codes, times and counts.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    false,
)

from common.replaystore import replay_table
from common.rosterstore import roster_table
from common.trustitems import trust_tables

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

#: Sharing units the gateway exchanges with (synchronised from the config's [[units]] at start).
units = Table(
    "units",
    metadata,
    Column("unit_id", String(64), primary_key=True),
    Column("category", Integer, nullable=False),
    Column("endpoint", String(255), nullable=False),
    # system / media / both (Procedure III.3: both may run side by side during migration)
    Column("exchange_mode", String(16), nullable=False),
    Column("enabled", Boolean, nullable=False),
    # Transport health for per-unit backoff: one unit being down never slows the others.
    Column("consecutive_failures", Integer, nullable=False, default=0),
    Column("next_attempt_ms", BigInteger, nullable=False, default=0),
    Column("last_success_ms", BigInteger, nullable=True),
    Column("last_error", String(64), nullable=True),
)

#: A request for verification as far as the exchange needs it (the workflow issue extends it).
commissions = Table(
    "commissions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ref", String(64), nullable=False, unique=True),
    Column("purpose", Integer, nullable=False),
    Column("income_from", String(7), nullable=False),  # YYYY-MM
    Column("income_to", String(7), nullable=False),
    Column("assets_as_of", Date, nullable=False),
    Column("staff_ids", String(255), nullable=False),  # comma-separated exchange staff ids
    Column("categories", String(255), nullable=False),  # comma-separated data category numbers
    Column("thresholds", String(255), nullable=False, default=""),  # category:limit_fen,...
    Column("created_at_ms", BigInteger, nullable=False),
    Column("cancelled_at_ms", BigInteger, nullable=True),
    # The workflow (clause 11, Procedure III and V); commissions made by the engine alone stay "exchanging".
    Column("letter_number", String(64), nullable=True),
    Column("letter_date", Date, nullable=True),
    Column("commissioner", String(64), nullable=True),
    Column("state", String(24), nullable=False, server_default="exchanging"),
    Column("reason", String(255), nullable=True),
    Column("from_lower_agency", Boolean, nullable=False, server_default="0"),
    Column("intake_staff", String(32), nullable=True),
    Column("review_staff", String(32), nullable=True),
    Column("report_staff", String(32), nullable=True),
    Column("exchange_digest", LargeBinary(32), nullable=True),
    Column("household_count", Integer, nullable=False, server_default="0"),
    Column("subject_count", Integer, nullable=False, server_default="0"),
    # The letter number as the one-letter-one-commission rule compares it (gateway.procedure.intake.letter_key;
    # migration 0009), and the orders ListCommissions pages in: newest first, by created time then id.
    Column("letter_key", String(64), nullable=True),
    # The approval tree (migration 0014, gateway/exchange/approvals.py): ``exchange_digest`` is its root, what the
    # staff sign; ``package_digest`` the agency-only commitment to the whole package (the exchange digest of before);
    # the roots of the subject tree and of the unit tree. NULL for commissions made before 0014.
    Column("package_digest", LargeBinary(32), nullable=True),
    Column("subject_root", LargeBinary(32), nullable=True),
    Column("unit_root", LargeBinary(32), nullable=True),
    Index("ix_commissions_letter", "commissioner", "letter_key"),
    Index("ix_commissions_listing", "commissioner", "created_at_ms", "id"),
    Index("ix_commissions_created", "created_at_ms", "id"),
)

subjects = Table(
    "subjects",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("commission_id", Integer, ForeignKey("commissions.id"), nullable=False, index=True),
    Column("subject_ref", String(64), nullable=False),
    Column("id_number", String(18), nullable=False),
    Column("name", String(64), nullable=False),
    Column("auth_number", String(64), nullable=False),
    Column("auth_digest", LargeBinary(32), nullable=False),
    Column("household_ref", String(64), nullable=True),
    Column("member_index", Integer, nullable=True),
    Column("relation", Integer, nullable=True),
    Column("id_copy_digest", LargeBinary(32), nullable=True),
    # The subject's leaf in the approval tree (migration 0014): its position in the commission's subject list and
    # its random 16-byte salt. NULL for subjects of commissions made before 0014.
    Column("share_index", Integer, nullable=True),
    Column("leaf_salt", LargeBinary(16), nullable=True),
)

#: The units of a commission's approval tree, in tree order (party id order): the units asked, the data categories
#: asked of each (comma-separated numbers) and its leaf hash (migration 0014).
approval_units = Table(
    "approval_units",
    metadata,
    Column("commission_id", Integer, ForeignKey("commissions.id"), primary_key=True),
    Column("unit_index", Integer, primary_key=True, autoincrement=False),
    Column("unit_id", String(64), nullable=False),
    Column("categories", String(255), nullable=False),
    Column("leaf", LargeBinary(32), nullable=False),
)

#: The nodes of a commission's subject tree, level by level (0: the leaves), each level cut into chunks of
#: ``gateway.exchange.approvals.NODE_CHUNK`` 32-byte hashes: a batch's proof reads a few chunks, never the whole tree
#: (migration 0014).
approval_nodes = Table(
    "approval_nodes",
    metadata,
    Column("commission_id", Integer, ForeignKey("commissions.id"), primary_key=True),
    Column("level", Integer, primary_key=True, autoincrement=False),
    Column("chunk", Integer, primary_key=True, autoincrement=False),
    Column("hashes", LargeBinary, nullable=False),
)

#: Exchange approvals: a staff signature over the commission's exchange digest (Procedure V.(二): two distinct).
approvals = Table(
    "approvals",
    metadata,
    Column("commission_id", Integer, ForeignKey("commissions.id"), primary_key=True),
    Column("staff_id", String(32), ForeignKey("staff.staff_id"), primary_key=True),
    Column("signature", LargeBinary(64), nullable=False),
    Column("approved_at_ms", BigInteger, nullable=False),
)

#: Signed procedure steps (Procedure V.(一), migration 0013): intake review, second review and report issue, each
#: as the staff member signed it (keys/steps.py). ``step`` holds the canonical ProcedureStep bytes the signature
#: covers, ``key_id`` the key it verified with when recorded, ``audit_seq`` the chain entry that names the step's
#: SHA-256 and the signature's (gateway/procedure/steps.py). One row per commission and step kind.
procedure_steps = Table(
    "procedure_steps",
    metadata,
    Column("commission_id", Integer, ForeignKey("commissions.id"), primary_key=True),
    Column("kind", Integer, primary_key=True),  # StepKind: 1 intake, 2 review, 3 report
    Column("staff_id", String(32), ForeignKey("staff.staff_id"), nullable=False),
    Column("step", LargeBinary, nullable=False),
    Column("signature", LargeBinary(64), nullable=False),
    Column("key_id", LargeBinary(16), nullable=False),
    Column("recorded_at_ms", BigInteger, nullable=False),
    Column("audit_seq", Integer, nullable=False),
)

#: The agency's staff register (Procedure V): who may do which step, and the key their approvals are checked with.
staff = Table(
    "staff",
    metadata,
    Column("staff_id", String(32), primary_key=True),
    Column("name", String(64), nullable=False),
    Column("roles", String(64), nullable=False),  # comma-separated: intake, review, exchange, report, admin
    Column("public_key", LargeBinary(32), nullable=False),  # Ed25519
    Column("valid_from_ms", BigInteger, nullable=False),
    Column("valid_until_ms", BigInteger, nullable=True),
    Column("registered_by", String(32), nullable=False),
    Column("registered_at_ms", BigInteger, nullable=False),
    Column("revoked_at_ms", BigInteger, nullable=True),
)

#: Append-only, hash-chained log of every API action and state change (clause 17). ``hash`` is SHA-256 over the
#: previous entry's hash and this entry's canonical fields, so any change, removal or reordering is detected.
audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("at_ms", BigInteger, nullable=False),
    Column("actor", String(64), nullable=False),
    Column("action", String(48), nullable=False),
    Column("commission_id", Integer, nullable=True, index=True),
    Column("before", String(32), nullable=True),
    Column("after", String(32), nullable=True),
    Column("detail", String(255), nullable=True),  # codes and counts only, never personal data
    Column("prev_hash", LargeBinary(32), nullable=False),
    Column("hash", LargeBinary(32), nullable=False),
)

#: Issued verification reports (核对报告), as signed.
reports = Table(
    "reports",
    metadata,
    Column("commission_id", Integer, ForeignKey("commissions.id"), primary_key=True),
    Column("report", LargeBinary, nullable=False),
    Column("signer_key_id", LargeBinary(16), nullable=False),
    Column("signature", LargeBinary(64), nullable=False),
    Column("html", Text, nullable=False),
    Column("partial", Boolean, nullable=False),
    Column("issued_at_ms", BigInteger, nullable=False),
)

#: Approval feedback (Procedure IV): the commissioner's decision per subject.
feedback = Table(
    "feedback",
    metadata,
    Column("subject_id", Integer, ForeignKey("subjects.id"), primary_key=True),
    Column("commission_id", Integer, ForeignKey("commissions.id"), nullable=False, index=True),
    Column("decision", Integer, nullable=False),
    Column("recorded_at_ms", BigInteger, nullable=False),
)

#: One subject asked of one unit for one commission. Its progress is its batch's; its answer is in ``answers``.
items = Table(
    "items",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("commission_id", Integer, ForeignKey("commissions.id"), nullable=False),
    Column("subject_id", Integer, ForeignKey("subjects.id"), nullable=False),
    Column("unit_id", String(64), ForeignKey("units.unit_id"), nullable=False),
    Column("batch_id", String(40), ForeignKey("batches.batch_id"), nullable=True),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("cancelled_at_ms", BigInteger, nullable=True),
    # Also the index of a batch's items (unit_id, batch_id): migration 0003.
    Index("ix_items_queue", "unit_id", "batch_id", "commission_id", "id"),
    # A commission's items, for progress and reports (migration 0006); untouched when batches form.
    Index("ix_items_commission", "commission_id", "unit_id"),
)

batches = Table(
    "batches",
    metadata,
    Column("batch_id", String(40), primary_key=True),
    Column("unit_id", String(64), ForeignKey("units.unit_id"), nullable=False),
    Column("commission_id", Integer, ForeignKey("commissions.id"), nullable=False),
    # SHA-256 of the batch's content (batch_contents), which the unit's receipt and answer must name.
    Column("digest", LargeBinary(32), nullable=False),
    Column("subject_count", Integer, nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    # ready -> receipted -> answered -> acknowledged; failed (refused by the unit: needs an operator)
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_ms", BigInteger, nullable=False, default=0),
    Column("last_error", String(64), nullable=True),
    Column("claimed_by", String(64), nullable=True),
    Column("claim_until_ms", BigInteger, nullable=True),
    Column("received_at_ms", BigInteger, nullable=True),
    Column("original_due", Date, nullable=True),
    Column("due", Date, nullable=True),
    # original_due/due counted across a year without an official holiday schedule (migration 0008): shown as
    # provisional, never marked overdue, fixed by BatchLedger.settle_due once the calendar knows the year.
    Column("due_provisional", Boolean, nullable=False, default=False, server_default=false()),
    Column("delay_reason", String(32), nullable=True),
    Column("overdue", Boolean, nullable=False, default=False),
    Column("receipt_envelope", LargeBinary, nullable=True),
    Column("answer_message_id", LargeBinary(16), ForeignKey("archive.message_id"), nullable=True),
    Column("answered_at_ms", BigInteger, nullable=True),
    Column("acknowledged_at_ms", BigInteger, nullable=True),
    Column("next_poll_ms", BigInteger, nullable=False, default=0),
    # The unit's signed refusal of the batch (trust.proto Refusal, sealed for us), kept in the archive (migration
    # 0014): the latest one, permanent or to be retried.
    Column("refusal_message_id", LargeBinary(16), ForeignKey("archive.message_id"), nullable=True),
    Index("ix_batches_work", "unit_id", "state", "next_attempt_ms"),
)

#: The canonical QueryBatch bytes of each batch, fixed at creation so that every retry sends the same batch. Kept
#: apart from ``batches`` (migration 0004): SQLite rewrites a whole row, blob included, on every update that changes
#: its size, and a batch's row changes state half a dozen times.
batch_contents = Table(
    "batch_contents",
    metadata,
    Column("batch_id", String(40), ForeignKey("batches.batch_id"), primary_key=True),
    Column("content", LargeBinary, nullable=False),
)

#: Every envelope received from a unit, as received, and every query batch envelope sent to one, as sent: the same
#: bytes prove later who sent what (clause 17). Each row kept since migration 0007 is referenced by an audit chain
#: entry (``audit_seq``, the first that names it) that records its message id and SHA-256 (gateway/archive/).
archive = Table(
    "archive",
    metadata,
    Column("message_id", LargeBinary(16), primary_key=True),
    Column("sender", String(64), nullable=False),
    Column("message_type", String(128), nullable=False),
    # When it was received, or, for an outgoing envelope, when it was about to be sent.
    Column("received_at_ms", BigInteger, nullable=False, index=True),
    Column("envelope", LargeBinary, nullable=False),
    # "in" (from a unit) or "out" (ours, to a unit); rows from before migration 0007 are all "in".
    Column("direction", String(3), nullable=False, server_default="in"),
    # SHA-256 of ``envelope``, as the chain entry records it; NULL for rows from before migration 0007.
    Column("sha256", LargeBinary(32), nullable=True),
    # The audit entry that first names this envelope; NULL for rows from before migration 0007.
    Column("audit_seq", Integer, nullable=True),
)

#: Exactly one answer per item: the primary key is the item.
answers = Table(
    "answers",
    metadata,
    Column("item_id", Integer, ForeignKey("items.id"), primary_key=True),
    # Not indexed (migration 0005): answers are read by item, never by batch.
    Column("batch_id", String(40), ForeignKey("batches.batch_id"), nullable=False),
    Column("status", Integer, nullable=False),
    # SubjectAnswer bytes as the unit signed them (inside the batch's answer envelope).
    Column("body", LargeBinary, nullable=False),
    Column("stored_at_ms", BigInteger, nullable=False),
)

#: Scheduler jobs: leases so that replicas never run the same job at once, and run history.
jobs = Table(
    "jobs",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("lease_owner", String(64), nullable=True),
    Column("lease_until_ms", BigInteger, nullable=False, default=0),
    Column("last_started_ms", BigInteger, nullable=True),
    Column("last_finished_ms", BigInteger, nullable=True),
    Column("last_status", String(16), nullable=True),
    Column("runs", Integer, nullable=False, default=0),
    Column("failures", Integer, nullable=False, default=0),
)

seen_messages = replay_table(metadata)

#: Which live process holds each replica id (gateway/ops/replica.py): a lease renewed by the holder's heartbeat, so
#: that a second gateway started with the same id refuses to start instead of working as the first one.
replicas = Table(
    "replicas",
    metadata,
    Column("replica_id", String(64), primary_key=True),
    Column("instance", String(32), nullable=False),
    Column("host", String(255), nullable=False),
    Column("boot_id", String(64), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("process_start", String(32), nullable=False),
    Column("started_ms", BigInteger, nullable=False),
    Column("heartbeat_ms", BigInteger, nullable=False),
    Column("lease_until_ms", BigInteger, nullable=False),
)

#: Trust items (rosters, key announcements, revocation lists) this gateway publishes for units, and each unit's
#: acknowledgement of each (migration 0011; common/trustitems.py, docs/exchange.md "Trust synchronisation").
trust_items, trust_deliveries = trust_tables(metadata)

#: Signed staff rosters (Procedure V.(三), keys/roster.py; the table in common/rosterstore.py), migration 0012: the
#: versions of our own roster (``own``) and those of the units, each as the SignedRoster bytes accepted, with its
#: history. A version is never changed or deleted: an old message is judged by the roster of its day.
rosters = roster_table(metadata)

#: The unit's staff an answer set names as responsible (BatchAnswer.responsible_staff, Procedure V.(二)), migration
#: 0012: comma-separated staff ids, and the version of the unit's roster in force at the answer's time that they
#: were checked against; NULL while the gateway held no roster of the unit (stored unverified).
answer_staff = Table(
    "answer_staff",
    metadata,
    Column("batch_id", String(40), ForeignKey("batches.batch_id"), primary_key=True),
    Column("staff_ids", String(300), nullable=False),
    Column("roster_version", BigInteger, nullable=True),
    Column("answered_at_ms", BigInteger, nullable=False),
)

#: The units' requests for a renewed TLS server certificate (CERTIFICATE_REQUEST trust items, keys/csr.py), migration
#: 0015: ``pending`` until the agency's operator signs it with the network CA, then ``issued`` with the certificate
#: (sent back as a CERTIFICATE trust item); ``superseded`` by a newer request of the same unit, or ``dropped`` by the
#: operator. Public material only: never a private key.
certificate_requests = Table(
    "certificate_requests",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("party_id", String(64), nullable=False),
    # SHA-256 of the DER request: the trust item's digest.
    Column("sha256", LargeBinary(32), nullable=False, unique=True),
    # SHA-256 of the requested public key's SubjectPublicKeyInfo (keys.csr.key_sha256).
    Column("key_sha256", LargeBinary(32), nullable=False),
    Column("csr", LargeBinary, nullable=False),
    # The DNS names and IP addresses asked for, comma-separated; the usages (clientAuth, serverAuth) likewise.
    Column("names", String(1100), nullable=False),
    Column("usages", String(24), nullable=False),
    Column("received_at_ms", BigInteger, nullable=False),
    Column("state", String(12), nullable=False),
    Column("decided_at_ms", BigInteger, nullable=True),
    Column("decided_by", String(64), nullable=True),
    Column("serial", String(40), nullable=True),
    # The DER certificate issued for the request.
    Column("certificate", LargeBinary, nullable=True),
    Index("ix_certificate_requests_party_id_state", "party_id", "state"),
)
