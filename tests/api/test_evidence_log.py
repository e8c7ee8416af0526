"""The evidence log (api.evidence_log): signed tree heads, inclusion and consistency proofs
that verify offline with gpudelivery.merkle, as docs/evidence-log.md says; built from stored
subtree roots, so that each reads a few blocks of leaves whatever the log's size."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Result, Select, delete, event, insert
from sqlalchemy.engine import Engine
from sqlalchemy.orm import ORMExecuteState
from sqlmodel import Session, col, select

from gpudelivery import canonical, merkle, signing
from gpudelivery import errors as core_errors
from gpudelivery.api import errors, evidence_log, ingest
from gpudelivery.api.models import MerkleNode, MeterBatch, TreeHead

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


# -- stored subtrees: heads and proofs read O(log n) rows ---------------------------------------


def _bulk_fill(session: Session, count: int, *, start: int = 0) -> list[bytes]:
    """Leaves `start` .. `start + count - 1`, inserted as rows of one registered key without
    going through ingest (the evidence log reads only indexes and leaf hashes); their
    hashes, committed."""
    key = signing.generate()
    meters.register(session, key, "gpu-node-09")
    hashes = [merkle.leaf_hash(f"leaf-{index}".encode()) for index in range(start, start + count)]
    session.execute(
        insert(MeterBatch),
        [
            {
                "key_id": key.key_id,
                "seq": index,
                "node": "gpu-node-09",
                "hash": hashed.hex(),
                "leaf_index": index,
                "leaf_hash": hashed.hex(),
                "document": b"{}",
                "received_at": NOW,
            }
            for index, hashed in enumerate(hashes, start)
        ],
    )
    session.commit()
    return hashes


@dataclass
class RowsRead:
    """Rows the selects of a session returned, by what they read."""

    leaves: int = 0
    nodes: int = 0


@contextlib.contextmanager
def _rows_read(session: Session) -> Iterator[RowsRead]:
    """Count the leaf hashes and stored node hashes `session` reads while open."""
    read = RowsRead()

    def count(state: ORMExecuteState) -> Result[Any] | None:
        if not isinstance(state.statement, Select):
            return None
        frozen = state.invoke_statement().freeze()
        rows = len(frozen().all())
        columns = {column.name for column in state.statement.selected_columns}
        read.leaves += rows if "leaf_hash" in columns else 0
        read.nodes += rows if {"level", "hash"} <= columns else 0
        return frozen()

    event.listen(session, "do_orm_execute", count)
    try:
        yield read
    finally:
        event.remove(session, "do_orm_execute", count)


def _stored_nodes(engine: Engine) -> dict[tuple[int, int], str]:
    with Session(engine) as session:
        return {(node.level, node.index): node.hash for node in session.exec(select(MerkleNode))}


LOG_SIZE = 2500
LOG_HASHES = [merkle.leaf_hash(f"leaf-{index}".encode()) for index in range(LOG_SIZE)]
LOG_TREE = merkle.MerkleTree(LOG_HASHES)
# (stored level, blocks per extension step, whether stored nodes are lost, earlier size,
# size), a leaf index, an old size.
CASES = st.tuples(
    st.sampled_from([2, 3]),
    st.sampled_from([4, 64]),
    st.booleans(),
    st.integers(min_value=0, max_value=LOG_SIZE),
    st.integers(min_value=1, max_value=LOG_SIZE),
).flatmap(
    lambda case: st.tuples(
        st.just(case),
        st.integers(min_value=0, max_value=case[4] - 1),
        st.integers(min_value=0, max_value=case[4]),
    )
)


@settings(max_examples=50, suppress_health_check=list(HealthCheck))
@given(case=CASES)
def test_roots_and_proofs_from_stored_subtrees_equal_the_whole_tree(
    session: Session,
    monkeypatch: pytest.MonkeyPatch,
    case: tuple[tuple[int, int, bool, int, int], int, int],
) -> None:
    """Whatever the stored level and step, however far nodes were stored before (`earlier`)
    and even with a third of them lost, every proof equals the in-memory tree's and
    verifies; so does the head of a log cut to `size`."""
    (stored_level, step_blocks, lost, earlier, size), leaf_index, old_size = case
    if evidence_log.log_size(session) == 0:
        _bulk_fill(session, LOG_SIZE)
    hashes, tree = LOG_HASHES, LOG_TREE
    monkeypatch.setattr(evidence_log, "STORED_LEVEL", stored_level)
    monkeypatch.setattr(evidence_log, "_EXTEND_BLOCKS", step_blocks)
    try:
        if earlier:
            evidence_log.inclusion(session, leaf_index=0, size=earlier)
        if lost:
            session.execute(delete(MerkleNode).where(col(MerkleNode.index) % 3 == 1))

        included = evidence_log.inclusion(session, leaf_index=leaf_index, size=size)
        consistent = evidence_log.consistency(session, old_size=old_size, new_size=size)
        session.execute(delete(MeterBatch).where(col(MeterBatch.leaf_index) >= size))
        head = evidence_log.tree_head(session, key=PROVIDER, now_s=NOW)

        path = [bytes.fromhex(node) for node in included.hashes]
        proof = [bytes.fromhex(node) for node in consistent.hashes]
        assert (head.size, head.root_hash) == (size, tree.root(size).hex())
        assert included.leaf_hash == hashes[leaf_index].hex()
        assert path == tree.inclusion_proof(leaf_index, size)
        assert proof == tree.consistency_proof(old_size, size)
        assert merkle.verify_inclusion(hashes[leaf_index], leaf_index, size, path, tree.root(size))
        assert merkle.verify_consistency(
            old_size, size, proof, tree.root(old_size), tree.root(size)
        )
    finally:
        session.rollback()


def test_stored_nodes_are_the_complete_subtrees_of_the_log_and_never_change(
    session: Session, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(evidence_log, "STORED_LEVEL", 2)
    hashes = _bulk_fill(session, 1000)
    expected = {
        (level, index): merkle.MerkleTree(hashes[index << level : (index + 1) << level])
        .root()
        .hex()
        for level in range(2, 10)
        for index in range(1000 >> level)
    }

    _head(session)
    first = _stored_nodes(engine)
    _head(session, NOW + 60)
    for leaf_index in range(0, 1000, 7):
        evidence_log.inclusion(session, leaf_index=leaf_index, size=1000)
        evidence_log.consistency(session, old_size=leaf_index + 1, new_size=1000)
    session.commit()
    with Session(engine) as other:
        evidence_log.tree_head(other, key=signing.generate(), now_s=NOW + 120)
        other.commit()

    assert first == expected
    assert _stored_nodes(engine) == expected


def test_a_grown_log_stores_only_the_subtrees_its_new_leaves_complete(
    session: Session, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(evidence_log, "STORED_LEVEL", 2)
    _bulk_fill(session, 10)
    _head(session)
    before = set(_stored_nodes(engine))
    _bulk_fill(session, 7, start=10)

    _head(session, NOW + 60)

    assert before == {(2, 0), (2, 1), (3, 0)}
    assert set(_stored_nodes(engine)) - before == {(2, 2), (2, 3), (3, 1), (4, 0)}


def test_two_sessions_storing_the_same_nodes_at_once_both_succeed(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second session computes the nodes the first has stored but not yet committed;
    its inserts skip them (PostgreSQL waits for the first to commit, SQLite for its lock)."""
    monkeypatch.setattr(evidence_log, "STORED_LEVEL", 2)
    with Session(engine) as session:
        _bulk_fill(session, 300)
    second_inserts = threading.Event()

    def second_head() -> tuple[int, str, str]:
        def before_insert(_connection: Any, _cursor: Any, statement: str, *_: Any) -> None:
            if statement.startswith("INSERT INTO merkle_nodes"):
                second_inserts.set()

        with Session(engine) as session:
            event.listen(session.connection(), "before_cursor_execute", before_insert)
            head = evidence_log.tree_head(session, key=PROVIDER, now_s=NOW + 60)
            session.commit()
            return head.size, head.root_hash, head.signature

    with Session(engine) as first, ThreadPoolExecutor(max_workers=1) as pool:
        head = evidence_log.tree_head(first, key=PROVIDER, now_s=NOW)
        expected = (head.size, head.root_hash, head.signature)
        second = pool.submit(second_head)
        assert second_inserts.wait(timeout=30)
        first.commit()
        assert second.result(timeout=30) == expected

    assert len(_stored_nodes(engine)) == 75 + 37 + 18 + 9 + 4 + 2 + 1
    assert meters.count(engine, TreeHead) == 1


def test_a_first_head_reads_each_leaf_once_in_bounded_steps(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(evidence_log, "_EXTEND_BLOCKS", 4)
    _bulk_fill(session, 5000)

    with _rows_read(session) as read:
        head = _head(session)

    assert head.size == 5000
    assert read.leaves == 5000  # 19 blocks of 256 stored, the last 136 leaves for the root


def test_heads_and_proofs_of_a_large_log_read_a_few_blocks_of_leaves(session: Session) -> None:
    _bulk_fill(session, 5000)
    _head(session)
    _bulk_fill(session, 300, start=5000)

    with _rows_read(session) as grown:
        _head(session, NOW + 60)
    with _rows_read(session) as first_leaf:
        evidence_log.inclusion(session, leaf_index=0, size=5000)
    with _rows_read(session) as last_leaf:
        evidence_log.inclusion(session, leaf_index=4999, size=5000)
    reads: list[RowsRead] = []
    for leaf_index in range(0, 5300, 53):
        for size in {leaf_index + 1, max(leaf_index + 1, 4321), 5300}:
            with _rows_read(session) as read:
                evidence_log.inclusion(session, leaf_index=leaf_index, size=size)
            reads.append(read)
            with _rows_read(session) as read:
                evidence_log.consistency(session, old_size=leaf_index + 1, new_size=size)
            reads.append(read)

    # The new leaves completed block 19 (leaves 4864..5119), read once and stored with its
    # 2 new ancestors, found beside 3 stored subtrees; the root read the last 180 leaves
    # and its 2 stored subtrees (4096 and 1024 leaves).
    assert (grown.leaves, grown.nodes) == (256 + 180, 3 + 2)
    # Leaf 0's block and the last 136 leaves; the subtrees of 256, 512, 1024 and 2048
    # leaves beside the path to leaf 0, and of 512 and 256 leaves after leaf 4096.
    assert (first_leaf.leaves, first_leaf.nodes) == (256 + 136, 6)
    # The last 136 leaves; the subtrees of 4096, 512 and 256 leaves left of them.
    assert (last_leaf.leaves, last_leaf.nodes) == (136, 3)
    assert max(read.leaves for read in reads) <= 2 * 256
    assert max(read.nodes for read in reads) <= 2 * 13


def test_a_missing_leaf_is_reported_not_hashed_over(session: Session) -> None:
    _bulk_fill(session, 600)
    session.execute(delete(MeterBatch).where(col(MeterBatch.leaf_index) == 300))
    session.commit()

    with pytest.raises(evidence_log.EvidenceLogError, match=r"^leaf 300 is missing from the log$"):
        evidence_log.tree_head(session, key=PROVIDER, now_s=NOW)
