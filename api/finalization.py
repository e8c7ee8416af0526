"""Finalization: the final proof and settlement of an ended contract, stored once.

Once a window has ended and `grace_s` has passed for batches still in flight (a node ships
its spool when its API connection comes back), `finalize_due` builds the final proof
(api.proofs), stores it with the settlement figures, marks the contract settled, and writes
the outbox messages that report both to the exchange (api.webhooks), all in the caller's
transaction: the report goes out if and only if the settlement is stored.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlmodel import Session, col, select

from gpudelivery import canonical, signing
from gpudelivery.api import contracts, proofs, webhooks
from gpudelivery.api.models import Contract, ProofRecord, SettlementRecord

__all__ = ["EVENT_PROOF_FINAL", "EVENT_SETTLEMENT_FINAL", "SETTLED", "finalize", "finalize_due"]

# Contract status once its final proof and settlement are stored.
SETTLED = "settled"
# Outbox event types (docs/webhooks.md).
EVENT_PROOF_FINAL = webhooks.PROOF_FINAL
EVENT_SETTLEMENT_FINAL = webhooks.SETTLEMENT_FINAL


def _due(session: Session, *, now_s: int, grace_s: int) -> Sequence[Contract]:
    return session.exec(
        select(Contract)
        .where(
            col(Contract.status).in_(contracts.LIVE_STATUSES),
            col(Contract.end_s) + grace_s <= now_s,
        )
        .order_by(col(Contract.end_s))
    ).all()


def finalize(
    session: Session, *, contract: Contract, key: signing.SigningKey, now_s: int
) -> ProofRecord:
    """Build and store the final proof and settlement of an ended contract, with their
    outbox messages, in the caller's transaction. Idempotent."""
    existing = proofs.final_proof(session, contract.id)
    if existing is not None:
        return existing
    document = proofs.build_proof(
        session, contract=contract, key=key, now_s=max(now_s, contract.end_s)
    )
    settlement = {**document["settlement"], "as_of": document["as_of"]}
    record = ProofRecord(
        contract_id=contract.id,
        final=True,
        document=canonical.canonical_json(document).decode("utf-8"),
        tree_size=document["meter_evidence"]["tree_size"],
        built_at=now_s,
    )
    session.add(record)
    session.merge(
        SettlementRecord(
            contract_id=contract.id,
            final=True,
            figures=canonical.canonical_json(settlement).decode("utf-8"),
            computed_at=now_s,
        )
    )
    contract.status = SETTLED
    session.add(contract)
    for event_type, payload in (
        (EVENT_PROOF_FINAL, document),
        (EVENT_SETTLEMENT_FINAL, settlement),
    ):
        webhooks.enqueue(
            session, exchange=contract.exchange, event_type=event_type, payload=payload, now_s=now_s
        )
    return record


def finalize_due(
    session: Session, *, key: signing.SigningKey, now_s: int, grace_s: int
) -> list[str]:
    """Finalize every live contract whose window ended at least `grace_s` ago."""
    done = []
    for contract in _due(session, now_s=now_s, grace_s=grace_s):
        finalize(session, contract=contract, key=key, now_s=now_s)
        done.append(contract.id)
    return done
