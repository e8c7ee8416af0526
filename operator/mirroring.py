"""Mirroring contracts between the API and the cluster: what to do so that both hold the same.

Exchanges send contracts to the API; providers may also `kubectl apply` a ComputeContract.
The operator alone mirrors them, both ways: each contract the API holds gets its resource
(`resources.contract_body`), each valid resource the API does not hold is registered with it
(`PUT /v1/contracts/{id}`), and a cancellation on either side is carried to the other.
`plan` decides all of it from what both sides hold now; `mirror.ContractsClient` and the
operator's timer carry the plan out, and running `plan` again after that finds nothing to do.

Rules, keyed by contract id (a resource's `spec.contractId`, not its name):

- The terms on both sides must be identical (their canonical JSON). A disagreement is never
  fixed by overwriting either side: it is a `Finding`, reported as a Warning event on the
  resource, and that contract is left alone. So are a resource whose spec is not valid
  terms and two resources holding one contract id.
- Cancellation is `spec.cancelledAt` on the resource (RFC 3339 UTC; not part of the terms)
  and `cancelled_at` in the API. The API's is written on the resource. A resource's is sent
  to the API only for a contract registered from the cluster (`Origin.CLUSTER`) and only
  before its start, as the API allows; an exchange's contract is cancelled by its exchange
  alone, so a `spec.cancelledAt` on it is a finding. Both sides cancelled is agreement,
  whatever the two instants.
- A contract whose window has ended gets no resource: there is nothing left to deliver (and
  a new cluster does not fill with history). A resource whose window has ended is still
  registered: its ledger and settlement need the API to know it.
- A resource deleted on the cluster is created again while its window lasts: the API is the
  record, and contracts are not deleted there.

Not here: HTTP (`mirror`), the cluster client, events and the timer (the operator's
handlers).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gpudelivery import canonical, errors, terms, timefmt
from gpudelivery.operator import resources

__all__ = [
    "CANCELLED_AT",
    "ApiContract",
    "Finding",
    "FindingKind",
    "MarkCancelled",
    "Origin",
    "Plan",
    "plan",
]

# The spec field that cancels a ComputeContract (RFC 3339 UTC); not one of the terms.
CANCELLED_AT = "cancelledAt"


class Origin(enum.StrEnum):
    """Where a contract the API holds came from (its `origin`)."""

    EXCHANGE = "exchange"  # sent by an exchange: only the exchange cancels it
    CLUSTER = "cluster"  # applied on the cluster and registered by the operator


@dataclass(frozen=True)
class ApiContract:
    """A contract as the API holds it: its terms, origin, and when it was cancelled."""

    terms: terms.ContractTerms
    origin: Origin
    cancelled_at_s: int | None = None

    @property
    def contract_id(self) -> str:
        return self.terms.contract_id


class FindingKind(enum.StrEnum):
    """Why a contract cannot be mirrored (also the Warning event's reason)."""

    TERMS_DIFFER = "TermsDiffer"  # the API holds other terms under the same contract id
    INVALID_SPEC = "InvalidSpec"  # the resource's spec is not valid terms
    DUPLICATE = "DuplicateContract"  # two or more resources hold the same contract id
    NAME_TAKEN = "NameTaken"  # the resource's name is held by another contract's resource
    CANCEL_NOT_MIRRORED = "CancelNotMirrored"  # spec.cancelledAt the API may not take


@dataclass(frozen=True)
class Finding:
    """A disagreement between the API and the cluster, left as it is and reported on the
    resource named `resource`."""

    kind: FindingKind
    resource: str
    contract_id: str | None
    message: str


@dataclass(frozen=True)
class MarkCancelled:
    """Write the API's cancellation on the resource `resource`."""

    resource: str
    contract_id: str
    cancelled_at_s: int

    def patch(self) -> dict[str, Any]:
        """The merge patch that does it."""
        return {"spec": {CANCELLED_AT: timefmt.format_utc(self.cancelled_at_s)}}


@dataclass(frozen=True)
class Plan:
    """What to do so that the API and the cluster hold the same contracts. Every list is in
    contract id order; registrations go before cancellations (a contract registered and
    cancelled in one round is cancelled right after it is registered)."""

    create: tuple[dict[str, Any], ...] = ()  # ComputeContract bodies to create
    mark_cancelled: tuple[MarkCancelled, ...] = ()  # spec.cancelledAt to set on resources
    register: tuple[terms.ContractTerms, ...] = ()  # PUT /v1/contracts/{id}
    cancel: tuple[str, ...] = ()  # POST /v1/contracts/{id}/cancel
    findings: tuple[Finding, ...] = ()

    @property
    def has_actions(self) -> bool:
        """Whether anything is to be written on either side (findings are not actions)."""
        return bool(self.create or self.mark_cancelled or self.register or self.cancel)


@dataclass(frozen=True)
class _Resource:
    """A ComputeContract read: its terms, or why it has none."""

    name: str
    contract_id: str | None
    terms: terms.ContractTerms | None
    cancelled_at_s: int | None
    problem: str | None


def _read(body: Mapping[str, Any]) -> _Resource:
    metadata = body.get("metadata")
    name = str(metadata.get("name", "")) if isinstance(metadata, Mapping) else ""
    spec = body.get("spec")
    if not isinstance(spec, Mapping):
        return _Resource(name, None, None, None, "spec: missing")
    contract_id = spec.get("contractId")
    readable_id = contract_id if isinstance(contract_id, str) and contract_id else None
    cancelled_at_s = None
    try:
        if spec.get(CANCELLED_AT) is not None:
            cancelled_at_s = timefmt.parse_utc(spec[CANCELLED_AT], field=f"spec.{CANCELLED_AT}")
        spec_terms = {key: value for key, value in spec.items() if key != CANCELLED_AT}
        contract = resources.terms_from_body({"spec": spec_terms})
    except errors.InputError as exc:
        return _Resource(name, readable_id, None, None, str(exc))
    return _Resource(name, contract.contract_id, contract, cancelled_at_s, None)


def _canonical(contract: terms.ContractTerms) -> bytes:
    return canonical.canonical_json(contract.to_json())


def _differences(api: terms.ContractTerms, cluster: terms.ContractTerms) -> str:
    """`spec.gpuCount is 8 here, 16 in the API` for each field that differs."""
    held, applied = api.to_json(), cluster.to_json()
    return "; ".join(
        f"spec.{_camel(field)} is {_shown(applied.get(field))} here, "
        f"{_shown(held.get(field))} in the API"
        for field in sorted(set(held) | set(applied))
        if held.get(field) != applied.get(field)
    )


def _camel(field: str) -> str:
    """A terms field as the spec spells it (`price_per_gpu_hour` -> `pricePerGpuHour`)."""
    head, *rest = field.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _shown(value: object) -> str:
    if value is None:
        return "absent"
    return canonical.canonical_json(value).decode("utf-8")


def plan(
    api_contracts: Iterable[ApiContract], bodies: Iterable[Mapping[str, Any]], *, now_s: int
) -> Plan:
    """What to do, at `now_s`, so that the API's contracts and the cluster's ComputeContract
    resources (`bodies`) agree (the module's docstring has the rules)."""
    api_by_id = {contract.contract_id: contract for contract in api_contracts}
    read = [_read(body) for body in bodies]
    by_id: dict[str, list[_Resource]] = {}
    for resource in read:
        if resource.contract_id is not None:
            by_id.setdefault(resource.contract_id, []).append(resource)
    names = {resource.name: resource for resource in read}
    outcome = _Outcome()
    for resource in read:
        if resource.contract_id is None:
            outcome.finding(FindingKind.INVALID_SPEC, resource, _cannot_mirror(resource))
    for contract_id in sorted(api_by_id.keys() | by_id.keys()):
        _decide(outcome, api_by_id.get(contract_id), by_id.get(contract_id, []), names, now_s=now_s)
    return outcome.plan()


def _cannot_mirror(resource: _Resource) -> str:
    return f"this ComputeContract cannot be mirrored with the API: {resource.problem}"


class _Outcome:
    """The plan being built."""

    def __init__(self) -> None:
        self.create: list[dict[str, Any]] = []
        self.mark_cancelled: list[MarkCancelled] = []
        self.register: list[terms.ContractTerms] = []
        self.cancel: list[str] = []
        self.findings: list[Finding] = []

    def finding(self, kind: FindingKind, resource: _Resource, message: str) -> None:
        self.findings.append(Finding(kind, resource.name, resource.contract_id, message))

    def plan(self) -> Plan:
        return Plan(
            create=tuple(self.create),
            mark_cancelled=tuple(self.mark_cancelled),
            register=tuple(self.register),
            cancel=tuple(self.cancel),
            findings=tuple(self.findings),
        )


def _decide(
    outcome: _Outcome,
    api: ApiContract | None,
    held: Sequence[_Resource],
    names: Mapping[str, _Resource],
    *,
    now_s: int,
) -> None:
    """Decide one contract id: `api` is the API's contract, `held` the resources naming it."""
    if len(held) > 1:
        listed = ", ".join(sorted(resource.name for resource in held))
        for resource in held:
            outcome.finding(
                FindingKind.DUPLICATE,
                resource,
                f"contract {resource.contract_id} is held by {len(held)} ComputeContracts "
                f"({listed}): none of them is mirrored until all but one are deleted",
            )
        return
    if not held:
        assert api is not None  # every contract id comes from one side or the other
        _create(outcome, api, names, now_s=now_s)
        return
    (resource,) = held
    if resource.terms is None:
        outcome.finding(FindingKind.INVALID_SPEC, resource, _cannot_mirror(resource))
        return
    if api is None:
        outcome.register.append(resource.terms)
        api = ApiContract(resource.terms, Origin.CLUSTER)  # what the API holds once it is
    elif _canonical(api.terms) != _canonical(resource.terms):
        outcome.finding(
            FindingKind.TERMS_DIFFER,
            resource,
            f"contract {api.contract_id}: the API holds other terms, and neither side is "
            f"overwritten: {_differences(api.terms, resource.terms)}",
        )
        return
    _mirror_cancellation(outcome, api, resource, now_s=now_s)


def _create(
    outcome: _Outcome, api: ApiContract, names: Mapping[str, _Resource], *, now_s: int
) -> None:
    if now_s >= api.terms.end:
        return  # ended: nothing left to deliver
    body = resources.contract_body(api.terms)
    name = body["metadata"]["name"]
    holder = names.get(name)
    if holder is not None:
        outcome.finding(
            FindingKind.NAME_TAKEN,
            holder,
            f"contract {api.contract_id} of the API cannot get its ComputeContract {name}: "
            "this resource holds that name",
        )
        return
    if api.cancelled_at_s is not None:
        body["spec"][CANCELLED_AT] = timefmt.format_utc(api.cancelled_at_s)
    outcome.create.append(body)


def _mirror_cancellation(
    outcome: _Outcome, api: ApiContract, resource: _Resource, *, now_s: int
) -> None:
    if api.cancelled_at_s is not None and resource.cancelled_at_s is None:
        outcome.mark_cancelled.append(
            MarkCancelled(resource.name, api.contract_id, api.cancelled_at_s)
        )
        return
    if resource.cancelled_at_s is None or api.cancelled_at_s is not None:
        return  # both live, or both cancelled
    cancelled_at = timefmt.format_utc(resource.cancelled_at_s)
    if api.origin is not Origin.CLUSTER:
        outcome.finding(
            FindingKind.CANCEL_NOT_MIRRORED,
            resource,
            f"contract {api.contract_id} was sent by an exchange, which alone may cancel it: "
            f"the API keeps it live despite spec.cancelledAt {cancelled_at}",
        )
    elif now_s >= api.terms.start:
        outcome.finding(
            FindingKind.CANCEL_NOT_MIRRORED,
            resource,
            f"contract {api.contract_id} started at {timefmt.format_utc(api.terms.start)}, "
            f"and the API cancels only before the start: it keeps the contract live despite "
            f"spec.cancelledAt {cancelled_at}",
        )
    else:
        outcome.cancel.append(api.contract_id)
