"""Delivery proofs and settlements from the ledger and the ingested evidence.

A proof is the core's signed document (docs/proof-format.md) built from the contract's
terms, its assignment ledger, and the meter records of the batches in the evidence log up
to a signed tree head, read mostly through their roll-ups (api.rollups); its
`meter_evidence` names that head (`leaves: "meter-batches"`), so an exchange can fetch an
inclusion proof for any batch and check it was counted against what the API published.
During delivery a proof is provisional (counted up to now, built on demand, not kept);
once the window has ended and `grace_s` has passed for batches still in flight,
`finalize_due` builds the final proof and settlement once, stores them, and writes their
outbox messages in the same transaction.
"""

from __future__ import annotations

import json
from typing import Any

from sqlmodel import Session, col, select

from gpudelivery import accounting, proof, signing
from gpudelivery.api import contracts, errors, evidence_log, ledger, rollups
from gpudelivery.api.models import Contract, ProofRecord, SettlementRecord

__all__ = ["build_proof", "final_proof", "settlement_of"]


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
    # The mark first, then the head: every record rolled up is in a batch of that head.
    last_record_id = rollups.hold(session)
    head = evidence_log.tree_head(session, key=key, now_s=now_s)
    assigned = accounting.assigned_spans(
        assignments, contract_id=contract.id, window=(terms.start, counted_until)
    )
    return proof.build_proof(
        terms=terms,
        assignments=assignments,
        records=rollups.evidence(
            session,
            assigned=assigned,
            start_s=terms.start,
            end_s=counted_until,
            tree_size=head.size,
            last_record_id=last_record_id,
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
