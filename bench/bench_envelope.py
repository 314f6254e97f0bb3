"""Benchmark of the sealed envelope v1 against the raw primitives, the AEAD alone and JOSE (jwcrypto).

Not a test: it measures and prints. Run it from the repository root in the project's virtualenv::

    python bench/bench_envelope.py                              # full run, about a minute on 2 cores
    python bench/bench_envelope.py --quick                      # smoke run of a few seconds; numbers indicative
    python bench/bench_envelope.py --write docs/performance.md  # also refresh the results block of that file

For each payload size (1 KiB, 64 KiB and 1 MiB of SealedFile content) it times five ways of making one round trip,
"seal for a peer, then open as that peer", each on a fresh message:

* envelope: Courier.seal by one party, Courier.open by the other. Real PartyKeys, trust stores filled through
  import_bundle, SystemClock, MemoryReplayCache; open is given ``expect`` so the SealedFile is parsed as well.
* raw: the primitives of suite 1 doing the same job by hand, without protobuf, checks or key look-ups: a fresh
  X25519 ephemeral key, X25519 and HKDF-SHA256 on each side, XChaCha20-Poly1305 encrypt and decrypt, Ed25519 sign
  and verify over the input the envelope signs (domain, length, a header of the same size, SHA-256 of the
  ciphertext), with Ed25519 and X25519 from OpenSSL (cryptography).
* sodium: the raw job with Ed25519 and X25519 from libsodium (PyNaCl), the implementations the envelope itself
  calls (keys/_primitives.py): the floor the envelope is compared with.
* aead: XChaCha20-Poly1305 encrypt and decrypt of the same bytes (libsodium through PyNaCl), nothing else.
* jose: jwcrypto, a compact JWS (EdDSA with an Ed25519 key) of the payload nested in a compact JWE (ECDH-ES to an
  X25519 key, A256GCM); the receiver decrypts, then verifies.

raw, sodium, aead and jose are handed the SealedFile already serialized; the envelope serializes and parses it
itself, so all protobuf work counts against the envelope. Each method is warmed up and its iteration count
calibrated to a time budget; then the methods are timed in interleaved rounds (so drift of the machine hits them
alike), rates are the median round and ratios the median of the per-round ratios. A table of the building blocks
(each primitive alone) follows. Targets: the envelope makes at least 4x as many round trips as JOSE at every size,
and at 1 MiB at least half as many as the AEAD alone. A full run that misses a target exits with status 1.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import resource
import shlex
import statistics
import struct
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from cryptography.hazmat.backends.openssl.backend import backend as openssl_backend
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from google.protobuf.internal import api_implementation
from hedui.v1 import envelope_pb2, media_pb2
from jwcrypto import jwe, jwk, jws
from nacl import bindings as sodium

from common.memory import MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES, tune_allocator
from keys import Courier, MemoryReplayCache, PartyKeys, SystemClock, TrustStore, read_bundle
from keys import envelope as hedui_envelope
from results import ResultsBlock, revision  # bench/results.py, beside this script

KIB = 1024
MIB = 1024 * KIB
SIZES = (KIB, 64 * KIB, MIB)

SENDER = "agency.220000"
RECIPIENT = "unit.220100.tax"
EXPECT = {media_pb2.SealedFile.DESCRIPTOR.full_name: media_pb2.SealedFile}

JOSE_TARGET = 4.0  # envelope round trips / JOSE round trips, at every size
AEAD_TARGET = 0.5  # envelope throughput / AEAD-alone throughput, at 1 MiB

JWS_HEADER = json.dumps({"alg": "EdDSA"})
JWE_HEADER = json.dumps({"alg": "ECDH-ES", "enc": "A256GCM", "cty": "JOSE"})

RESULTS = ResultsBlock("bench_envelope")

# The code whose speed this measures: uncommitted changes there are noted with the results.
MEASURED_CODE = ("keys", "protos", "bench")

# Environment variables that change how memory is allocated, recorded with the results when set.
ALLOCATOR_ENV = ("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD", "PYTHONMALLOC")

X25519_BYTES = 32
XNONCE_BYTES = 24

aead_encrypt = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt
aead_decrypt = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt

RoundTrip = Callable[[], bytes]


@dataclass(frozen=True)
class Settings:
    budget_s: float  # length of one timed round of one method
    rounds: int
    warmup: int


FULL = Settings(budget_s=0.25, rounds=11, warmup=5)
QUICK = Settings(budget_s=0.03, rounds=2, warmup=1)


# --- the five ways of sealing and opening ----------------------------------------------------------------------


def enrol(trust: TrustStore, bundle: bytes, own_party_id: str) -> None:
    """Import a peer's bundle. A deployment compares the fingerprint out of band; here it comes from the bundle."""
    trust.import_bundle(bundle, expected_fingerprint=read_bundle(bundle).fingerprint, own_party_id=own_party_id)


def make_couriers() -> tuple[Courier, Courier]:
    """Two parties with fresh keys that trust each other: the sender's and the recipient's Courier."""
    clock = SystemClock()
    now = clock.now_ms()
    sender_keys = PartyKeys.create(SENDER, now_ms=now)
    recipient_keys = PartyKeys.create(RECIPIENT, now_ms=now)
    sender_trust, recipient_trust = TrustStore(), TrustStore()
    enrol(sender_trust, recipient_keys.bundle(now), SENDER)
    enrol(recipient_trust, sender_keys.bundle(now), RECIPIENT)
    return (
        Courier(sender_keys, sender_trust, replay=MemoryReplayCache(), clock=clock),
        Courier(recipient_keys, recipient_trust, replay=MemoryReplayCache(), clock=clock),
    )


class EnvelopeRoundTrip:
    """Courier.seal by the sender, Courier.open by the recipient; a new message id (and replay entry) each time."""

    def __init__(self, couriers: tuple[Courier, Courier], message: media_pb2.SealedFile) -> None:
        self.sender, self.recipient = couriers
        self.message = message

    def __call__(self) -> bytes:
        opened = self.recipient.open(self.sender.seal(self.message, RECIPIENT), expect=EXPECT)
        return opened.payload

    def header_bytes(self) -> int:
        """Size of the signed header of an envelope like the ones this round trip makes."""
        sealed = self.sender.seal(self.message, RECIPIENT)
        return len(envelope_pb2.Envelope.FromString(sealed).header)


def signed_input(header: bytes, ciphertext: bytes) -> bytes:
    """The envelope's signature input, rebuilt from its constants: the raw path runs no code of keys.envelope."""
    digest = hashlib.sha256(ciphertext).digest()
    return hedui_envelope.SIGNATURE_DOMAIN + struct.pack(">I", len(header)) + header + digest


def payload_key(shared: bytes, ephemeral_public: bytes, recipient_public: bytes) -> bytes:
    """The envelope's HKDF-SHA256 key schedule, rebuilt likewise."""
    info = hedui_envelope.HKDF_INFO_PREFIX + struct.pack(">I", hedui_envelope.SUITE) + ephemeral_public
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=hedui_envelope.HKDF_SALT, info=info + recipient_public)
    return hkdf.derive(shared)


class RawRoundTrip:
    """The primitives of suite 1 alone. Long-term keys stay loaded; the ephemeral public key is parsed per message."""

    def __init__(self, payload: bytes, header_bytes: int) -> None:
        self.payload = payload
        self.signer = ed25519.Ed25519PrivateKey.generate()
        self.verifier = self.signer.public_key()
        self.recipient = x25519.X25519PrivateKey.generate()
        self.recipient_public = self.recipient.public_key()
        self.recipient_raw = self.recipient_public.public_bytes_raw()
        # Stands in for the envelope's header fields other than the ephemeral key and the nonce, at the same size.
        self.header_rest = os.urandom(header_bytes - X25519_BYTES - XNONCE_BYTES)

    def __call__(self) -> bytes:
        return self.open(*self.seal())

    def seal(self) -> tuple[bytes, bytes, bytes]:
        ephemeral = x25519.X25519PrivateKey.generate()
        ephemeral_raw = ephemeral.public_key().public_bytes_raw()
        nonce = os.urandom(XNONCE_BYTES)
        header = self.header_rest + ephemeral_raw + nonce
        key = payload_key(ephemeral.exchange(self.recipient_public), ephemeral_raw, self.recipient_raw)
        ciphertext = aead_encrypt(self.payload, header, nonce, key)
        return header, ciphertext, self.signer.sign(signed_input(header, ciphertext))

    def open(self, header: bytes, ciphertext: bytes, signature: bytes) -> bytes:
        self.verifier.verify(signature, signed_input(header, ciphertext))  # raises InvalidSignature
        ephemeral_raw = header[-(X25519_BYTES + XNONCE_BYTES) : -XNONCE_BYTES]
        nonce = header[-XNONCE_BYTES:]
        shared = self.recipient.exchange(x25519.X25519PublicKey.from_public_bytes(ephemeral_raw))
        key = payload_key(shared, ephemeral_raw, self.recipient_raw)
        plaintext: bytes = aead_decrypt(ciphertext, header, nonce, key)
        return plaintext


class SodiumRoundTrip:
    """The raw job again with Ed25519 and X25519 from libsodium instead of OpenSSL: how low the floor can go."""

    def __init__(self, payload: bytes, header_bytes: int) -> None:
        self.payload = payload
        self.verify_key, self.sign_key = sodium.crypto_sign_seed_keypair(os.urandom(32))
        self.recipient_secret = os.urandom(32)
        self.recipient_raw = sodium.crypto_scalarmult_base(self.recipient_secret)
        self.header_rest = os.urandom(header_bytes - X25519_BYTES - XNONCE_BYTES)

    def __call__(self) -> bytes:
        return self.open(*self.seal())

    def seal(self) -> tuple[bytes, bytes, bytes]:
        ephemeral = os.urandom(32)
        ephemeral_raw = sodium.crypto_scalarmult_base(ephemeral)
        nonce = os.urandom(XNONCE_BYTES)
        header = self.header_rest + ephemeral_raw + nonce
        shared = sodium.crypto_scalarmult(ephemeral, self.recipient_raw)  # refuses an all-zero result
        key = payload_key(shared, ephemeral_raw, self.recipient_raw)
        ciphertext = aead_encrypt(self.payload, header, nonce, key)
        signed = sodium.crypto_sign(signed_input(header, ciphertext), self.sign_key)
        return header, ciphertext, signed[: sodium.crypto_sign_BYTES]

    def open(self, header: bytes, ciphertext: bytes, signature: bytes) -> bytes:
        # PyNaCl's bindings verify the combined form, signature then message; raises BadSignatureError.
        sodium.crypto_sign_open(signature + signed_input(header, ciphertext), self.verify_key)
        ephemeral_raw = header[-(X25519_BYTES + XNONCE_BYTES) : -XNONCE_BYTES]
        nonce = header[-XNONCE_BYTES:]
        shared = sodium.crypto_scalarmult(self.recipient_secret, ephemeral_raw)
        key = payload_key(shared, ephemeral_raw, self.recipient_raw)
        plaintext: bytes = aead_decrypt(ciphertext, header, nonce, key)
        return plaintext


class AeadRoundTrip:
    """XChaCha20-Poly1305 encrypt then decrypt. The nonce is fixed: fine for timing, never for real data."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.key = os.urandom(32)
        self.nonce = os.urandom(XNONCE_BYTES)

    def __call__(self) -> bytes:
        ciphertext = aead_encrypt(self.payload, None, self.nonce, self.key)
        plaintext: bytes = aead_decrypt(ciphertext, None, self.nonce, self.key)
        return plaintext


class JoseRoundTrip:
    """jwcrypto: EdDSA compact JWS nested in an ECDH-ES (X25519) + A256GCM compact JWE; decrypt, then verify."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.sign_key = jwk.JWK.generate(kty="OKP", crv="Ed25519")
        self.verify_key = jwk.JWK(**self.sign_key.export_public(as_dict=True))
        self.decrypt_key = jwk.JWK.generate(kty="OKP", crv="X25519")
        self.encrypt_key = jwk.JWK(**self.decrypt_key.export_public(as_dict=True))

    def __call__(self) -> bytes:
        return self.open(self.seal())

    def seal(self) -> str:
        signed = jws.JWS(self.payload)
        signed.add_signature(self.sign_key, alg="EdDSA", protected=JWS_HEADER)
        sealed = jwe.JWE(signed.serialize(compact=True).encode(), protected=JWE_HEADER)
        sealed.add_recipient(self.encrypt_key)
        token: str = sealed.serialize(compact=True)
        return token

    def open(self, token: str) -> bytes:
        sealed = jwe.JWE()
        sealed.deserialize(token, key=self.decrypt_key)
        signed = jws.JWS()
        signed.deserialize(sealed.payload.decode())
        signed.verify(self.verify_key, alg="EdDSA")
        payload: bytes = signed.payload
        return payload


def check_raw_matches_envelope() -> None:
    """The raw path must sign and derive exactly what the envelope does, or the ratio compares different work."""
    header, ciphertext, shared, ephemeral, recipient = (os.urandom(n) for n in (200, 1000, 32, 32, 32))
    if signed_input(header, ciphertext) != hedui_envelope.signature_input(header, ciphertext):
        raise RuntimeError("raw signature input differs from keys.envelope.signature_input")
    if payload_key(shared, ephemeral, recipient) != hedui_envelope.payload_key(shared, ephemeral, recipient):
        raise RuntimeError("raw key schedule differs from keys.envelope.payload_key")


# --- measuring -------------------------------------------------------------------------------------------------

METHODS = ("envelope", "raw", "sodium", "aead", "jose")
LABELS = {
    "envelope": "Hedui envelope (Courier.seal + Courier.open)",
    "raw": "Raw primitives, Ed25519 and X25519 from OpenSSL (cryptography)",
    "sodium": "Raw primitives as the envelope calls them: Ed25519 and X25519 from libsodium",
    "aead": "XChaCha20-Poly1305 alone",
    "jose": "JOSE: JWS (EdDSA) in JWE (ECDH-ES X25519 + A256GCM), jwcrypto",
}


@dataclass(kw_only=True)
class Timing:
    """Repeated timed rounds of one operation."""

    op: Callable[[], object]
    iterations: int = 0
    rates: list[float] = field(default_factory=list)  # operations per second, one per timed round
    faults: int = 0  # minor page faults over all timed rounds

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    @property
    def spread(self) -> float:
        return (max(self.rates) - min(self.rates)) / self.rate

    @property
    def faults_per_op(self) -> float:
        return self.faults / (self.iterations * len(self.rates))

    def calibrate(self, settings: Settings, budget_s: float) -> None:
        """Warm up, then find how many operations fill a round of ``budget_s``."""
        for _ in range(settings.warmup):
            self.op()
        iterations = 1
        while True:
            elapsed = self._timed(iterations)
            if elapsed >= budget_s / 4:
                self.iterations = max(3, round(iterations * budget_s / elapsed))
                return
            iterations *= 2

    def run_round(self) -> None:
        gc.collect()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        self.rates.append(self.iterations / self._timed(self.iterations))
        self.faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    def _timed(self, iterations: int) -> float:
        op = self.op
        start = time.perf_counter()
        for _ in range(iterations):
            op()
        return time.perf_counter() - start


@dataclass(kw_only=True)
class Cell(Timing):
    """One method at one payload size."""

    method: str
    size: int
    peak_heap: int = 0  # bytes allocated by Python at the peak of one round trip (tracemalloc)

    @property
    def megabytes_per_s(self) -> float:
        return self.rate * self.size / 1e6


def ratio(a: Timing, b: Timing) -> float:
    """Median of the per-round ratios: the rounds interleave the methods, so slow drift of the machine cancels."""
    return statistics.median(x / y for x, y in zip(a.rates, b.rates, strict=True))


def interleave(timings: Sequence[Timing], settings: Settings, budget_s: float) -> None:
    for timing in timings:
        timing.calibrate(settings, budget_s)
    for _ in range(settings.rounds):
        for timing in timings:
            timing.run_round()


def peak_heap(op: Callable[[], object]) -> int:
    """Peak of Python allocations during one call (payload copies; not OpenSSL's internal buffers)."""
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        op()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - before


def sealed_file(size: int) -> media_pb2.SealedFile:
    return media_pb2.SealedFile(file_name="sample.bin", content=os.urandom(size), media_type="application/octet-stream")


def build_cells(size: int, couriers: tuple[Courier, Courier]) -> list[Cell]:
    message = sealed_file(size)
    payload = message.SerializeToString(deterministic=True)
    envelope = EnvelopeRoundTrip(couriers, message)
    header_bytes = envelope.header_bytes()
    ops: dict[str, RoundTrip] = {
        "envelope": envelope,
        "raw": RawRoundTrip(payload, header_bytes),
        "sodium": SodiumRoundTrip(payload, header_bytes),
        "aead": AeadRoundTrip(payload),
        "jose": JoseRoundTrip(payload),
    }
    for method, op in ops.items():
        if op() != payload:
            raise RuntimeError(f"{method} round trip at {size} bytes did not give back the payload")
    return [Cell(op=ops[method], method=method, size=size) for method in METHODS]


def measure(size: int, couriers: tuple[Courier, Courier], settings: Settings) -> list[Cell]:
    cells = build_cells(size, couriers)
    interleave(cells, settings, settings.budget_s)
    for cell in cells:
        cell.peak_heap = peak_heap(cell.op)
        print(
            f"  {size_label(size):>7}  {cell.method:<8} {cell.rate:>10,.0f} round trips/s "
            f"{cell.megabytes_per_s:>8.1f} MB/s  {cell.faults_per_op:>6.0f} faults  "
            f"({cell.iterations} x {settings.rounds}, spread {cell.spread:.0%})",
            file=sys.stderr,
        )
    return cells


def building_blocks(signed_bytes: int, settings: Settings) -> list[tuple[str, Timing]]:
    """The primitives one at a time, to show the floor under any framing of them."""
    signer = ed25519.Ed25519PrivateKey.generate()
    verifier = signer.public_key()
    agreement = x25519.X25519PrivateKey.generate()
    peer = x25519.X25519PrivateKey.generate().public_key()
    small, big = os.urandom(signed_bytes), os.urandom(MIB)
    small_signature, big_signature = signer.sign(small), signer.sign(big)
    key, nonce = os.urandom(32), os.urandom(XNONCE_BYTES)
    sealed = aead_encrypt(big, None, nonce, key)
    shared, ephemeral_raw, recipient_raw = os.urandom(32), os.urandom(32), os.urandom(32)
    sodium_public, sodium_secret = sodium.crypto_sign_seed_keypair(os.urandom(32))
    sodium_signed = sodium.crypto_sign(small, sodium_secret)
    sodium_agreement, sodium_peer = os.urandom(32), sodium.crypto_scalarmult_base(os.urandom(32))
    blocks: list[tuple[str, Callable[[], object]]] = [
        (f"Ed25519 sign, {signed_bytes} B (what the envelope signs)", lambda: signer.sign(small)),
        (f"Ed25519 verify, {signed_bytes} B", lambda: verifier.verify(small_signature, small)),
        ("X25519 key generation with public key", lambda: x25519.X25519PrivateKey.generate().public_key()),
        ("X25519 key agreement", lambda: agreement.exchange(peer)),
        (f"Ed25519 sign, {signed_bytes} B, libsodium", lambda: sodium.crypto_sign(small, sodium_secret)),
        (f"Ed25519 verify, {signed_bytes} B, libsodium", lambda: sodium.crypto_sign_open(sodium_signed, sodium_public)),
        ("X25519 key generation with public key, libsodium", lambda: sodium.crypto_scalarmult_base(os.urandom(32))),
        ("X25519 key agreement, libsodium", lambda: sodium.crypto_scalarmult(sodium_agreement, sodium_peer)),
        ("HKDF-SHA256 key schedule", lambda: payload_key(shared, ephemeral_raw, recipient_raw)),
        ("SHA-256, 1 MiB", lambda: hashlib.sha256(big).digest()),
        ("SHA-512, 1 MiB", lambda: hashlib.sha512(big).digest()),
        ("Ed25519 sign, 1 MiB", lambda: signer.sign(big)),
        ("Ed25519 verify, 1 MiB", lambda: verifier.verify(big_signature, big)),
        ("XChaCha20-Poly1305 encrypt, 1 MiB", lambda: aead_encrypt(big, None, nonce, key)),
        ("XChaCha20-Poly1305 decrypt, 1 MiB", lambda: aead_decrypt(sealed, None, nonce, key)),
        ("Copy of 1 MiB into a new bytes object", lambda: bytes(bytearray(big))),
    ]
    timings = [(name, Timing(op=op)) for name, op in blocks]
    interleave([t for _, t in timings], settings, settings.budget_s / 4)
    for name, timing in timings:
        print(f"  {1e6 / timing.rate:>10,.1f} µs  {name}", file=sys.stderr)
    return timings


class Background:
    """CPU time the rest of the machine used while we measured (other processes, and time stolen by a hypervisor)."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float, float]:
        """Busy and stolen CPU seconds of the whole machine, our own CPU seconds, and the wall clock."""
        own = resource.getrusage(resource.RUSAGE_SELF)
        busy = steal = 0.0
        try:
            with open("/proc/stat", encoding="ascii") as stat:
                fields = [int(x) for x in stat.readline().split()[1:]]
            tick = os.sysconf("SC_CLK_TCK")
            busy = (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / tick  # user nice system irq softirq
            steal = fields[7] / tick if len(fields) > 7 else 0.0
        except (OSError, ValueError, IndexError):
            pass
        return busy, steal, own.ru_utime + own.ru_stime, time.perf_counter()

    def summary(self) -> str:
        busy, steal, own, wall = (b - a for a, b in zip(self.start, self._sample(), strict=True))
        others = max(0.0, busy - own)
        return (
            f"while it ran, other processes used {others:.1f} CPU-seconds ({others / wall:.0%} of one core on "
            f"average) and the hypervisor stole {steal:.1f} s"
        )


# --- reporting -------------------------------------------------------------------------------------------------


def size_label(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"


def bytes_label(n: int) -> str:
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{n / KIB:.0f} KiB"


def cpu_info() -> tuple[str, str]:
    """CPU model name and the features that matter here (SHA extensions for SHA-256, vector units for ChaCha20)."""
    model, flags = "unknown", set[str]()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    wanted = ("sha_ni", "avx2", "avx512f", "aes", "vaes")
    return model, " ".join(f for f in wanted if f in flags) or "unknown"


def allocator_tuning() -> list[str]:
    return [f"{name}={value}" for name, value in sorted(os.environ.items()) if name.startswith(ALLOCATOR_ENV)]


def machine_lines() -> list[str]:
    model, features = cpu_info()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    version = metadata.version
    tuning = allocator_tuning()
    return [
        f"- CPU: {model}, {cores} usable cores (nproc); features: {features}",
        f"- OS: {platform.platform()}",
        f"- Python {platform.python_version()} ({platform.python_implementation()})",
        f"- cryptography {version('cryptography')} ({openssl_backend.openssl_version_text()}), "
        f"PyNaCl {version('PyNaCl')} (bundled libsodium), protobuf {version('protobuf')} "
        f"({api_implementation.Type()} backend), jwcrypto {version('jwcrypto')}",
        "- Memory allocator: glibc malloc with the thresholds the services set at start (common/memory.py: mmap "
        f"{MMAP_THRESHOLD_BYTES >> 20} MiB, trim {TRIM_THRESHOLD_BYTES >> 20} MiB)"
        + (f", and {', '.join(tuning)} from the environment" if tuning else ""),
    ]


def verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**FAIL**"


def report(
    cells: list[Cell],
    blocks: list[tuple[str, Timing]],
    command: str,
    settings: Settings,
    quick: bool,
    background: str,
) -> tuple[str, bool]:
    """The markdown block for docs/performance.md, and whether every target was met."""
    by = {(c.size, c.method): c for c in cells}
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB  # Linux reports KiB
    lines = [
        f"Produced by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, revision {revision(MEASURED_CODE)}"
        + (" — **quick run, numbers indicative only**." if quick else "."),
        "",
        *machine_lines(),
        f"- Timing: {settings.rounds} rounds per method and size, each of about {settings.budget_s} s, the methods "
        "interleaved round by round, after warm-up. Rates are the median round; spread = (max - min) / median; "
        f"ratios are the median of the per-round ratios. Peak RSS of the whole run: {bytes_label(peak_rss)}.",
        f"- Load: {background}.",
        "",
        "A round trip is one seal and one open of a fresh message. MB/s counts SealedFile content (10^6 bytes) "
        "sealed and opened per second. Faults are minor page faults per round trip (fresh memory from the "
        "kernel). Peak heap is the most Python memory one round trip held at once (tracemalloc; includes the "
        "payloads it creates, not OpenSSL's internal buffers).",
        "",
        "| Payload | Method | Round trips/s | MB/s | Spread | Faults | Peak heap |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for size in SIZES:
        for method in METHODS:
            c = by[size, method]
            lines.append(
                f"| {size_label(size)} | {LABELS[method]} | {c.rate:,.0f} | {c.megabytes_per_s:,.1f} "
                f"| {c.spread:.0%} | {c.faults_per_op:,.0f} | {bytes_label(c.peak_heap)} |"
            )
    jose_ratios = {size: ratio(by[size, "envelope"], by[size, "jose"]) for size in SIZES}
    aead_ratios = {size: ratio(by[size, "envelope"], by[size, "aead"]) for size in SIZES}
    lines += [
        "",
        "Ratios of round trips per second:",
        "",
        f"| Payload | Envelope / JOSE (target ≥ {JOSE_TARGET:g}) "
        f"| Envelope / AEAD alone (target ≥ {AEAD_TARGET:g} at 1 MiB) | Envelope / its raw primitives (libsodium) |",
        "|---|---:|---:|---:|",
        *(
            f"| {size_label(size)} | {jose_ratios[size]:.2f} | {aead_ratios[size]:.2f} "
            f"| {ratio(by[size, 'envelope'], by[size, 'sodium']):.2f} |"
            for size in SIZES
        ),
        "",
        "Ceilings: the raw rows do the envelope's cryptographic work and nothing else; with the primitive "
        "implementations it calls (libsodium) the envelope can at best reach libsodium raw / JOSE and libsodium raw "
        "/ AEAD alone:",
        "",
        "| Payload | OpenSSL raw / JOSE | OpenSSL raw / AEAD alone | libsodium raw / JOSE "
        "| libsodium raw / AEAD alone |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {size_label(size)} | {ratio(by[size, 'raw'], by[size, 'jose']):.2f} "
            f"| {ratio(by[size, 'raw'], by[size, 'aead']):.2f} | {ratio(by[size, 'sodium'], by[size, 'jose']):.2f} "
            f"| {ratio(by[size, 'sodium'], by[size, 'aead']):.2f} |"
            for size in SIZES
        ),
    ]
    jose_ok = {size: r >= JOSE_TARGET for size, r in jose_ratios.items()}
    aead_ok = aead_ratios[MIB] >= AEAD_TARGET
    per_size = ", ".join(f"{size_label(s)} {jose_ratios[s]:.2f} {'PASS' if jose_ok[s] else 'FAIL'}" for s in SIZES)
    lines += [
        "",
        f"- Envelope ≥ {JOSE_TARGET:g}× JOSE round trips at every size: {verdict(all(jose_ok.values()))} ({per_size}).",
        f"- Envelope ≥ {AEAD_TARGET:g}× AEAD-alone throughput at 1 MiB: {verdict(aead_ok)} "
        f"({aead_ratios[MIB]:.2f}: {by[MIB, 'envelope'].megabytes_per_s:,.0f} MB/s against "
        f"{by[MIB, 'aead'].megabytes_per_s:,.0f} MB/s).",
        "",
        "Building blocks, timed the same way in the same run:",
        "",
        "| Operation | µs per call | Spread |",
        "|---|---:|---:|",
        *(f"| {name} | {1e6 / t.rate:,.1f} | {t.spread:.0%} |" for name, t in blocks),
    ]
    return "\n".join(lines), all(jose_ok.values()) and aead_ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smoke run of a few seconds; numbers indicative only")
    parser.add_argument("--write", type=Path, metavar="FILE", help="also put the results between the markers in FILE")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    command = shlex.join(
        [*allocator_tuning(), "python", "bench/bench_envelope.py", *(sys.argv[1:] if argv is None else argv)]
    )

    if args.write is not None:
        RESULTS.find(args.write)  # fail now rather than after a minute of measuring
    # The services apply the same allocator thresholds at start (common/memory.py); measure what they run.
    tune_allocator()
    check_raw_matches_envelope()
    couriers = make_couriers()
    started, background = time.perf_counter(), Background()
    cells: list[Cell] = []
    for size in SIZES:
        cells += measure(size, couriers, settings)
    header_bytes = EnvelopeRoundTrip(couriers, sealed_file(1)).header_bytes()
    blocks = building_blocks(len(signed_input(os.urandom(header_bytes), b"")), settings)
    print(f"  measured in {time.perf_counter() - started:.0f} s; {background.summary()}", file=sys.stderr)

    block, passed = report(cells, blocks, command, settings, args.quick, background.summary())
    RESULTS.publish(block, args.write)
    return 0 if passed or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
