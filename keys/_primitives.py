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

import nacl.bindings as sodium  # importing the bindings runs sodium_init()
import nacl.exceptions
from nacl._sodium import ffi, lib  # type: ignore[import-not-found]

# Large outputs need no zero-filling: libsodium writes every byte it returns.
_alloc = ffi.new_allocator(should_clear_after_alloc=False)


def _bytes(buffer: object, size: int) -> bytes:
    data: bytes = ffi.buffer(buffer, size)[:]
    return data


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


# The hot functions below call libsodium through PyNaCl's own cffi module directly: PyNaCl's Python wrappers
# format their error messages on every call, which costs more than the X25519 or AEAD work on small messages.


def ed25519_sign(secret: bytes, data: bytes) -> bytes:
    signed = _alloc("unsigned char[]", len(data) + SIGNATURE_BYTES)
    if lib.crypto_sign(signed, ffi.NULL, data, len(data), secret) != 0:
        raise PrimitiveFailure("signing failed")
    return _bytes(signed, SIGNATURE_BYTES)


def ed25519_verify(public: bytes, signature: bytes, data: bytes) -> bool:
    if len(signature) != SIGNATURE_BYTES or len(public) != PUBLIC_KEY_BYTES:
        return False
    signed = signature + data
    out = _alloc("unsigned char[]", len(signed))
    length = ffi.new("unsigned long long *")
    return bool(lib.crypto_sign_open(out, length, signed, len(signed), public) == 0)


def x25519_public(seed: bytes) -> bytes:
    """The public key of a 32-byte X25519 secret (clamping is done by the function, RFC 7748)."""
    if len(seed) != SEED_BYTES:
        raise PrimitiveFailure("an X25519 secret is 32 bytes")
    out = ffi.new("unsigned char[]", PUBLIC_KEY_BYTES)
    lib.crypto_scalarmult_base(out, seed)
    return _bytes(out, PUBLIC_KEY_BYTES)


def x25519_shared(secret: bytes, peer_public: bytes) -> bytes:
    """X25519, refusing the all-zero output that low-order peer points produce (RFC 7748 section 6.1)."""
    if len(secret) != SEED_BYTES or len(peer_public) != PUBLIC_KEY_BYTES:
        raise PrimitiveFailure("X25519 keys are 32 bytes")
    out = ffi.new("unsigned char[]", PUBLIC_KEY_BYTES)
    # libsodium returns -1 when the result is all zeros (a low-order point); checked again below regardless.
    if lib.crypto_scalarmult(out, secret, peer_public) != 0:
        raise PrimitiveFailure("key agreement failed")
    shared = _bytes(out, PUBLIC_KEY_BYTES)
    if hmac.compare_digest(shared, bytes(PUBLIC_KEY_BYTES)):
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


def _check_aead(key: bytes, nonce: bytes) -> None:
    if len(key) != AEAD_KEY_BYTES or len(nonce) != XNONCE_BYTES:
        raise PrimitiveFailure("XChaCha20-Poly1305 takes a 32-byte key and a 24-byte nonce")


def xchacha_encrypt(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    _check_aead(key, nonce)
    size = len(plaintext) + AEAD_TAG_BYTES
    out = _alloc("unsigned char[]", size)
    lib.crypto_aead_xchacha20poly1305_ietf_encrypt(
        out, ffi.NULL, plaintext, len(plaintext), aad, len(aad), ffi.NULL, nonce, key
    )
    return _bytes(out, size)


def xchacha_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    return bytes(xchacha_decrypt_view(key, nonce, ciphertext, aad))


def xchacha_decrypt_view(key: bytes, nonce: bytes, ciphertext: bytes | memoryview, aad: bytes) -> memoryview:
    """Decrypt into a fresh buffer and return a view of it (large payloads are not copied again)."""
    _check_aead(key, nonce)
    if len(ciphertext) < AEAD_TAG_BYTES:
        raise PrimitiveFailure("ciphertext is shorter than its tag")
    size = len(ciphertext) - AEAD_TAG_BYTES
    out = _alloc("unsigned char[]", max(size, 1))
    source = ffi.from_buffer(ciphertext)
    status = lib.crypto_aead_xchacha20poly1305_ietf_decrypt(
        out, ffi.NULL, ffi.NULL, source, len(ciphertext), aad, len(aad), nonce, key
    )
    if status != 0:
        raise PrimitiveFailure("authenticated decryption failed")
    return memoryview(ffi.buffer(out, size))


def sha256(data: bytes | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def sha512(data: bytes) -> bytes:
    return hashlib.sha512(data).digest()
