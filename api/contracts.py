"""Contracts: created by exchanges, held by buyers, cancelled, transferred; and capacity.

An exchange sends a contract (the core's terms) with an idempotency key: sending the same
terms with the same key again answers the same contract, different terms with a used key
are refused. A contract is accepted only while the instrument's capacity holds it: at no
instant may the GPUs of the overlapping live contracts exceed what the provider declared
(`Capacity`, written by the operator from its pools), so an exchange never sells what the
provider cannot deliver. `free_capacity` answers what is still free over a span.

The operator also *registers* contracts a provider applied on its cluster with `kubectl`
(`register_contract`): the cluster has already booked (or rejected) them against its pools,
so registration records them without a capacity check, and they count against capacity from
then on. The operator's principal is their exchange of record, and their idempotency key is
`registration_key(contract_id)`, a reserved form no exchange may send: that is how
`origin_of` tells them apart without a column of their own. The operator that registered
a contract may cancel it before its start, as an exchange cancels the contracts it sent.

The holder of a contract is the terms' buyer until a transfer moves it at a given instant
(the secondary market); the holder *now* decides who may read it. Service functions are
keyword-only, take the session and never commit: the route owns the transaction.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from sqlmodel import Session, col, func, or_, select

from gpudelivery import canonical, timefmt
from gpudelivery import errors as core_errors
from gpudelivery import terms as core_terms
from gpudelivery.api import errors
from gpudelivery.api.auth import Principal, Role
from gpudelivery.api.models import Capacity, Contract, ContractTransfer

__all__ = [
    "BOOKED",
    "CANCELLED",
    "ORIGIN_CLUSTER",
    "ORIGIN_EXCHANGE",
    "Free",
    "cancel_contract",
    "create_contract",
    "current_holder",
    "free_capacity",
    "get_contract",
    "list_contracts",
    "origin_of",
    "register_contract",
    "registration_key",
    "set_capacity",
    "transfer_contract",
]

# Contract statuses the API sets; the operator reports the delivery phases later.
BOOKED = "booked"
CANCELLED = "cancelled"
LIVE_STATUSES = frozenset({BOOKED})
# Where a contract came from: sent by an exchange, or registered by the operator from a
# ComputeContract a provider applied on its cluster.
ORIGIN_EXCHANGE = "exchange"
ORIGIN_CLUSTER = "cluster"
# The idempotency keys of registered contracts start with this; exchanges may not send it.
REGISTERED_KEY_PREFIX = "cluster:"


def _terms(data: object) -> core_terms.ContractTerms:
    try:
        return core_terms.parse_terms(data)
    except core_errors.InputError as exc:
        raise errors.UnprocessableError(str(exc)) from exc


def _canonical_terms(terms: core_terms.ContractTerms) -> str:
    return canonical.canonical_json(terms.to_json()).decode("utf-8")


def terms_of(contract: Contract) -> core_terms.ContractTerms:
    return core_terms.parse_terms(json.loads(contract.terms))


def registration_key(contract_id: str) -> str:
    """The idempotency key of a registered contract: the reserved prefix and a SHA-256 of
    the id (an id may be 128 characters, as long as the column; its hash always fits)."""
    return REGISTERED_KEY_PREFIX + hashlib.sha256(contract_id.encode("utf-8")).hexdigest()


def origin_of(contract: Contract) -> str:
    """`ORIGIN_CLUSTER` for a contract the operator registered, else `ORIGIN_EXCHANGE`."""
    if contract.idempotency_key == registration_key(contract.id):
        return ORIGIN_CLUSTER
    return ORIGIN_EXCHANGE


# -- capacity ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Free:
    """What is still free of an instrument over [from_s, to_s)."""

    instrument: str
    from_s: int
    to_s: int
    capacity_gpus: int
    free_gpus: int  # at the busiest instant: what one more contract over the span may take
    free_gpu_seconds: int


def set_capacity(session: Session, *, instrument: str, gpus: int, now_s: int) -> Capacity:
    if gpus < 0:
        raise errors.UnprocessableError("gpus: must be 0 or more")
    row = session.get(Capacity, instrument)
    if row is None:
        row = Capacity(instrument=instrument, gpus=gpus, updated_at=now_s)
    else:
        row.gpus, row.updated_at = gpus, now_s
    session.add(row)
    return row


def _live_overlapping(
    session: Session, *, instrument: str, from_s: int, to_s: int
) -> Sequence[Contract]:
    return session.exec(
        select(Contract).where(
            Contract.instrument == instrument,
            col(Contract.status).in_(LIVE_STATUSES),
            Contract.start_s < to_s,
            Contract.end_s > from_s,
        )
    ).all()


def free_capacity(session: Session, *, instrument: str, from_s: int, to_s: int) -> Free:
    """Free GPUs of `instrument` over [from_s, to_s): a sweep over the live contracts."""
    if to_s <= from_s:
        raise errors.UnprocessableError("to: must be after from")
    row = session.get(Capacity, instrument)
    if row is None:
        raise errors.NotFoundError(f"the provider declares no capacity for {instrument}")
    changes: dict[int, int] = {}
    for contract in _live_overlapping(session, instrument=instrument, from_s=from_s, to_s=to_s):
        start, end = max(contract.start_s, from_s), min(contract.end_s, to_s)
        changes[start] = changes.get(start, 0) + contract.gpu_count
        changes[end] = changes.get(end, 0) - contract.gpu_count
    busiest = used = used_seconds = 0
    previous = from_s
    for at in sorted(changes):
        used_seconds += used * (at - previous)
        used += changes[at]
        busiest = max(busiest, used)
        previous = at
    used_seconds += used * (to_s - previous)
    return Free(
        instrument=instrument,
        from_s=from_s,
        to_s=to_s,
        capacity_gpus=row.gpus,
        free_gpus=max(0, row.gpus - busiest),
        free_gpu_seconds=max(0, row.gpus * (to_s - from_s) - used_seconds),
    )


# -- contracts --------------------------------------------------------------------------------


def create_contract(
    session: Session, *, exchange: Principal, idempotency_key: str, data: object, now_s: int
) -> tuple[Contract, bool]:
    """The contract for these terms and key, and whether it was created just now."""
    if not 0 < len(idempotency_key) <= 128:
        raise errors.ApiError("Idempotency-Key: must be 1 to 128 characters")
    if idempotency_key.startswith(REGISTERED_KEY_PREFIX):
        raise errors.ApiError(
            f"Idempotency-Key: the prefix {REGISTERED_KEY_PREFIX!r} is reserved for contracts "
            "registered from the cluster"
        )
    terms = _terms(data)
    canonical_terms = _canonical_terms(terms)
    earlier = session.exec(
        select(Contract).where(
            Contract.exchange == exchange.name, Contract.idempotency_key == idempotency_key
        )
    ).first()
    if earlier is not None:
        if earlier.terms != canonical_terms:
            raise errors.ConflictError(
                f"Idempotency-Key {idempotency_key!r} was used for other terms "
                f"(contract {earlier.id})"
            )
        return earlier, False
    if session.get(Contract, terms.contract_id) is not None:
        raise errors.ConflictError(f"contract {terms.contract_id} exists")
    free = free_capacity(session, instrument=terms.instrument, from_s=terms.start, to_s=terms.end)
    if free.free_gpus < terms.gpu_count:
        raise errors.ConflictError(
            f"oversold: {terms.gpu_count} GPUs of {terms.instrument} asked, "
            f"{free.free_gpus} free over the whole window"
        )
    contract = _new_contract(terms, canonical_terms, exchange.name, idempotency_key, now_s)
    session.add(contract)
    return contract, True


def _new_contract(
    terms: core_terms.ContractTerms,
    canonical_terms: str,
    exchange: str,
    idempotency_key: str,
    now_s: int,
) -> Contract:
    """A booked contract of `terms`, recorded for `exchange` (its exchange of record)."""
    return Contract(
        id=terms.contract_id,
        exchange=exchange,
        holder=terms.buyer,
        instrument=terms.instrument,
        gpu_count=terms.gpu_count,
        start_s=terms.start,
        end_s=terms.end,
        terms=canonical_terms,
        status=BOOKED,
        idempotency_key=idempotency_key,
        created_at=now_s,
    )


def register_contract(
    session: Session, *, registrar: Principal, contract_id: str, data: object, now_s: int
) -> tuple[Contract, bool]:
    """The contract a provider applied on its cluster, recorded with `registrar` (the
    operator) as its exchange of record, and whether it was recorded just now.

    Idempotent: a contract already held with the same canonical terms is answered as it is,
    whoever sent it (the cluster and the API agree); other terms under its id are refused
    naming each field that differs, and nothing is overwritten. No capacity check: the
    cluster's pools have already decided the booking."""
    terms = _terms(data)
    if terms.contract_id != contract_id:
        raise errors.UnprocessableError(
            f"contract_id: {terms.contract_id!r} is not the path's contract id {contract_id!r}"
        )
    canonical_terms = _canonical_terms(terms)
    held = session.get(Contract, contract_id)
    if held is not None:
        if held.terms != canonical_terms:
            raise errors.ConflictError(
                f"contract {contract_id} exists with other terms: "
                + "; ".join(_differences(json.loads(held.terms), terms.to_json()))
            )
        return held, False
    contract = _new_contract(
        terms, canonical_terms, registrar.name, registration_key(terms.contract_id), now_s
    )
    session.add(contract)
    return contract, True


def _differences(held: object, sent: dict[str, object]) -> list[str]:
    """`field is <held>, not <sent>` for each field of the terms that differs."""
    stored = held if isinstance(held, dict) else {}
    return [
        f"{field} is {_shown(stored.get(field))}, not {_shown(sent.get(field))}"
        for field in sorted(set(stored) | set(sent))
        if stored.get(field) != sent.get(field)
    ]


def _shown(value: object) -> str:
    return "absent" if value is None else json.dumps(value, sort_keys=True)


def _transfers(session: Session, contract_id: str) -> Sequence[ContractTransfer]:
    return session.exec(
        select(ContractTransfer)
        .where(ContractTransfer.contract_id == contract_id)
        .order_by(col(ContractTransfer.at_s), col(ContractTransfer.id))
    ).all()


def current_holder(session: Session, contract: Contract, *, now_s: int) -> str | None:
    """Who holds `contract` at `now_s`: the buyer, or the last transfer that took effect."""
    holder = contract.holder
    for transfer in _transfers(session, contract.id):
        if transfer.at_s <= now_s:
            holder = transfer.to_holder
    return holder


def _may_read(session: Session, principal: Principal, contract: Contract, now_s: int) -> bool:
    if principal.role in (Role.ADMIN, Role.OPERATOR):
        return True
    if principal.role is Role.EXCHANGE:
        return contract.exchange == principal.name
    if principal.role is Role.BUYER:
        return current_holder(session, contract, now_s=now_s) == principal.name
    return False


def get_contract(
    session: Session, *, principal: Principal, contract_id: str, now_s: int
) -> Contract:
    """The contract, if `principal` may see it; NotFoundError alike for missing and hidden."""
    contract = session.get(Contract, contract_id)
    if contract is None or not _may_read(session, principal, contract, now_s):
        raise errors.NotFoundError(f"no contract {contract_id}")
    return contract


def list_contracts(
    session: Session,
    *,
    principal: Principal,
    now_s: int,
    status: str | None = None,
    offset: int = 0,
    limit: int = 100,
) -> tuple[list[Contract], int]:
    """The contracts `principal` may see (a page of them, and how many there are)."""
    query = select(Contract).order_by(col(Contract.start_s), col(Contract.id))
    if status is not None:
        query = query.where(Contract.status == status)
    if principal.role is Role.EXCHANGE:
        query = query.where(Contract.exchange == principal.name)
    elif principal.role is Role.BUYER:
        ever_held = select(ContractTransfer.contract_id).where(
            ContractTransfer.to_holder == principal.name
        )
        query = query.where(or_(Contract.holder == principal.name, col(Contract.id).in_(ever_held)))
    elif principal.role in (Role.ADMIN, Role.OPERATOR):
        # They see every contract: the database pages, and nothing is read to be dropped.
        count = session.exec(select(func.count()).select_from(query.subquery())).one()
        return list(session.exec(query.offset(offset).limit(limit)).all()), count
    else:
        return [], 0
    visible = [
        contract
        for contract in session.exec(query).all()
        if _may_read(session, principal, contract, now_s)
    ]
    return visible[offset : offset + limit], len(visible)


def _owned_by_exchange(
    session: Session, principal: Principal, contract_id: str, now_s: int
) -> Contract:
    contract = get_contract(session, principal=principal, contract_id=contract_id, now_s=now_s)
    if principal.role not in (Role.ADMIN, Role.EXCHANGE):
        raise errors.ForbiddenError("only the exchange that sent a contract may change it")
    return contract


def _may_cancel(session: Session, principal: Principal, contract_id: str, now_s: int) -> Contract:
    contract = get_contract(session, principal=principal, contract_id=contract_id, now_s=now_s)
    if principal.role in (Role.ADMIN, Role.EXCHANGE):
        return contract  # an exchange sees only the contracts it sent
    registered_by_caller = (
        origin_of(contract) == ORIGIN_CLUSTER and contract.exchange == principal.name
    )
    if principal.role is Role.OPERATOR and registered_by_caller:
        return contract
    raise errors.ForbiddenError(
        "only the exchange that sent a contract, or the operator that registered it from "
        "its cluster, may cancel it"
    )


def cancel_contract(
    session: Session, *, principal: Principal, contract_id: str, now_s: int
) -> Contract:
    """Cancel before delivery starts (its exchange, or the operator that registered it);
    cancelling twice answers the cancelled contract."""
    contract = _may_cancel(session, principal, contract_id, now_s)
    if contract.status == CANCELLED:
        return contract
    if now_s >= contract.start_s:
        raise errors.ConflictError(
            f"contract {contract_id} started at {timefmt.format_utc(contract.start_s)}: "
            "it can no longer be cancelled"
        )
    contract.status, contract.cancelled_at = CANCELLED, now_s
    session.add(contract)
    return contract


def transfer_contract(
    session: Session,
    *,
    principal: Principal,
    contract_id: str,
    to_holder: str,
    at_s: int,
    now_s: int,
) -> ContractTransfer:
    """Record that `to_holder` holds the contract from `at_s` on."""
    contract = _owned_by_exchange(session, principal, contract_id, now_s)
    if contract.status == CANCELLED:
        raise errors.ConflictError(f"contract {contract_id} is cancelled")
    if at_s >= contract.end_s:
        raise errors.UnprocessableError("at: must be before the contract's end")
    transfers = _transfers(session, contract_id)
    if transfers and at_s < transfers[-1].at_s:
        raise errors.ConflictError(
            f"at: a later transfer (at {timefmt.format_utc(transfers[-1].at_s)}) is recorded"
        )
    if not to_holder or len(to_holder) > 128:
        raise errors.UnprocessableError("to_holder: must be 1 to 128 characters")
    transfer = ContractTransfer(
        contract_id=contract_id,
        from_holder=current_holder(session, contract, now_s=at_s),
        to_holder=to_holder,
        at_s=at_s,
        recorded_at=now_s,
    )
    session.add(transfer)
    return transfer
