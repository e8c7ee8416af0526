"""Meter ingest: node keys, and the signed batches the metering agents ship (docs/ingest.md).

A batch is stored only when it is signed by a registered, unrevoked key of its node and
continues that key's chain exactly: the next `seq`, linked to the stored head by
`prev_hash`. Anything else is answered per batch (`duplicate`, `out_of_order`, `fork`,
`unknown_key`, `invalid`) and stored nowhere; a chain gap or a fork is also recorded as an
`Incident`, as is a meter's own gap marker. Accepted batches are kept as their canonical
bytes, appended to the evidence log (api.evidence_log) in acceptance order, and their
records flattened into `meter_records` for the settlement's joins.

Signatures are checked first, then leaf indexes and chain heads are read and written
under one lock per database (api.ingest_store, which does the reading and writing), so two
requests never give out the same leaf index or both extend a chain from the same head.
On PostgreSQL the records, most of what a request writes, go in before that lock: the
chains are read without it and judged, the records of the batches that would be accepted
are written, and under the lock the chains are read and judged again. When the verdicts
differ (another request moved one of the chains in between: an agent that sent the same
batches twice at once), the transaction is rolled back and the request done again with
the lock taken first. Nothing here commits: the route commits once per request.

Not here: request-level checks (JSON, batch count, body size) belong to the route;
the evidence log's heads and proofs to api.evidence_log.
"""

from __future__ import annotations

import enum
import functools
import operator
import re
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from cryptography.hazmat.primitives.asymmetric import ed25519
from pydantic import BaseModel, ConfigDict
from sqlalchemy import Connection
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col

from gpudelivery import batches, errors, merkle, signing, timefmt
from gpudelivery.api import errors as api_errors
from gpudelivery.api import ingest_store
from gpudelivery.api.models import MeterKey

__all__ = [
    "INCIDENT_CHAIN_GAP",
    "INCIDENT_FORK",
    "INCIDENT_METER_GAP",
    "MAX_BATCHES_PER_REQUEST",
    "BatchResult",
    "BatchStatus",
    "ingest",
    "record_count",
    "register_key",
    "revoke_key",
]

# docs/ingest.md: one request carries 1 to 100 batches.
MAX_BATCHES_PER_REQUEST = 100
# Incident kinds: a batch beyond its chain's head + 1, a second batch for a seq or a broken
# link, a gap marker the meter signed.
INCIDENT_CHAIN_GAP = "chain_gap"
INCIDENT_FORK = "fork"
INCIDENT_METER_GAP = "meter_gap"
# meter_records.gpu_uuid is VARCHAR(96); NVML UUIDs are 40 characters.
_MAX_GPU_UUID = 96
# meter_keys.key_id is VARCHAR(64); ids are 40 characters (meter-batch.md).
_MAX_KEY_ID = 64
# The gpu_uuid of a batches.RecordValues.
_gpu_uuid = operator.itemgetter(0)
# A Kubernetes node name is a DNS-1123 subdomain.
_NODE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_MAX_NODE_NAME = 253


class BatchStatus(enum.StrEnum):
    """The answer for one batch (docs/ingest.md, Answer)."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    OUT_OF_ORDER = "out_of_order"
    FORK = "fork"
    UNKNOWN_KEY = "unknown_key"
    INVALID = "invalid"


class BatchResult(BaseModel):
    """The result of one batch, in request order; `node`, `key_id` and `seq` echo the
    batch (left out when it has none)."""

    model_config = ConfigDict(frozen=True)

    node: str | None = None
    key_id: str | None = None
    seq: int | None = None
    status: BatchStatus
    expected_seq: int | None = None
    detail: str | None = None


# The statuses after which the rest of a node's batches in the request are out_of_order.
_BLOCKING = frozenset({BatchStatus.OUT_OF_ORDER, BatchStatus.FORK, BatchStatus.INVALID})


@dataclass
class _Ingest:
    """The state of one ingest request: the keys its batches name and its chains as read
    under the lock (api.ingest_store), the heads as it leaves them, the batches it
    accepted, and the rows it will write."""

    now_s: int
    keys: dict[str, ingest_store.NodeKey]
    next_leaf: int = 0
    public_keys: dict[str, ed25519.Ed25519PublicKey] = field(default_factory=dict)
    # Every registered key's head once locked (None: an empty chain), then as accepted.
    heads: dict[str, ingest_store.Head | None] = field(default_factory=dict)
    # The hashes of the stored batches this request sends again, by (key_id, seq).
    stored: dict[tuple[str, int], str] = field(default_factory=dict)
    accepted: dict[tuple[str, int], str] = field(default_factory=dict)
    blocked: dict[str, BatchStatus] = field(default_factory=dict)
    batch_rows: list[tuple[Any, ...]] = field(default_factory=list)
    record_rows: list[tuple[Any, ...]] = field(default_factory=list)
    incident_rows: list[dict[str, Any]] = field(default_factory=list)
    # Signatures checked before the lock (by position in the request): the verdict of
    # verify_batch, a batch or the error it raised.
    verified: dict[int, batches.MeterBatch | errors.GpuDeliveryError] = field(default_factory=dict)


class _ChainsMoved(Exception):
    """Under the lock, the chains judged differently than before it."""


def ingest(session: Session, *, documents: list[Any], now_s: int) -> list[BatchResult]:
    """Verify and store `documents` (batches decoded as JSON or as batches.UsualBatch, in
    request order); one result each.

    The caller commits; ingest must be the first thing in its transaction, which it may
    roll back and do again. Chain order is per node key; the request may mix nodes, and
    however many it holds, each table is read once (twice on PostgreSQL).
    """
    if ingest_store.writes_records_first(session.connection()):
        try:
            return _ingest(session, documents, now_s, records_first=True)
        except _ChainsMoved:
            session.rollback()
    return _ingest(session, documents, now_s, records_first=False)


def _ingest(
    session: Session, documents: list[Any], now_s: int, *, records_first: bool
) -> list[BatchResult]:
    connection = session.connection()
    ingest_store.begin(connection)
    echoes = [_echo(document) for document in documents]
    key_ids = {key_id for _, key_id, _ in echoes if _could_be_registered(key_id)}
    request = _Ingest(now_s=now_s, keys=ingest_store.load_keys(connection, key_ids))
    # What the request sends of each registered key's chain: the stored hashes to read.
    sent = {
        (key_id, seq)
        for _, key_id, seq in echoes
        if key_id in request.keys and seq is not None and 0 <= seq < batches.MAX_SEQ
    }
    expected: list[BatchResult] | None = None
    if records_first:
        expected = _verify_and_write_records(connection, request, documents, echoes, sent)
    else:
        for index, (document, (node, key_id, _)) in enumerate(zip(documents, echoes, strict=True)):
            _preverify(request, index, document, node, key_id)
    # Signatures, the costly part, are checked: on PostgreSQL, the lock is taken only now.
    chains = ingest_store.lock_and_read_chains(connection, key_ids=request.keys, sent=sent)
    state = _judgement(request, chains)
    results = [
        _ingest_one(state, index, document, echo)
        for index, (document, echo) in enumerate(zip(documents, echoes, strict=True))
    ]
    if expected is not None and results != expected:
        raise _ChainsMoved
    ingest_store.write(
        connection,
        batch_rows=state.batch_rows,
        record_rows=() if records_first else state.record_rows,
        incident_rows=state.incident_rows,
    )
    return results


def _verify_and_write_records(
    connection: Connection,
    request: _Ingest,
    documents: list[Any],
    echoes: list[tuple[str | None, str | None, int | None]],
    sent: set[tuple[str, int]],
) -> list[BatchResult]:
    """Check each batch's signature and judge it against the chains as they are before
    the lock, streaming the records of those it would accept to the database as it goes
    (which stores them while the next batches are checked); the results it expects."""
    early = _judgement(
        request, ingest_store.read_chains(connection, key_ids=request.keys, sent=sent)
    )
    expected = []
    with ingest_store.record_writer(connection) as write_records:
        for index, (document, echo) in enumerate(zip(documents, echoes, strict=True)):
            _preverify(request, index, document, echo[0], echo[1])
            expected.append(_ingest_one(early, index, document, echo))
            write_records(early.record_rows)
            early.record_rows.clear()
    return expected


def _judgement(request: _Ingest, chains: ingest_store.Chains) -> _Ingest:
    """A fresh judgement of the request's batches against `chains`: it shares `request`'s
    keys and checked signatures, and collects its own results' rows."""
    return _Ingest(
        now_s=request.now_s,
        keys=request.keys,
        public_keys=request.public_keys,
        verified=request.verified,
        next_leaf=chains.next_leaf,
        heads=dict(chains.heads),
        stored=chains.stored,
    )


def record_count(document: object) -> int:
    """How many records an accepted batch (a document `ingest` took) stored."""
    if isinstance(document, batches.UsualBatch):
        return len(document.records)
    assert isinstance(document, dict)  # accepted, so a batch
    return len(document["records"])


def _echo(document: object) -> tuple[str | None, str | None, int | None]:
    """What a result repeats of a batch: its node, key id and seq, when they have a type."""
    if isinstance(document, batches.UsualBatch):
        return document.node, document.key_id, document.seq
    if not isinstance(document, dict):
        return None, None, None
    node, key_id, seq = document.get("node"), document.get("key_id"), document.get("seq")
    return (
        node if isinstance(node, str) else None,
        key_id if isinstance(key_id, str) else None,
        seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
    )


@dataclass(frozen=True, slots=True)
class _Verdict:
    status: BatchStatus
    detail: str | None = None
    expected_seq: int | None = None


def _preverify(
    state: _Ingest, index: int, document: object, node: str | None, key_id: str | None
) -> None:
    """Check the signature of a batch whose key is registered to its node, ahead of the
    lock; `_judge` then takes the verdict instead of checking again."""
    meter_key = _meter_key(state, key_id)
    if meter_key is None or not meter_key.signs_for(node):
        return
    assert key_id is not None  # a key was found for it
    try:
        batch = batches.verify_batch(document, _public_key(state, key_id, meter_key))
        _check_storable(batch)
    except errors.GpuDeliveryError as exc:
        state.verified[index] = exc
    else:
        state.verified[index] = batch


def _ingest_one(
    state: _Ingest,
    index: int,
    document: object,
    echo: tuple[str | None, str | None, int | None],
) -> BatchResult:
    node, key_id, seq = echo
    verdict = _judge(state, index, document, node, key_id)
    if node is not None and verdict.status in _BLOCKING:
        state.blocked.setdefault(node, verdict.status)
    return BatchResult(
        node=node,
        key_id=key_id,
        seq=seq,
        status=verdict.status,
        expected_seq=verdict.expected_seq,
        detail=verdict.detail,
    )


def _judge(
    state: _Ingest, index: int, document: object, node: str | None, key_id: str | None
) -> _Verdict:
    """Check a batch in the order meter-batch.md gives: structure, key, signature, chain."""
    if node is not None and node in state.blocked:
        return _Verdict(
            BatchStatus.OUT_OF_ORDER,
            f"an earlier batch of node {node} in this request was "
            f"{state.blocked[node].value}: a chain is ingested in order or not at all",
            _expected_seq(state, key_id),
        )
    meter_key = _meter_key(state, key_id)
    if meter_key is None or not meter_key.signs_for(node):
        try:
            batches.parse_batch(document)
        except errors.GpuDeliveryError as exc:
            return _Verdict(BatchStatus.INVALID, str(exc))
        return _Verdict(
            BatchStatus.UNKNOWN_KEY, f"{key_id} is not a registered, unrevoked key of node {node}"
        )
    verified = state.verified[index]  # every batch of a key that signs for its node
    if isinstance(verified, errors.GpuDeliveryError):
        return _Verdict(BatchStatus.INVALID, str(verified))
    return _chain(state, verified)


def _chain(state: _Ingest, batch: batches.MeterBatch) -> _Verdict:
    """Place a verified batch in its key's chain: accept it, or say why not."""
    head = state.heads.get(batch.key_id)
    expected = 0 if head is None else head.seq + 1
    if batch.seq < expected:
        stored = _stored_hash(state, batch.key_id, batch.seq)
        if stored == batch.hash:
            return _Verdict(BatchStatus.DUPLICATE)
        detail = (
            f"key {batch.key_id}: seq {batch.seq} has hash {batch.hash}, but the stored "
            f"batch with that seq has hash {stored}"
        )
        _incident(state, batch, INCIDENT_FORK, detail)
        return _Verdict(BatchStatus.FORK, detail)
    if batch.seq > expected:
        detail = (
            f"key {batch.key_id}: seq {batch.seq} is beyond the chain's head + 1; "
            f"the next seq is {expected}"
        )
        _incident(state, batch, INCIDENT_CHAIN_GAP, detail)
        return _Verdict(BatchStatus.OUT_OF_ORDER, detail, expected)
    if head is not None and batch.prev_hash != head.hash:
        detail = (
            f"key {batch.key_id}: seq {batch.seq} names prev_hash {batch.prev_hash}, but "
            f"the stored seq {head.seq} has hash {head.hash}"
        )
        _incident(state, batch, INCIDENT_FORK, detail)
        return _Verdict(BatchStatus.FORK, detail)
    _accept(state, batch)
    return _Verdict(BatchStatus.ACCEPTED)


def _could_be_registered(key_id: str | None) -> TypeGuard[str]:
    """Whether a key id fits `meter_keys` at all: PostgreSQL refuses even to compare a NUL."""
    return key_id is not None and len(key_id) <= _MAX_KEY_ID and "\x00" not in key_id


def _meter_key(state: _Ingest, key_id: str | None) -> ingest_store.NodeKey | None:
    return state.keys.get(key_id) if _could_be_registered(key_id) else None


@functools.lru_cache(maxsize=4096)
def _parsed_key(public_key_pem: str) -> ed25519.Ed25519PublicKey:
    """A PEM parsed once per process: keyed by its text, so a new key is a new entry
    (whether a key may still sign is read from its row on every request)."""
    return signing.load_public_pem(public_key_pem.encode("ascii"))


def _public_key(
    state: _Ingest, key_id: str, meter_key: ingest_store.NodeKey
) -> ed25519.Ed25519PublicKey:
    if key_id not in state.public_keys:
        state.public_keys[key_id] = _parsed_key(meter_key.public_key_pem)
    return state.public_keys[key_id]


def _expected_seq(state: _Ingest, key_id: str | None) -> int:
    head = state.heads.get(key_id) if key_id is not None else None
    return 0 if head is None else head.seq + 1


def _stored_hash(state: _Ingest, key_id: str, seq: int) -> str | None:
    if (key_id, seq) in state.accepted:
        return state.accepted[(key_id, seq)]
    return state.stored.get((key_id, seq))


def _check_storable(batch: batches.MeterBatch) -> None:
    """Refuse what the tables cannot hold, naming the field, rather than fail the request."""
    gpu_uuids = list(map(_gpu_uuid, batch.record_values))
    if not gpu_uuids or (
        max(map(len, gpu_uuids)) <= _MAX_GPU_UUID and "\x00" not in "".join(gpu_uuids)
    ):
        return  # the usual batch, checked whole; otherwise, find the first that is not
    for index, gpu_uuid in enumerate(gpu_uuids):
        if len(gpu_uuid) > _MAX_GPU_UUID or "\x00" in gpu_uuid:
            raise errors.EvidenceError(
                f"must be at most {_MAX_GPU_UUID} characters, without NUL",
                field=f"records[{index}].gpu_uuid",
            )


def _accept(state: _Ingest, batch: batches.MeterBatch) -> None:
    document = batch.canonical
    state.batch_rows.append(
        (
            batch.key_id,
            batch.seq,
            batch.node,
            batch.hash,
            state.next_leaf,
            merkle.leaf_hash(document).hex(),
            document,
            state.now_s,
        )
    )
    state.next_leaf += 1
    state.accepted[(batch.key_id, batch.seq)] = batch.hash
    state.heads[batch.key_id] = ingest_store.Head(batch.seq, batch.hash)
    prefix = (batch.key_id, batch.seq, batch.node)
    state.record_rows.extend([prefix + values for values in batch.record_values])
    if batch.gap is not None:
        gap = batch.gap
        _incident(
            state,
            batch,
            INCIDENT_METER_GAP,
            f"key {batch.key_id}: seq {batch.seq} says the records of "
            f"[{timefmt.format_utc(gap.start_s)}, {timefmt.format_utc(gap.end_s)}) are "
            f"lost: {gap.reason!r}",
        )


def _incident(state: _Ingest, batch: batches.MeterBatch, kind: str, detail: str) -> None:
    state.incident_rows.append(
        {
            "kind": kind,
            "node": batch.node,
            "key_id": batch.key_id,
            "seq": batch.seq,
            "detail": detail,
            "at_s": state.now_s,
        }
    )


def _check_node_name(node: str) -> None:
    if len(node) > _MAX_NODE_NAME or not _NODE_NAME.fullmatch(node):
        raise api_errors.UnprocessableError(
            f"node {node!r} is not a Kubernetes node name (a DNS-1123 subdomain)"
        )


def register_key(
    session: Session, *, node: str, public_key_pem: str, now_s: int
) -> tuple[MeterKey, bool]:
    """Register a node's public key; the key and whether it is new (docs/ingest.md).

    A key belongs to one node: registering it again for the same node changes nothing,
    for another node is a conflict, and a revoked key stays revoked.
    """
    _check_node_name(node)
    try:
        public_key = signing.load_public_pem(public_key_pem.encode("utf-8"))
    except (errors.SignatureError, UnicodeEncodeError) as exc:
        raise api_errors.UnprocessableError(f"public_key_pem: {exc}") from exc
    key_id = signing.key_id(public_key)
    values = {
        "key_id": key_id,
        "node": node,
        "public_key_pem": signing.public_pem(public_key).decode("ascii"),
        "registered_at": now_s,
        "revoked_at": None,
    }
    # Insert-if-absent, so two nodes racing for one key cannot both win.
    connection = session.connection()
    dialect_insert = postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert
    inserted = connection.execute(
        dialect_insert(MeterKey)
        .values(values)
        .on_conflict_do_nothing()
        .returning(col(MeterKey.key_id))
    ).first()
    key = session.get(MeterKey, key_id, populate_existing=True)
    assert key is not None  # inserted, or there before
    if key.node != node:
        raise api_errors.ConflictError(f"key {key_id} is registered for another node")
    if key.revoked_at is not None:
        raise api_errors.ConflictError(
            f"key {key_id} was revoked; the node needs a new key to register"
        )
    return key, inserted is not None


def revoke_key(session: Session, *, key_id: str, now_s: int) -> MeterKey:
    """Revoke a node key: its batches answer `unknown_key` from now on. Idempotent."""
    key = session.get(MeterKey, key_id)
    if key is None:
        raise api_errors.NotFoundError(f"no meter key {key_id}")
    if key.revoked_at is None:
        key.revoked_at = now_s
        session.add(key)
        session.flush()
    return key
