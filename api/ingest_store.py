"""The database side of meter ingest (api.ingest): what it reads to judge a request's
batches, and how it stores the ones it accepts.

A request reads each table once, however many nodes it holds: the keys its batches name,
then, under the ingest lock, the next leaf index, every key's chain head and the stored
hashes of the batches it sends again; it then writes the accepted batches, their records
and any incidents in one bulk statement per table. On PostgreSQL those reads share one
round trip and the writes are binary COPY, through psycopg itself (in the session's
transaction): ingest's statements are its hot path, and SQLAlchemy costs several times
what psycopg does per statement. SQLite, in-process, has no round trips to save.

The ingest lock: PostgreSQL's is a transaction-level advisory lock, taken once signatures
are checked and the records are written (api.ingest reads the chains without it first and
writes the records of the batches it expects to accept, then checks under the lock that
the chains did not move), so two requests verify and write records at once and take
turns only to place batches in their chains and write those. SQLite's is its single write
lock, taken first (`begin`): a read before it could leave the transaction on a snapshot
that can no longer be upgraded to a write once another request commits. Either is held
until commit, so two requests never give out the same leaf index or both extend a chain
from the same head.

The records lock (PostgreSQL): every ingest holds it shared from its first read of the
chains to commit, so
records written before the ingest lock may take ids out of commit order only while their
transaction is open. `settled_record_id` takes it exclusively for a moment: once every
ingest that was writing has ended, no record at or below the largest id then stored can
still appear, which is the mark api.rollups may move to. On SQLite, ids grow in commit
order: the write lock is taken before anything is written.

Not here: what the batches mean (api.ingest), the evidence log's heads (api.evidence_log).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Sequence
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
    "read_chains",
    "record_writer",
    "settled_record_id",
    "write",
    "writes_records_first",
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
# The records lock: shared by every ingest transaction, exclusive for `settled_record_id`.
_RECORDS_LOCK_ID = 0x67707564_72656373  # "gpudrecs"
# Where a pooled connection remembers whether its server compresses with lz4.
_LZ4_KNOWN = "gpudelivery.ingest.lz4"

# PostgreSQL's statements. Those under the lock go in one pipeline, each on a snapshot
# taken when it starts, so after the lock is granted. Heads and stored hashes are an index
# probe per key or batch, however long the chains. The lock statement can also have the
# transaction compress the documents it stores with lz4 (see _has_lz4).
_KEYS = "SELECT key_id, node, public_key_pem, revoked_at FROM meter_keys WHERE key_id = ANY(%s)"
_LOCK = "SELECT pg_advisory_xact_lock(%s)"
_LOCK_LZ4 = "SELECT pg_advisory_xact_lock(%s), set_config('default_toast_compression', 'lz4', true)"
_RECORDS_SHARED = "SELECT pg_advisory_xact_lock_shared(%s)"
# Session-level, released at once: the job's transaction goes on for a while.
_RECORDS_EXCLUSIVE = "SELECT pg_advisory_lock(%s)"
_RECORDS_RELEASE = "SELECT pg_advisory_unlock(%s)"
_NEWEST_RECORD = "SELECT max(id) FROM meter_records"
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
    """Start an ingest: on SQLite, take the write lock before anything is read. (On
    PostgreSQL, reading the chains takes the records lock.)"""
    if connection.dialect.name != "postgresql":
        connection.execute(text("UPDATE meter_batches SET seq = seq WHERE 1 = 0"))


def writes_records_first(connection: Connection) -> bool:
    """Whether an ingest may write records before it takes the ingest lock (PostgreSQL;
    on SQLite it holds the one write lock from the start anyway)."""
    return connection.dialect.name == "postgresql"


def settled_record_id(connection: Connection) -> int | None:
    """The largest record id below which no record can still appear (None: no bound is
    needed, on SQLite). Waits for the ingests writing at the moment to end."""
    if connection.dialect.name != "postgresql":
        return None
    driver = _driver(connection)
    driver.execute(_RECORDS_EXCLUSIVE, (_RECORDS_LOCK_ID,))
    try:
        row = driver.execute(_NEWEST_RECORD).fetchone()
    finally:
        driver.execute(_RECORDS_RELEASE, (_RECORDS_LOCK_ID,))
    return 0 if row is None or row[0] is None else int(row[0])


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
    return _read_chains(connection, key_ids, sent, lock=True)


def read_chains(
    connection: Connection, *, key_ids: Collection[str], sent: Collection[tuple[str, int]]
) -> Chains:
    """`lock_and_read_chains` without the lock: what the chains are now, which they may no
    longer be by the time the lock is granted."""
    return _read_chains(connection, key_ids, sent, lock=False)


def _read_chains(
    connection: Connection,
    key_ids: Collection[str],
    sent: Collection[tuple[str, int]],
    *,
    lock: bool,
) -> Chains:
    wanted_keys, wanted_batches = sorted(key_ids), sorted(sent)
    if connection.dialect.name == "postgresql":
        last_leaf, heads, stored = _read_postgresql(
            connection, wanted_keys, wanted_batches, lock=lock
        )
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
    connection: Connection, key_ids: list[str], sent: list[tuple[str, int]], *, lock: bool
) -> tuple[Any, _Rows, _Rows]:
    driver = _driver(connection)
    lock_statement = (_LOCK_LZ4 if _has_lz4(connection) else _LOCK) if lock else None
    with driver.pipeline():
        driver.execute(_RECORDS_SHARED, (_RECORDS_LOCK_ID,))  # again: a no-op if held
        if lock_statement is not None:
            driver.execute(lock_statement, (_INGEST_LOCK_ID,))
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


@contextlib.contextmanager
def record_writer(
    connection: Connection,
) -> Iterator[Callable[[Sequence[tuple[Any, ...]]], None]]:
    """A function that writes record rows (in `RECORD_COLUMNS` order) as they come: on
    PostgreSQL into one binary COPY, open until the block ends, which the server stores
    while the caller goes on; on SQLite, in one insert at the end."""
    if connection.dialect.name != "postgresql":
        rows: list[tuple[Any, ...]] = []
        yield rows.extend
        write(connection, batch_rows=(), record_rows=rows, incident_rows=())
        return
    statement = f"COPY meter_records ({', '.join(RECORD_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
    with _driver(connection).cursor() as cursor, cursor.copy(statement) as copy:
        copy.set_types(_RECORD_TYPES)

        def write_rows(rows: Sequence[tuple[Any, ...]]) -> None:
            for row in rows:
                copy.write_row(row)

        yield write_rows


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
