"""Opaque key handles.

A private key lives in a handle: it never shows its secret in ``repr``, cannot be pickled or copied into another
process by accident, and gives its secret bytes out only through :meth:`PrivateKey.expose_secret_for_export`, which
the keystore calls when it encrypts keys at rest. Handles are made by :meth:`SigningKey.generate` /
:meth:`AgreementKey.generate` or by the keystore; there is no public constructor from raw bytes.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn

from keys import _primitives as prim
from keys.fingerprint import Algorithm, key_fingerprint, key_id

#: Source of randomness: n -> n random bytes. Injected in tests and vector generation.
RandomSource = Callable[[int], bytes]

_CONSTRUCT = object()  # only code in this package holds the token that opens the constructor


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A public key with its algorithm. Safe to copy, log (by key id) and publish."""

    algorithm: Algorithm
    raw: bytes
    _key_id: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.raw) != prim.PUBLIC_KEY_BYTES:
            raise ValueError(f"a {self.algorithm.name} public key is {prim.PUBLIC_KEY_BYTES} bytes")
        object.__setattr__(self, "_key_id", key_id(self.algorithm, self.raw))  # derived once: used on every open

    @property
    def key_id(self) -> bytes:
        """16-byte key id derived from the key (see docs/keys.md)."""
        return self._key_id

    @property
    def fingerprint(self) -> str:
        """Human-readable fingerprint: 8 groups of 5 digits."""
        return key_fingerprint(self.algorithm, self.raw)

    def verify(self, signature: bytes, data: bytes) -> bool:
        """Verify an Ed25519 signature; False for a wrong signature or a key that cannot sign."""
        if self.algorithm is not Algorithm.ED25519:
            return False
        return prim.ed25519_verify(self.raw, signature, data)

    def __repr__(self) -> str:
        return f"PublicKey({self.algorithm.name}, key_id={self.key_id.hex()})"


class PrivateKey:
    """Base of the private-key handles. Not picklable; no secret in ``repr``."""

    __slots__ = ("_public", "_seed")
    algorithm: ClassVar[Algorithm]

    def __init__(self, token: object, seed: bytes) -> None:
        if token is not _CONSTRUCT:
            raise TypeError("private keys come from generate() or from a keystore, not from raw bytes")
        if len(seed) != prim.SEED_BYTES:
            raise ValueError(f"a private key seed is {prim.SEED_BYTES} bytes")
        self._seed = bytes(seed)
        self._public = PublicKey(self.algorithm, self._derive_public(self._seed))

    @staticmethod
    def _derive_public(seed: bytes) -> bytes:
        raise NotImplementedError

    @classmethod
    def generate(cls, rng: RandomSource = os.urandom) -> PrivateKey:
        """A new random key."""
        return cls(_CONSTRUCT, rng(prim.SEED_BYTES))

    @property
    def public(self) -> PublicKey:
        """The matching public key."""
        return self._public

    @property
    def key_id(self) -> bytes:
        return self._public.key_id

    def expose_secret_for_export(self) -> bytes:
        """The 32-byte secret seed. Only for encrypting it at rest; never log, print or send it."""
        return self._seed

    def same_secret(self, other: PrivateKey) -> bool:
        """Constant-time comparison of two handles' secrets."""
        return type(self) is type(other) and hmac.compare_digest(self._seed, other._seed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key_id={self.key_id.hex()}, secret=<hidden>)"

    def __reduce__(self) -> NoReturn:
        raise TypeError(f"{type(self).__name__} cannot be pickled; export it through a keystore")

    def __getstate__(self) -> NoReturn:
        raise TypeError(f"{type(self).__name__} cannot be pickled; export it through a keystore")

    def __copy__(self) -> PrivateKey:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> PrivateKey:
        return self


class SigningKey(PrivateKey):
    """An Ed25519 signing key."""

    __slots__ = ("_secret",)
    algorithm = Algorithm.ED25519

    def __init__(self, token: object, seed: bytes) -> None:
        super().__init__(token, seed)
        self._secret = prim.ed25519_keypair(self._seed)[1]

    @staticmethod
    def _derive_public(seed: bytes) -> bytes:
        return prim.ed25519_keypair(seed)[0]

    @classmethod
    def generate(cls, rng: RandomSource = os.urandom) -> SigningKey:
        return cls(_CONSTRUCT, rng(prim.SEED_BYTES))

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature (64 bytes) over ``data``."""
        return prim.ed25519_sign(self._secret, data)


class AgreementKey(PrivateKey):
    """An X25519 key-agreement key (static; envelopes use a fresh ephemeral key on the sender side)."""

    __slots__ = ()
    algorithm = Algorithm.X25519

    @staticmethod
    def _derive_public(seed: bytes) -> bytes:
        return prim.x25519_public(seed)

    @classmethod
    def generate(cls, rng: RandomSource = os.urandom) -> AgreementKey:
        return cls(_CONSTRUCT, rng(prim.SEED_BYTES))

    def _shared_secret(self, peer_public: bytes) -> bytes:
        """Raw X25519 output with a peer. Package-internal: callers use the envelope recipe instead."""
        return prim.x25519_shared(self._seed, peer_public)


def _load_private(algorithm: Algorithm, seed: bytes) -> PrivateKey:
    """Rebuild a handle from its secret seed. For the keystore and the test-vector generator only."""
    cls: type[PrivateKey] = SigningKey if algorithm is Algorithm.ED25519 else AgreementKey
    return cls(_CONSTRUCT, seed)
