"""Delivery routes: the assignment ledger (operator), proofs and settlements (readers)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, status
from pydantic import BaseModel, Field

from gpudelivery import timefmt
from gpudelivery.api import auth, contracts, ledger, proofs
from gpudelivery.api.auth import Role
from gpudelivery.api.deps import CurrentPrincipal, SessionDep, StateDep
from gpudelivery.api.models import Assignment
from gpudelivery.api.routes import params

__all__ = ["router"]

router = APIRouter(tags=["delivery"])


class IntervalIn(BaseModel):
    node: str = Field(min_length=1, max_length=253)
    gpu_uuid: str = Field(min_length=1, max_length=96)
    start: str = Field(description="RFC 3339 UTC, whole seconds.")
    end: str | None = Field(default=None, description="Unset while the GPU still serves.")


class IntervalsIn(BaseModel):
    assignments: list[IntervalIn] = Field(min_length=1, max_length=10_000)


class IntervalPublic(BaseModel):
    contract_id: params.ContractIdPath
    node: str
    gpu_uuid: str
    start: str
    end: str | None


class IntervalsPublic(BaseModel):
    data: list[IntervalPublic]
    count: int


class SettlementPublic(BaseModel):
    contract_id: params.ContractIdPath
    status: str = Field(description="provisional (counted up to as_of) or final")
    as_of: str
    figures: dict[str, Any]


def _interval(row: Assignment) -> IntervalPublic:
    return IntervalPublic(
        contract_id=row.contract_id,
        node=row.node,
        gpu_uuid=row.gpu_uuid,
        start=timefmt.format_utc(row.start_s),
        end=None if row.end_s is None else timefmt.format_utc(row.end_s),
    )


@router.post(
    "/v1/contracts/{contract_id}/assignments",
    response_model=IntervalsPublic,
    status_code=status.HTTP_200_OK,
    summary="Record GPU assignment intervals of a contract (operator; idempotent).",
    responses=params.NOT_FOUND,
)
def record_assignments(
    session: SessionDep,
    principal: CurrentPrincipal,
    contract_id: params.ContractIdPath,
    body: IntervalsIn,
) -> IntervalsPublic:
    auth.require(principal, Role.OPERATOR)
    now_s = params.now_s()
    contract = contracts.get_contract(
        session, principal=principal, contract_id=contract_id, now_s=now_s
    )
    intervals = []
    for index, item in enumerate(body.assignments):
        intervals.append(
            ledger.Interval(
                node=item.node,
                gpu_uuid=item.gpu_uuid,
                start_s=params.instant(item.start, f"assignments[{index}].start"),
                end_s=None
                if item.end is None
                else params.instant(item.end, f"assignments[{index}].end"),
            )
        )
    rows = ledger.record_intervals(session, contract=contract, intervals=intervals, now_s=now_s)
    session.commit()
    return IntervalsPublic(data=[_interval(row) for row in rows], count=len(rows))


@router.get(
    "/v1/contracts/{contract_id}/assignments",
    response_model=IntervalsPublic,
    summary="The assignment ledger of a contract.",
    responses=params.NOT_FOUND,
)
def list_assignments(
    session: SessionDep, principal: CurrentPrincipal, contract_id: params.ContractIdPath
) -> IntervalsPublic:
    contracts.get_contract(
        session, principal=principal, contract_id=contract_id, now_s=params.now_s()
    )
    rows = ledger.assignments_of(session, contract_id)
    return IntervalsPublic(data=[_interval(row) for row in rows], count=len(rows))


@router.get(
    "/v1/contracts/{contract_id}/proof",
    summary="The signed delivery proof: final once stored, else provisional, built now.",
    responses={
        **params.NOT_FOUND,
        409: {"description": "The delivery window has not started."},
        200: {"description": "A delivery proof (docs/proof-format.md)."},
    },
)
def get_proof(
    session: SessionDep,
    state: StateDep,
    principal: CurrentPrincipal,
    contract_id: params.ContractIdPath,
) -> dict[str, Any]:
    now_s = params.now_s()
    contract = contracts.get_contract(
        session, principal=principal, contract_id=contract_id, now_s=now_s
    )
    stored = proofs.final_proof(session, contract.id)
    if stored is not None:
        document: dict[str, Any] = json.loads(stored.document)
        return document
    document = proofs.build_proof(session, contract=contract, key=state.provider_key, now_s=now_s)
    session.commit()  # a new tree head may have been signed for it
    return document


@router.get(
    "/v1/contracts/{contract_id}/settlement",
    response_model=SettlementPublic,
    summary="The settlement figures: final once stored, else provisional up to now.",
    responses={**params.NOT_FOUND, 409: {"description": "The delivery window has not started."}},
)
def get_settlement(
    session: SessionDep,
    state: StateDep,
    principal: CurrentPrincipal,
    contract_id: params.ContractIdPath,
) -> SettlementPublic:
    now_s = params.now_s()
    contract = contracts.get_contract(
        session, principal=principal, contract_id=contract_id, now_s=now_s
    )
    figures, final = proofs.settlement_of(
        session, contract=contract, key=state.provider_key, now_s=now_s
    )
    session.commit()
    as_of = str(figures.pop("as_of"))
    return SettlementPublic(
        contract_id=contract.id,
        status="final" if final else "provisional",
        as_of=as_of,
        figures=figures,
    )
