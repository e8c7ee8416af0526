"""Ed25519 keys and signatures: PEM forms, key ids, and refusals."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from gpudelivery import errors, signing

# RFC 8032 section 7.1, TEST 1: a secret key, its public key, and its signature of the
# empty message.
RFC8032_SECRET = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC8032_SIGNATURE = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555"
    "fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)

KEY = signing.SigningKey(ed25519.Ed25519PrivateKey.from_private_bytes(RFC8032_SECRET))
OTHER_KEY = signing.SigningKey(
    ed25519.Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"other").digest())
)


def raw_private(key: signing.SigningKey) -> bytes:
    return key.private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def raw_public(public_key: ed25519.Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# -- PEM ------------------------------------------------------------------------------------


def test_private_key_round_trips_through_pem() -> None:
    pem = KEY.private_pem()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    loaded = signing.load_private_pem(pem)
    assert raw_private(loaded) == RFC8032_SECRET
    assert loaded.private_pem() == pem
    assert loaded.key_id == KEY.key_id


def test_public_key_round_trips_through_pem() -> None:
    pem = signing.public_pem(KEY.public_key)
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----\n")
    loaded = signing.load_public_pem(pem)
    assert raw_public(loaded) == RFC8032_PUBLIC
    assert signing.public_pem(loaded) == pem


def test_a_generated_key_round_trips_and_signs_what_its_public_key_verifies() -> None:
    key = signing.generate()
    loaded = signing.load_private_pem(key.private_pem())
    public = signing.load_public_pem(signing.public_pem(key.public_key))
    assert raw_private(loaded) == raw_private(key)
    signing.verify(public, b"payload", loaded.sign(b"payload"))


# -- key ids ----------------------------------------------------------------------------------


def test_key_id_is_ed25519_and_the_hex_of_16_bytes_of_sha256_of_the_raw_public_key() -> None:
    expected = "ed25519:" + hashlib.sha256(RFC8032_PUBLIC).digest()[:16].hex()
    assert expected == "ed25519:21fe31dfa154a261626bf854046fd227"
    assert KEY.key_id == expected
    assert signing.key_id(KEY.public_key) == expected


def test_key_id_is_stable_and_derived_from_the_public_key_alone() -> None:
    from_pem = signing.load_public_pem(signing.public_pem(KEY.public_key))
    from_raw = ed25519.Ed25519PublicKey.from_public_bytes(RFC8032_PUBLIC)
    assert signing.key_id(from_pem) == signing.key_id(from_raw) == KEY.key_id
    assert signing.load_private_pem(KEY.private_pem()).key_id == KEY.key_id


def test_key_ids_of_different_keys_differ() -> None:
    assert OTHER_KEY.key_id != KEY.key_id
    assert signing.generate().key_id != signing.generate().key_id


def test_generated_key_id_has_the_prefix_and_32_lower_case_hex_characters() -> None:
    key_id = signing.generate().key_id
    prefix, digest = key_id[: len("ed25519:")], key_id[len("ed25519:") :]
    assert prefix == "ed25519:"
    assert len(digest) == 32
    assert set(digest) <= set("0123456789abcdef")


# -- no key material in text ----------------------------------------------------------------


def test_repr_names_the_key_id_and_shows_no_key_material() -> None:
    text = repr(KEY)
    assert text == "SigningKey(key_id='ed25519:21fe31dfa154a261626bf854046fd227')"
    assert str(KEY) == text
    assert f"{KEY}" == text
    assert "PRIVATE" not in text
    for material in (RFC8032_SECRET, RFC8032_PUBLIC):
        assert base64.b64encode(material).decode() not in text
        assert material.hex() not in text
    assert KEY.private_pem().decode() not in text


# -- loading other keys and garbage ---------------------------------------------------------


def private_and_public_pem(key: PrivateKeyTypes) -> tuple[bytes, bytes]:
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_pem


@pytest.mark.parametrize(
    ("make_key", "name"),
    [
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "RSA"),
        (lambda: ec.generate_private_key(ec.SECP256R1()), "EC"),
        (ed448.Ed448PrivateKey.generate, "Ed448"),
        (x25519.X25519PrivateKey.generate, "X25519"),
    ],
    ids=["RSA", "EC", "Ed448", "X25519"],
)
def test_a_key_of_another_type_is_refused_naming_its_type(
    make_key: Callable[[], PrivateKeyTypes], name: str
) -> None:
    private_pem, public_pem = private_and_public_pem(make_key())
    with pytest.raises(errors.SignatureError) as private_refusal:
        signing.load_private_pem(private_pem)
    assert str(private_refusal.value) == f"not an Ed25519 key but {name}PrivateKey"
    with pytest.raises(errors.SignatureError) as public_refusal:
        signing.load_public_pem(public_pem)
    assert str(public_refusal.value) == f"not an Ed25519 key but {name}PublicKey"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x01",
        b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n",
        b"-----BEGIN PUBLIC KEY-----\nZ2FyYmFnZQ==\n-----END PUBLIC KEY-----\n",
        KEY.private_pem()[:60],
    ],
    ids=["empty", "binary", "private key armour around garbage", "public key armour", "cut"],
)
def test_garbage_pem_is_refused(data: bytes) -> None:
    with pytest.raises(errors.SignatureError) as private_refusal:
        signing.load_private_pem(data)
    assert str(private_refusal.value) == "not an unencrypted PEM private key"
    with pytest.raises(errors.SignatureError) as public_refusal:
        signing.load_public_pem(data)
    assert str(public_refusal.value) == "not a PEM public key"


def test_an_encrypted_private_key_is_refused() -> None:
    encrypted = KEY.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    with pytest.raises(errors.SignatureError) as caught:
        signing.load_private_pem(encrypted)
    assert str(caught.value) == "not an unencrypted PEM private key"


def test_a_public_key_is_not_a_private_key_nor_the_other_way_round() -> None:
    with pytest.raises(errors.SignatureError) as private_refusal:
        signing.load_private_pem(signing.public_pem(KEY.public_key))
    assert str(private_refusal.value) == "not an unencrypted PEM private key"
    with pytest.raises(errors.SignatureError) as public_refusal:
        signing.load_public_pem(KEY.private_pem())
    assert str(public_refusal.value) == "not a PEM public key"


# -- signatures -------------------------------------------------------------------------------


def test_signature_is_standard_base64_of_the_rfc_8032_signature() -> None:
    signature = KEY.sign(b"")
    assert signature == base64.b64encode(RFC8032_SIGNATURE).decode()
    signing.verify(KEY.public_key, b"", signature)


def test_a_valid_signature_verifies() -> None:
    signing.verify(KEY.public_key, b"payload", KEY.sign(b"payload"))


def flipped(signature: str, bit: int) -> str:
    raw = bytearray(base64.b64decode(signature))
    raw[bit // 8] ^= 1 << (bit % 8)
    return base64.b64encode(raw).decode()


NOT_VERIFIED = "signature does not verify under key ed25519:21fe31dfa154a261626bf854046fd227"
BAD_SIGNATURES = [
    pytest.param(KEY.sign(b"other payload"), NOT_VERIFIED, id="of another payload"),
    pytest.param(OTHER_KEY.sign(b"payload"), NOT_VERIFIED, id="by another key"),
    pytest.param(flipped(KEY.sign(b"payload"), 0), NOT_VERIFIED, id="first bit flipped"),
    pytest.param(flipped(KEY.sign(b"payload"), 511), NOT_VERIFIED, id="last bit flipped"),
    pytest.param(base64.b64encode(bytes(64)).decode(), NOT_VERIFIED, id="zeros"),
    pytest.param(base64.b64encode(bytes(63)).decode(), NOT_VERIFIED, id="too short"),
    pytest.param("", NOT_VERIFIED, id="empty"),
    pytest.param("not base64!", "signature is not valid base64", id="not base64"),
    pytest.param(
        KEY.sign(b"payload").rstrip("="), "signature is not valid base64", id="padding dropped"
    ),
    pytest.param(
        KEY.sign(b"payload").replace("+", "-").replace("/", "_") + "-_",
        "signature is not valid base64",
        id="url-safe alphabet",
    ),
    pytest.param(None, "signature must be a base64 string", id="null"),
    pytest.param(12, "signature must be a base64 string", id="number"),
    pytest.param(KEY.sign(b"payload").encode(), "signature must be a base64 string", id="bytes"),
]


@pytest.mark.parametrize(("signature", "message"), BAD_SIGNATURES)
def test_a_bad_signature_is_refused(signature: object, message: str) -> None:
    with pytest.raises(errors.SignatureError) as caught:
        signing.verify(KEY.public_key, b"payload", signature)
    assert str(caught.value) == message
