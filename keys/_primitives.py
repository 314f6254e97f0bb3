"""Thin layer over the primitives of suite 1. Nothing outside ``keys`` imports this module.

Ed25519, X25519 and XChaCha20-Poly1305 come from libsodium through PyNaCl's low-level bindings; HKDF-SHA256
(RFC 5869) is two HMAC-SHA256 calls from the standard library, and SHA-256 comes from hashlib. libsodium's Ed25519
verification is strict (canonical S, no small-order keys or R), and its X25519 refuses the all-zero shared secret
of low-order points. Every function takes and returns plain bytes; failures surface as :class:`PrimitiveFailure`
so that callers map them to their own typed errors.
"""

from __future__ import annotations

import hashlib
import hmac

import nacl.bindings as sodium
import nacl.exceptions

SEED_BYTES = 32
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
XNONCE_BYTES = 24
AEAD_KEY_BYTES = 32
AEAD_TAG_BYTES = 16
DIGEST_BYTES = 32
_HASH_BYTES = 32

_SODIUM_ERRORS = (nacl.exceptions.CryptoError, nacl.exceptions.RuntimeError, nacl.exceptions.ValueError, ValueError)


class PrimitiveFailure(Exception):
    """A primitive refused its input (bad tag, low-order point, wrong length). Carries no secret."""


def ed25519_keypair(seed: bytes) -> tuple[bytes, bytes]:
    """(public key, 64-byte libsodium secret key) for a 32-byte seed."""
    public, secret = sodium.crypto_sign_seed_keypair(seed)
    return public, secret


def ed25519_sign(secret: bytes, data: bytes) -> bytes:
    return sodium.crypto_sign(data, secret)[:SIGNATURE_BYTES]


def ed25519_verify(public: bytes, signature: bytes, data: bytes) -> bool:
    if len(signature) != SIGNATURE_BYTES or len(public) != PUBLIC_KEY_BYTES:
        return False
    try:
        sodium.crypto_sign_open(signature + data, public)
    except _SODIUM_ERRORS:
        return False
    return True


def x25519_public(seed: bytes) -> bytes:
    """The public key of a 32-byte X25519 secret (clamping is done by the function, RFC 7748)."""
    return sodium.crypto_scalarmult_base(seed)


def x25519_shared(secret: bytes, peer_public: bytes) -> bytes:
    """X25519, refusing the all-zero output that low-order peer points produce (RFC 7748 section 6.1)."""
    try:
        shared = sodium.crypto_scalarmult(secret, peer_public)
    except _SODIUM_ERRORS as exc:
        raise PrimitiveFailure("key agreement failed") from exc
    if hmac.compare_digest(shared, bytes(len(shared))):
        raise PrimitiveFailure("key agreement produced the all-zero value")
    return shared


def hkdf_sha256(ikm: bytes, *, salt: bytes, info: bytes, length: int = AEAD_KEY_BYTES) -> bytes:
    """RFC 5869 HKDF with SHA-256: extract, then expand to ``length`` bytes."""
    if not 0 < length <= 255 * _HASH_BYTES:
        raise ValueError("HKDF output length out of range")
    prk = hmac.digest(salt or bytes(_HASH_BYTES), ikm, "sha256")
    okm, block = b"", b""
    for counter in range(1, -(-length // _HASH_BYTES) + 1):
        block = hmac.digest(prk, block + info + bytes([counter]), "sha256")
        okm += block
    return okm[:length]


def xchacha_encrypt(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    return sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key)


def xchacha_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    try:
        return sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, aad, nonce, key)
    except _SODIUM_ERRORS as exc:
        raise PrimitiveFailure("authenticated decryption failed") from exc


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def sha512(data: bytes) -> bytes:
    return hashlib.sha512(data).digest()
