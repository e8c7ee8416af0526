"""Roll-ups of the meter records, and the evidence a proof reads through them.

A 512-GPU fleet metered once a second writes 1.3 billion `meter_records` a month; a proof
cannot read them all. The `rollups` job folds them, in the order they were stored, into
`meter_rollups` rows (the core's `rollup.MeterRollup`: records of one GPU and health state
whose t0 lie in one aligned bucket and whose intervals connect, summed exactly) at two
widths: hour buckets, and minute buckets. `rollup_state` keeps how far it has read: every
record with `id` <= `last_record_id` is in exactly one row of each width, and no later
record is in any. The mark moves only up to a settled id (api.ingest_store's
`settled_record_id`: no record at or below it can still be committed, although ingests
write records before their lock), so a record the job has not read is always past it.

`evidence` gives a proof, for each assigned GPU:

- the hour rows, except in an hour where some row crosses the edge of a span the GPU is
  assigned (a row must count wholly or not at all, `proof.build_proof`);
- in those hours, the minute rows, except in a minute where some row crosses an edge;
- in those minutes, the records themselves;
- and every record past the mark, from batches in the proof's tree head (the raw tail).

The parts never overlap and together are exactly the records a proof of raw records reads,
so the proof is the same document (tests/core/test_rollup.py and tests/api/test_rollups.py
hold it so). A month of a GPU is about 720 hour rows, where a window's edges and each
substitution cost some 60 minute rows and 60 records more.

The job and a proof's reads exclude each other (`_lock`): PostgreSQL by a transaction-level
advisory lock, exclusive for the job and shared by proofs; SQLite by its write lock. Raw
records are kept: they back the minutes where an edge falls, and `meter_batches` stays the
evidence.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import and_, func, insert, or_, text, update
from sqlalchemy import select as sa_select
from sqlmodel import Session, col

from gpudelivery.accounting import Span
from gpudelivery.api import ingest_store
from gpudelivery.api.models import MeterBatch, MeterRecordRow, MeterRollupRow, RollupState
from gpudelivery.evidence import GpuKey, MeterRecord
from gpudelivery.rollup import (
    MeterRollup,
    RollupAccumulator,
    bucket_of,
    fraction_text,
    parse_fraction,
)

__all__ = [
    "CHUNK_RECORDS",
    "HOUR_S",
    "MINUTE_S",
    "evidence",
    "hold",
    "lag",
    "roll_up",
    "roll_up_all",
]

# The two widths of roll-up rows.
HOUR_S = 3_600
MINUTE_S = 60
WIDTHS = (HOUR_S, MINUTE_S)
# Records read per roll-up transaction, and chunks per run of the job.
CHUNK_RECORDS = 100_000
CHUNKS_PER_RUN = 20
# The watermark's row in rollup_state.
_STATE = "meter_records"
# The transaction-level advisory lock between the job (exclusive) and proofs (shared).
_LOCK_ID = 0x67707564_726F6C6C  # "gpudroll"
# Keys per `IN` list when loading rows to extend, well under SQLite's variable limit.
_KEYS_PER_QUERY = 500
_ROW_COLUMNS = (
    col(MeterRollupRow.id),
    col(MeterRollupRow.node),
    col(MeterRollupRow.gpu_uuid),
    col(MeterRollupRow.bucket_s),
    col(MeterRollupRow.t0_s),
    col(MeterRollupRow.t1_s),
    col(MeterRollupRow.healthy),
    col(MeterRollupRow.records),
    col(MeterRollupRow.utilization_sum),
    col(MeterRollupRow.utilization_s),
    col(MeterRollupRow.energy_mj),
)
_RECORD_COLUMNS = (
    col(MeterRecordRow.node),
    col(MeterRecordRow.gpu_uuid),
    col(MeterRecordRow.t0_s),
    col(MeterRecordRow.t1_s),
    col(MeterRecordRow.healthy),
    col(MeterRecordRow.utilization_gpu_pct),
    col(MeterRecordRow.energy_mj),
)


def _lock(session: Session, *, exclusive: bool) -> None:
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        function = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
        connection.execute(text(f"SELECT {function}(:id)"), {"id": _LOCK_ID})
    else:
        # SQLite's one write lock, taken by a write that changes nothing: held to commit.
        connection.execute(text("UPDATE rollup_state SET name = name WHERE 1 = 0"))


def _watermark(session: Session) -> int:
    state = session.get(RollupState, _STATE, populate_existing=True)
    return 0 if state is None else state.last_record_id


def lag(session: Session) -> int:
    """How many record ids lie past the roll-ups' mark (0 when they have caught up)."""
    newest = session.execute(sa_select(func.max(col(MeterRecordRow.id)))).scalar()
    return max(0, int(newest or 0) - _watermark(session))


# -- the job ----------------------------------------------------------------------------------


def roll_up(session: Session, *, now_s: int, limit: int = CHUNK_RECORDS) -> int:
    """Fold the next `limit` records past the mark into the roll-ups and move the mark;
    how many records it read. The caller commits."""
    _lock(session, exclusive=True)
    last = _watermark(session)
    query = sa_select(col(MeterRecordRow.id), *_RECORD_COLUMNS).where(col(MeterRecordRow.id) > last)
    settled = ingest_store.settled_record_id(session.connection())
    if settled is not None:
        query = query.where(col(MeterRecordRow.id) <= settled)
    rows = session.execute(query.order_by(col(MeterRecordRow.id)).limit(limit)).all()
    if not rows:
        return 0
    records = [
        MeterRecord(node, gpu_uuid, t0_s, t1_s, healthy, utilization, energy)
        for _, node, gpu_uuid, t0_s, t1_s, healthy, utilization, energy in rows
    ]
    for width_s in WIDTHS:
        _fold(session, records, width_s)
    _set_watermark(session, int(rows[-1][0]), now_s)
    return len(rows)


def roll_up_all(session: Session, *, now_s: int, chunks: int = CHUNKS_PER_RUN) -> int:
    """The job: roll up chunk after chunk, committing each, until caught up or `chunks`
    chunks are done; how many records it read."""
    total = 0
    for _ in range(chunks):
        read = roll_up(session, now_s=now_s)
        session.commit()
        total += read
        if read < CHUNK_RECORDS:
            break
    return total


def _set_watermark(session: Session, last_record_id: int, now_s: int) -> None:
    state = session.get(RollupState, _STATE)
    if state is None:
        state = RollupState(name=_STATE, last_record_id=last_record_id, updated_at=now_s)
    else:
        state.last_record_id = last_record_id
        state.updated_at = now_s
    session.add(state)
    session.flush()


def _accumulator(row: Sequence[Any], width_s: int) -> RollupAccumulator:
    _, node, gpu_uuid, bucket_s, t0_s, t1_s, healthy, records, utilization, seconds, energy = row
    return RollupAccumulator(
        node=node,
        gpu_uuid=gpu_uuid,
        healthy=healthy,
        width_s=width_s,
        bucket_s=bucket_s,
        t0_s=t0_s,
        t1_s=t1_s,
        records=records,
        utilization_sum=None if utilization is None else parse_fraction(utilization),
        utilization_s=seconds,
        energy_mj=energy,
    )


def _values(accumulator: RollupAccumulator) -> dict[str, Any]:
    return {
        "width_s": accumulator.width_s,
        "node": accumulator.node,
        "gpu_uuid": accumulator.gpu_uuid,
        "bucket_s": accumulator.bucket_s,
        "t0_s": accumulator.t0_s,
        "t1_s": accumulator.t1_s,
        "healthy": accumulator.healthy,
        "records": accumulator.records,
        "utilization_sum": (
            None
            if accumulator.utilization_sum is None
            else fraction_text(accumulator.utilization_sum)
        ),
        "utilization_s": accumulator.utilization_s,
        "energy_mj": accumulator.energy_mj,
    }


def _fold(session: Session, records: Sequence[MeterRecord], width_s: int) -> None:
    """Fold `records` into the rows of `width_s`: extend a stored or new row of the same
    GPU, health and bucket that a record connects to, else start a row."""
    keys = sorted({(r.node, r.gpu_uuid, bucket_of(r.t0_s, width_s)) for r in records})
    open_rows: dict[tuple[str, str, int, bool], list[tuple[int | None, RollupAccumulator]]] = {}
    for start in range(0, len(keys), _KEYS_PER_QUERY):
        # Each column against a list, not a row constructor against a list of rows:
        # PostgreSQL scans the index with arrays, where `(a, b, c) IN (...)` becomes an OR
        # of every key tested on every row. The few extra rows the cross product may match
        # (a GPU's row in another GPU's bucket) are dropped here.
        wanted = set(keys[start : start + _KEYS_PER_QUERY])
        stored = session.execute(
            sa_select(*_ROW_COLUMNS).where(
                col(MeterRollupRow.node).in_(sorted({node for node, _, _ in wanted})),
                col(MeterRollupRow.gpu_uuid).in_(sorted({gpu for _, gpu, _ in wanted})),
                col(MeterRollupRow.width_s) == width_s,
                col(MeterRollupRow.bucket_s).in_(sorted({bucket for _, _, bucket in wanted})),
            )
        )
        for row in stored:
            if (row[1], row[2], row[3]) not in wanted:
                continue
            key = (row[1], row[2], row[3], row[6])
            open_rows.setdefault(key, []).append((int(row[0]), _accumulator(row, width_s)))
    changed: set[int] = set()
    for record in records:
        key = (record.node, record.gpu_uuid, bucket_of(record.t0_s, width_s), record.healthy)
        candidates = open_rows.setdefault(key, [])
        for row_id, accumulator in reversed(candidates):
            if accumulator.connects(record):
                accumulator.add(record)
                if row_id is not None:
                    changed.add(row_id)
                break
        else:
            candidates.append((None, RollupAccumulator.of(record, width_s=width_s)))
    updates, inserts = [], []
    for candidates in open_rows.values():
        for row_id, accumulator in candidates:
            if row_id is None:
                inserts.append(_values(accumulator))
            elif row_id in changed:
                updates.append({"id": row_id, **_values(accumulator)})
    if updates:
        session.execute(update(MeterRollupRow), updates)
    if inserts:
        session.execute(insert(MeterRollupRow), inserts)


# -- what a proof reads -----------------------------------------------------------------------


def _covers(spans: Sequence[Span], starts: Sequence[int], t0_s: int, t1_s: int) -> int:
    """How many of the seconds of [t0_s, t1_s) the coalesced, sorted `spans` cover."""
    index = max(bisect.bisect_right(starts, t0_s) - 1, 0)
    covered = 0
    while index < len(spans) and spans[index][0] < t1_s:
        covered += max(0, min(t1_s, spans[index][1]) - max(t0_s, spans[index][0]))
        index += 1
    return covered


class _Edges:
    """Whether a roll-up crosses the edge of a GPU's assigned spans."""

    def __init__(self, assigned: Mapping[GpuKey, list[Span]]) -> None:
        self.assigned = assigned
        self.starts = {gpu: [span[0] for span in spans] for gpu, spans in assigned.items()}

    def crossed(self, gpu: GpuKey, t0_s: int, t1_s: int) -> bool:
        if gpu not in self.assigned:
            return False
        covered = _covers(self.assigned[gpu], self.starts[gpu], t0_s, t1_s)
        return 0 < covered < t1_s - t0_s


def _rollup(row: Sequence[Any]) -> MeterRollup:
    _, node, gpu_uuid, _, t0_s, t1_s, healthy, records, utilization, seconds, energy = row
    return MeterRollup(
        node,
        gpu_uuid,
        t0_s,
        t1_s,
        healthy,
        records,
        None if utilization is None else parse_fraction(utilization),
        seconds,
        energy,
    )


def _by_bucket(
    rows: Iterable[Sequence[Any]], edges: _Edges
) -> Iterator[tuple[GpuKey, int, list[Sequence[Any]], bool]]:
    """Rows ordered by GPU and bucket, grouped: (GPU, bucket, its rows, whether one of them
    crosses an edge)."""
    group: list[Sequence[Any]] = []
    current: tuple[GpuKey, int] | None = None
    crossed = False
    for row in rows:
        gpu, bucket_s = (row[1], row[2]), row[3]
        if (gpu, bucket_s) != current:
            if current is not None:
                yield current[0], current[1], group, crossed
            current, group, crossed = (gpu, bucket_s), [], False
        group.append(row)
        crossed = crossed or edges.crossed(gpu, row[4], row[5])
    if current is not None:
        yield current[0], current[1], group, crossed


def hold(session: Session) -> int:
    """Keep the job out until the caller's transaction ends; the mark it must read with."""
    _lock(session, exclusive=False)
    return _watermark(session)


def evidence(
    session: Session,
    *,
    assigned: Mapping[GpuKey, list[Span]],
    start_s: int,
    end_s: int,
    tree_size: int,
    last_record_id: int,
) -> Iterator[MeterRecord | MeterRollup]:
    """The roll-ups and records of the `assigned` GPUs over [start_s, end_s) that stand
    for exactly the records of batches in the tree of `tree_size` leaves (see the module
    docstring). `last_record_id` is the mark read by `hold` in the same transaction."""
    if not assigned:
        return
    edges = _Edges(assigned)
    nodes = sorted({node for node, _ in assigned})
    hours = session.execute(
        sa_select(*_ROW_COLUMNS)
        .where(
            col(MeterRollupRow.node).in_(nodes),
            col(MeterRollupRow.width_s) == HOUR_S,
            col(MeterRollupRow.t1_s) > start_s,
            col(MeterRollupRow.t0_s) < end_s,
        )
        .order_by(
            col(MeterRollupRow.node), col(MeterRollupRow.gpu_uuid), col(MeterRollupRow.bucket_s)
        )
        .execution_options(yield_per=10_000)
    )
    crossed_hours: dict[GpuKey, list[int]] = {}
    for gpu, bucket_s, rows, crossed in _by_bucket(hours, edges):
        if gpu not in assigned:
            continue
        if crossed:
            crossed_hours.setdefault(gpu, []).append(bucket_s)
        else:
            for row in rows:
                yield _rollup(row)
    crossed_minutes: dict[GpuKey, list[int]] = {}
    for gpu, buckets in crossed_hours.items():
        minutes = session.execute(
            sa_select(*_ROW_COLUMNS)
            .where(
                col(MeterRollupRow.node) == gpu[0],
                col(MeterRollupRow.gpu_uuid) == gpu[1],
                col(MeterRollupRow.width_s) == MINUTE_S,
                or_(
                    *(
                        and_(
                            col(MeterRollupRow.bucket_s) >= hour,
                            col(MeterRollupRow.bucket_s) < hour + HOUR_S,
                        )
                        for hour in buckets
                    )
                ),
            )
            .order_by(col(MeterRollupRow.bucket_s))
        )
        for _, bucket_s, rows, crossed in _by_bucket(minutes, edges):
            if crossed:
                crossed_minutes.setdefault(gpu, []).append(bucket_s)
            else:
                for row in rows:
                    yield _rollup(row)
    for gpu, buckets in crossed_minutes.items():
        records = session.execute(
            sa_select(*_RECORD_COLUMNS).where(
                col(MeterRecordRow.node) == gpu[0],
                col(MeterRecordRow.gpu_uuid) == gpu[1],
                col(MeterRecordRow.id) <= last_record_id,
                or_(
                    *(
                        and_(
                            col(MeterRecordRow.t0_s) >= minute,
                            col(MeterRecordRow.t0_s) < minute + MINUTE_S,
                        )
                        for minute in buckets
                    )
                ),
            )
        )
        for row in records:
            yield MeterRecord(*row)
    yield from _tail(
        session,
        assigned=assigned,
        nodes=nodes,
        start_s=start_s,
        end_s=end_s,
        tree_size=tree_size,
        last_record_id=last_record_id,
    )


def _tail(
    session: Session,
    *,
    assigned: Mapping[GpuKey, list[Span]],
    nodes: list[str],
    start_s: int,
    end_s: int,
    tree_size: int,
    last_record_id: int,
) -> Iterator[MeterRecord]:
    """The records past the mark, of batches in the tree of `tree_size` leaves."""
    query = (
        sa_select(*_RECORD_COLUMNS)
        .join(
            MeterBatch,
            (col(MeterBatch.key_id) == col(MeterRecordRow.key_id))
            & (col(MeterBatch.seq) == col(MeterRecordRow.seq)),
        )
        .where(
            col(MeterRecordRow.id) > last_record_id,
            col(MeterRecordRow.node).in_(nodes),
            col(MeterRecordRow.t1_s) > start_s,
            col(MeterRecordRow.t0_s) < end_s,
            col(MeterBatch.leaf_index) < tree_size,
        )
        .execution_options(yield_per=10_000)
    )
    for node, gpu_uuid, t0_s, t1_s, healthy, utilization, energy in session.execute(query):
        if (node, gpu_uuid) in assigned:
            yield MeterRecord(node, gpu_uuid, t0_s, t1_s, healthy, utilization, energy)
