"""The operator's custom resources, and the names and keys it writes on the cluster.

Two cluster-scoped resources of group `gpudelivery.io`, version `v1alpha1` (their CRDs are
in charts/gpudelivery/crds): a `DeliveryPool` says which nodes deliver an instrument and
how (GPUs a node, spares held back, lead time, drain timeout, end-of-window grace); a
`ComputeContract` holds a contract's terms in its spec, camelCased, and the operator's view
of its delivery in its status.

This module turns resource bodies into the core's values (`Pool`, `terms.ContractTerms`)
and back, refusing a bad spec with an error that names the field as `kubectl` shows it
(`spec.gpuCount`). It also derives the Kubernetes names of a contract: the resource, its
label and taint value and the buyer's namespace must be DNS labels, which a contract id
(`EX-2026:03/1`, mixed case) is not.

Not here: what the operator does with them.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gpudelivery import errors, terms, timefmt

__all__ = [
    "CONTRACTS",
    "GROUP",
    "LABEL_BLOCK",
    "LABEL_CONTRACT",
    "LABEL_GPU_PRODUCT",
    "LABEL_ZONE",
    "POOLS",
    "SPEC_CANCELLED_AT",
    "TAINT_CONTRACT",
    "TAINT_QUARANTINE",
    "VERSION",
    "Phase",
    "Pool",
    "cancelled_at_s",
    "contract_body",
    "namespace_name",
    "pool_from_body",
    "resource_name",
    "terms_from_body",
]

GROUP = "gpudelivery.io"
VERSION = "v1alpha1"
# The resources' plural names, as their URLs and RBAC rules spell them.
POOLS = "deliverypools"
CONTRACTS = "computecontracts"
# The node label and taint that hand a node to a contract (value: the contract's resource
# name), and the taint that keeps a failed node out of service until it is repaired.
LABEL_CONTRACT = "gpudelivery.io/contract"
TAINT_CONTRACT = "gpudelivery.io/contract"
TAINT_QUARANTINE = "gpudelivery.io/quarantine"
# Placement reads these node labels: the network block (provider-set), the zone (standard).
LABEL_BLOCK = "gpudelivery.io/network-block"
LABEL_ZONE = "topology.kubernetes.io/zone"
# What GPU feature discovery labels a node's GPU product with: a pool's default selector.
LABEL_GPU_PRODUCT = "nvidia.com/gpu.product"
# The ComputeContract spec field saying the contract was cancelled, and when (RFC 3339 UTC):
# not one of the terms, so it sits beside them. The mirror copies the API's cancellation
# into it; a provider sets it to cancel a contract applied with kubectl.
SPEC_CANCELLED_AT = "cancelledAt"

# A DNS label is at most 63 characters; the namespace adds its prefix to the resource name,
# whose readable part is cut to leave room for it and for the hash that keeps names apart.
_DNS_LABEL = 63
_NAMESPACE_PREFIX = "gpud-"
_READABLE = 40
_HASH_HEX = 8
_NOT_DNS = re.compile(r"[^a-z0-9-]+")

# spec field (camelCase, as kubectl shows it) -> ContractTerms field.
_TERMS_FIELDS = {
    "contractId": "contract_id",
    "buyer": "buyer",
    "instrument": "instrument",
    "gpuCount": "gpu_count",
    "start": "start",
    "end": "end",
    "pricePerGpuHour": "price_per_gpu_hour",
    "currency": "currency",
    "penaltyTiers": "penalty_tiers",
    "ldMultiplier": "ld_multiplier",
}
_SPEC_FIELDS = {core: spec for spec, core in _TERMS_FIELDS.items()}


class Phase(enum.StrEnum):
    """A ComputeContract's phase (status.phase)."""

    BOOKED = "Booked"  # fits the pool's calendar; waits for its lead time
    REJECTED = "Rejected"  # would oversell the pool, or its spec is invalid
    PREPARING = "Preparing"  # nodes chosen, cordoned and draining before the window
    DELIVERING = "Delivering"  # every node handed over
    DEGRADED = "Degraded"  # short of nodes: a failed one awaits a substitute
    COMPLETED = "Completed"  # the window ended and everything was released
    FAILED = "Failed"  # could not be delivered at all
    CANCELLED = "Cancelled"  # cancelled before its window: the booking is released


@dataclass(frozen=True)
class Pool:
    """A DeliveryPool's spec with its defaults applied."""

    name: str
    instrument: str
    node_selector: Mapping[str, str]
    gpus_per_node: int
    spares: int
    lead_time_s: int
    drain_timeout_s: int
    grace_s: int


# DeliveryPool spec field -> (default, lowest value allowed), as the CRD declares them.
_POOL_NUMBERS = {
    "gpusPerNode": (8, 1),
    "spares": (0, 0),
    "leadTimeSeconds": (600, 0),
    "drainTimeoutSeconds": (300, 1),
    "gracePeriodSeconds": (300, 0),
}


def pool_from_body(body: Mapping[str, Any]) -> Pool:
    """The pool a DeliveryPool resource describes; `errors.InputError` names a bad field."""
    name = str(body.get("metadata", {}).get("name", ""))
    spec = body.get("spec")
    if not isinstance(spec, Mapping):
        raise errors.InputError("missing", field="spec")
    instrument = spec.get("instrument")
    if not isinstance(instrument, str) or not instrument:
        raise errors.InputError("must be a non-empty string", field="spec.instrument")
    numbers = {}
    for field, (default, lowest) in _POOL_NUMBERS.items():
        value = spec.get(field, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise errors.InputError(f"must be a whole number >= {lowest}", field=f"spec.{field}")
        numbers[field] = value
    product = spec.get("gpuProduct", instrument)
    selector = spec.get("nodeSelector", {LABEL_GPU_PRODUCT: product})
    if (
        not isinstance(selector, Mapping)
        or not selector
        or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in selector.items()
        )
    ):
        raise errors.InputError("must map label keys to values", field="spec.nodeSelector")
    return Pool(
        name=name,
        instrument=instrument,
        node_selector=dict(selector),
        gpus_per_node=numbers["gpusPerNode"],
        spares=numbers["spares"],
        lead_time_s=numbers["leadTimeSeconds"],
        drain_timeout_s=numbers["drainTimeoutSeconds"],
        grace_s=numbers["gracePeriodSeconds"],
    )


def terms_from_body(body: Mapping[str, Any]) -> terms.ContractTerms:
    """The terms in a ComputeContract's spec; `errors.TermsError` names a bad field as
    `spec.<camelCase>`."""
    spec = body.get("spec")
    if not isinstance(spec, Mapping):
        raise errors.TermsError("missing", field="spec")
    unknown = sorted(set(spec) - set(_TERMS_FIELDS) - {SPEC_CANCELLED_AT})
    if unknown:
        raise errors.TermsError("unknown field", field=f"spec.{unknown[0]}")
    document = {_TERMS_FIELDS[key]: value for key, value in spec.items() if key in _TERMS_FIELDS}
    try:
        return terms.parse_terms(document)
    except errors.TermsError as exc:
        raise errors.TermsError(exc.reason, field=_spec_field(exc.field)) from exc


def cancelled_at_s(body: Mapping[str, Any]) -> int | None:
    """When the ComputeContract was cancelled (`spec.cancelledAt`), or None; a value that is
    not an RFC 3339 UTC instant is refused by name (`errors.InputError`)."""
    spec = body.get("spec")
    value = spec.get(SPEC_CANCELLED_AT) if isinstance(spec, Mapping) else None
    if value is None:
        return None
    return timefmt.parse_utc(value, field=f"spec.{SPEC_CANCELLED_AT}")


def _spec_field(core_field: str | None) -> str:
    if core_field is None:
        return "spec"
    head, dot, rest = core_field.partition(".")
    bracket = head.find("[")
    name, index = (head, "") if bracket < 0 else (head[:bracket], head[bracket:])
    return f"spec.{_SPEC_FIELDS.get(name, name)}{index}{dot}{rest}"


def contract_body(contract: terms.ContractTerms) -> dict[str, Any]:
    """The ComputeContract resource for a contract (what the operator creates for each
    contract the API holds)."""
    document = contract.to_json()
    spec = {_SPEC_FIELDS[key]: value for key, value in document.items()}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ComputeContract",
        "metadata": {"name": resource_name(contract.contract_id)},
        "spec": spec,
    }


def resource_name(contract_id: str) -> str:
    """The ComputeContract name of a contract id: its readable part lower-cased, with
    anything outside a DNS label turned into dashes, and a hash of the whole id, so ids that
    read alike keep apart (`EX-1` and `ex:1`). It is also the value of the node label and
    taint, and names the buyer's namespace, so it stays well inside a DNS label."""
    readable = _NOT_DNS.sub("-", contract_id.lower()).strip("-")[:_READABLE].strip("-")
    digest = hashlib.sha256(contract_id.encode("utf-8")).hexdigest()[:_HASH_HEX]
    return f"{readable}-{digest}" if readable else f"c-{digest}"


def namespace_name(name: str) -> str:
    """The buyer's namespace of the ComputeContract `name`."""
    namespace = _NAMESPACE_PREFIX + name
    assert len(namespace) <= _DNS_LABEL  # resource_name keeps room for the prefix
    return namespace
