"""The API's tables (SQLModel) and the shapes its routes read and answer.

Per entity, the FastAPI template's family: `XCreate` (what a client sends), `X` (the
table), `XPublic` (what a client gets back), `XsPublic` (a page of them). Times are whole
epoch seconds in the tables and RFC 3339 UTC strings on the wire; money stays in the
contract's canonical terms (decimal strings), never a float column.

Tables change only through Alembic (api/migrations); `tests/api` checks that the migrated
schema matches these models.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Column, Float, Index, Integer, LargeBinary, UniqueConstraint
from sqlmodel import Field, SQLModel

__all__ = [
    "ApiKey",
    "Assignment",
    "Capacity",
    "Contract",
    "ContractTransfer",
    "Incident",
    "MerkleNode",
    "MeterBatch",
    "MeterKey",
    "MeterRecordRow",
    "MeterRollupRow",
    "OutboxMessage",
    "ProofRecord",
    "RollupState",
    "SettlementRecord",
    "TreeHead",
    "Webhook",
]


# A 64-bit row id that SQLite still numbers itself (only INTEGER PRIMARY KEY does there).
_ROW_ID = BigInteger().with_variant(Integer, "sqlite")


def _big(*, primary_key: bool = False, index: bool = False, nullable: bool = False) -> Any:
    """An integer column wide enough for epoch seconds, sequence numbers and energy."""
    return Field(
        sa_column=Column(BigInteger, primary_key=primary_key, index=index, nullable=nullable)
    )


class ApiKey(SQLModel, table=True):
    """A principal's API key: only the SHA-256 of its secret is kept."""

    __tablename__ = "api_keys"

    id: str = Field(primary_key=True, max_length=16)
    name: str = Field(index=True, max_length=128)
    role: str = Field(max_length=16)
    secret_hash: str = Field(max_length=64)
    created_at: int = _big()
    revoked_at: int | None = _big(nullable=True)


class Contract(SQLModel, table=True):
    """A delivery contract: the core's terms, who sent it, who holds it now."""

    __tablename__ = "contracts"
    __table_args__ = (
        UniqueConstraint("exchange", "idempotency_key", name="contracts_idempotency"),
        Index("contracts_by_window", "instrument", "start_s", "end_s"),
    )

    id: str = Field(primary_key=True, max_length=128)
    exchange: str = Field(index=True, max_length=128)
    holder: str | None = Field(default=None, index=True, max_length=128)
    instrument: str = Field(max_length=63)
    gpu_count: int
    start_s: int = _big()
    end_s: int = _big()
    terms: str  # canonical JSON of the terms as sent (buyer = the first holder)
    status: str = Field(max_length=16)
    idempotency_key: str = Field(max_length=128)
    created_at: int = _big()
    cancelled_at: int | None = _big(nullable=True)


class Capacity(SQLModel, table=True):
    """How many GPUs of an instrument the provider can deliver at once (its pools' nodes
    less their spares), as the operator reports it."""

    __tablename__ = "capacity"

    instrument: str = Field(primary_key=True, max_length=63)
    gpus: int
    updated_at: int = _big()


class ContractTransfer(SQLModel, table=True):
    """The holder of a contract changed at `at_s` (secondary market)."""

    __tablename__ = "contract_transfers"

    id: int | None = Field(default=None, primary_key=True)
    contract_id: str = Field(foreign_key="contracts.id", index=True, max_length=128)
    from_holder: str | None = Field(default=None, max_length=128)
    to_holder: str = Field(max_length=128)
    at_s: int = _big()
    recorded_at: int = _big()


class MeterKey(SQLModel, table=True):
    """A node's registered Ed25519 key."""

    __tablename__ = "meter_keys"

    key_id: str = Field(primary_key=True, max_length=64)
    node: str = Field(index=True, max_length=253)
    public_key_pem: str
    registered_at: int = _big()
    revoked_at: int | None = _big(nullable=True)


class MeterBatch(SQLModel, table=True):
    """A verified meter batch, kept as received: it is the evidence. Each is a leaf of the
    evidence log (`leaf_index`), in the order the API accepted them."""

    __tablename__ = "meter_batches"

    key_id: str = Field(primary_key=True, foreign_key="meter_keys.key_id", max_length=64)
    seq: int = _big(primary_key=True)
    node: str = Field(index=True, max_length=253)
    hash: str = Field(max_length=64)
    leaf_index: int = Field(sa_column=Column(BigInteger, nullable=False, unique=True))
    leaf_hash: str = Field(max_length=64)
    document: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    received_at: int = _big()


class MeterRecordRow(SQLModel, table=True):
    """One meter record of a stored batch, flattened for the settlement's joins."""

    __tablename__ = "meter_records"
    __table_args__ = (Index("meter_records_by_gpu", "node", "gpu_uuid", "t0_s"),)

    id: int | None = Field(default=None, sa_column=Column(_ROW_ID, primary_key=True))
    key_id: str = Field(max_length=64)
    seq: int = _big()
    node: str = Field(max_length=253)
    gpu_uuid: str = Field(max_length=96)
    t0_s: int = _big()
    t1_s: int = _big()
    healthy: bool
    # As metered: a meter may send fractions, and the proof must count what was sent.
    utilization_gpu_pct: float | None = Field(default=None, sa_column=Column(Float, nullable=True))
    energy_mj: int | None = _big(nullable=True)


class MeterRollupRow(SQLModel, table=True):
    """Meter records of one GPU in one health state, summed (api.rollups): their t0 all lie
    in one aligned bucket of `width_s` seconds starting at `bucket_s`, and their intervals
    connect, so together they cover exactly [t0_s, t1_s). A proof reads these in place of
    the records wherever a row lies wholly inside or wholly outside the counted spans."""

    __tablename__ = "meter_rollups"
    __table_args__ = (Index("meter_rollups_by_gpu", "node", "gpu_uuid", "width_s", "bucket_s"),)

    id: int | None = Field(default=None, sa_column=Column(_ROW_ID, primary_key=True))
    width_s: int
    node: str = Field(max_length=253)
    gpu_uuid: str = Field(max_length=96)
    bucket_s: int = _big()
    t0_s: int = _big()
    t1_s: int = _big()
    healthy: bool
    records: int = _big()
    # Exact sum over its records that carry a utilization of utilization x seconds, as a
    # fraction "n" or "n/d" (a meter may send fractions); and the seconds they cover.
    utilization_sum: str | None = Field(default=None, max_length=256)
    utilization_s: int = _big()
    # Sum of energy over its records that carry one; None when none does.
    energy_mj: int | None = _big(nullable=True)


class RollupState(SQLModel, table=True):
    """How far the roll-ups have read: every meter record with `id` <= `last_record_id` is
    in exactly one roll-up row of each width."""

    __tablename__ = "rollup_state"

    name: str = Field(primary_key=True, max_length=32)
    last_record_id: int = _big()
    updated_at: int = _big()


class Incident(SQLModel, table=True):
    """Something the evidence says went wrong: a gap or fork in a node's chain, a silent
    meter. Recorded, never silently accepted."""

    __tablename__ = "incidents"

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=32, index=True)
    node: str = Field(max_length=253, index=True)
    key_id: str | None = Field(default=None, max_length=64)
    seq: int | None = _big(nullable=True)
    detail: str
    at_s: int = _big()


class TreeHead(SQLModel, table=True):
    """A signed head of the evidence log: its size and root at a time."""

    __tablename__ = "tree_heads"

    size: int = _big(primary_key=True)
    root_hash: str = Field(max_length=64)
    timestamp_s: int = _big()
    key_id: str = Field(max_length=64)
    signature: str


class MerkleNode(SQLModel, table=True):
    """The root of a complete subtree of the evidence log: leaves
    [index * 2**level, (index + 1) * 2**level). Kept for high levels only
    (api.evidence_log), so heads and proofs read O(log n) rows, not every leaf."""

    __tablename__ = "merkle_nodes"

    level: int = Field(primary_key=True)
    index: int = _big(primary_key=True)
    hash: str = Field(max_length=64)


class Assignment(SQLModel, table=True):
    """The assignment ledger: GPU (node, UUID) served the contract over [start_s, end_s).
    An open interval (end_s None) is still running; the operator closes it."""

    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("contract_id", "node", "gpu_uuid", "start_s", name="assignments_key"),
    )

    id: int | None = Field(default=None, primary_key=True)
    contract_id: str = Field(foreign_key="contracts.id", index=True, max_length=128)
    node: str = Field(max_length=253)
    gpu_uuid: str = Field(max_length=96)
    start_s: int = _big()
    end_s: int | None = _big(nullable=True)
    recorded_at: int = _big()


class ProofRecord(SQLModel, table=True):
    """A signed delivery proof as built: provisional during delivery, final after it."""

    __tablename__ = "proofs"

    id: int | None = Field(default=None, primary_key=True)
    contract_id: str = Field(foreign_key="contracts.id", index=True, max_length=128)
    final: bool
    document: str  # the signed proof, canonical JSON
    tree_size: int = _big()
    built_at: int = _big()


class SettlementRecord(SQLModel, table=True):
    """A contract's settlement figures (SETTLEMENT.md): provisional, then final once."""

    __tablename__ = "settlements"

    contract_id: str = Field(primary_key=True, foreign_key="contracts.id", max_length=128)
    final: bool
    figures: str  # canonical JSON of the core's settlement figures
    computed_at: int = _big()


class Webhook(SQLModel, table=True):
    """Where an exchange receives final proofs and settlements."""

    __tablename__ = "webhooks"

    id: str = Field(primary_key=True, max_length=32)
    exchange: str = Field(index=True, max_length=128)
    url: str = Field(max_length=2048)
    created_at: int = _big()
    disabled_at: int | None = _big(nullable=True)


class OutboxMessage(SQLModel, table=True):
    """A message to deliver to a webhook, written in the same transaction as what it
    reports; dispatched with retries until delivered or given up."""

    __tablename__ = "outbox"
    __table_args__ = (Index("outbox_due", "delivered_at", "next_attempt_at"),)

    id: str = Field(primary_key=True, max_length=40)  # the webhook-id header
    webhook_id: str = Field(foreign_key="webhooks.id", index=True, max_length=32)
    event_type: str = Field(max_length=64)
    payload: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: int = _big()
    next_attempt_at: int = _big()
    attempts: int = 0
    delivered_at: int | None = _big(nullable=True)
    given_up_at: int | None = _big(nullable=True)
    last_error: str | None = None
