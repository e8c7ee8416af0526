"""The database side of meter ingest (api.ingest): what it reads to judge a request's
batches, and how it stores the ones it accepts.

A request reads each table once, however many nodes it holds: the keys its batches name,
then, under the ingest lock, the next leaf index, every key's chain head and the stored
hashes of the batches it sends again; it then writes the accepted batches, their records
and any incidents in one bulk statement per table. On PostgreSQL those reads share one
round trip and the writes are binary COPY, through psycopg itself (in the session's
transaction): ingest's statements are its hot path, and SQLAlchemy costs several times
what psycopg does per statement. SQLite, in-process, has no round trips to save.

The lock: PostgreSQL's is a transaction-level advisory lock, taken once signatures are
checked, so two requests verify at once and take turns only to place batches in their
chains and write them. SQLite's is its single write lock, taken first (`begin`): a read
before it could leave the transaction on a snapshot that can no longer be upgraded to a
write once another request commits. Either is held until commit, so two requests never
give out the same leaf index or both extend a chain from the same head, and record ids
grow in commit order (api.rollups relies on it).

Not here: what the batches mean (api.ingest), the evidence log's heads (api.evidence_log).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import Connection, func, insert, select, text, tuple_
from sqlmodel import col

from gpudelivery.api.models import Incident, MeterBatch, MeterKey, MeterRecordRow

__all__ = [
    "BATCH_COLUMNS",
    "RECORD_COLUMNS",
    "Chains",
    "Head",
    "NodeKey",
    "begin",
    "load_keys",
    "lock_and_read_chains",
    "write",
]

# meter_batches and meter_records as ingest writes them, and their PostgreSQL types for
# binary COPY.
BATCH_COLUMNS = (
    "key_id",
    "seq",
    "node",
    "hash",
    "leaf_index",
    "leaf_hash",
    "document",
    "received_at",
)
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
_BATCH_TYPES = ("varchar", "int8", "varchar", "varchar", "int8", "varchar", "bytea", "int8")
_RECORD_TYPES = ("varchar", "int8", "varchar", "varchar", "int8", "int8", "bool", "float8", "int8")
# Any constant serves, as long as every ingest uses the same one: it names the one
# transaction-level PostgreSQL advisory lock under which chain heads and leaf indexes move.
_INGEST_LOCK_ID = 0x67707564_656C6976  # "gpudeliv"
# Where a pooled connection remembers whether its server compresses with lz4.
_LZ4_KNOWN = "gpudelivery.ingest.lz4"

# PostgreSQL's statements. Those under the lock go in one pipeline, each on a snapshot
# taken when it starts, so after the lock is granted. Heads and stored hashes are an index
# probe per key or batch, however long the chains. The lock statement can also have the
# transaction compress the documents it stores with lz4 (see _has_lz4).
_KEYS = "SELECT key_id, node, public_key_pem, revoked_at FROM meter_keys WHERE key_id = ANY(%s)"
_LOCK = "SELECT pg_advisory_xact_lock(%s)"
_LOCK_LZ4 = "SELECT pg_advisory_xact_lock(%s), set_config('default_toast_compression', 'lz4', true)"
_LAST_LEAF = "SELECT max(leaf_index) FROM meter_batches"
_HEADS = (
    "SELECT head.key_id, head.seq, head.hash FROM unnest(%s::varchar[]) AS wanted(key_id) "
    "CROSS JOIN LATERAL (SELECT key_id, seq, hash FROM meter_batches "
    "WHERE meter_batches.key_id = wanted.key_id ORDER BY seq DESC LIMIT 1) AS head"
)
_STORED = (
    "SELECT sent.key_id, sent.seq, stored.hash "
    "FROM unnest(%s::varchar[], %s::int8[]) AS sent(key_id, seq) "
    "CROSS JOIN LATERAL (SELECT hash FROM meter_batches WHERE meter_batches.key_id = "
    "sent.key_id AND meter_batches.seq = sent.seq) AS stored"
)


@dataclass(frozen=True, slots=True)
class NodeKey:
    """What ingest reads of a `meter_keys` row."""

    node: str
    public_key_pem: str
    revoked_at: int | None

    def signs_for(self, node: str | None) -> bool:
        """Whether the key may sign batches of `node` (registered for it, not revoked)."""
        return self.revoked_at is None and self.node == node


@dataclass(frozen=True, slots=True)
class Head:
    """The last stored batch of a key's chain."""

    seq: int
    hash: str


@dataclass(frozen=True)
class Chains:
    """What a request's batches are judged by, read under the lock."""

    next_leaf: int
    # Every key asked for: its head, None for an empty chain.
    heads: dict[str, Head | None]
    # The hash of each stored batch among those asked for, by (key_id, seq).
    stored: dict[tuple[str, int], str]


def begin(connection: Connection) -> None:
    """Start an ingest: on SQLite, take the write lock before anything is read."""
    if connection.dialect.name != "postgresql":
        connection.execute(text("UPDATE meter_batches SET seq = seq WHERE 1 = 0"))


def load_keys(connection: Connection, key_ids: Collection[str]) -> dict[str, NodeKey]:
    """The registered keys among `key_ids` (revoked ones too), in one query."""
    if not key_ids:
        return {}
    rows: Sequence[Any]
    if connection.dialect.name == "postgresql":
        rows = _driver(connection).execute(_KEYS, (sorted(key_ids),)).fetchall()
    else:
        rows = connection.execute(
            select(
                col(MeterKey.key_id),
                col(MeterKey.node),
                col(MeterKey.public_key_pem),
                col(MeterKey.revoked_at),
            ).where(col(MeterKey.key_id).in_(sorted(key_ids)))
        ).all()
    return {
        key_id: NodeKey(node=node, public_key_pem=pem, revoked_at=revoked_at)
        for key_id, node, pem, revoked_at in rows
    }


def lock_and_read_chains(
    connection: Connection, *, key_ids: Collection[str], sent: Collection[tuple[str, int]]
) -> Chains:
    """Under the ingest lock (taken here on PostgreSQL): the next leaf index, the head of
    each of `key_ids`, and the stored hashes of the batches `sent` ((key_id, seq) pairs)."""
    wanted_keys, wanted_batches = sorted(key_ids), sorted(sent)
    if connection.dialect.name == "postgresql":
        last_leaf, heads, stored = _read_postgresql(connection, wanted_keys, wanted_batches)
    else:
        last_leaf, heads, stored = _read_sqlite(connection, wanted_keys, wanted_batches)
    chains = Chains(
        next_leaf=0 if last_leaf is None else int(last_leaf) + 1,
        heads=dict.fromkeys(wanted_keys),
        stored={(key_id, int(seq)): str(hash_hex) for key_id, seq, hash_hex in stored},
    )
    for key_id, seq, hash_hex in heads:
        chains.heads[key_id] = Head(int(seq), str(hash_hex))
    return chains


_Rows = Sequence[Sequence[Any]]


def _read_postgresql(
    connection: Connection, key_ids: list[str], sent: list[tuple[str, int]]
) -> tuple[Any, _Rows, _Rows]:
    driver = _driver(connection)
    lock = _LOCK_LZ4 if _has_lz4(connection) else _LOCK
    with driver.pipeline():
        driver.execute(lock, (_INGEST_LOCK_ID,))
        last_leaf = driver.execute(_LAST_LEAF)
        heads = driver.execute(_HEADS, (key_ids,))
        stored = driver.execute(_STORED, ([key for key, _ in sent], [seq for _, seq in sent]))
    row = last_leaf.fetchone()
    return None if row is None else row[0], heads.fetchall(), stored.fetchall()


def _read_sqlite(
    connection: Connection, key_ids: list[str], sent: list[tuple[str, int]]
) -> tuple[Any, _Rows, _Rows]:
    last_leaf = connection.execute(select(func.max(MeterBatch.leaf_index))).scalar()
    batch = (col(MeterBatch.key_id), col(MeterBatch.seq), col(MeterBatch.hash))
    heads = []
    for key_id in key_ids:  # no LATERAL: a probe per key
        newest = connection.execute(
            select(*batch)
            .where(col(MeterBatch.key_id) == key_id)
            .order_by(col(MeterBatch.seq).desc())
            .limit(1)
        ).first()
        heads.extend([] if newest is None else [newest])
    stored: _Rows = ()
    if sent:
        stored = connection.execute(
            select(*batch).where(tuple_(col(MeterBatch.key_id), col(MeterBatch.seq)).in_(sent))
        ).all()
    return last_leaf, heads, stored


def write(
    connection: Connection,
    *,
    batch_rows: Sequence[tuple[Any, ...]],
    record_rows: Sequence[tuple[Any, ...]],
    incident_rows: Sequence[dict[str, Any]],
) -> None:
    """Store a request's accepted batches and their records (rows in `BATCH_COLUMNS` and
    `RECORD_COLUMNS` order) and its incidents: one bulk statement per table."""
    if incident_rows:
        connection.execute(insert(Incident), list(incident_rows))
    if connection.dialect.name != "postgresql":
        for model, names, values in (
            (MeterBatch, BATCH_COLUMNS, batch_rows),
            (MeterRecordRow, RECORD_COLUMNS, record_rows),
        ):
            if values:
                connection.execute(
                    insert(model), [dict(zip(names, row, strict=True)) for row in values]
                )
        return
    with _driver(connection).cursor() as cursor:
        for table, columns, types, rows in (
            ("meter_batches", BATCH_COLUMNS, _BATCH_TYPES, batch_rows),
            ("meter_records", RECORD_COLUMNS, _RECORD_TYPES, record_rows),
        ):
            if not rows:
                continue
            statement = f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)"
            with cursor.copy(statement) as copy:
                copy.set_types(types)
                for row in rows:
                    copy.write_row(row)


def _driver(connection: Connection) -> psycopg.Connection[Any]:
    """The psycopg connection under a PostgreSQL `connection`, in its transaction."""
    driver = connection.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    return driver


def _has_lz4(connection: Connection) -> bool:
    """Whether the server compresses with lz4 (PostgreSQL 14 and later, built with it),
    asked once per pooled connection. Documents are most of the bytes ingest writes under
    its lock, and pglz, the default, takes about four times as long; readers decompress
    either, and the setting lasts only for the ingest's transaction."""
    info = connection.connection.info
    if _LZ4_KNOWN not in info:
        info[_LZ4_KNOWN] = bool(
            connection.execute(
                text("SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = :name"),
                {"name": "default_toast_compression"},
            ).scalar()
        )
    return bool(info[_LZ4_KNOWN])
