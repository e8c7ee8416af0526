"""Meter ingest: node keys, and the signed batches the metering agents ship (docs/ingest.md).

A batch is stored only when it is signed by a registered, unrevoked key of its node and
continues that key's chain exactly: the next `seq`, linked to the stored head by
`prev_hash`. Anything else is answered per batch (`duplicate`, `out_of_order`, `fork`,
`unknown_key`, `invalid`) and stored nowhere; a chain gap or a fork is also recorded as an
`Incident`, as is a meter's own gap marker. Accepted batches are kept as their canonical
bytes, appended to the evidence log (api.evidence_log) in acceptance order, and their
records flattened into `meter_records` for the settlement's joins.

Leaf indexes and chain heads are read and written under one lock per database
(`_lock_ingest`), so two requests never give out the same leaf index or both extend a
chain from the same head. Nothing here commits: the route commits once per request.

Not here: request-level checks (JSON, batch count, body size) belong to the route;
the evidence log's heads and proofs to api.evidence_log.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from cryptography.hazmat.primitives.asymmetric import ed25519
from pydantic import BaseModel, ConfigDict
from sqlalchemy import func, insert, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, select

from gpudelivery import batches, errors, merkle, signing, timefmt
from gpudelivery.api import errors as api_errors
from gpudelivery.api.models import Incident, MeterBatch, MeterKey, MeterRecordRow

__all__ = [
    "INCIDENT_CHAIN_GAP",
    "INCIDENT_FORK",
    "INCIDENT_METER_GAP",
    "MAX_BATCHES_PER_REQUEST",
    "RECORD_COLUMNS",
    "BatchResult",
    "BatchStatus",
    "ingest",
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
# Any constant serves, as long as every ingest uses the same one: it names the one
# transaction-level PostgreSQL advisory lock under which chain heads and leaf indexes move.
_INGEST_LOCK_ID = 0x67707564_656C6976  # "gpudeliv"
# meter_records.gpu_uuid is VARCHAR(96); NVML UUIDs are 40 characters.
_MAX_GPU_UUID = 96
# meter_keys.key_id is VARCHAR(64); ids are 40 characters (meter-batch.md).
_MAX_KEY_ID = 64
RECORD_COLUMNS = (
    "key_id",
    "seq",
    "node",
    "gpu_uuid",
    "t0_s",
    "t1_s",
    "healthy",
    "utilization_gpu_pct",
    "energy_mj",
)
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


@dataclass(frozen=True, slots=True)
class _Head:
    seq: int
    hash: str


@dataclass
class _Ingest:
    """The state of one ingest request: chain heads as this request leaves them, the
    batches it accepted, and the rows it will write."""

    session: Session
    now_s: int
    next_leaf: int
    keys: dict[str, MeterKey | None] = field(default_factory=dict)
    public_keys: dict[str, ed25519.Ed25519PublicKey] = field(default_factory=dict)
    heads: dict[str, _Head | None] = field(default_factory=dict)
    accepted: dict[tuple[str, int], str] = field(default_factory=dict)
    blocked: dict[str, BatchStatus] = field(default_factory=dict)
    batch_rows: list[dict[str, Any]] = field(default_factory=list)
    record_rows: list[tuple[Any, ...]] = field(default_factory=list)
    incident_rows: list[dict[str, Any]] = field(default_factory=list)
    # Signatures checked before the lock (by position in the request): the verdict of
    # verify_batch, a batch or the error it raised.
    verified: dict[int, batches.MeterBatch | errors.GpuDeliveryError] = field(default_factory=dict)


def ingest(session: Session, *, documents: list[Any], now_s: int) -> list[BatchResult]:
    """Verify and store `documents` (decoded batches, in request order); one result each.

    The caller commits. Chain order is per node key; the request may mix nodes.
    """
    state = _Ingest(session=session, now_s=now_s, next_leaf=0)
    postgresql = session.connection().dialect.name == "postgresql"
    if not postgresql:
        # SQLite: the write lock first. A read before it could leave the transaction on a
        # snapshot that can no longer be upgraded to a write once another request commits.
        _lock_ingest(session)
    for index, document in enumerate(documents):
        _preverify(state, index, document)
    if postgresql:
        # Signatures, the costly part, were checked without the lock: two requests verify
        # at once and only take turns to place batches in their chains and write them.
        _lock_ingest(session)
    state.next_leaf = _next_leaf_index(session)
    results = [_ingest_one(state, index, document) for index, document in enumerate(documents)]
    _write(state)
    return results


def _lock_ingest(session: Session) -> None:
    """Serialise ingests: PostgreSQL by an advisory lock held until commit, SQLite by taking
    its single write lock now (a write that changes nothing), before any chain is read."""
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _INGEST_LOCK_ID})
    else:
        connection.execute(text("UPDATE meter_batches SET seq = seq WHERE 1 = 0"))


def _next_leaf_index(session: Session) -> int:
    last = session.exec(select(func.max(MeterBatch.leaf_index))).one()
    return 0 if last is None else int(last) + 1


def _echo(document: object) -> tuple[str | None, str | None, int | None]:
    """What a result repeats of a batch: its node, key id and seq, when they have a type."""
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


def _preverify(state: _Ingest, index: int, document: object) -> None:
    """Check the signature of a batch whose key is registered to its node, ahead of the
    lock; `_judge` then takes the verdict instead of checking again."""
    node, key_id, _ = _echo(document)
    meter_key = _meter_key(state, key_id)
    if meter_key is None or meter_key.revoked_at is not None or meter_key.node != node:
        return
    try:
        state.verified[index] = batches.verify_batch(document, _public_key(state, meter_key))
    except errors.GpuDeliveryError as exc:
        state.verified[index] = exc


def _ingest_one(state: _Ingest, index: int, document: object) -> BatchResult:
    node, key_id, seq = _echo(document)
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
    if meter_key is None or meter_key.revoked_at is not None or meter_key.node != node:
        try:
            batches.parse_batch(document)
        except errors.GpuDeliveryError as exc:
            return _Verdict(BatchStatus.INVALID, str(exc))
        return _Verdict(
            BatchStatus.UNKNOWN_KEY, f"{key_id} is not a registered, unrevoked key of node {node}"
        )
    try:
        verified = state.verified.get(index)
        if isinstance(verified, errors.GpuDeliveryError):
            raise verified
        batch = (
            verified
            if verified is not None
            else batches.verify_batch(document, _public_key(state, meter_key))
        )
        _check_storable(batch)
    except errors.GpuDeliveryError as exc:
        return _Verdict(BatchStatus.INVALID, str(exc))
    return _chain(state, batch)


def _chain(state: _Ingest, batch: batches.MeterBatch) -> _Verdict:
    """Place a verified batch in its key's chain: accept it, or say why not."""
    head = _head(state, batch.key_id)
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


def _meter_key(state: _Ingest, key_id: str | None) -> MeterKey | None:
    if not _could_be_registered(key_id):
        return None
    if key_id not in state.keys:
        state.keys[key_id] = state.session.get(MeterKey, key_id)
    return state.keys[key_id]


@functools.lru_cache(maxsize=4096)
def _parsed_key(public_key_pem: str) -> ed25519.Ed25519PublicKey:
    """A PEM parsed once per process: keyed by its text, so a new key is a new entry
    (whether a key may still sign is read from its row on every request)."""
    return signing.load_public_pem(public_key_pem.encode("ascii"))


def _public_key(state: _Ingest, meter_key: MeterKey) -> ed25519.Ed25519PublicKey:
    if meter_key.key_id not in state.public_keys:
        state.public_keys[meter_key.key_id] = _parsed_key(meter_key.public_key_pem)
    return state.public_keys[meter_key.key_id]


def _head(state: _Ingest, key_id: str) -> _Head | None:
    """The last batch of the key's chain: accepted in this request, or stored before."""
    if key_id not in state.heads:
        row = state.session.exec(
            select(MeterBatch.seq, MeterBatch.hash)
            .where(MeterBatch.key_id == key_id)
            .order_by(col(MeterBatch.seq).desc())
            .limit(1)
        ).first()
        state.heads[key_id] = None if row is None else _Head(int(row[0]), str(row[1]))
    return state.heads[key_id]


def _expected_seq(state: _Ingest, key_id: str | None) -> int:
    head = _head(state, key_id) if _could_be_registered(key_id) else None
    return 0 if head is None else head.seq + 1


def _stored_hash(state: _Ingest, key_id: str, seq: int) -> str | None:
    if (key_id, seq) in state.accepted:
        return state.accepted[(key_id, seq)]
    stored = state.session.exec(
        select(MeterBatch.hash).where(MeterBatch.key_id == key_id, MeterBatch.seq == seq)
    ).first()
    return None if stored is None else str(stored)


def _check_storable(batch: batches.MeterBatch) -> None:
    """Refuse what the tables cannot hold, naming the field, rather than fail the request."""
    for index, record in enumerate(batch.records):
        if len(record.gpu_uuid) > _MAX_GPU_UUID or "\x00" in record.gpu_uuid:
            raise errors.EvidenceError(
                f"must be at most {_MAX_GPU_UUID} characters, without NUL",
                field=f"records[{index}].gpu_uuid",
            )


def _accept(state: _Ingest, batch: batches.MeterBatch) -> None:
    document = batch.canonical
    state.batch_rows.append(
        {
            "key_id": batch.key_id,
            "seq": batch.seq,
            "node": batch.node,
            "hash": batch.hash,
            "leaf_index": state.next_leaf,
            "leaf_hash": merkle.leaf_hash(document).hex(),
            "document": document,
            "received_at": state.now_s,
        }
    )
    state.next_leaf += 1
    state.accepted[(batch.key_id, batch.seq)] = batch.hash
    state.heads[batch.key_id] = _Head(batch.seq, batch.hash)
    state.record_rows.extend(_record_rows(batch))
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


def _record_rows(batch: batches.MeterBatch) -> Iterable[tuple[Any, ...]]:
    """The batch's records as `meter_records` rows, in `RECORD_COLUMNS` order."""
    for record in batch.records:
        yield (
            batch.key_id,
            batch.seq,
            batch.node,
            record.gpu_uuid,
            record.t0_s,
            record.t1_s,
            record.healthy,
            record.utilization_gpu_pct,
            record.energy_mj,
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


def _write(state: _Ingest) -> None:
    """Everything the request stores, one bulk statement per table."""
    connection = state.session.connection()
    if state.batch_rows:
        connection.execute(insert(MeterBatch), state.batch_rows)
    if state.incident_rows:
        connection.execute(insert(Incident), state.incident_rows)
    if not state.record_rows:
        return
    if connection.dialect.name == "postgresql":
        # COPY: the records are most of what ingest writes, and COPY is PostgreSQL's
        # fastest way in (same transaction: the DBAPI connection is the session's).
        columns = ", ".join(RECORD_COLUMNS)
        driver = connection.connection.driver_connection
        assert driver is not None
        with (
            driver.cursor() as cursor,
            cursor.copy(f"COPY meter_records ({columns}) FROM STDIN") as copy,
        ):
            for row in state.record_rows:
                copy.write_row(row)
        return
    rows = [dict(zip(RECORD_COLUMNS, row, strict=True)) for row in state.record_rows]
    connection.execute(insert(MeterRecordRow), rows)


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
