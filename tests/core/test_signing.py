"""Ed25519 keys and signatures: PEM forms, key ids, and refusals."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gpudelivery import errors, signing

KEY = signing.generate()


def test_private_and_public_keys_round_trip_through_pem() -> None:
    loaded = signing.load_private_pem(KEY.private_pem())
    assert loaded.key_id == KEY.key_id
    public = signing.load_public_pem(signing.public_pem(KEY.public_key))
    signing.verify(public, b"payload", loaded.sign(b"payload"))


def test_key_id_is_derived_from_the_public_key_alone() -> None:
    public = signing.load_public_pem(signing.public_pem(KEY.public_key))
    assert signing.key_id(public) == KEY.key_id
    prefix, digest = KEY.key_id.split(":")
    assert (prefix, len(digest), int(digest, 16) >= 0) == ("ed25519", 32, True)
    assert signing.generate().key_id != KEY.key_id


def test_repr_shows_the_key_id_and_no_key_material() -> None:
    raw = KEY.private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    text = repr(KEY)
    assert text == f"SigningKey(key_id={KEY.key_id!r})"
    assert base64.b64encode(raw).decode() not in text
    assert raw.hex() not in text


def test_other_key_types_are_refused_naming_the_type() -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    private_pem = other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = other.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(errors.SignatureError, match=r"^not an Ed25519 key but ECPrivateKey$"):
        signing.load_private_pem(private_pem)
    with pytest.raises(errors.SignatureError, match=r"^not an Ed25519 key but ECPublicKey$"):
        signing.load_public_pem(public_pem)


@pytest.mark.parametrize("data", [b"", b"-----BEGIN PRIVATE KEY-----\ngarbage\n", b"\x00\x01"])
def test_garbage_pem_is_refused(data: bytes) -> None:
    with pytest.raises(errors.SignatureError, match=r"^not an unencrypted PEM private key$"):
        signing.load_private_pem(data)
    with pytest.raises(errors.SignatureError, match=r"^not a PEM public key$"):
        signing.load_public_pem(data)


def test_a_valid_signature_verifies() -> None:
    signing.verify(KEY.public_key, b"payload", KEY.sign(b"payload"))


@pytest.mark.parametrize(
    ("signature", "message"),
    [
        (KEY.sign(b"other payload"), "signature does not verify under key"),
        (signing.generate().sign(b"payload"), "signature does not verify under key"),
        ("not base64!", "signature is not valid base64"),
        (None, "signature must be a base64 string"),
        (12, "signature must be a base64 string"),
    ],
)
def test_bad_signatures_are_refused(signature: object, message: str) -> None:
    with pytest.raises(errors.SignatureError, match=f"^{message}"):
        signing.verify(KEY.public_key, b"payload", signature)
