"""Builders of signed meter batch chains for the API's ingest and evidence-log tests.

Batches are made by the real signer (`gpudelivery.batches.sign_batch`) with real keys, so
the API verifies exactly what a metering agent would ship.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, func, select

from gpudelivery import batches, signing, timefmt
from gpudelivery.api import ingest

EPOCH = timefmt.parse_utc("2026-03-03T09:00:00Z", field="epoch")
INTERVAL_S = 10
GPU_A = "GPU-5d8c2e1a-7f3b-4c9d-8e6f-0a1b2c3d4e5f"
GPU_B = "GPU-9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d"


def record(gpu_uuid: str, t0_s: int, **fields: Any) -> dict[str, Any]:
    """One meter record of an interval from `t0_s`; `fields` add to or replace its own."""
    return {
        "gpu_uuid": gpu_uuid,
        "t0": timefmt.format_utc(t0_s),
        "t1": timefmt.format_utc(t0_s + INTERVAL_S),
        "healthy": True,
        "utilization_gpu_pct": 97,
        "energy_mj": 6_950_000,
        **fields,
    }


def interval_records(seq: int) -> list[dict[str, Any]]:
    """Two GPUs' records of the interval of batch `seq`."""
    t0_s = EPOCH + seq * INTERVAL_S
    return [record(GPU_A, t0_s), record(GPU_B, t0_s, healthy=False, xids=[79])]


def chain(
    key: signing.SigningKey, node: str, count: int, *, start: int = 0
) -> list[dict[str, Any]]:
    """Batches `start` .. `start + count - 1` of the node's chain under `key`, from seq 0
    (batches before `start` are signed for their hashes and left out)."""
    documents: list[dict[str, Any]] = []
    prev_hash = None
    for seq in range(start + count):
        document = batches.sign_batch(
            key=key, node=node, seq=seq, prev_hash=prev_hash, records=interval_records(seq)
        )
        prev_hash = batches.batch_hash(document)
        if seq >= start:
            documents.append(document)
    return documents


def follow(
    key: signing.SigningKey,
    previous: dict[str, Any],
    *,
    records: list[dict[str, Any]] | None = None,
    gap: batches.Gap | None = None,
) -> dict[str, Any]:
    """The batch after `previous` in its chain."""
    seq = previous["seq"] + 1
    return batches.sign_batch(
        key=key,
        node=previous["node"],
        seq=seq,
        prev_hash=batches.batch_hash(previous),
        records=interval_records(seq) if records is None else records,
        gap=gap,
    )


def register(session: Session, key: signing.SigningKey, node: str, *, now_s: int = EPOCH) -> None:
    """Register `key` for `node` and commit."""
    pem = signing.public_pem(key.public_key).decode("ascii")
    ingest.register_key(session, node=node, public_key_pem=pem, now_s=now_s)
    session.commit()


def count(engine: Engine, model: type[SQLModel]) -> int:
    """The rows of `model`'s table, read in a session of its own."""
    with Session(engine) as session:
        return int(session.exec(select(func.count()).select_from(model)).one())


def register_in(engine: Engine, key: signing.SigningKey, node: str) -> None:
    """Register `key` for `node` in a session of its own."""
    with Session(engine) as session:
        register(session, key, node)
