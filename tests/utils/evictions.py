"""Whether the emulated API server (kube.py) lets a pod be evicted (`pods/eviction`).

The real server asks the PodDisruptionBudget selecting the pod, from the counts the
disruption controller writes into the budget's status. No controllers run in the emulator,
so `check_eviction` counts itself: a budget's expected pods are its matching pods that have
not finished, and a pod counts as healthy while `Running` and not being deleted. A budget
that allows no disruption refuses with 429 (the cause names it), a pod selected by more than
one budget cannot be evicted at all (500); pending, finished and terminating pods are
evicted without asking, as on the real server. The eviction itself, deleting the pod, is
the emulator's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from utils import apierrors, selection

__all__ = ["check_eviction", "evicted"]

# Pods in these phases (or being deleted) are evicted without asking their budget.
_BUDGET_EXEMPT_PHASES = frozenset({"Pending", "Succeeded", "Failed"})
_FINISHED_PHASES = frozenset({"Succeeded", "Failed"})
_BUDGET_VIOLATION = "Cannot evict pod as it would violate the pod's disruption budget."


def check_eviction(
    pod: Mapping[str, Any],
    *,
    budgets: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
) -> None:
    """Refuse the eviction of `pod` if its budget allows no disruption; `budgets` and `pods`
    are those of the pod's namespace."""
    exempt = pod.get("status", {}).get("phase") in _BUDGET_EXEMPT_PHASES
    if exempt or "deletionTimestamp" in pod["metadata"]:
        return
    labels = pod["metadata"].get("labels") or {}
    selecting = [
        budget
        for budget in budgets
        if selection.selector_matches((budget.get("spec") or {}).get("selector"), labels)
    ]
    if len(selecting) > 1:
        message = (
            "This pod has more than one PodDisruptionBudget, "
            "which the eviction subresource does not support."
        )
        raise apierrors.error(500, "InternalError", message)
    if not selecting:
        return
    (budget,) = selecting
    selector = budget["spec"].get("selector")
    expected = [
        other
        for other in pods
        if selection.selector_matches(selector, other["metadata"].get("labels") or {})
        and other.get("status", {}).get("phase") not in _FINISHED_PHASES
    ]
    healthy = sum(
        other.get("status", {}).get("phase") == "Running"
        and "deletionTimestamp" not in other["metadata"]
        for other in expected
    )
    desired = _desired_healthy(budget["spec"], len(expected))
    if healthy - desired < 1:
        cause = (
            f"The disruption budget {budget['metadata']['name']} needs {desired} healthy "
            f"pods and has {healthy} currently"
        )
        causes = [{"reason": "DisruptionBudget", "message": cause}]
        raise apierrors.error(429, "TooManyRequests", _BUDGET_VIOLATION, causes=causes)


def evicted() -> dict[str, Any]:
    """The answer to an eviction that went through."""
    return {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Success", "code": 201}


def _desired_healthy(spec: Mapping[str, Any], expected: int) -> int:
    """How many healthy pods a budget's spec asks for out of `expected` (percentages round
    up, as the disruption controller rounds them)."""

    def scaled(value: int | str) -> int:
        if isinstance(value, str) and value.endswith("%"):
            return math.ceil(int(value[:-1]) * expected / 100)
        return int(value)

    if spec.get("maxUnavailable") is not None:
        return max(expected - scaled(spec["maxUnavailable"]), 0)
    if spec.get("minAvailable") is not None:
        return scaled(spec["minAvailable"])
    return 0
