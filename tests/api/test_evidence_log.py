"""The evidence log (api.evidence_log): signed tree heads, inclusion and consistency proofs
that verify offline with gpudelivery.merkle, as docs/evidence-log.md says."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session

from gpudelivery import canonical, merkle, signing
from gpudelivery import errors as core_errors
from gpudelivery.api import errors, evidence_log, ingest
from gpudelivery.api.models import TreeHead

from utils import meters

NOW = meters.EPOCH + 3600
PROVIDER = signing.generate()
DOCS = Path(__file__).parents[2] / "docs"


def _fill(session: Session, count_per_node: int) -> list[bytes]:
    """Two nodes' chains ingested interleaved; the canonical bytes of the leaves in order."""
    keys = {node: signing.generate() for node in ("gpu-node-07", "gpu-node-08")}
    for node, key in keys.items():
        meters.register(session, key, node)
    chains = [meters.chain(key, node, count_per_node) for node, key in keys.items()]
    documents = [document for pair in zip(*chains, strict=True) for document in pair]
    results = ingest.ingest(session, documents=documents, now_s=NOW)
    session.commit()
    assert {result.status for result in results} == {"accepted"}
    return [canonical.canonical_json(document) for document in documents]


def _head(session: Session, now_s: int = NOW) -> TreeHead:
    head = evidence_log.tree_head(session, key=PROVIDER, now_s=now_s)
    session.commit()
    return head


def test_the_head_of_an_empty_log_is_the_hash_of_nothing(session: Session) -> None:
    head = _head(session)

    assert (head.size, head.root_hash, head.timestamp_s, head.key_id) == (
        0,
        hashlib.sha256(b"").hexdigest(),
        NOW,
        PROVIDER.key_id,
    )
    evidence_log.verify_tree_head(head, PROVIDER.public_key)


def test_the_head_names_the_root_of_every_batch_and_is_signed(session: Session) -> None:
    leaves = _fill(session, 3)

    head = _head(session)

    assert (head.size, head.root_hash) == (6, merkle.root_of(leaves)[1].hex())
    statement = canonical.canonical_json(
        {
            "format": "gpudelivery.tree-head/v1",
            "size": 6,
            "root_hash": head.root_hash,
            "timestamp": "2026-03-03T10:00:00Z",
        }
    )
    signing.verify(PROVIDER.public_key, statement, head.signature)
    assert evidence_log.statement(size=6, root_hash=head.root_hash, timestamp_s=NOW) == statement


def test_a_head_that_was_tampered_with_does_not_verify(session: Session) -> None:
    _fill(session, 1)
    head = _head(session)
    head.size = 3

    with pytest.raises(core_errors.SignatureError):
        evidence_log.verify_tree_head(head, PROVIDER.public_key)


def test_the_head_is_kept_while_the_log_does_not_grow(session: Session, engine: Engine) -> None:
    _fill(session, 1)
    first = _head(session)

    again = _head(session, NOW + 60)

    assert (again.size, again.timestamp_s, again.signature) == (
        first.size,
        NOW,
        first.signature,
    )
    assert meters.count(engine, TreeHead) == 1


def test_a_new_head_is_signed_when_the_log_grows(session: Session, engine: Engine) -> None:
    _fill(session, 1)
    _head(session)
    _fill(session, 1)

    grown = _head(session, NOW + 60)

    assert (grown.size, grown.timestamp_s) == (4, NOW + 60)
    evidence_log.verify_tree_head(grown, PROVIDER.public_key)
    assert meters.count(engine, TreeHead) == 2


def test_a_head_signed_by_a_replaced_key_is_signed_again(session: Session) -> None:
    _fill(session, 1)
    _head(session)
    new_provider = signing.generate()

    head = evidence_log.tree_head(session, key=new_provider, now_s=NOW + 60)
    session.commit()

    assert (head.size, head.key_id, head.timestamp_s) == (2, new_provider.key_id, NOW + 60)
    evidence_log.verify_tree_head(head, new_provider.public_key)


def test_every_leaf_has_an_inclusion_proof_that_verifies(session: Session) -> None:
    leaves = _fill(session, 4)
    head = _head(session)

    for index, leaf in enumerate(leaves):
        proof = evidence_log.inclusion(session, leaf_index=index, size=head.size)
        assert (proof.leaf_index, proof.tree_size) == (index, 8)
        assert proof.leaf_hash == merkle.leaf_hash(leaf).hex()
        assert merkle.verify_inclusion(
            merkle.leaf_hash(leaf),
            index,
            head.size,
            [bytes.fromhex(node) for node in proof.hashes],
            bytes.fromhex(head.root_hash),
        )


def test_an_inclusion_proof_in_an_older_head_verifies_against_it(session: Session) -> None:
    leaves = _fill(session, 2)
    old_head = _head(session)
    _fill(session, 3)

    proof = evidence_log.inclusion(session, leaf_index=1, size=old_head.size)

    assert merkle.verify_inclusion(
        merkle.leaf_hash(leaves[1]),
        1,
        4,
        [bytes.fromhex(node) for node in proof.hashes],
        bytes.fromhex(old_head.root_hash),
    )


def test_a_later_head_is_proved_consistent_with_an_earlier_one(session: Session) -> None:
    _fill(session, 2)
    old_head = _head(session)
    _fill(session, 3)
    new_head = _head(session, NOW + 60)

    proof = evidence_log.consistency(session, old_size=old_head.size, new_size=new_head.size)

    assert (proof.old_size, proof.new_size) == (4, 10)
    assert merkle.verify_consistency(
        4,
        10,
        [bytes.fromhex(node) for node in proof.hashes],
        bytes.fromhex(old_head.root_hash),
        bytes.fromhex(new_head.root_hash),
    )


def test_consistency_proofs_verify_between_every_pair_of_sizes(session: Session) -> None:
    leaves = _fill(session, 3)
    roots = [merkle.MerkleTree.from_leaves(leaves[:size]).root() for size in range(7)]

    for new_size in range(7):
        for old_size in range(new_size + 1):
            proof = evidence_log.consistency(session, old_size=old_size, new_size=new_size)
            assert merkle.verify_consistency(
                old_size,
                new_size,
                [bytes.fromhex(node) for node in proof.hashes],
                roots[old_size],
                roots[new_size],
            ), (old_size, new_size)


def test_proofs_beyond_the_log_are_not_found(session: Session) -> None:
    _fill(session, 1)

    with pytest.raises(errors.NotFoundError, match=r"^the evidence log has no leaf 2$"):
        evidence_log.inclusion(session, leaf_index=2, size=2)
    with pytest.raises(errors.NotFoundError, match=r"^the evidence log has no leaf -1$"):
        evidence_log.inclusion(session, leaf_index=-1, size=2)
    with pytest.raises(errors.NotFoundError, match=r"^the evidence log has 2 leaves, not 3$"):
        evidence_log.inclusion(session, leaf_index=1, size=3)
    with pytest.raises(errors.NotFoundError, match=r"^the evidence log has 2 leaves, not 5$"):
        evidence_log.consistency(session, old_size=1, new_size=5)


def test_proofs_of_impossible_trees_are_unprocessable(session: Session) -> None:
    _fill(session, 1)

    with pytest.raises(errors.UnprocessableError, match=r"^leaf 1 is not in a tree of size 1$"):
        evidence_log.inclusion(session, leaf_index=1, size=1)
    with pytest.raises(
        errors.UnprocessableError,
        match=r"^a consistency proof needs 0 <= from <= to, not from 2 to 1$",
    ):
        evidence_log.consistency(session, old_size=2, new_size=1)


def test_the_documented_example_holds() -> None:
    batch_page = (DOCS / "meter-batch.md").read_text(encoding="utf-8")
    log_page = (DOCS / "evidence-log.md").read_text(encoding="utf-8")
    leaves = [
        canonical.canonical_json(json.loads(block))
        for block in re.findall(r"```json\n(.*?)```", batch_page, re.DOTALL)
    ]
    tree = merkle.MerkleTree.from_leaves(leaves)
    leaf_1 = merkle.leaf_hash(leaves[1]).hex()

    table = dict(re.findall(r"^\| (leaf \d|root of size \d)[^|]*\| `([0-9a-f]{64})` \|$",
                            log_page, re.MULTILINE))  # fmt: skip
    assert table == {
        "leaf 0": merkle.leaf_hash(leaves[0]).hex(),
        "leaf 1": leaf_1,
        "root of size 1": tree.root(1).hex(),
        "root of size 2": tree.root(2).hex(),
    }
    assert [node.hex() for node in tree.inclusion_proof(0, 2)] == [leaf_1]
    assert [node.hex() for node in tree.consistency_proof(1, 2)] == [leaf_1]
    statement = evidence_log.statement(
        size=2, root_hash=tree.root().hex(), timestamp_s=meters.EPOCH + 120
    )
    assert f"\n{statement.decode()}\n" in log_page
    assert f'"hashes": ["{leaf_1}"]' in log_page
