"""Contract and capacity routes (api.contracts holds the rules)."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Path, Query, Response, status
from pydantic import BaseModel, ConfigDict, Field

from gpudelivery import timefmt
from gpudelivery.api import auth, contracts
from gpudelivery.api.auth import Role
from gpudelivery.api.deps import CurrentPrincipal, SessionDep
from gpudelivery.api.models import Contract, ContractTransfer
from gpudelivery.api.routes import params

__all__ = ["router"]

router = APIRouter(tags=["contracts"])


_DECIMAL = r"^[0-9]+(\.[0-9]+)?$"
_INSTRUMENT = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
InstrumentPath = Annotated[str, Path(min_length=1, max_length=63, pattern=_INSTRUMENT)]
_INSTANT = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$"


class TierIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    below: str = Field(pattern=_DECIMAL, description="Availability threshold, 0 < below <= 1.")
    rate: str = Field(pattern=_DECIMAL, description="Share of the contract value, 0..1.")


class TermsIn(BaseModel):
    """A contract's terms (SETTLEMENT.md): decimals as strings, times RFC 3339 UTC. What
    JSON Schema cannot say (end after start, tiers in order) answers 422 naming the field."""

    model_config = ConfigDict(extra="forbid")

    contract_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    buyer: str | None = Field(default=None, min_length=1, max_length=128)
    instrument: str = Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    gpu_count: int = Field(ge=1, le=1_000_000)
    start: str = Field(pattern=_INSTANT)
    end: str = Field(pattern=_INSTANT)
    price_per_gpu_hour: str = Field(pattern=_DECIMAL)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    penalty_tiers: list[TierIn] = Field(default_factory=list, max_length=16)
    ld_multiplier: str | None = Field(default=None, pattern=_DECIMAL)


class ContractPublic(BaseModel):
    contract_id: str
    exchange: str = Field(
        description="Who sent it: the exchange, or for a contract registered from the "
        "cluster, the operator that registered it."
    )
    origin: str = Field(
        description="`exchange` (sent by an exchange) or `cluster` (applied on the "
        "provider's cluster and registered by the operator)."
    )
    holder: str | None
    instrument: str
    gpu_count: int
    start: str
    end: str
    status: str
    terms: dict[str, Any]
    created_at: str
    cancelled_at: str | None


class ContractsPublic(BaseModel):
    data: list[ContractPublic]
    count: int


class TransferCreate(BaseModel):
    to_holder: str = Field(min_length=1, max_length=128, description="The new holder.")
    at: str = Field(description="When the new holder takes the contract (RFC 3339, UTC).")


class TransferPublic(BaseModel):
    contract_id: str
    from_holder: str | None
    to_holder: str
    at: str


class CapacityUpdate(BaseModel):
    gpus: int = Field(ge=0, le=10_000_000, description="GPUs the provider can deliver at once.")


class CapacityPublic(BaseModel):
    instrument: str
    gpus: int
    updated_at: str


class FreeCapacity(BaseModel):
    instrument: str
    from_: str = Field(alias="from")
    to: str
    capacity_gpus: int
    free_gpus: int = Field(description="GPUs free at the busiest instant of the span.")
    free_gpu_hours: str = Field(description="Free GPU-hours over the span, a decimal string.")


def _public(session: SessionDep, contract: Contract, now_s: int) -> ContractPublic:
    return ContractPublic(
        contract_id=contract.id,
        exchange=contract.exchange,
        origin=contracts.origin_of(contract),
        holder=contracts.current_holder(session, contract, now_s=now_s),
        instrument=contract.instrument,
        gpu_count=contract.gpu_count,
        start=timefmt.format_utc(contract.start_s),
        end=timefmt.format_utc(contract.end_s),
        status=contract.status,
        terms=json.loads(contract.terms),
        created_at=timefmt.format_utc(contract.created_at),
        cancelled_at=None
        if contract.cancelled_at is None
        else timefmt.format_utc(contract.cancelled_at),
    )


def _stored(
    session: SessionDep, response: Response, contract: Contract, now_s: int, *, created: bool
) -> ContractPublic:
    """Commit a contract sent or registered, answered 201 when it is new, else 200."""
    session.commit()
    if not created:
        response.status_code = status.HTTP_200_OK
    return _public(session, contract, now_s)


@router.post(
    "/v1/contracts",
    response_model=ContractPublic,
    status_code=status.HTTP_201_CREATED,
    summary="Send a delivery contract (exchange).",
    responses={200: {"description": "Sent before with this Idempotency-Key: the same one."}},
)
def create_contract(
    session: SessionDep,
    principal: CurrentPrincipal,
    response: Response,
    terms: Annotated[TermsIn, Body(description="The contract's terms (SETTLEMENT.md).")],
    idempotency_key: Annotated[str, Header(min_length=1, max_length=128)],
) -> ContractPublic:
    auth.require(principal, Role.EXCHANGE)
    now_s = params.now_s()
    contract, created = contracts.create_contract(
        session,
        exchange=principal,
        idempotency_key=idempotency_key,
        data=terms.model_dump(exclude_none=True),
        now_s=now_s,
    )
    return _stored(session, response, contract, now_s, created=created)


@router.put(
    "/v1/contracts/{contract_id}",
    response_model=ContractPublic,
    status_code=status.HTTP_201_CREATED,
    summary="Register a contract a provider applied on its cluster (operator; idempotent).",
    responses={
        200: {"description": "Held with the same terms already: that contract."},
        409: {"description": "Held with other terms: the detail names each difference."},
    },
)
def register_contract(
    session: SessionDep,
    principal: CurrentPrincipal,
    response: Response,
    contract_id: params.ContractIdPath,
    terms: Annotated[TermsIn, Body(description="The contract's terms (SETTLEMENT.md).")],
) -> ContractPublic:
    auth.require(principal, Role.OPERATOR)
    now_s = params.now_s()
    contract, created = contracts.register_contract(
        session,
        registrar=principal,
        contract_id=contract_id,
        data=terms.model_dump(exclude_none=True),
        now_s=now_s,
    )
    return _stored(session, response, contract, now_s, created=created)


@router.get("/v1/contracts", response_model=ContractsPublic, summary="The contracts you may see.")
def list_contracts(
    session: SessionDep,
    principal: CurrentPrincipal,
    status_: Annotated[str | None, Query(alias="status")] = None,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> ContractsPublic:
    now_s = params.now_s()
    page, count = contracts.list_contracts(
        session, principal=principal, now_s=now_s, status=status_, offset=offset, limit=limit
    )
    return ContractsPublic(data=[_public(session, c, now_s) for c in page], count=count)


@router.get(
    "/v1/contracts/{contract_id}",
    response_model=ContractPublic,
    summary="One contract.",
    responses=params.NOT_FOUND,
)
def get_contract(
    session: SessionDep, principal: CurrentPrincipal, contract_id: params.ContractIdPath
) -> Any:
    now_s = params.now_s()
    contract = contracts.get_contract(
        session, principal=principal, contract_id=contract_id, now_s=now_s
    )
    return _public(session, contract, now_s)


@router.post(
    "/v1/contracts/{contract_id}/cancel",
    response_model=ContractPublic,
    summary="Cancel a contract before its delivery starts (its exchange, or the operator "
    "that registered it).",
    responses=params.NOT_FOUND,
)
def cancel_contract(
    session: SessionDep, principal: CurrentPrincipal, contract_id: params.ContractIdPath
) -> Any:
    now_s = params.now_s()
    contract = contracts.cancel_contract(
        session, principal=principal, contract_id=contract_id, now_s=now_s
    )
    session.commit()
    return _public(session, contract, now_s)


@router.post(
    "/v1/contracts/{contract_id}/transfers",
    response_model=TransferPublic,
    status_code=status.HTTP_201_CREATED,
    summary="Record a change of holder at a given instant (its exchange).",
    responses=params.NOT_FOUND,
)
def transfer_contract(
    session: SessionDep,
    principal: CurrentPrincipal,
    contract_id: params.ContractIdPath,
    body: TransferCreate,
) -> TransferPublic:
    now_s = params.now_s()
    transfer: ContractTransfer = contracts.transfer_contract(
        session,
        principal=principal,
        contract_id=contract_id,
        to_holder=body.to_holder,
        at_s=params.instant(body.at, "at"),
        now_s=now_s,
    )
    session.commit()
    return TransferPublic(
        contract_id=transfer.contract_id,
        from_holder=transfer.from_holder,
        to_holder=transfer.to_holder,
        at=timefmt.format_utc(transfer.at_s),
    )


@router.get(
    "/v1/capacity",
    response_model=FreeCapacity,
    summary="What is still free of an instrument over a span.",
    responses={404: {"description": "The provider declares no capacity for it."}},
)
def free_capacity(
    session: SessionDep,
    principal: CurrentPrincipal,
    instrument: Annotated[str, Query(min_length=1, max_length=63, pattern=_INSTRUMENT)],
    from_: Annotated[str, Query(alias="from")],
    to: str,
) -> FreeCapacity:
    auth.require(principal, Role.EXCHANGE, Role.OPERATOR)
    free = contracts.free_capacity(
        session,
        instrument=instrument,
        from_s=params.instant(from_, "from"),
        to_s=params.instant(to, "to"),
    )
    return FreeCapacity.model_validate(
        {
            "instrument": free.instrument,
            "from": timefmt.format_utc(free.from_s),
            "to": timefmt.format_utc(free.to_s),
            "capacity_gpus": free.capacity_gpus,
            "free_gpus": free.free_gpus,
            "free_gpu_hours": _hours(free.free_gpu_seconds),
        }
    )


def _hours(seconds: int) -> str:
    whole, rest = divmod(seconds, 3600)
    return f"{whole}.{rest * 1_000_000 // 3600:06d}"


@router.put(
    "/v1/capacity/{instrument}",
    response_model=CapacityPublic,
    summary="Declare how many GPUs of an instrument can be delivered at once (operator).",
)
def set_capacity(
    session: SessionDep,
    principal: CurrentPrincipal,
    instrument: InstrumentPath,
    body: CapacityUpdate,
) -> CapacityPublic:
    auth.require(principal, Role.OPERATOR)
    row = contracts.set_capacity(
        session, instrument=instrument, gpus=body.gpus, now_s=params.now_s()
    )
    session.commit()
    return CapacityPublic(
        instrument=row.instrument, gpus=row.gpus, updated_at=timefmt.format_utc(row.updated_at)
    )
