"""Thin layer over the primitives of suite 1. Nothing outside ``keys`` imports this module.

Ed25519 and X25519 come from pyca/cryptography (OpenSSL), XChaCha20-Poly1305 from libsodium through PyNaCl,
HKDF-SHA256 from cryptography and SHA-256 from hashlib. Every function takes and returns plain bytes; failures
surface as :class:`PrimitiveFailure` so that callers map them to their own typed errors.
"""

from __future__ import annotations

import hashlib

import nacl.bindings
import nacl.exceptions
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEED_BYTES = 32
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
XNONCE_BYTES = 24
AEAD_KEY_BYTES = 32
AEAD_TAG_BYTES = 16
DIGEST_BYTES = 32


class PrimitiveFailure(Exception):
    """A primitive refused its input (bad tag, low-order point, wrong length). Carries no secret."""


def ed25519_public(seed: bytes) -> bytes:
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()


def ed25519_signer(seed: bytes) -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed)


def ed25519_verify(public: bytes, signature: bytes, data: bytes) -> bool:
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def x25519_private(seed: bytes) -> x25519.X25519PrivateKey:
    return x25519.X25519PrivateKey.from_private_bytes(seed)


def x25519_public(seed: bytes) -> bytes:
    return x25519_private(seed).public_key().public_bytes_raw()


def x25519_shared(private: x25519.X25519PrivateKey, peer_public: bytes) -> bytes:
    """X25519, refusing the all-zero output that low-order peer points produce (RFC 7748 section 6.1)."""
    try:
        shared = private.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise PrimitiveFailure("key agreement failed") from exc
    if shared == bytes(len(shared)):
        raise PrimitiveFailure("key agreement produced the all-zero value")
    return shared


def hkdf_sha256(ikm: bytes, *, salt: bytes, info: bytes, length: int = AEAD_KEY_BYTES) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def xchacha_encrypt(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key)


def xchacha_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    try:
        return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, aad, nonce, key)
    except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, ValueError) as exc:
        raise PrimitiveFailure("authenticated decryption failed") from exc


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def sha512(data: bytes) -> bytes:
    return hashlib.sha512(data).digest()
