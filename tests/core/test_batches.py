"""Signed, hash-chained meter batches: signing, verification, chains and refusals."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from gpudelivery import batches, errors, signing, timefmt

from utils.factories import EPOCH

KEY = signing.generate()
NODE = "gpu-node-7"


def record(minute: int, *, healthy: bool = True) -> dict[str, Any]:
    return {
        "gpu_uuid": "GPU-aaaa",
        "t0": timefmt.format_utc(EPOCH + minute * 10),
        "t1": timefmt.format_utc(EPOCH + minute * 10 + 10),
        "healthy": healthy,
        "utilization_gpu_pct": 91.5,
        "energy_mj": 7_000_000,
        "xids": [],
    }


def chain(length: int) -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for seq in range(length):
        previous = batches.batch_hash(documents[-1]) if documents else None
        documents.append(
            batches.sign_batch(
                key=KEY, node=NODE, seq=seq, prev_hash=previous, records=[record(seq)]
            )
        )
    return documents


def test_signed_batch_verifies_and_survives_a_json_round_trip() -> None:
    document = chain(1)[0]
    again = json.loads(json.dumps(document))
    batch = batches.verify_batch(again, KEY.public_key)
    assert (batch.node, batch.seq, batch.prev_hash, batch.key_id) == (NODE, 0, None, KEY.key_id)
    assert batch.hash == batches.batch_hash(document)
    assert [(r.gpu_uuid, r.t0_s, r.healthy, r.energy_mj) for r in batch.records] == [
        ("GPU-aaaa", EPOCH, True, 7_000_000)
    ]


EDITS = [
    (("node",), "gpu-node-8", errors.SignatureError),
    (("seq",), 1, errors.EvidenceError),  # seq 1 needs a prev_hash
    (("prev_hash",), "0" * 64, errors.EvidenceError),  # seq 0 must not have one
    (("records", 0, "healthy"), False, errors.SignatureError),
    (("records", 0, "t1"), timefmt.format_utc(EPOCH + 11), errors.SignatureError),
    (("records", 0, "xids"), [79], errors.SignatureError),
    (("key_id",), signing.generate().key_id, errors.SignatureError),
    (("signature",), KEY.sign(b"something else"), errors.SignatureError),
]


@pytest.mark.parametrize(("path", "value", "error"), EDITS, ids=[str(e[0]) for e in EDITS])
def test_every_single_field_edit_is_refused(path: tuple[Any, ...], value: Any, error: type) -> None:
    document = copy.deepcopy(chain(1)[0])
    holder = document
    for step in path[:-1]:
        holder = holder[step]
    holder[path[-1]] = value
    with pytest.raises(error):
        batches.verify_batch(document, KEY.public_key)


def test_batch_hash_changes_with_any_field() -> None:
    document = chain(1)[0]
    hashes = {batches.batch_hash(document)}
    for name in ("node", "key_id", "signature"):
        hashes.add(batches.batch_hash({**document, name: document[name] + "x"}))
    hashes.add(batches.batch_hash({**document, "records": []}))
    assert len(hashes) == 5


def test_batch_signed_by_another_key_is_refused_naming_both() -> None:
    other = signing.generate()
    document = batches.sign_batch(key=other, node=NODE, seq=0, prev_hash=None, records=[])
    with pytest.raises(errors.SignatureError) as caught:
        batches.verify_batch(document, KEY.public_key)
    assert str(caught.value) == f"batch names key {other.key_id}, not {KEY.key_id}"


def test_a_five_batch_chain_verifies() -> None:
    verified = batches.verify_chain(chain(5), KEY.public_key)
    assert [batch.seq for batch in verified] == [0, 1, 2, 3, 4]


def test_a_dropped_batch_is_a_gap() -> None:
    documents = chain(5)
    del documents[2]
    with pytest.raises(
        batches.ChainError, match=f"^node {NODE}: seq 3 does not follow seq 1 \\(gap\\)$"
    ):
        batches.verify_chain(documents, KEY.public_key)


def test_reordered_batches_are_refused() -> None:
    documents = chain(5)
    documents[1], documents[2] = documents[2], documents[1]
    with pytest.raises(batches.ChainError, match="seq 2 does not follow seq 0"):
        batches.verify_chain(documents, KEY.public_key)


def test_a_forked_batch_does_not_link() -> None:
    documents = chain(3)
    fork = batches.sign_batch(
        key=KEY, node=NODE, seq=1, prev_hash=batches.batch_hash(documents[0]), records=[record(9)]
    )
    documents[1] = fork
    with pytest.raises(
        batches.ChainError,
        match=f"^node {NODE}: seq 2 does not link to the hash of seq 1 \\(fork\\)$",
    ):
        batches.verify_chain(documents, KEY.public_key)


def test_a_chain_must_start_at_seq_0() -> None:
    with pytest.raises(batches.ChainError, match=f"^node {NODE}: chain starts at seq 1, not 0$"):
        batches.verify_chain(chain(3)[1:], KEY.public_key)


def test_a_replayed_batch_does_not_follow() -> None:
    documents = chain(3)
    with pytest.raises(batches.ChainError, match="seq 1 does not follow seq 2"):
        batches.verify_chain([*documents, documents[1]], KEY.public_key)


def signed(**changes: Any) -> dict[str, Any]:
    document = copy.deepcopy(chain(1)[0])
    document.update(changes)
    return document


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (signed(extra=1), "extra: unknown field"),
        (
            signed(format="gpudelivery.meter-batch/v0"),
            "format: must be 'gpudelivery.meter-batch/v1'",
        ),
        (signed(seq=-1), "seq: must be a whole number >= 0"),
        (signed(seq=True), "seq: must be a whole number >= 0"),
        (signed(prev_hash="0" * 64), "prev_hash: is null exactly when seq is 0"),
        (signed(seq=3, prev_hash=None), "prev_hash: is null exactly when seq is 0"),
        (signed(seq=3, prev_hash="XYZ"), "prev_hash: must be null or a hex SHA-256"),
        (signed(records={}), "records: must be a list"),
        (signed(records=[{**record(0), "t1": record(0)["t0"]}]), "records[0].t1: must be after t0"),
        (
            signed(records=[{**record(0), "node": "elsewhere"}]),
            "records[0].node: must be the batch's node 'gpu-node-7'",
        ),
        (signed(node=""), "node: must be a non-empty string"),
        (signed(signature=None), "signature: must be a base64 string"),
        ([], "a batch must be a JSON object"),
    ],
)
def test_malformed_batches_are_refused_naming_the_field(document: Any, message: str) -> None:
    with pytest.raises(errors.EvidenceError) as caught:
        batches.parse_batch(document)
    assert str(caught.value) == message


def test_gap_marker_signs_and_verifies() -> None:
    gap = batches.Gap(EPOCH, EPOCH + 600, "spool disk full")
    document = batches.sign_batch(key=KEY, node=NODE, seq=0, prev_hash=None, records=[], gap=gap)
    assert document["gap"] == {
        "from": "2026-03-03T00:00:00Z",
        "to": "2026-03-03T00:10:00Z",
        "reason": "spool disk full",
    }
    assert batches.verify_batch(document, KEY.public_key).gap == gap


def test_gap_marker_must_end_after_it_starts() -> None:
    with pytest.raises(errors.EvidenceError, match=r"^gap\.to: must be after gap\.from$"):
        batches.sign_batch(
            key=KEY,
            node=NODE,
            seq=0,
            prev_hash=None,
            records=[],
            gap=batches.Gap(EPOCH, EPOCH, "x"),
        )
