"""Delivery proofs and settlements from the ledger and the ingested evidence.

A proof is the core's signed document (docs/proof-format.md) built from the contract's
terms, its assignment ledger, and the meter records of the batches in the evidence log up
to a signed tree head; its `meter_evidence` names that head (`leaves: "meter-batches"`),
so an exchange can fetch an inclusion proof for any batch and check it was counted
against what the API published. During delivery a proof is provisional (counted up to
now, built on demand, not kept); once the window has ended and `grace_s` has passed for
batches still in flight, `finalize_due` builds the final proof and settlement once, stores
them, and writes their outbox messages in the same transaction.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from gpudelivery import evidence, proof, signing
from gpudelivery.api import contracts, errors, evidence_log, ledger
from gpudelivery.api.models import (
    Contract,
    MeterBatch,
    MeterRecordRow,
    ProofRecord,
    SettlementRecord,
)

__all__ = ["build_proof", "final_proof", "settlement_of"]

# Rows fetched at a time while a proof streams its meter records.
_CHUNK_ROWS = 10_000


def _records(
    session: Session, *, gpus: set[tuple[str, str]], start_s: int, end_s: int, tree_size: int
) -> Iterator[evidence.MeterRecord]:
    """The meter records of `gpus` overlapping [start_s, end_s), from logged batches only."""
    if not gpus:
        return
    nodes = sorted({node for node, _ in gpus})
    # Plain column tuples, streamed in chunks: a fleet-month is millions of rows, and ORM
    # objects for all of them at once cost far more memory and time than the sweep.
    query = (
        sa_select(
            col(MeterRecordRow.node),
            col(MeterRecordRow.gpu_uuid),
            col(MeterRecordRow.t0_s),
            col(MeterRecordRow.t1_s),
            col(MeterRecordRow.healthy),
            col(MeterRecordRow.utilization_gpu_pct),
            col(MeterRecordRow.energy_mj),
        )
        .join(
            MeterBatch,
            (col(MeterBatch.key_id) == col(MeterRecordRow.key_id))
            & (col(MeterBatch.seq) == col(MeterRecordRow.seq)),
        )
        .where(
            col(MeterRecordRow.node).in_(nodes),
            col(MeterRecordRow.t1_s) > start_s,
            col(MeterRecordRow.t0_s) < end_s,
            col(MeterBatch.leaf_index) < tree_size,
        )
        .execution_options(yield_per=_CHUNK_ROWS)
    )
    record = evidence.MeterRecord
    for node, gpu_uuid, t0_s, t1_s, healthy, utilization, energy in session.execute(query):
        if (node, gpu_uuid) in gpus:
            yield record(node, gpu_uuid, t0_s, t1_s, healthy, utilization, energy)


def build_proof(
    session: Session, *, contract: Contract, key: signing.SigningKey, now_s: int
) -> dict[str, Any]:
    """The signed proof of `contract` as of `now_s`: final once the window has ended."""
    terms = contracts.terms_of(contract)
    if now_s < terms.start:
        raise errors.ConflictError(
            f"contract {contract.id} has not started: there is no delivery to prove yet"
        )
    counted_until = min(now_s, terms.end)
    rows = ledger.assignments_of(session, contract.id)
    assignments = ledger.closed_for(rows, contract_id=contract.id, until_s=counted_until)
    head = evidence_log.tree_head(session, key=key, now_s=now_s)
    gpus = {(a.node, a.gpu_uuid) for a in assignments}
    return proof.build_proof(
        terms=terms,
        assignments=assignments,
        records=_records(
            session, gpus=gpus, start_s=terms.start, end_s=counted_until, tree_size=head.size
        ),
        meter_evidence=proof.MeterEvidence(proof.LEAVES_METER_BATCHES, head.size, head.root_hash),
        key=key,
        issued_at_s=now_s,
        as_of_s=None if now_s >= terms.end else now_s,
    )


def final_proof(session: Session, contract_id: str) -> ProofRecord | None:
    return session.exec(
        select(ProofRecord).where(ProofRecord.contract_id == contract_id, col(ProofRecord.final))
    ).first()


def settlement_of(
    session: Session, *, contract: Contract, key: signing.SigningKey, now_s: int
) -> tuple[dict[str, Any], bool]:
    """The settlement figures and whether they are final (else counted up to now)."""
    stored = session.get(SettlementRecord, contract.id)
    if stored is not None and stored.final:
        return json.loads(stored.figures), True
    document = build_proof(session, contract=contract, key=key, now_s=now_s)
    return {**document["settlement"], "as_of": document["as_of"]}, False
