"""Nodes for the delivery planner: their facts read from the API's JSON, and the patches of
the node actions, applied to the cluster emulator over HTTP."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from gpudelivery.operator import actions, claims, nodes, resources

from utils.operators import Cluster

CONTRACT = "ex-1-0a1b2c3d"
OTHER_TAINT = {"key": "example.com/maintenance", "value": "soon", "effect": "PreferNoSchedule"}


def node_json(**metadata: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "gpu-0",
            "labels": {resources.LABEL_BLOCK: "b1", resources.LABEL_ZONE: "z1"},
            "annotations": {nodes.ANNOTATION_GPU_UUIDS: "GPU-b,GPU-a"},
            **metadata,
        },
        "spec": {"taints": [OTHER_TAINT]},
        "status": {
            "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": "2026-03-03T00:00:00Z"},
                {"type": nodes.CONDITION_GPU_HEALTHY, "status": "False"},
            ]
        },
    }


def pod_json(name: str, **metadata: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "team", **metadata}}


def test_a_nodes_facts_are_read_from_its_labels_conditions_taints_and_pods() -> None:
    pods = [
        pod_json("web"),
        pod_json("agent", ownerReferences=[{"kind": "DaemonSet", "name": "meter"}]),
        pod_json("static", annotations={"kubernetes.io/config.mirror": "x"}),
        pod_json("leaving", deletionTimestamp="2026-03-03T00:00:05Z"),
    ]
    assert nodes.facts(node_json(), pods) == claims.NodeFacts(
        name="gpu-0",
        block="b1",
        zone="z1",
        ready=True,
        ready_since_s=1_772_496_000,
        gpu_healthy=False,
        unschedulable=False,
        quarantined=False,
        claimed_by=None,
        contract_label=None,
        contract_taint=None,
        gpu_uuids=("GPU-a", "GPU-b"),
        pods=(
            claims.Pod("team", "agent", stays=True),
            claims.Pod("team", "leaving", terminating=True),
            claims.Pod("team", "static", stays=True),
            claims.Pod("team", "web"),
        ),
    )


def test_a_bare_node_has_no_known_health_gpus_or_marks() -> None:
    found = nodes.facts({"metadata": {"name": "n"}}, [])
    assert (found.ready, found.gpu_healthy, found.gpu_uuids, found.block) == (
        False,
        None,
        (),
        None,
    )


def test_only_node_actions_have_a_patch() -> None:
    with pytest.raises(TypeError, match="Evict is not a node action"):
        nodes.patch(actions.Evict("n", "ns", "p"), CONTRACT, node_json())


def read(cluster: Cluster) -> dict[str, Any]:
    found: dict[str, Any] = client.ApiClient().sanitize_for_serialization(
        cluster.core.read_node("gpu-0")
    )
    return found


def apply(cluster: Cluster, action: actions.Action) -> dict[str, Any]:
    """Read the node, patch it as the action says, and read it again."""
    cluster.core.patch_node("gpu-0", nodes.patch(action, CONTRACT, read(cluster)))
    return read(cluster)


def marks(node: dict[str, Any]) -> tuple[Any, ...]:
    facts = nodes.facts(node, [])
    return (
        facts.unschedulable,
        facts.claimed_by,
        facts.contract_label,
        facts.contract_taint,
        facts.quarantined,
        [t for t in node["spec"].get("taints") or [] if t["key"] == OTHER_TAINT["key"]],
    )


def test_node_actions_mark_the_node_keep_other_taints_and_are_idempotent(
    cluster: Cluster,
) -> None:
    body = node_json()
    del body["status"]
    cluster.core.create_node(body)
    kept = [OTHER_TAINT]
    steps = [
        (actions.Cordon("gpu-0"), (True, CONTRACT, None, None, False, kept)),
        (actions.Handover("gpu-0"), (False, CONTRACT, CONTRACT, CONTRACT, False, kept)),
        (actions.Quarantine("gpu-0"), (False, CONTRACT, CONTRACT, CONTRACT, True, kept)),
        (actions.Release("gpu-0"), (False, None, None, None, True, kept)),
    ]
    for action, expected in steps:
        once = apply(cluster, action)
        assert marks(once) == expected, action
        again = apply(cluster, action)
        assert again["metadata"]["resourceVersion"] == once["metadata"]["resourceVersion"]


def test_a_patch_of_a_node_changed_since_it_was_read_is_refused(cluster: Cluster) -> None:
    body = node_json()
    del body["status"]
    cluster.core.create_node(body)
    stale = read(cluster)
    cluster.core.patch_node("gpu-0", {"metadata": {"labels": {"other": "writer"}}})
    with pytest.raises(ApiException) as caught:
        cluster.core.patch_node("gpu-0", nodes.patch(actions.Cordon("gpu-0"), CONTRACT, stale))
    assert caught.value.status == 409
    assert marks(read(cluster))[0] is False
