"""Signed, hash-chained meter batches: signing, verification, chains and refusals."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from gpudelivery import batches, canonical, errors, evidence, signing, timefmt

from utils.factories import EPOCH

NODE = "gpu-node-7"
GPU_A = "GPU-5d8c2e1a-7f3b-4c9d-8e6f-0a1b2c3d4e5f"
GPU_B = "GPU-9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d"
METER_BATCH_DOC = Path(__file__).parents[2] / "docs" / "meter-batch.md"


def fixed_key(name: str) -> signing.SigningKey:
    """A signing key derived from `name`, the same on every run."""
    seed = hashlib.sha256(name.encode()).digest()
    return signing.SigningKey(ed25519.Ed25519PrivateKey.from_private_bytes(seed))


KEY = fixed_key("node key")
OTHER_KEY = fixed_key("another node key")
NOT_VERIFIED = f"signature does not verify under key {KEY.key_id}"


def record(interval: int, *, gpu: str = GPU_A, healthy: bool = True) -> dict[str, Any]:
    """The meter record of `gpu` for the `interval`-th 10-second interval after EPOCH."""
    return {
        "gpu_uuid": gpu,
        "t0": timefmt.format_utc(EPOCH + interval * 10),
        "t1": timefmt.format_utc(EPOCH + interval * 10 + 10),
        "healthy": healthy,
        "utilization_gpu_pct": 91.5 if healthy else 0,
        "energy_mj": 7_000_000,
        "xids": [] if healthy else [79],
    }


def chain(length: int, *, node: str = NODE) -> list[dict[str, Any]]:
    """A chain of `length` signed batches from seq 0, two records each."""
    documents: list[dict[str, Any]] = []
    for seq in range(length):
        documents.append(
            batches.sign_batch(
                key=KEY,
                node=node,
                seq=seq,
                prev_hash=batches.batch_hash(documents[-1]) if documents else None,
                records=[record(seq), record(seq, gpu=GPU_B, healthy=seq % 2 == 0)],
            )
        )
    return documents


CHAIN = chain(5)


def second_batch() -> dict[str, Any]:
    """A fresh copy of seq 1 of CHAIN: it has a prev_hash, so every field can be edited."""
    return copy.deepcopy(CHAIN[1])


def refusal(document: object) -> errors.GpuDeliveryError:
    """The error `verify_batch` raises for `document` under KEY."""
    with pytest.raises(errors.GpuDeliveryError) as caught:
        batches.verify_batch(document, KEY.public_key)
    return caught.value


# -- a signed batch -------------------------------------------------------------------------


def test_signed_batch_verifies_and_round_trips_through_json_unchanged() -> None:
    document = CHAIN[1]
    again = json.loads(json.dumps(document))
    assert again == document
    batch = batches.verify_batch(again, KEY.public_key)
    assert (batch.node, batch.key_id, batch.seq, batch.prev_hash, batch.gap) == (
        NODE,
        KEY.key_id,
        1,
        batches.batch_hash(CHAIN[0]),
        None,
    )
    assert batch.hash == batches.batch_hash(document)
    assert batch.document == document
    assert [
        (r.node, r.gpu_uuid, r.t0_s, r.t1_s, r.healthy, r.utilization_gpu_pct, r.energy_mj)
        for r in batch.records
    ] == [
        (NODE, GPU_A, EPOCH + 10, EPOCH + 20, True, 91.5, 7_000_000),
        (NODE, GPU_B, EPOCH + 10, EPOCH + 20, False, 0, 7_000_000),
    ]


def test_signed_batch_has_exactly_the_documented_fields() -> None:
    document = CHAIN[0]
    assert list(document) == [
        "format",
        "node",
        "key_id",
        "seq",
        "prev_hash",
        "records",
        "signature",
    ]
    assert (document["format"], document["node"], document["key_id"]) == (
        "gpudelivery.meter-batch/v1",
        NODE,
        KEY.key_id,
    )
    assert (document["seq"], document["prev_hash"]) == (0, None)
    assert document["records"] == [record(0), record(0, gpu=GPU_B)]


def test_signature_is_standard_base64_ed25519_over_canonical_json_without_signature() -> None:
    document = CHAIN[1]
    unsigned = {name: value for name, value in document.items() if name != "signature"}
    raw = base64.b64decode(document["signature"], validate=True)
    assert len(raw) == 64
    KEY.public_key.verify(raw, rfc8785.dumps(unsigned))  # raises if it does not verify


def test_batch_hash_is_sha256_hex_of_canonical_json_of_the_signed_batch() -> None:
    document = CHAIN[1]
    expected = hashlib.sha256(rfc8785.dumps(document)).hexdigest()
    assert batches.batch_hash(document) == expected
    assert batches.batch_hash(dict(reversed(document.items()))) == expected
    assert CHAIN[2]["prev_hash"] == expected


BATCH_EDITS: list[tuple[str, Any]] = [
    ("format", "gpudelivery.meter-batch/v2"),
    ("node", "gpu-node-8"),
    ("key_id", OTHER_KEY.key_id),
    ("seq", 2),
    ("prev_hash", "0" * 64),
    ("records", []),
    ("records", [record(1)]),
    ("records", [record(1, gpu=GPU_B, healthy=False), record(1)]),
    ("gap", {"from": "2026-03-03T00:00:00Z", "to": "2026-03-03T00:00:10Z", "reason": "x"}),
    ("signature", OTHER_KEY.sign(b"")),
]
RECORD_EDITS: list[tuple[str, Any]] = [
    ("gpu_uuid", GPU_B),
    ("t0", timefmt.format_utc(EPOCH)),
    ("t1", timefmt.format_utc(EPOCH + 30)),
    ("healthy", False),
    ("utilization_gpu_pct", 91.6),
    ("energy_mj", 7_000_001),
    ("xids", [79]),
    ("pods", ["team-a/train-0"]),
]


@pytest.mark.parametrize(
    ("name", "value"), BATCH_EDITS, ids=[f"{n}={v!r}"[:40] for n, v in BATCH_EDITS]
)
def test_batch_hash_changes_when_a_field_changes(name: str, value: Any) -> None:
    document = second_batch()
    document[name] = value
    assert batches.batch_hash(document) != batches.batch_hash(CHAIN[1])


@pytest.mark.parametrize(("name", "value"), RECORD_EDITS, ids=[n for n, _ in RECORD_EDITS])
def test_batch_hash_changes_when_a_record_field_changes(name: str, value: Any) -> None:
    document = second_batch()
    document["records"][0][name] = value
    assert batches.batch_hash(document) != batches.batch_hash(CHAIN[1])


# Each single-field edit of a signed seq-1 batch, and exactly what verification says.
REFUSED_EDITS: list[tuple[str, Any, type[errors.GpuDeliveryError], str]] = [
    (
        "format",
        "gpudelivery.meter-batch/v2",
        errors.EvidenceError,
        "format: must be 'gpudelivery.meter-batch/v1'",
    ),
    ("node", "gpu-node-8", errors.SignatureError, NOT_VERIFIED),
    (
        "key_id",
        OTHER_KEY.key_id,
        errors.SignatureError,
        f"batch names key {OTHER_KEY.key_id}, not {KEY.key_id}",
    ),
    ("seq", 2, errors.SignatureError, NOT_VERIFIED),
    ("seq", 0, errors.EvidenceError, "prev_hash: is null exactly when seq is 0"),
    ("prev_hash", "0" * 64, errors.SignatureError, NOT_VERIFIED),
    ("prev_hash", None, errors.EvidenceError, "prev_hash: is null exactly when seq is 0"),
    ("records", [], errors.SignatureError, NOT_VERIFIED),
    ("records", copy.deepcopy(CHAIN[1]["records"][:1]), errors.SignatureError, NOT_VERIFIED),
    ("records", copy.deepcopy(CHAIN[1]["records"][::-1]), errors.SignatureError, NOT_VERIFIED),
    (
        "records",
        [*copy.deepcopy(CHAIN[1]["records"]), record(1, gpu="GPU-extra")],
        errors.SignatureError,
        NOT_VERIFIED,
    ),
    (
        "gap",
        {"from": "2026-03-03T00:00:00Z", "to": "2026-03-03T00:00:10Z", "reason": "x"},
        errors.SignatureError,
        NOT_VERIFIED,
    ),
    ("signature", OTHER_KEY.sign(b"anything"), errors.SignatureError, NOT_VERIFIED),
    ("signature", base64.b64encode(bytes(64)).decode(), errors.SignatureError, NOT_VERIFIED),
    ("signature", "not base64!", errors.SignatureError, "signature is not valid base64"),
    ("signature", None, errors.EvidenceError, "signature: must be a base64 string"),
]


@pytest.mark.parametrize(
    ("name", "value", "error", "message"),
    REFUSED_EDITS,
    ids=[f"{name}={value!r}"[:40] for name, value, _, _ in REFUSED_EDITS],
)
def test_every_single_field_edit_of_a_signed_batch_is_refused(
    name: str, value: Any, error: type[errors.GpuDeliveryError], message: str
) -> None:
    document = second_batch()
    document[name] = value
    refused = refusal(document)
    assert type(refused) is error
    assert str(refused) == message


REFUSED_RECORD_EDITS: list[tuple[str, Any, type[errors.GpuDeliveryError], str]] = [
    *((name, value, errors.SignatureError, NOT_VERIFIED) for name, value in RECORD_EDITS),
    (
        "t1",
        timefmt.format_utc(EPOCH + 10),
        errors.EvidenceError,
        "records[0].t1: must be after t0",
    ),
    (
        "node",
        "gpu-node-8",
        errors.EvidenceError,
        f"records[0].node: must be the batch's node {NODE!r}",
    ),
]


@pytest.mark.parametrize(
    ("name", "value", "error", "message"),
    REFUSED_RECORD_EDITS,
    ids=[f"{name}={value!r}"[:40] for name, value, _, _ in REFUSED_RECORD_EDITS],
)
def test_every_single_field_edit_of_a_signed_record_is_refused(
    name: str, value: Any, error: type[errors.GpuDeliveryError], message: str
) -> None:
    document = second_batch()
    document["records"][0][name] = value
    refused = refusal(document)
    assert type(refused) is error
    assert str(refused) == message


def test_every_flipped_signature_bit_is_refused() -> None:
    raw = base64.b64decode(CHAIN[1]["signature"])
    for bit in range(len(raw) * 8):
        altered = bytearray(raw)
        altered[bit // 8] ^= 1 << (bit % 8)
        document = second_batch()
        document["signature"] = base64.b64encode(altered).decode()
        assert str(refusal(document)) == NOT_VERIFIED, bit


def test_batch_signed_by_another_key_is_refused_naming_both_key_ids() -> None:
    document = batches.sign_batch(
        key=OTHER_KEY, node=NODE, seq=0, prev_hash=None, records=[record(0)]
    )
    refused = refusal(document)
    assert type(refused) is errors.SignatureError
    assert str(refused) == f"batch names key {OTHER_KEY.key_id}, not {KEY.key_id}"


def test_batch_signed_by_another_key_under_this_key_id_is_refused() -> None:
    document = batches.sign_batch(
        key=OTHER_KEY, node=NODE, seq=0, prev_hash=None, records=[record(0)]
    )
    document["key_id"] = KEY.key_id
    unsigned = {name: value for name, value in document.items() if name != "signature"}
    document["signature"] = OTHER_KEY.sign(rfc8785.dumps(unsigned))
    refused = refusal(document)
    assert type(refused) is errors.SignatureError
    assert str(refused) == NOT_VERIFIED


# -- chains ---------------------------------------------------------------------------------


def test_a_five_batch_chain_verifies_each_batch_linking_to_the_one_before() -> None:
    verified = batches.verify_chain(CHAIN, KEY.public_key)
    assert [(batch.seq, batch.prev_hash) for batch in verified] == [
        (0, None),
        *((seq, batches.batch_hash(CHAIN[seq - 1])) for seq in range(1, 5)),
    ]
    assert [batch.hash for batch in verified] == [batches.batch_hash(d) for d in CHAIN]


def test_a_chain_ending_early_still_verifies() -> None:
    # The chain cannot tell a missing tail from batches not yet sent: ingest sees the tail.
    assert [batch.seq for batch in batches.verify_chain(CHAIN[:3], KEY.public_key)] == [0, 1, 2]


@pytest.mark.parametrize("dropped", [1, 2, 3])
def test_a_dropped_batch_is_reported_as_a_gap(dropped: int) -> None:
    documents = [d for seq, d in enumerate(CHAIN) if seq != dropped]
    with pytest.raises(batches.ChainError) as caught:
        batches.verify_chain(documents, KEY.public_key)
    assert str(caught.value) == (
        f"node {NODE}: seq {dropped + 1} does not follow seq {dropped - 1} (gap)"
    )


def test_a_dropped_first_batch_is_a_chain_not_starting_at_0() -> None:
    with pytest.raises(batches.ChainError) as caught:
        batches.verify_chain(CHAIN[1:], KEY.public_key)
    assert str(caught.value) == f"node {NODE}: chain starts at seq 1, not 0"


@pytest.mark.parametrize(
    ("order", "message"),
    [
        ([0, 2, 1, 3, 4], "seq 2 does not follow seq 0 (gap)"),
        ([0, 1, 3, 2, 4], "seq 3 does not follow seq 1 (gap)"),
        ([0, 1, 2, 4, 3], "seq 4 does not follow seq 2 (gap)"),
        ([0, 1, 2, 3, 4, 2], "seq 2 does not follow seq 4 (gap)"),
        ([0, 1, 1, 2, 3, 4], "seq 1 does not follow seq 1 (gap)"),
    ],
)
def test_reordered_or_replayed_batches_are_refused(order: list[int], message: str) -> None:
    with pytest.raises(batches.ChainError) as caught:
        batches.verify_chain([CHAIN[seq] for seq in order], KEY.public_key)
    assert str(caught.value) == f"node {NODE}: {message}"


def test_a_forked_batch_breaks_the_link_of_the_next_one() -> None:
    fork = batches.sign_batch(
        key=KEY,
        node=NODE,
        seq=2,
        prev_hash=batches.batch_hash(CHAIN[1]),
        records=[record(2, healthy=False)],
    )
    assert fork["seq"] == CHAIN[2]["seq"]
    assert fork != CHAIN[2]
    with pytest.raises(batches.ChainError) as caught:
        batches.verify_chain([*CHAIN[:2], fork, *CHAIN[3:]], KEY.public_key)
    assert str(caught.value) == f"node {NODE}: seq 3 does not link to the hash of seq 2 (fork)"


def test_a_batch_linking_to_another_history_is_a_fork() -> None:
    other_history = chain(3, node=NODE + "-restored")
    stray = batches.sign_batch(
        key=KEY,
        node=NODE,
        seq=3,
        prev_hash=batches.batch_hash(other_history[2]),
        records=[record(3)],
    )
    with pytest.raises(batches.ChainError) as caught:
        batches.verify_chain([*CHAIN[:3], stray], KEY.public_key)
    assert str(caught.value) == f"node {NODE}: seq 3 does not link to the hash of seq 2 (fork)"


def test_a_chain_not_starting_at_seq_0_is_refused() -> None:
    with pytest.raises(batches.ChainError) as caught:
        batches.verify_chain(CHAIN[2:], KEY.public_key)
    assert str(caught.value) == f"node {NODE}: chain starts at seq 2, not 0"


def test_a_batch_of_another_node_does_not_continue_the_chain() -> None:
    elsewhere = batches.sign_batch(
        key=KEY,
        node="gpu-node-8",
        seq=1,
        prev_hash=batches.batch_hash(CHAIN[0]),
        records=[],
    )
    with pytest.raises(batches.ChainError) as caught:
        batches.verify_chain([CHAIN[0], elsewhere], KEY.public_key)
    assert str(caught.value) == "seq 1 belongs to another node or key than seq 0"


def test_an_unsigned_edit_inside_a_chain_is_refused_before_linking() -> None:
    documents = copy.deepcopy(CHAIN)
    documents[3]["records"][0]["healthy"] = False
    with pytest.raises(errors.SignatureError) as caught:
        batches.verify_chain(documents, KEY.public_key)
    assert str(caught.value) == NOT_VERIFIED


# -- structure --------------------------------------------------------------------------------


def edited(**changes: Any) -> dict[str, Any]:
    """CHAIN[1] with top-level fields replaced (not re-signed: parse_batch does not check)."""
    document = second_batch()
    document.update(changes)
    return document


def with_record(index: int = 0, **changes: Any) -> dict[str, Any]:
    """CHAIN[1] with fields of one record replaced, or (value None) removed."""
    document = second_batch()
    for name, value in changes.items():
        if value is None:
            del document["records"][index][name]
        else:
            document["records"][index][name] = value
    return document


def without(name: str) -> dict[str, Any]:
    document = second_batch()
    del document[name]
    return document


GAP = {"from": "2026-03-03T00:00:00Z", "to": "2026-03-03T00:10:00Z", "reason": "spool disk full"}

MALFORMED = [
    pytest.param([], "a batch must be a JSON object", id="not an object"),
    pytest.param(edited(extra=1), "extra: unknown field", id="unknown field"),
    pytest.param(edited(Seq=1), "Seq: unknown field", id="field name in another case"),
    pytest.param(without("format"), "format: must be 'gpudelivery.meter-batch/v1'", id="no format"),
    pytest.param(
        edited(format="gpudelivery.meter-batch/v0"),
        "format: must be 'gpudelivery.meter-batch/v1'",
        id="wrong format tag",
    ),
    pytest.param(edited(node=""), "node: must be a non-empty string", id="empty node"),
    pytest.param(without("node"), "node: must be a non-empty string", id="no node"),
    pytest.param(edited(key_id=7), "key_id: must be a non-empty string", id="key_id not a string"),
    pytest.param(
        edited(seq=-1), "seq: must be a whole number from 0 to 2^53 - 1", id="negative seq"
    ),
    pytest.param(
        edited(seq=2**53, prev_hash="0" * 64),
        "seq: must be a whole number from 0 to 2^53 - 1",
        id="seq beyond JSON integers",
    ),
    pytest.param(edited(seq=True), "seq: must be a whole number from 0 to 2^53 - 1", id="seq true"),
    pytest.param(
        edited(seq=False, prev_hash=None),
        "seq: must be a whole number from 0 to 2^53 - 1",
        id="seq false",
    ),
    pytest.param(
        edited(seq=1.0), "seq: must be a whole number from 0 to 2^53 - 1", id="seq a float"
    ),
    pytest.param(
        edited(seq="1"), "seq: must be a whole number from 0 to 2^53 - 1", id="seq a string"
    ),
    pytest.param(without("seq"), "seq: must be a whole number from 0 to 2^53 - 1", id="no seq"),
    pytest.param(
        edited(seq=0), "prev_hash: is null exactly when seq is 0", id="seq 0 with a prev_hash"
    ),
    pytest.param(
        edited(seq=3, prev_hash=None),
        "prev_hash: is null exactly when seq is 0",
        id="seq 3 without a prev_hash",
    ),
    pytest.param(
        without("prev_hash"), "prev_hash: is null exactly when seq is 0", id="no prev_hash"
    ),
    pytest.param(
        edited(prev_hash="A" * 64),
        "prev_hash: must be null or a hex SHA-256",
        id="prev_hash upper-case",
    ),
    pytest.param(
        edited(prev_hash="a" * 63),
        "prev_hash: must be null or a hex SHA-256",
        id="prev_hash too short",
    ),
    pytest.param(
        edited(prev_hash="z" * 64),
        "prev_hash: must be null or a hex SHA-256",
        id="prev_hash not hex",
    ),
    pytest.param(
        edited(prev_hash=1), "prev_hash: must be null or a hex SHA-256", id="prev_hash a number"
    ),
    pytest.param(edited(records={}), "records: must be a list", id="records an object"),
    pytest.param(without("records"), "records: must be a list", id="no records"),
    pytest.param(
        edited(records=[5]),
        "records[0]: must be a JSON object, got int",
        id="record not an object",
    ),
    pytest.param(
        with_record(t1=record(1)["t0"]), "records[0].t1: must be after t0", id="record t1 = t0"
    ),
    pytest.param(
        with_record(1, t1=timefmt.format_utc(EPOCH)),
        "records[1].t1: must be after t0",
        id="second record t1 before t0",
    ),
    pytest.param(
        with_record(node="elsewhere"),
        f"records[0].node: must be the batch's node {NODE!r}",
        id="record of another node",
    ),
    pytest.param(
        with_record(gpu_uuid=None), "records[0].gpu_uuid: missing", id="record without gpu_uuid"
    ),
    pytest.param(with_record(t0=None), "records[0].t0: missing", id="record without t0"),
    pytest.param(
        with_record(t0="2026-03-03T01:00:10+01:00"),
        "records[0].t0: '2026-03-03T01:00:10+01:00' is not in UTC (use a Z suffix)",
        id="record time not in UTC",
    ),
    pytest.param(
        with_record(t1="2026-03-03T00:00:20.5Z"),
        "records[0].t1: '2026-03-03T00:00:20.5Z' has fractional seconds; use whole seconds",
        id="record time with fractional seconds",
    ),
    pytest.param(
        with_record(healthy="yes"),
        "records[0].healthy: must be true or false",
        id="record healthy a string",
    ),
    pytest.param(
        with_record(healthy=None), "records[0].healthy: missing", id="record without healthy"
    ),
    pytest.param(
        with_record(utilization_gpu_pct=100.5),
        "records[0].utilization_gpu_pct: must be a number from 0 to 100",
        id="record utilization above 100",
    ),
    pytest.param(
        with_record(utilization_gpu_pct=True),
        "records[0].utilization_gpu_pct: must be a number from 0 to 100",
        id="record utilization a boolean",
    ),
    pytest.param(
        with_record(energy_mj=1.5),
        "records[0].energy_mj: must be a whole number >= 0",
        id="record energy a float",
    ),
    pytest.param(
        with_record(energy_mj=-1),
        "records[0].energy_mj: must be a whole number >= 0",
        id="record energy negative",
    ),
    pytest.param(edited(signature=None), "signature: must be a base64 string", id="signature null"),
    pytest.param(without("signature"), "signature: must be a base64 string", id="no signature"),
    pytest.param(edited(gap=[]), "gap: must be an object {from, to, reason}", id="gap a list"),
    pytest.param(
        edited(gap={**GAP, "until": GAP["to"]}),
        "gap: must be an object {from, to, reason}",
        id="gap with an unknown field",
    ),
    pytest.param(
        edited(gap={**GAP, "to": GAP["from"]}),
        "gap.to: must be after gap.from",
        id="gap to = from",
    ),
    pytest.param(
        edited(gap={**GAP, "reason": ""}),
        "gap.reason: must be a non-empty string",
        id="gap without a reason",
    ),
    pytest.param(
        edited(gap={**GAP, "from": 0}),
        "gap.from: must be an RFC 3339 UTC timestamp string, got int",
        id="gap from a number",
    ),
]


@pytest.mark.parametrize(("document", "message"), MALFORMED)
def test_malformed_batch_is_refused_naming_the_field(document: object, message: str) -> None:
    with pytest.raises(errors.EvidenceError) as caught:
        batches.parse_batch(document)
    assert str(caught.value) == message


def test_records_may_carry_further_fields_and_name_their_own_node() -> None:
    document = batches.sign_batch(
        key=KEY,
        node=NODE,
        seq=0,
        prev_hash=None,
        records=[{**record(0), "node": NODE, "ecc_dbe": 0, "pods": ["team-a/train-0"]}],
    )
    (parsed,) = batches.verify_batch(document, KEY.public_key).records
    assert (parsed.node, parsed.gpu_uuid, parsed.healthy) == (NODE, GPU_A, True)


def test_sign_batch_refuses_to_sign_a_malformed_batch() -> None:
    with pytest.raises(errors.EvidenceError) as caught:
        batches.sign_batch(key=KEY, node=NODE, seq=1, prev_hash=None, records=[])
    assert str(caught.value) == "prev_hash: is null exactly when seq is 0"


# -- gap markers ----------------------------------------------------------------------------


def test_gap_marker_batch_signs_verifies_and_continues_the_chain() -> None:
    gap = batches.Gap(EPOCH, EPOCH + 600, "spool disk full")
    document = batches.sign_batch(
        key=KEY,
        node=NODE,
        seq=5,
        prev_hash=batches.batch_hash(CHAIN[4]),
        records=[],
        gap=gap,
    )
    assert document["gap"] == GAP
    assert batches.verify_batch(document, KEY.public_key).gap == gap
    verified = batches.verify_chain([*CHAIN, document], KEY.public_key)
    assert [(batch.seq, batch.gap) for batch in verified[-2:]] == [(4, None), (5, gap)]


@pytest.mark.parametrize("end_s", [EPOCH, EPOCH - 1])
def test_gap_marker_must_end_after_it_starts(end_s: int) -> None:
    with pytest.raises(errors.EvidenceError) as caught:
        batches.sign_batch(
            key=KEY,
            node=NODE,
            seq=0,
            prev_hash=None,
            records=[],
            gap=batches.Gap(EPOCH, end_s, "spool disk full"),
        )
    assert str(caught.value) == "gap.to: must be after gap.from"


def test_an_edited_gap_marker_is_refused() -> None:
    document = batches.sign_batch(
        key=KEY,
        node=NODE,
        seq=0,
        prev_hash=None,
        records=[],
        gap=batches.Gap(EPOCH, EPOCH + 600, "spool disk full"),
    )
    document["gap"]["to"] = "2026-03-03T00:05:00Z"
    assert str(refusal(document)) == NOT_VERIFIED


# -- the documented example -----------------------------------------------------------------


def test_the_examples_in_the_format_documentation_verify_and_link() -> None:
    text = METER_BATCH_DOC.read_text(encoding="utf-8")
    documents = [json.loads(block) for block in re.findall(r"```json\n(.*?)```", text, re.DOTALL)]
    (seed,) = re.findall(r"private key is the Ed25519 seed[^`]*`([0-9a-f]{64})`", text)
    example_key = signing.SigningKey(
        ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed))
    )
    (public_pem,) = re.findall(
        r"-----BEGIN PUBLIC KEY-----\n.*?\n-----END PUBLIC KEY-----\n", text, re.DOTALL
    )
    public_key = signing.load_public_pem(public_pem.encode())
    assert signing.key_id(public_key) == example_key.key_id
    records_batch, gap_batch = (batches.verify_batch(d, public_key) for d in documents)
    batches.check_link(records_batch, gap_batch)
    assert (records_batch.seq, gap_batch.seq, gap_batch.gap) == (
        4217,
        4218,
        batches.Gap(
            timefmt.parse_utc("2026-03-03T09:00:10Z", field="from"),
            timefmt.parse_utc("2026-03-03T09:01:10Z", field="to"),
            "spool disk full",
        ),
    )
    unsigned_gap_batch = {
        name: value for name, value in documents[1].items() if name != "signature"
    }
    for documented in (
        f"key id `{example_key.key_id}`",
        f"`{records_batch.hash}`",
        f"`{gap_batch.hash}`",
        "```\n" + rfc8785.dumps(unsigned_gap_batch).decode() + "\n```",
    ):
        assert documented in text
    # Ed25519 is deterministic: the documented seed signs to the documented signatures.
    assert [
        example_key.sign(rfc8785.dumps({n: v for n, v in d.items() if n != "signature"}))
        for d in documents
    ] == [d["signature"] for d in documents]


def test_a_value_canonical_json_cannot_hold_is_refused_naming_records() -> None:
    document = copy.deepcopy(chain(1)[0])
    document["records"][0]["temperature_c"] = float("nan")
    with pytest.raises(errors.EvidenceError) as caught:
        batches.parse_batch(document)
    assert str(caught.value).startswith("records: cannot be canonicalised as JSON")


def test_the_spliced_hash_of_a_signed_batch_is_its_batch_hash() -> None:
    gap = batches.Gap(1_772_496_000, 1_772_496_600, "spool full")
    for records, marker in (
        ([], None),
        ([{"gpu_uuid": "GPU-é", "t0": "x", "note": "\u20ac\x01"}], gap),
    ):
        signed = batches.sign_batch_and_hash(
            key=signing.generate(), node="n", seq=3, prev_hash="a" * 64, records=records, gap=marker
        )
        assert signed.canonical == canonical.canonical_json(signed.document)
        assert signed.hash == batches.batch_hash(signed.document)


@pytest.mark.parametrize(
    ("seq", "prev_hash", "gap", "message"),
    [
        (1, None, None, "prev_hash: is null exactly when seq is 0"),
        (0, "a" * 64, None, "prev_hash: is null exactly when seq is 0"),
        (2**53, "a" * 64, None, "seq: must be a whole number from 0 to 2^53 - 1"),
        (0, None, batches.Gap(EPOCH, EPOCH, "full"), "gap.to: must be after gap.from"),
    ],
)
def test_the_fast_signer_still_refuses_a_bad_header(
    seq: int, prev_hash: str | None, gap: batches.Gap | None, message: str
) -> None:
    with pytest.raises(errors.EvidenceError) as caught:
        batches.sign_batch_and_hash(
            key=KEY, node=NODE, seq=seq, prev_hash=prev_hash, records=[], gap=gap
        )
    assert str(caught.value) == message


def test_the_signed_bytes_are_cut_from_the_canonical_form_exactly() -> None:
    document = batches.sign_batch(
        key=KEY, node=NODE, seq=0, prev_hash=None, records=[record(0), record(1)]
    )
    batch = batches.parse_batch(document)
    unsigned = {name: value for name, value in document.items() if name != "signature"}
    assert batch.canonical == canonical.canonical_json(document)
    assert batches._unsigned_canonical(batch) == canonical.canonical_json(unsigned)


def test_a_signature_needing_escapes_is_checked_on_fresh_bytes_and_refused() -> None:
    document = batches.sign_batch(key=KEY, node=NODE, seq=0, prev_hash=None, records=[record(0)])
    forged = {**document, "signature": 'a"b\\\\c'}
    with pytest.raises(errors.SignatureError):
        batches.verify_batch(forged, KEY.public_key)


# -- records: the batch's own check against evidence.meter_record_from_json -----------------

INSTANTS = [timefmt.format_utc(EPOCH + offset) for offset in (0, 10, 20)]
record_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-5, max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.sampled_from([*INSTANTS, "2026-03-03T09:00:00.5Z", "2026-03-03T09:00:00", GPU_A, NODE]),
    st.lists(st.integers(), max_size=2),
)
record_fields = st.sampled_from(
    ["gpu_uuid", "t0", "t1", "healthy", "utilization_gpu_pct", "energy_mj", "node", "xids"]
)


@st.composite
def raw_records(draw: st.DrawFn) -> object:
    """A meter record as it may arrive: mostly well formed, every field possibly odd."""
    if draw(st.integers(min_value=0, max_value=20)) == 0:
        return draw(record_values)
    raw: dict[str, Any] = {
        "gpu_uuid": GPU_A,
        "t0": INSTANTS[0],
        "t1": INSTANTS[1],
        "healthy": True,
        "utilization_gpu_pct": 50,
        "energy_mj": 1_000,
    }
    for name in draw(st.lists(record_fields, max_size=3)):
        if draw(st.booleans()):
            raw[name] = draw(record_values)
        else:
            raw.pop(name, None)
    return raw


def _verdict(check: Any) -> tuple[str, Any]:
    try:
        return ("ok", check())
    except errors.InputError as exc:
        return (type(exc).__name__, (exc.field, exc.reason))


@settings(max_examples=400)
@given(st.lists(raw_records(), min_size=1, max_size=3))
def test_records_are_checked_exactly_as_meter_record_from_json_checks_them(
    raws: list[object],
) -> None:
    document = second_batch()
    document["records"] = raws
    expected = []
    for index, raw in enumerate(raws):
        verdict = _verdict(lambda raw=raw: evidence.meter_record_from_json(raw, node=NODE))
        if verdict[0] != "ok":
            field, reason = verdict[1]
            where = f"records[{index}]" + (f".{field}" if field else "")
            expected_error = ("EvidenceError", (where, reason))
            break
        expected.append(verdict[1])
    else:
        expected_error = None

    outcome = _verdict(lambda: batches.parse_batch(document).records)

    if expected_error is not None:
        assert outcome == expected_error
    elif outcome[0] == "ok":
        assert outcome == ("ok", tuple(expected))
    else:  # the records pass, the batch as a whole cannot be canonicalised (NaN, say)
        assert outcome[1][0] == "records"
        assert outcome[1][1].startswith("cannot be canonicalised as JSON")


# -- the usual batch, decoded typed --------------------------------------------------------


def usual(document: object) -> batches.UsualBatch:
    """`document` as the API decodes a batch in the agent's usual shape."""
    return msgspec.json.decode(orjson.dumps(document), type=batches.UsualBatch)


def agent_like_record(interval: int, gpu: str = GPU_A) -> dict[str, Any]:
    """A record with every field the agent writes (metering.records)."""
    return {
        "gpu_uuid": gpu,
        "t0": timefmt.format_utc(EPOCH + interval * 10),
        "t1": timefmt.format_utc(EPOCH + interval * 10 + 10),
        "healthy": False,
        "reasons": ["critical XID 79 since the last reset"],
        "xids": [79],
        "utilization_gpu_pct": 97,
        "utilization_memory_pct": 60,
        "memory_used_bytes": 2**36,
        "power_mw": 650_000,
        "energy_mj": 650_000,
        "temperature_c": 64,
        "ecc_corrected": 2,
        "ecc_uncorrected": 0,
        "remapped_rows": 0,
        "pods": ["team-a/trainer-0"],
    }


def agent_like_batch(**header: Any) -> dict[str, Any]:
    return batches.sign_batch(
        key=KEY,
        node=NODE,
        seq=header.get("seq", 1),
        prev_hash=header.get("prev_hash", batches.batch_hash(CHAIN[0])),
        records=[agent_like_record(1), {**agent_like_record(1, GPU_B), "node": NODE}],
        gap=header.get("gap"),
    )


def test_a_usual_batch_parses_to_exactly_what_its_plain_json_parses_to() -> None:
    document = agent_like_batch()
    batch = batches.verify_batch(usual(document), KEY.public_key)
    assert batch == batches.verify_batch(document, KEY.public_key)
    assert batch.canonical == canonical.canonical_json(document)
    assert batch.document == document
    assert batch.record_values[1] == (GPU_B, EPOCH + 10, EPOCH + 20, False, 97, 650_000)


def test_a_usual_gap_marker_parses_as_its_plain_json_does() -> None:
    gap = batches.Gap(EPOCH, EPOCH + 600, "spool full")
    document = agent_like_batch(gap=gap)
    batch = batches.verify_batch(usual(document), KEY.public_key)
    assert batch == batches.verify_batch(document, KEY.public_key)
    assert batch.gap == gap


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda d: d["records"][0].update(utilization_gpu_pct=97.5), "a float"),
        (lambda d: d["records"][0].update(firmware="1.2"), "a record field it does not know"),
        (lambda d: d.update(extra=1), "a batch field it does not know"),
        (lambda d: d["records"][0].update(power_mw=2**53), "an integer RFC 8785 cannot hold"),
        (lambda d: d["records"][0].pop("healthy"), "a required field missing"),
        (lambda d: d["records"][0].update(xids="79"), "a field of another type"),
    ],
)
def test_a_batch_not_in_the_usual_shape_does_not_decode_as_one(change: Any, why: str) -> None:
    document = agent_like_batch()
    change(document)
    with pytest.raises(msgspec.ValidationError):
        usual(document)


# Edits that keep a batch in the usual shape but may break one of parse_batch's checks.
_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=6
) | st.sampled_from(["", "gpu-node-7", GPU_A, "2026-03-03T00:00:10Z", "\x00", '"\\', "\u2028"])
_INSTANT = st.sampled_from(
    [
        "2026-03-03T00:00:10Z",
        "2026-03-03T00:00:20Z",
        "2026-03-03T00:00:20+00:00",
        "2026-03-03t00:00:20z",
        "2026-03-03T01:00:20+01:00",
        "2026-03-03T00:00:20",
        "2026-03-03 00:00:20Z",
        "yesterday",
    ]
)
_INT = st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1) | st.sampled_from([0, 100, 101])


@st.composite
def usual_edits(draw: st.DrawFn) -> dict[str, Any]:
    document = agent_like_batch()
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        where = draw(st.sampled_from(["header", "record", "drop"]))
        if where == "header":
            name = draw(st.sampled_from(["format", "node", "key_id", "prev_hash", "seq"]))
            document[name] = draw(
                _INT.filter(lambda n: n >= 0)
                if name == "seq"
                else _TEXT | st.none()
                if name == "prev_hash"
                else _TEXT
            )
        else:
            record = draw(st.sampled_from(document["records"]))
            name = draw(st.sampled_from([*sorted(agent_like_record(0)), "node"]))
            if where == "drop":
                record.pop(name, None)
            elif name in ("t0", "t1"):
                record[name] = draw(_INSTANT)
            elif name == "healthy":
                record[name] = draw(st.booleans())
            elif name in ("xids", "reasons", "pods"):
                record[name] = draw(st.lists(_INT if name == "xids" else _TEXT, max_size=2))
            elif name in ("gpu_uuid", "node"):
                record[name] = draw(_TEXT)
            else:
                record[name] = draw(_INT | st.none())
    if draw(st.booleans()):  # signed as edited, so the verdict is the checks', not "forged"
        unsigned = {name: value for name, value in document.items() if name != "signature"}
        document["signature"] = KEY.sign(canonical.canonical_json(unsigned))
    return document


@settings(max_examples=400)
@given(usual_edits())
def test_a_usual_batch_gets_the_verdict_its_plain_json_gets(document: dict[str, Any]) -> None:
    try:
        typed = usual(document)
    except msgspec.ValidationError:
        return  # the plain path alone takes it

    def verdict(candidate: object) -> tuple[str, Any]:
        try:
            return ("ok", batches.verify_batch(candidate, KEY.public_key))
        except errors.GpuDeliveryError as exc:
            return (type(exc).__name__, str(exc))

    assert verdict(typed) == verdict(document)
