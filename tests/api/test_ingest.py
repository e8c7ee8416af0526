"""Meter ingest (api.ingest) as docs/ingest.md defines it, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from gpudelivery import batches, canonical, merkle, signing
from gpudelivery.api import ingest, ingest_store
from gpudelivery.api.ingest import BatchResult, BatchStatus
from gpudelivery.api.models import Incident, MeterBatch, MeterKey, MeterRecordRow

from utils import meters
from utils.polling import poll

NOW = meters.EPOCH + 3600
NODE = "gpu-node-07"
OTHER_NODE = "gpu-node-08"


def _ingest(session: Session, documents: list[Any]) -> list[tuple[Any, ...]]:
    """(seq, status, expected_seq) per result, committed as the route does."""
    results = ingest.ingest(session, documents=documents, now_s=NOW)
    session.commit()
    return [(result.seq, result.status, result.expected_seq) for result in results]


def _stored(session: Session) -> list[tuple[str, str, int, int]]:
    rows = session.exec(select(MeterBatch).order_by(col(MeterBatch.leaf_index))).all()
    return [(row.node, row.key_id, row.seq, row.leaf_index) for row in rows]


def _incidents(session: Session) -> list[tuple[str, str, str | None, int | None, str, int]]:
    rows = session.exec(select(Incident).order_by(col(Incident.id))).all()
    return [(row.kind, row.node, row.key_id, row.seq, row.detail, row.at_s) for row in rows]


def _key(session: Session, node: str = NODE) -> signing.SigningKey:
    key = signing.generate()
    meters.register(session, key, node)
    return key


def test_a_chain_is_accepted_and_kept_as_its_canonical_bytes(session: Session) -> None:
    key = _key(session)
    documents = meters.chain(key, NODE, 3)

    results = ingest.ingest(session, documents=documents, now_s=NOW)
    session.commit()

    assert results == [
        BatchResult(node=NODE, key_id=key.key_id, seq=seq, status=BatchStatus.ACCEPTED)
        for seq in range(3)
    ]
    rows = session.exec(select(MeterBatch).order_by(col(MeterBatch.seq))).all()
    assert [row.leaf_index for row in rows] == [0, 1, 2]
    for row, document in zip(rows, documents, strict=True):
        assert row.document == canonical.canonical_json(document)
        assert row.hash == batches.batch_hash(document)
        assert row.leaf_hash == merkle.leaf_hash(canonical.canonical_json(document)).hex()
        assert (row.node, row.key_id, row.received_at) == (NODE, key.key_id, NOW)
    assert _incidents(session) == []


def test_a_chain_continues_from_the_stored_head_in_a_later_request(session: Session) -> None:
    key = _key(session)
    documents = meters.chain(key, NODE, 4)
    assert _ingest(session, documents[:2]) == [(0, "accepted", None), (1, "accepted", None)]

    assert _ingest(session, documents[2:]) == [(2, "accepted", None), (3, "accepted", None)]

    assert _stored(session) == [(NODE, key.key_id, seq, seq) for seq in range(4)]


def test_records_are_flattened_into_rows_exactly(session: Session) -> None:
    key = _key(session)
    t0 = meters.EPOCH
    records = [
        meters.record(meters.GPU_A, t0, utilization_gpu_pct=97, energy_mj=6_950_000, pods=[]),
        meters.record(meters.GPU_B, t0, healthy=False, utilization_gpu_pct=12.5, energy_mj=0),
        {"gpu_uuid": "GPU-c", "t0": "2026-03-03T09:00:00Z", "t1": "2026-03-03T09:00:05Z",
         "healthy": True, "node": NODE},
    ]  # fmt: skip
    document = batches.sign_batch(key=key, node=NODE, seq=0, prev_hash=None, records=records)

    assert _ingest(session, [document]) == [(0, "accepted", None)]

    rows = session.exec(select(MeterRecordRow).order_by(col(MeterRecordRow.gpu_uuid))).all()
    assert [
        (
            row.key_id,
            row.seq,
            row.node,
            row.gpu_uuid,
            row.t0_s,
            row.t1_s,
            row.healthy,
            row.utilization_gpu_pct,
            row.energy_mj,
        )
        for row in rows
    ] == [
        (key.key_id, 0, NODE, meters.GPU_A, t0, t0 + 10, True, 97, 6_950_000),
        (key.key_id, 0, NODE, meters.GPU_B, t0, t0 + 10, False, 12.5, 0),  # fractions kept
        (key.key_id, 0, NODE, "GPU-c", t0, t0 + 5, True, None, None),
    ]


def test_a_batch_sent_twice_in_one_request_is_stored_once(session: Session, engine: Engine) -> None:
    key = _key(session)
    first, second = meters.chain(key, NODE, 2)

    assert _ingest(session, [first, second, first, second]) == [
        (0, "accepted", None),
        (1, "accepted", None),
        (0, "duplicate", None),
        (1, "duplicate", None),
    ]
    assert _stored(session) == [(NODE, key.key_id, 0, 0), (NODE, key.key_id, 1, 1)]
    assert meters.count(engine, MeterRecordRow) == 4
    assert _incidents(session) == []


def test_a_batch_sent_again_later_is_a_duplicate(session: Session, engine: Engine) -> None:
    key = _key(session)
    documents = meters.chain(key, NODE, 3)
    _ingest(session, documents)
    # Re-serialised in transit (keys reordered): still the same batch.
    reordered = dict(reversed(list(documents[1].items())))

    assert _ingest(session, [documents[0], reordered, documents[2]]) == [
        (0, "duplicate", None),
        (1, "duplicate", None),
        (2, "duplicate", None),
    ]
    assert meters.count(engine, MeterBatch) == 3
    assert meters.count(engine, MeterRecordRow) == 6


def test_a_batch_beyond_the_head_is_out_of_order_and_blocks_its_node(
    session: Session, engine: Engine
) -> None:
    key, other = _key(session), _key(session, OTHER_NODE)
    documents = meters.chain(key, NODE, 4)
    other_documents = meters.chain(other, OTHER_NODE, 1)

    results = ingest.ingest(
        session,
        documents=[documents[0], documents[2], other_documents[0], documents[3], documents[1]],
        now_s=NOW,
    )
    session.commit()

    assert [(r.node, r.seq, r.status, r.expected_seq) for r in results] == [
        (NODE, 0, "accepted", None),
        (NODE, 2, "out_of_order", 1),
        (OTHER_NODE, 0, "accepted", None),
        (NODE, 3, "out_of_order", 1),
        (NODE, 1, "out_of_order", 1),
    ]
    assert results[1].detail == (
        f"key {key.key_id}: seq 2 is beyond the chain's head + 1; the next seq is 1"
    )
    assert results[3].detail == (
        f"an earlier batch of node {NODE} in this request was out_of_order: a chain is "
        "ingested in order or not at all"
    )
    assert _stored(session) == [(NODE, key.key_id, 0, 0), (OTHER_NODE, other.key_id, 0, 1)]
    assert _incidents(session) == [("chain_gap", NODE, key.key_id, 2, results[1].detail, NOW)]


def test_a_key_whose_first_batch_is_not_seq_0_is_asked_for_seq_0(
    session: Session, engine: Engine
) -> None:
    key = _key(session)
    later = meters.chain(key, NODE, 2, start=5)

    assert _ingest(session, later) == [(5, "out_of_order", 0), (6, "out_of_order", 0)]
    assert meters.count(engine, MeterBatch) == 0
    assert [incident[:4] for incident in _incidents(session)] == [
        ("chain_gap", NODE, key.key_id, 5)
    ]


def test_another_batch_with_a_stored_seq_is_a_fork(session: Session, engine: Engine) -> None:
    key = _key(session)
    documents = meters.chain(key, NODE, 2)
    _ingest(session, documents)
    rewritten = meters.follow(key, documents[0], records=[])

    results = ingest.ingest(session, documents=[rewritten, documents[1]], now_s=NOW)
    session.commit()

    assert [(r.seq, r.status) for r in results] == [(1, "fork"), (1, "out_of_order")]
    assert results[0].detail == (
        f"key {key.key_id}: seq 1 has hash {batches.batch_hash(rewritten)}, but the stored "
        f"batch with that seq has hash {batches.batch_hash(documents[1])}"
    )
    assert results[1].expected_seq == 2
    assert _stored(session) == [(NODE, key.key_id, 0, 0), (NODE, key.key_id, 1, 1)]
    assert meters.count(engine, MeterRecordRow) == 4
    assert _incidents(session) == [("fork", NODE, key.key_id, 1, results[0].detail, NOW)]


def test_a_batch_not_linked_to_the_head_is_a_fork(session: Session, engine: Engine) -> None:
    key = _key(session)
    documents = meters.chain(key, NODE, 2)
    _ingest(session, documents[:1])
    wrong_link = batches.sign_batch(
        key=key, node=NODE, seq=1, prev_hash="0" * 64, records=meters.interval_records(1)
    )

    results = ingest.ingest(session, documents=[wrong_link, documents[1]], now_s=NOW)
    session.commit()

    assert [(r.seq, r.status) for r in results] == [(1, "fork"), (1, "out_of_order")]
    assert results[0].detail == (
        f"key {key.key_id}: seq 1 names prev_hash {'0' * 64}, but the stored seq 0 has "
        f"hash {batches.batch_hash(documents[0])}"
    )
    assert meters.count(engine, MeterBatch) == 1
    assert _incidents(session) == [("fork", NODE, key.key_id, 1, results[0].detail, NOW)]
    # The true batch 1 still continues the chain afterwards.
    assert _ingest(session, documents[1:]) == [(1, "accepted", None)]


def test_batches_of_an_unregistered_key_are_unknown_and_stored_nowhere(
    session: Session, engine: Engine
) -> None:
    stranger = signing.generate()
    documents = meters.chain(stranger, NODE, 2)

    results = ingest.ingest(session, documents=documents, now_s=NOW)
    session.commit()

    assert [(r.seq, r.status, r.detail) for r in results] == [
        (seq, "unknown_key", f"{stranger.key_id} is not a registered, unrevoked key of node {NODE}")
        for seq in (0, 1)
    ]
    assert (meters.count(engine, MeterBatch), meters.count(engine, Incident)) == (0, 0)


def test_a_key_id_no_key_can_have_is_unknown(session: Session, engine: Engine) -> None:
    key = _key(session)
    (document,) = meters.chain(key, NODE, 1)
    impossible = [{**document, "key_id": "ed25519:\x00"}, {**document, "key_id": "x" * 65}]

    results = ingest.ingest(session, documents=impossible, now_s=NOW)
    session.commit()

    assert [r.status for r in results] == ["unknown_key", "unknown_key"]
    assert meters.count(engine, MeterBatch) == 0


def test_a_key_of_another_node_is_unknown_for_this_node(session: Session, engine: Engine) -> None:
    other_nodes_key = _key(session, OTHER_NODE)
    key = _key(session)
    impostor = meters.chain(other_nodes_key, NODE, 1)
    own = meters.chain(key, NODE, 1)

    # unknown_key does not block the node's other chains.
    assert _ingest(session, [impostor[0], own[0]]) == [
        (0, "unknown_key", None),
        (0, "accepted", None),
    ]
    assert _stored(session) == [(NODE, key.key_id, 0, 0)]


def test_a_revoked_key_is_unknown(session: Session, engine: Engine) -> None:
    key = _key(session)
    documents = meters.chain(key, NODE, 2)
    _ingest(session, documents[:1])
    revoked = ingest.revoke_key(session, key_id=key.key_id, now_s=NOW)
    session.commit()

    assert revoked.revoked_at == NOW
    assert _ingest(session, documents) == [(0, "unknown_key", None), (1, "unknown_key", None)]
    assert meters.count(engine, MeterBatch) == 1


def test_a_batch_whose_signature_does_not_verify_is_invalid_and_blocks_its_node(
    session: Session, engine: Engine
) -> None:
    key = _key(session)
    documents = meters.chain(key, NODE, 2)
    forged = {**documents[0], "records": []}

    results = ingest.ingest(session, documents=[forged, documents[0], documents[1]], now_s=NOW)
    session.commit()

    assert [(r.seq, r.status, r.expected_seq) for r in results] == [
        (0, "invalid", None),
        (0, "out_of_order", 0),
        (1, "out_of_order", 0),
    ]
    assert results[0].detail == f"signature does not verify under key {key.key_id}"
    assert (meters.count(engine, MeterBatch), meters.count(engine, Incident)) == (0, 0)


def test_a_malformed_batch_is_invalid_naming_the_field(session: Session, engine: Engine) -> None:
    key = _key(session)
    (document,) = meters.chain(key, NODE, 1)
    bad_record = {**document, "records": [{"gpu_uuid": "GPU-a", "healthy": True}]}

    results = ingest.ingest(
        session, documents=[["not", "a", "batch"], bad_record, document], now_s=NOW
    )
    session.commit()

    assert results == [
        BatchResult(
            node=None,
            key_id=None,
            seq=None,
            status=BatchStatus.INVALID,
            detail="a batch must be a JSON object",
        ),
        BatchResult(
            node=NODE,
            key_id=key.key_id,
            seq=0,
            status=BatchStatus.INVALID,
            detail="records[0].t0: missing",
        ),
        BatchResult(
            node=NODE,
            key_id=key.key_id,
            seq=0,
            status=BatchStatus.OUT_OF_ORDER,
            expected_seq=0,
            detail=f"an earlier batch of node {NODE} in this request was invalid: a chain is "
            "ingested in order or not at all",
        ),
    ]
    assert meters.count(engine, MeterBatch) == 0


def test_a_malformed_batch_of_an_unknown_key_is_invalid(session: Session) -> None:
    stranger = signing.generate()
    (document,) = meters.chain(stranger, NODE, 1)

    results = ingest.ingest(session, documents=[{**document, "seq": "0"}], now_s=NOW)

    assert [(r.seq, r.status, r.detail) for r in results] == [
        (None, "invalid", "seq: must be a whole number from 0 to 2^53 - 1")
    ]


def test_a_gpu_uuid_the_table_cannot_hold_is_invalid(session: Session, engine: Engine) -> None:
    key = _key(session)
    records = [meters.record("GPU-" + "x" * 93, meters.EPOCH)]
    document = batches.sign_batch(key=key, node=NODE, seq=0, prev_hash=None, records=records)

    results = ingest.ingest(session, documents=[document], now_s=NOW)
    session.commit()

    assert [(r.status, r.detail) for r in results] == [
        ("invalid", "records[0].gpu_uuid: must be at most 96 characters, without NUL")
    ]
    assert meters.count(engine, MeterBatch) == 0


def test_a_gap_marker_joins_the_chain_and_is_recorded(session: Session, engine: Engine) -> None:
    key = _key(session)
    (first,) = meters.chain(key, NODE, 1)
    gap = batches.Gap(meters.EPOCH + 10, meters.EPOCH + 70, "spool disk full")
    marker = meters.follow(key, first, records=[], gap=gap)
    after = meters.follow(key, marker)

    assert _ingest(session, [first, marker, after]) == [
        (0, "accepted", None),
        (1, "accepted", None),
        (2, "accepted", None),
    ]
    assert _stored(session) == [(NODE, key.key_id, seq, seq) for seq in range(3)]
    assert meters.count(engine, MeterRecordRow) == 4
    assert _incidents(session) == [
        (
            "meter_gap",
            NODE,
            key.key_id,
            1,
            f"key {key.key_id}: seq 1 says the records of [2026-03-03T09:00:10Z, "
            "2026-03-03T09:01:10Z) are lost: 'spool disk full'",
            NOW,
        )
    ]


def test_leaf_indexes_run_on_across_nodes_and_requests(session: Session) -> None:
    key, other = _key(session), _key(session, OTHER_NODE)
    mine, theirs = meters.chain(key, NODE, 3), meters.chain(other, OTHER_NODE, 3)
    _ingest(session, [mine[0], theirs[0], theirs[1], mine[1]])

    _ingest(session, [theirs[1], theirs[2], mine[2]])

    assert _stored(session) == [
        (NODE, key.key_id, 0, 0),
        (OTHER_NODE, other.key_id, 0, 1),
        (OTHER_NODE, other.key_id, 1, 2),
        (NODE, key.key_id, 1, 3),
        (OTHER_NODE, other.key_id, 2, 4),
        (NODE, key.key_id, 2, 5),
    ]


def _waiting_for_the_ingest_lock(engine: Engine) -> bool:
    with engine.connect() as connection:
        waiting = connection.execute(
            text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
        ).scalar_one()
    return bool(waiting)


def test_concurrent_ingests_take_turns_for_chains_and_leaf_indexes(
    session: Session, engine: Engine
) -> None:
    key = _key(session)
    documents = meters.chain(key, NODE, 4)
    second_results: list[BatchResult] = []
    started = threading.Event()

    def second_request() -> None:
        with Session(engine) as second:
            started.set()
            second_results.extend(ingest.ingest(second, documents=documents, now_s=NOW))
            second.commit()

    with Session(engine) as first:
        ingest.ingest(first, documents=documents[:2], now_s=NOW)
        thread = threading.Thread(target=second_request)
        thread.start()
        poll(started.is_set)
        if engine.dialect.name == "postgresql":
            poll(lambda: _waiting_for_the_ingest_lock(engine))
        first.commit()
    thread.join(timeout=30)

    assert not thread.is_alive()
    assert [(r.seq, r.status) for r in second_results] == [
        (0, "duplicate"),
        (1, "duplicate"),
        (2, "accepted"),
        (3, "accepted"),
    ]
    assert _stored(session) == [(NODE, key.key_id, seq, seq) for seq in range(4)]
    # On PostgreSQL the second request wrote all four batches' records before the lock, then
    # found two of them stored by the first: it was done again, so each record is stored once.
    assert _records_per_batch(session) == dict.fromkeys(range(4), 2)


def _records_per_batch(session: Session) -> dict[int, int]:
    rows = session.exec(select(MeterRecordRow.seq)).all()
    return {seq: rows.count(seq) for seq in set(rows)}


def test_a_new_key_of_a_node_starts_a_new_chain(session: Session) -> None:
    old, new = _key(session), _key(session)
    _ingest(session, meters.chain(old, NODE, 2))

    assert _ingest(session, meters.chain(new, NODE, 1)) == [(0, "accepted", None)]


def test_registering_a_key_again_for_its_node_changes_nothing(session: Session) -> None:
    key = signing.generate()
    pem = signing.public_pem(key.public_key).decode("ascii")
    first, created = ingest.register_key(session, node=NODE, public_key_pem=pem, now_s=NOW)
    session.commit()

    again, created_again = ingest.register_key(
        session, node=NODE, public_key_pem=pem, now_s=NOW + 60
    )

    assert (created, created_again) == (True, False)
    assert (again.key_id, again.node, again.registered_at) == (key.key_id, NODE, NOW)
    assert session.exec(select(MeterKey.key_id)).all() == [first.key_id]


def test_one_request_of_many_nodes_reads_each_table_once_and_judges_every_chain(
    session: Session, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    nodes = [f"gpu-node-{number:02d}" for number in range(8)]
    keys = {node: _key(session, node) for node in nodes}
    chains = {node: meters.chain(keys[node], node, 4) for node in nodes}
    # Nodes 4 to 7 already hold batches 0 and 1.
    _ingest(session, [document for node in nodes[4:] for document in chains[node][:2]])
    stranger = signing.generate()
    forked = meters.follow(keys[nodes[6]], chains[nodes[6]][0], records=[])
    reads: list[tuple[str, Any]] = []
    for name in ("load_keys", "lock_and_read_chains"):
        real = getattr(ingest_store, name)

        def spy(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            reads.append((_name, sorted(kwargs.get("key_ids", args[-1]))))
            return _real(*args, **kwargs)

        monkeypatch.setattr(ingest_store, name, spy)
    documents = [
        *chains[nodes[0]][:3],  # a new chain
        chains[nodes[1]][0],
        chains[nodes[2]][1],  # a new chain must start at 0
        chains[nodes[3]][0],
        chains[nodes[1]][1],  # nodes take turns in the request
        chains[nodes[4]][1],  # sent again
        chains[nodes[4]][2],  # continues the stored chain
        chains[nodes[5]][3],  # beyond the stored head
        chains[nodes[5]][2],  # blocked by the batch before
        forked,  # another batch for a stored seq
        chains[nodes[7]][2],
        meters.chain(stranger, nodes[7], 1)[0],  # not this node's key
        chains[nodes[7]][3],
    ]

    results = ingest.ingest(session, documents=documents, now_s=NOW)
    session.commit()

    assert [(r.node, r.seq, r.status, r.expected_seq) for r in results] == [
        (nodes[0], 0, "accepted", None),
        (nodes[0], 1, "accepted", None),
        (nodes[0], 2, "accepted", None),
        (nodes[1], 0, "accepted", None),
        (nodes[2], 1, "out_of_order", 0),
        (nodes[3], 0, "accepted", None),
        (nodes[1], 1, "accepted", None),
        (nodes[4], 1, "duplicate", None),
        (nodes[4], 2, "accepted", None),
        (nodes[5], 3, "out_of_order", 2),
        (nodes[5], 2, "out_of_order", 2),
        (nodes[6], 1, "fork", None),
        (nodes[7], 2, "accepted", None),
        (nodes[7], 0, "unknown_key", None),
        (nodes[7], 3, "accepted", None),
    ]
    named = sorted({keys[node].key_id for node in nodes} | {stranger.key_id})
    registered = sorted(keys[node].key_id for node in nodes)
    assert reads == [("load_keys", named), ("lock_and_read_chains", registered)]
    assert _stored(session)[8:] == [
        (nodes[0], keys[nodes[0]].key_id, 0, 8),
        (nodes[0], keys[nodes[0]].key_id, 1, 9),
        (nodes[0], keys[nodes[0]].key_id, 2, 10),
        (nodes[1], keys[nodes[1]].key_id, 0, 11),
        (nodes[3], keys[nodes[3]].key_id, 0, 12),
        (nodes[1], keys[nodes[1]].key_id, 1, 13),
        (nodes[4], keys[nodes[4]].key_id, 2, 14),
        (nodes[7], keys[nodes[7]].key_id, 2, 15),
        (nodes[7], keys[nodes[7]].key_id, 3, 16),
    ]
    assert [incident[:4] for incident in _incidents(session)] == [
        ("chain_gap", nodes[2], keys[nodes[2]].key_id, 1),
        ("chain_gap", nodes[5], keys[nodes[5]].key_id, 3),
        ("fork", nodes[6], keys[nodes[6]].key_id, 1),
    ]
    assert meters.count(engine, MeterRecordRow) == 17 * 2


def test_stored_documents_are_their_canonical_bytes_compressed_with_lz4_on_postgresql(
    session: Session, engine: Engine
) -> None:
    key = _key(session)
    records = [meters.record(f"GPU-{gpu:04d}", meters.EPOCH, pods=[]) for gpu in range(64)]
    document = batches.sign_batch(key=key, node=NODE, seq=0, prev_hash=None, records=records)

    assert _ingest(session, [document]) == [(0, "accepted", None)]

    stored = session.exec(select(MeterBatch.document)).one()
    assert stored == canonical.canonical_json(document)
    assert len(stored) > 8_000  # large enough to be compressed
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            offered = connection.execute(
                text("SELECT enumvals FROM pg_settings WHERE name = 'default_toast_compression'")
            ).scalar_one()
            method = connection.execute(
                text("SELECT pg_column_compression(document) FROM meter_batches")
            ).scalar_one()
        assert method == ("lz4" if "lz4" in offered else "pglz")
