"""Nodes as the delivery planner sees them, and the patches that carry out its node actions.

`facts` reads a Node and its pods (as the API serves them, JSON) into the planner's
`claims.NodeFacts`; `patch` turns a node action (operator/actions.py) into the one merge
patch of the Node that carries it out. A patch names the Node's resourceVersion, so it
applies to the node as read or not at all (409): its taint list is written whole, and a
taint another writer added in between must not be lost. Applying an action's patch to a
node that already shows it changes nothing: the actions are idempotent.

Where the planner learns a node's GPUs: the annotation `ANNOTATION_GPU_UUIDS` (comma
separated UUIDs, gpudelivery/node_signals.py), which the metering agent on the node publishes
next to its `GPUHealthy` condition (metering/node_condition.py); a node without it is never
handed over (its GPUs cannot be put in the ledger).

Not here: reading and writing through the client (operator/cluster.py), deciding.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from gpudelivery import node_signals
from gpudelivery.operator import actions, claims, resources

__all__ = ["ANNOTATION_GPU_UUIDS", "CONDITION_GPU_HEALTHY", "facts", "is_quarantined", "patch"]

# The node annotation listing the node's GPU UUIDs (set by the metering agent).
ANNOTATION_GPU_UUIDS = node_signals.ANNOTATION_GPU_UUIDS
# The node condition the metering agent sets (metering/node_condition.py).
CONDITION_GPU_HEALTHY = node_signals.CONDITION_GPU_HEALTHY
# A mirror (static) pod carries this annotation; the kubelet owns it, eviction cannot move it.
_MIRROR_POD = "kubernetes.io/config.mirror"


def facts(node: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> claims.NodeFacts:
    """The planner's facts of `node` and the `pods` bound to it."""
    metadata = node.get("metadata") or {}
    labels = metadata.get("labels") or {}
    annotations = metadata.get("annotations") or {}
    spec = node.get("spec") or {}
    taints = spec.get("taints") or []
    conditions = {
        condition.get("type"): condition
        for condition in (node.get("status") or {}).get("conditions") or []
    }
    ready = conditions.get("Ready", {})
    healthy = conditions.get(CONDITION_GPU_HEALTHY, {}).get("status")
    return claims.NodeFacts(
        name=str(metadata.get("name")),
        block=labels.get(resources.LABEL_BLOCK),
        zone=labels.get(resources.LABEL_ZONE),
        ready=ready.get("status") == "True",
        ready_since_s=_epoch_s(ready.get("lastTransitionTime")),
        gpu_healthy={"True": True, "False": False}.get(str(healthy)),
        unschedulable=bool(spec.get("unschedulable")),
        quarantined=is_quarantined(node),
        claimed_by=annotations.get(claims.ANNOTATION_CLAIMED_BY),
        contract_label=labels.get(resources.LABEL_CONTRACT),
        contract_taint=next(
            (t.get("value") for t in taints if t.get("key") == resources.TAINT_CONTRACT), None
        ),
        gpu_uuids=node_signals.parse_gpu_uuids(annotations.get(ANNOTATION_GPU_UUIDS)),
        pods=tuple(sorted((_pod(pod) for pod in pods), key=lambda p: (p.namespace, p.name))),
    )


def is_quarantined(node: Mapping[str, Any]) -> bool:
    """Whether `node` carries the quarantine taint (held for repair)."""
    taints = (node.get("spec") or {}).get("taints") or []
    return any(taint.get("key") == resources.TAINT_QUARANTINE for taint in taints)


def _pod(pod: Mapping[str, Any]) -> claims.Pod:
    metadata = pod.get("metadata") or {}
    owners = metadata.get("ownerReferences") or []
    stays = _MIRROR_POD in (metadata.get("annotations") or {}) or any(
        owner.get("kind") == "DaemonSet" for owner in owners
    )
    return claims.Pod(
        namespace=str(metadata.get("namespace")),
        name=str(metadata.get("name")),
        stays=stays,
        terminating=metadata.get("deletionTimestamp") is not None,
    )


def _epoch_s(value: object) -> int:
    if isinstance(value, datetime.datetime):
        return int(value.timestamp())
    if isinstance(value, str) and value:
        return int(datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
    return 0


def patch(action: actions.Action, contract: str, node: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch of `node` (as read) that carries out a node action of `contract`
    (Cordon, Handover, Quarantine, Release); it names the node's resourceVersion."""
    metadata = node.get("metadata") or {}
    taints = [dict(t) for t in (node.get("spec") or {}).get("taints") or []]
    annotations: dict[str, str | None] = {}
    labels: dict[str, str | None] = {}
    spec: dict[str, Any] = {}
    if isinstance(action, actions.Cordon):
        annotations[claims.ANNOTATION_CLAIMED_BY] = contract
        spec["unschedulable"] = True
    elif isinstance(action, actions.Handover):
        annotations[claims.ANNOTATION_CLAIMED_BY] = contract
        labels[resources.LABEL_CONTRACT] = contract
        taints = [t for t in taints if t.get("key") != resources.TAINT_CONTRACT]
        taints.append({"key": resources.TAINT_CONTRACT, "value": contract, "effect": "NoSchedule"})
        spec["unschedulable"] = None
    elif isinstance(action, actions.Quarantine):
        if not any(t.get("key") == resources.TAINT_QUARANTINE for t in taints):
            taints.append({"key": resources.TAINT_QUARANTINE, "effect": "NoSchedule"})
    elif isinstance(action, actions.Release):
        annotations[claims.ANNOTATION_CLAIMED_BY] = None
        labels[resources.LABEL_CONTRACT] = None
        taints = [t for t in taints if t.get("key") != resources.TAINT_CONTRACT]
        spec["unschedulable"] = None
    else:
        raise TypeError(f"{type(action).__name__} is not a node action")
    spec["taints"] = taints or None
    return {
        "metadata": {
            "resourceVersion": metadata.get("resourceVersion"),
            "annotations": annotations,
            "labels": labels,
        },
        "spec": spec,
    }
