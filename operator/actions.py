"""What the delivery planner asks the operator to do, as values an executor carries out.

operator/delivery.py decides; an executor (the kopf handlers' adapter) carries out a plan's
actions in the order given, then writes the contract's status last. Every action is
idempotent: done twice, or redone after a crash, it leaves the cluster as done once, so an
executor needs no memory of its own. The planner emits an action only when the facts it was
given show it still to do: planning again after a plan is carried out asks only for what that
plan made possible (a node cordoned by one plan is handed over by the next, once its pods have
left), and a plan that asks for nothing stays so until time moves or the cluster changes.

Node actions name one node and patch it in one request (one PATCH of the Node is atomic, so
a node is never seen half handed over); label, taint and annotation keys are in
operator/resources.py and operator/claims.py. Ledger actions change the contract's
`status.ledger.intervals` the executor is about to write (as `ledger.Interval` values), and
the executor reports the whole ledger to the API after writing the status.

Not here: when each is due (operator/delivery.py), or the Kubernetes calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

__all__ = [
    "Action",
    "CloseInterval",
    "Cordon",
    "Evict",
    "Handover",
    "OpenInterval",
    "Quarantine",
    "Release",
    "WarnBuyer",
]


@dataclass(frozen=True, slots=True)
class Cordon:
    """Claim `node` for the contract and cordon it: set `spec.unschedulable` and the
    annotation `claims.ANNOTATION_CLAIMED_BY` (the contract's resource name) together.
    The claim is how a cordon left behind by a crash is known for the contract's own."""

    node: str


@dataclass(frozen=True, slots=True)
class Evict:
    """Evict pod `namespace`/`name` from `node` through the Eviction API. The server
    honours PodDisruptionBudgets: a refusal (429) is no error, the next plan asks again."""

    node: str
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Handover:
    """Hand `node` to the contract: label `resources.LABEL_CONTRACT` and taint
    `resources.TAINT_CONTRACT` (value: the contract's resource name, effect NoSchedule) and
    uncordon it, in one patch. The claim annotation stays until `Release`."""

    node: str


@dataclass(frozen=True, slots=True)
class Quarantine:
    """Taint `node` with `resources.TAINT_QUARANTINE` (NoSchedule) for repair; only people
    lift it. Always followed by the node's `Release`."""

    node: str


@dataclass(frozen=True, slots=True)
class Release:
    """Give `node` back: remove the contract's label, taint and claim annotation and
    uncordon it, in one patch (a quarantine taint stays)."""

    node: str


@dataclass(frozen=True, slots=True)
class OpenInterval:
    """Append the open ledger interval [at_s, ...) of GPU `gpu_uuid` of `node`."""

    node: str
    gpu_uuid: str
    at_s: int


@dataclass(frozen=True, slots=True)
class CloseInterval:
    """End at `at_s` the open ledger interval of GPU `gpu_uuid` of `node` that started at
    `start_s` (the pair names one interval: a GPU may have served the contract twice)."""

    node: str
    gpu_uuid: str
    start_s: int
    at_s: int


@dataclass(frozen=True, slots=True)
class WarnBuyer:
    """Tell the buyer the window ends at `end_s`: a Warning Event on the contract and an
    annotation on the pods of the buyer's namespace. The status keeps when (the plan's
    `buyer_warned_s`), so it is given once."""

    end_s: int


# Every action, for `match` in an executor.
Action: TypeAlias = (
    Cordon | Evict | Handover | Quarantine | Release | OpenInterval | CloseInterval | WarnBuyer
)
