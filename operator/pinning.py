"""Pinning a buyer's pod to its contract's nodes: what the admission webhook changes.

A contract's nodes carry the label `LABEL_CONTRACT=<contract>` and the taint
`TAINT_CONTRACT=<contract>:NoSchedule` (operator/nodes.py). A pod created in the buyer's
namespace `gpud-<contract>` gets the node selector that sends it there and the toleration
that lets it in, so buyers apply their workloads as they are. The buyer's own selectors and
tolerations stay: they can only narrow where the pod goes, since a node selector's entries
must all match. A pod that selects another contract's nodes is refused: a buyer may not aim
at capacity someone else bought.

Which contract: the namespace's name, `gpud-<contract>` (resources.namespace_name), not its
label. The webhook's namespaceSelector (operator/admission.py) only lets through pods of
namespaces labelled `LABEL_CONTRACT`, and the operator creates its namespaces named and
labelled together (operator/tenancy.py), so the name says what the label would without an
API call for every pod. A namespace someone else labelled but did not name `gpud-...` gets
no change; buyers cannot relabel theirs (the ClusterRole `edit` they hold in it does not
write namespaces).

Not here: kopf, the webhook server and its configuration (operator/admission.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gpudelivery import errors
from gpudelivery.operator import resources

__all__ = ["FIELD_CONTRACT_SELECTOR", "contract_of_namespace", "spec_patch", "toleration"]

# The field a pod aiming at another contract's nodes is refused for, as the API server
# writes a map key in a field path.
FIELD_CONTRACT_SELECTOR = f"spec.nodeSelector[{resources.LABEL_CONTRACT}]"
# The taint effect a contract's nodes carry (operator/nodes.py).
_EFFECT = "NoSchedule"
# What a buyer's namespace name starts with: the contract's name follows it.
_NAMESPACE_PREFIX = resources.namespace_name("")


def contract_of_namespace(namespace: str | None) -> str | None:
    """The ComputeContract whose buyer's namespace is `namespace`; None when it is not one
    (another prefix, or nothing after it)."""
    if namespace is None or not namespace.startswith(_NAMESPACE_PREFIX):
        return None
    return namespace.removeprefix(_NAMESPACE_PREFIX) or None


def toleration(contract: str) -> dict[str, str]:
    """The toleration of the taint on the nodes handed over to `contract`."""
    return {
        "key": resources.TAINT_CONTRACT,
        "operator": "Equal",
        "value": contract,
        "effect": _EFFECT,
    }


def spec_patch(pod: Mapping[str, Any], contract: str) -> dict[str, Any]:
    """The merge patch of `pod`'s spec that pins it to `contract`'s nodes: the contract's
    entry added to `nodeSelector`, and its toleration appended to `tolerations` (a merge
    patch writes a list whole). Empty when the pod is pinned already: it selects the
    contract's nodes and tolerates their taint, with ours or with a toleration of its own
    that covers it (an `Exists` one, say), so applying it twice changes nothing.

    `errors.InputError` naming FIELD_CONTRACT_SELECTOR when the pod selects another
    contract's nodes."""
    spec = pod.get("spec") or {}
    patch: dict[str, Any] = {}
    selected = (spec.get("nodeSelector") or {}).get(resources.LABEL_CONTRACT)
    if selected is None:
        patch["nodeSelector"] = {resources.LABEL_CONTRACT: contract}
    elif selected != contract:
        raise errors.InputError(
            f"selects the nodes of contract {selected!r}; pods of namespace "
            f"{resources.namespace_name(contract)} run on the nodes of contract {contract!r}",
            field=FIELD_CONTRACT_SELECTOR,
        )
    tolerations: Sequence[Mapping[str, Any]] = spec.get("tolerations") or []
    if not any(_tolerates(existing, contract) for existing in tolerations):
        patch["tolerations"] = [*(dict(existing) for existing in tolerations), toleration(contract)]
    return patch


def _tolerates(existing: Mapping[str, Any], contract: str) -> bool:
    """Whether `existing` tolerates the contract's taint, by the scheduler's rule: a
    toleration without a key or effect covers every key or effect, `Exists` every value."""
    if existing.get("effect") and existing["effect"] != _EFFECT:
        return False
    if existing.get("key") and existing["key"] != resources.TAINT_CONTRACT:
        return False
    operator = existing.get("operator") or "Equal"
    if operator == "Exists":
        return True
    return operator == "Equal" and existing.get("value", "") == contract
