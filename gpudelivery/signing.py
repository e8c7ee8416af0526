"""Ed25519 keys, key ids and detached signatures over canonical JSON.

Provider proof keys and meter node keys are Ed25519 (`cryptography`). Private keys are
stored as PEM PKCS#8, public keys as PEM SubjectPublicKeyInfo, the forms
`gpudelivery keys generate` writes. A key id is derived from the public key alone
(`ed25519:` and the first 16 bytes of the SHA-256 of its raw 32 bytes, in hex), so anyone
holding the public key computes the same id and no registry is needed to name a key.
Signatures travel as standard base64.

Nothing here logs or prints key material.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from gpudelivery import errors

__all__ = [
    "ALGORITHM",
    "SigningKey",
    "generate",
    "key_id",
    "load_private_pem",
    "load_public_pem",
    "public_pem",
    "verify",
]

# The one signature algorithm gpudelivery documents produce and accept.
ALGORITHM = "Ed25519"
_KEY_ID_PREFIX = "ed25519:"
_KEY_ID_BYTES = 16


def key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    """The stable id of a public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _KEY_ID_PREFIX + hashlib.sha256(raw).digest()[:_KEY_ID_BYTES].hex()


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private key with its id; `repr` never shows the key."""

    private_key: ed25519.Ed25519PrivateKey

    @property
    def public_key(self) -> ed25519.Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    def sign(self, payload: bytes) -> str:
        """Base64 Ed25519 signature of `payload`."""
        return base64.b64encode(self.private_key.sign(payload)).decode("ascii")

    def private_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id!r})"


def generate() -> SigningKey:
    """A fresh Ed25519 signing key."""
    return SigningKey(ed25519.Ed25519PrivateKey.generate())


def public_pem(public_key: ed25519.Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private_pem(data: bytes) -> SigningKey:
    """Load an unencrypted PEM PKCS#8 Ed25519 private key."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise errors.SignatureError("not an unencrypted PEM private key") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise errors.SignatureError(f"not an Ed25519 key but {type(key).__name__}")
    return SigningKey(key)


def load_public_pem(data: bytes) -> ed25519.Ed25519PublicKey:
    """Load a PEM SubjectPublicKeyInfo Ed25519 public key."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise errors.SignatureError("not a PEM public key") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise errors.SignatureError(f"not an Ed25519 key but {type(key).__name__}")
    return key


def verify(public_key: ed25519.Ed25519PublicKey, payload: bytes, signature: object) -> None:
    """Raise `SignatureError` unless `signature` (base64) signs `payload` under the key."""
    if not isinstance(signature, str):
        raise errors.SignatureError("signature must be a base64 string")
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise errors.SignatureError("signature is not valid base64") from exc
    try:
        public_key.verify(raw, payload)
    except InvalidSignature as exc:
        raise errors.SignatureError(
            f"signature does not verify under key {key_id(public_key)}"
        ) from exc
