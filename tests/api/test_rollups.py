"""Roll-ups: the job folds stored records into hour and minute rows, and a proof read
through them is the document a proof of every record is."""

from __future__ import annotations

import json
import random
import threading
from typing import Any

import pytest
from sqlalchemy import func, insert, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from gpudelivery import proof, signing, timefmt
from gpudelivery.api import (
    contracts,
    evidence_log,
    ingest,
    ingest_store,
    jobs,
    ledger,
    proofs,
    rollups,
)
from gpudelivery.api.models import (
    Assignment,
    Contract,
    MeterBatch,
    MeterKey,
    MeterRecordRow,
    MeterRollupRow,
)
from gpudelivery.evidence import MeterRecord

from utils import factories, meters
from utils.polling import poll

KEY = signing.generate()
NODES = ("gpu-node-1", "gpu-node-2")
GPUS = {node: [f"GPU-{n}{g}-0000-4000-8000-000000000000" for g in range(2)] for n, node in
        enumerate(NODES)}  # fmt: skip
HOUR = 3_600
# Windows and edges that fall inside hours and minutes, not on their boundaries.
BASE = factories.EPOCH


def contract(session: Session, *, start_s: int, end_s: int, gpu_count: int = 2) -> Contract:
    terms = factories.terms_json(
        gpu_count=gpu_count, start=timefmt.format_utc(start_s), end=timefmt.format_utc(end_s)
    )
    row = Contract(
        id=terms["contract_id"],
        exchange="cme",
        holder=terms["buyer"],
        instrument=terms["instrument"],
        gpu_count=gpu_count,
        start_s=start_s,
        end_s=end_s,
        terms=json.dumps(terms),
        status="booked",
        idempotency_key="k",
        created_at=start_s - HOUR,
    )
    session.add(row)
    for node in NODES:
        session.add(MeterKey(key_id=f"key-{node}", node=node, public_key_pem="-", registered_at=0))
    session.commit()
    return row


def assign(session: Session, contract_id: str, node: str, gpu: str, start_s: int,
           end_s: int | None) -> None:  # fmt: skip
    session.add(
        Assignment(
            contract_id=contract_id,
            node=node,
            gpu_uuid=gpu,
            start_s=start_s,
            end_s=end_s,
            recorded_at=start_s,
        )
    )
    session.commit()


class Meter:
    """Stores batches and their records as ingest does: a batch row in the evidence log
    (a placeholder document: proofs read only records and leaf indexes) and its records."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.seq = dict.fromkeys(NODES, 0)
        self.leaf = 0

    def ship(self, node: str, records: list[tuple[Any, ...]]) -> None:
        seq = self.seq[node]
        self.seq[node] += 1
        key_id = f"key-{node}"
        self.session.add(
            MeterBatch(
                key_id=key_id,
                seq=seq,
                node=node,
                hash=f"{self.leaf:064x}",
                leaf_index=self.leaf,
                leaf_hash=f"{self.leaf:064x}",
                document=b"{}",
                received_at=0,
            )
        )
        self.leaf += 1
        self.session.flush()
        rows = [
            dict(
                zip(
                    ("gpu_uuid", "t0_s", "t1_s", "healthy", "utilization_gpu_pct", "energy_mj"),
                    record,
                    strict=True,
                ),
                key_id=key_id,
                seq=seq,
                node=node,
            )
            for record in records
        ]
        if rows:
            self.session.execute(insert(MeterRecordRow), rows)
        self.session.commit()


def random_evidence(rng: random.Random, *, start_s: int, end_s: int) -> dict[str, list[Any]]:
    """Per node, batches of records over [start_s, end_s): mostly runs of 5-second records
    (sometimes 1 s, sometimes overlapping or missing), health flipping now and then,
    utilization whole or fractional or absent, energy or none."""
    shipped: dict[str, list[Any]] = {node: [] for node in NODES}
    for node in NODES:
        batch: list[tuple[Any, ...]] = []
        for gpu in GPUS[node]:
            healthy, t = True, start_s + rng.randrange(0, 40)
            while t < end_s:
                length = rng.choice([5, 5, 5, 5, 1, 7])
                if rng.random() < 0.01:
                    healthy = not healthy
                if rng.random() < 0.02:
                    t += rng.randrange(1, 30)  # a gap
                utilization = rng.choice([90, 91.5, None, 100, 0.1])
                energy = rng.choice([3_250_000, None, 17])
                batch.append((gpu, t, t + length, healthy, utilization, energy))
                if rng.random() < 0.01:  # a record overlapping the next
                    batch.append((gpu, t + 1, t + length + 2, not healthy, 50, 11))
                t += length
        batch.sort(key=lambda record: record[1])
        shipped[node] = [batch[i : i + 40] for i in range(0, len(batch), 40)]
    return shipped


def build(session: Session, contract_row: Contract, now_s: int) -> dict[str, Any]:
    document = proofs.build_proof(session, contract=contract_row, key=KEY, now_s=now_s)
    session.commit()
    return document


def every_record_proof(session: Session, row: Contract, now_s: int) -> dict[str, Any]:
    """The oracle: the proof built by the core from every stored record of a logged batch."""
    terms = contracts.terms_of(row)
    until = min(now_s, terms.end)
    ledger_rows = ledger.closed_for(
        ledger.assignments_of(session, row.id), contract_id=row.id, until_s=until
    )
    head = evidence_log.tree_head(session, key=KEY, now_s=now_s)
    stored = session.exec(
        select(MeterRecordRow)
        .join(
            MeterBatch,
            (col(MeterBatch.key_id) == col(MeterRecordRow.key_id))
            & (col(MeterBatch.seq) == col(MeterRecordRow.seq)),
        )
        .where(col(MeterBatch.leaf_index) < head.size)
    ).all()
    records = [
        MeterRecord(r.node, r.gpu_uuid, r.t0_s, r.t1_s, r.healthy, r.utilization_gpu_pct,
                    r.energy_mj)
        for r in stored
    ]  # fmt: skip
    document = proof.build_proof(
        terms=terms,
        assignments=ledger_rows,
        records=records,
        meter_evidence=proof.MeterEvidence(proof.LEAVES_METER_BATCHES, head.size, head.root_hash),
        key=KEY,
        issued_at_s=now_s,
        as_of_s=None if now_s >= terms.end else now_s,
    )
    session.commit()
    return document


def rollup_rows(session: Session, width_s: int) -> int:
    return session.exec(
        select(func.count()).select_from(MeterRollupRow).where(MeterRollupRow.width_s == width_s)
    ).one()


@pytest.mark.parametrize("seed", range(8))
def test_a_proof_through_roll_ups_is_the_proof_of_every_record(session: Session, seed: int) -> None:
    rng = random.Random(seed)
    start_s = BASE + 1_234 + rng.randrange(0, 600)  # inside an hour and a minute
    end_s = start_s + 2 * HOUR + rng.randrange(0, 900)
    row = contract(session, start_s=start_s, end_s=end_s)
    (a1, a2), (b1, _) = GPUS[NODES[0]], GPUS[NODES[1]]
    swap = start_s + rng.randrange(600, 6_000)  # a substitution: a1 fails, b1 takes over
    assign(session, row.id, NODES[0], a1, start_s, swap)
    assign(session, row.id, NODES[1], b1, swap, None)
    assign(session, row.id, NODES[0], a2, start_s, end_s)
    shipped = random_evidence(rng, start_s=start_s - 900, end_s=end_s + 900)
    meter = Meter(session)
    batches = [(node, batch) for node in NODES for batch in shipped[node]]
    rng.shuffle(batches)  # nodes ship late or out of time order: ids are not time order
    cut = len(batches) * 7 // 10
    for now_s, shipping in ((start_s + 3 * 600 + 17, batches[:cut]), (end_s + 60, batches[cut:])):
        for number, (node, batch) in enumerate(shipping):
            meter.ship(node, batch)
            if number % 37 == 0:  # the job runs now and then, a small chunk at a time
                rollups.roll_up(session, now_s=end_s, limit=rng.choice([50, 400, 3_000]))
                session.commit()
        # A provisional proof, then the final one.
        expected = every_record_proof(session, row, now_s)
        # Roll up all but a tail, so every source of evidence is read: hours, minutes,
        # records in minutes where an edge falls, and records past the mark.
        tail = min(1_000, rollups.lag(session) // 2)
        assert tail > 0
        rollups.roll_up(session, now_s=now_s, limit=rollups.lag(session) - tail)
        session.commit()
        assert rollups.lag(session) == tail
        assert build(session, row, now_s) == expected
        rollups.roll_up_all(session, now_s=now_s)
        assert rollups.lag(session) == 0
        assert build(session, row, now_s) == expected
    assert rollup_rows(session, rollups.HOUR_S) > 0


def test_contiguous_records_of_a_healthy_gpu_roll_up_into_one_row_an_hour_and_a_minute(
    session: Session,
) -> None:
    start_s = BASE  # midnight: hours and minutes align with the window
    row = contract(session, start_s=start_s, end_s=start_s + 2 * HOUR)
    gpu = GPUS[NODES[0]][0]
    assign(session, row.id, NODES[0], gpu, start_s, start_s + 2 * HOUR)
    meter = Meter(session)
    for ten in range(0, 2 * HOUR, 10):
        meter.ship(
            NODES[0],
            [(gpu, start_s + ten + s, start_s + ten + s + 1, True, 90, 650_000) for s in range(10)],
        )
        if ten % 1_800 == 0:
            rollups.roll_up(session, now_s=start_s)
            session.commit()
    raw = build(session, row, start_s + 2 * HOUR)
    assert rollups.roll_up_all(session, now_s=start_s + 2 * HOUR) > 0
    assert rollups.lag(session) == 0
    assert rollup_rows(session, rollups.HOUR_S) == 2
    assert rollup_rows(session, rollups.MINUTE_S) == 120
    first = session.exec(
        select(MeterRollupRow)
        .where(MeterRollupRow.width_s == rollups.HOUR_S)
        .order_by(col(MeterRollupRow.t0_s))
    ).first()
    assert first is not None
    assert (first.t0_s, first.t1_s, first.records) == (start_s, start_s + HOUR, 3_600)
    assert (first.utilization_sum, first.utilization_s) == (str(90 * HOUR), HOUR)
    assert first.energy_mj == 650_000 * HOUR
    through = build(session, row, start_s + 2 * HOUR)
    assert through == raw
    assert through["gpus"][0]["summary"] == {
        "utilization_gpu_pct_mean": "90.00",
        "utilization_sampled_seconds": 2 * HOUR,
        "energy_mj": 650_000 * 2 * HOUR,
    }
    assert rollups.roll_up(session, now_s=start_s) == 0  # nothing new: nothing read


def test_records_of_batches_beyond_the_proofs_tree_head_are_not_counted(
    session: Session,
) -> None:
    start_s = BASE
    row = contract(session, start_s=start_s, end_s=start_s + 600)
    gpu = GPUS[NODES[0]][0]
    assign(session, row.id, NODES[0], gpu, start_s, start_s + 600)
    meter = Meter(session)
    meter.ship(NODES[0], [(gpu, start_s, start_s + 300, True, 50, 1)])
    rollups.roll_up_all(session, now_s=start_s)
    document = build(session, row, start_s + 600)
    assert document["meter_evidence"]["tree_size"] == 1
    assert document["gpus"][0]["healthy_spans"] == [
        [timefmt.format_utc(start_s), timefmt.format_utc(start_s + 300)]
    ]


def test_the_job_runner_rolls_up(session: Session) -> None:
    start_s = BASE
    contract(session, start_s=start_s, end_s=start_s + 600)
    Meter(session).ship(NODES[0], [(GPUS[NODES[0]][0], start_s, start_s + 5, True, 1, 1)])
    engine = session.get_bind()
    runner = jobs.JobRunner(engine, key=KEY, clock=lambda: start_s)  # type: ignore[arg-type]
    runner.rollups()
    runner.leadership.release()
    assert runner.stats.runs == {"rollups": 1}
    assert rollups.lag(session) == 0
    assert rollup_rows(session, rollups.MINUTE_S) == 1


def test_the_mark_waits_for_records_an_open_ingest_wrote_before_its_lock(
    postgres_engine: Engine,
) -> None:
    """An ingest writes its records before it takes the ingest lock, so a later ingest may
    commit higher record ids first: the job must not move its mark past the open one's."""
    engine = postgres_engine
    later_key = signing.generate()
    meters.register_in(engine, later_key, "gpu-node-2")
    read: list[int] = []
    with Session(engine) as open_ingest:
        # What api.ingest does before its lock: chains read (the records lock taken shared),
        # records written; it has not committed.
        connection = open_ingest.connection()
        ingest_store.read_chains(connection, key_ids=[], sent=[])
        with ingest_store.record_writer(connection) as write_records:
            write_records(
                [("key-a", 0, "gpu-node-1", GPUS["gpu-node-1"][0], BASE, BASE + 10, True, 97, 1)]
            )
        with Session(engine) as later:
            assert {r.status for r in ingest.ingest(
                later, documents=meters.chain(later_key, "gpu-node-2", 3), now_s=BASE
            )} == {"accepted"}  # fmt: skip
            later.commit()

        def job() -> None:
            with Session(engine) as session:
                read.append(rollups.roll_up(session, now_s=BASE))
                session.commit()

        thread = threading.Thread(target=job)
        thread.start()
        poll(lambda: _waiting_for_an_advisory_lock(engine))
        assert thread.is_alive()
        assert not read
        open_ingest.commit()
    thread.join(timeout=30)

    assert read == [1 + 3 * 2]  # the open ingest's record and the later one's six
    with Session(engine) as session:
        assert rollups.lag(session) == 0
        folded = session.exec(
            select(func.sum(MeterRollupRow.records)).where(MeterRollupRow.width_s == HOUR)
        ).one()
    assert folded == 7


def _waiting_for_an_advisory_lock(engine: Engine) -> bool:
    with engine.connect() as connection:
        waiting = connection.execute(
            text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
        ).scalar_one()
    return bool(waiting)
