"""Delivery through the running operator: kopf, the official client and the cluster emulator
over HTTP, with a clock the test moves. A contract's nodes are claimed, cordoned and drained
over its lead time, handed over at its start (labelled, tainted, uncordoned, their GPUs in
the ledger), a failed node is quarantined and replaced, and at the end everything is given
back and the ledger closed."""

from __future__ import annotations

from typing import Any

from kubernetes import client

from gpudelivery import timefmt
from gpudelivery.operator import claims, nodes, resources

from utils.factories import EPOCH
from utils.operators import (
    PRODUCT,
    Clock,
    Cluster,
    add_contract,
    add_gpu_nodes,
    add_pool,
    contract_status,
    gpu_uuids,
    running_operator,
)
from utils.polling import poll

START, END = EPOCH, EPOCH + 3_600


def node(cluster: Cluster, name: str) -> dict[str, Any]:
    found: dict[str, Any] = client.ApiClient().sanitize_for_serialization(
        cluster.core.read_node(name)
    )
    return found


def marks(cluster: Cluster, name: str) -> dict[str, Any]:
    """What the operator put on node `name`: claim, label, taints, cordon."""
    found = node(cluster, name)
    metadata, spec = found["metadata"], found.get("spec") or {}
    return {
        "claimed-by": (metadata.get("annotations") or {}).get(claims.ANNOTATION_CLAIMED_BY),
        "label": (metadata.get("labels") or {}).get(resources.LABEL_CONTRACT),
        "taints": sorted(taint["key"] for taint in spec.get("taints") or []),
        "cordoned": bool(spec.get("unschedulable")),
    }


def add_pod(cluster: Cluster, namespace: str, name: str, on: str) -> None:
    cluster.core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"nodeName": on, "containers": [{"name": "main", "image": "busybox"}]},
            "status": {"phase": "Running"},
        },
    )


def pods_on(cluster: Cluster, name: str) -> list[str]:
    found = cluster.core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={name}")
    return sorted(f"{pod.metadata.namespace}/{pod.metadata.name}" for pod in found.items)


def set_gpu_health(cluster: Cluster, name: str, healthy: bool, at_s: int) -> None:
    condition = {
        "type": nodes.CONDITION_GPU_HEALTHY,
        "status": "True" if healthy else "False",
        "lastTransitionTime": timefmt.format_utc(at_s),
    }
    cluster.core.patch_node_status(name, {"status": {"conditions": [condition]}})


def phase_of(cluster: Cluster, name: str) -> str | None:
    found: str | None = contract_status(cluster, name).get("phase")
    return found


def ledger_of(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = (
        contract_status(cluster, name).get("ledger", {}).get("intervals", [])
    )
    return found


def intervals(node_name: str, start_s: int, end_s: int | None = None) -> list[dict[str, Any]]:
    return [
        {"node": node_name, "gpu_uuid": uuid, "start": timefmt.format_utc(start_s)}
        | ({} if end_s is None else {"end": timefmt.format_utc(end_s)})
        for uuid in gpu_uuids(node_name)
    ]


FREE = {"claimed-by": None, "label": None, "taints": [], "cordoned": False}


def test_a_contract_is_prepared_delivered_substituted_and_released(cluster: Cluster) -> None:
    clock = Clock()
    clock.attach(cluster)
    add_pool(cluster)
    add_gpu_nodes(cluster, ["gpu-a1", "gpu-a2"], block="a")
    add_gpu_nodes(cluster, ["gpu-b1"], block="b")
    add_pod(cluster, "team", "batch", on="gpu-a1")
    name = add_contract(cluster, "EX-1", 16)
    with running_operator(cluster, clock=clock):
        poll(lambda: phase_of(cluster, name) == "Booked")
        assert [marks(cluster, n) for n in ("gpu-a1", "gpu-a2", "gpu-b1")] == [FREE] * 3

        clock.now_s = START - 300  # within the pool's 10-minute lead time
        poll(lambda: phase_of(cluster, name) == "Preparing" and not pods_on(cluster, "gpu-a1"))
        cordoned = {"claimed-by": name, "label": None, "taints": [], "cordoned": True}
        poll(lambda: marks(cluster, "gpu-a1") == cordoned)
        status = contract_status(cluster, name)
        assert status["nodes"] == ["gpu-a1", "gpu-a2"]  # one network block
        assert status["reason"] == "2 of 2 nodes ready for 2026-03-03T00:00:00Z"
        assert [marks(cluster, n) for n in ("gpu-a2", "gpu-b1")] == [cordoned, FREE]
        assert ledger_of(cluster, name) == []

        clock.now_s = START
        poll(lambda: phase_of(cluster, name) == "Delivering")
        handed = {
            "claimed-by": name,
            "label": name,
            "taints": [resources.TAINT_CONTRACT],
            "cordoned": False,
        }
        assert [marks(cluster, n) for n in ("gpu-a1", "gpu-a2", "gpu-b1")] == [
            handed,
            handed,
            FREE,
        ]
        assert ledger_of(cluster, name) == intervals("gpu-a1", START) + intervals("gpu-a2", START)
        assert len(contract_status(cluster, name)["gpus"]) == 16

        clock.now_s = START + 1_200
        set_gpu_health(cluster, "gpu-a2", healthy=False, at_s=clock.now_s)
        poll(lambda: contract_status(cluster, name).get("nodes") == ["gpu-a1", "gpu-b1"])
        poll(lambda: phase_of(cluster, name) == "Delivering" and marks(cluster, "gpu-b1")["label"])
        assert marks(cluster, "gpu-a2") == {
            "claimed-by": None,
            "label": None,
            "taints": [resources.TAINT_QUARANTINE],
            "cordoned": False,
        }
        assert marks(cluster, "gpu-b1") == handed
        assert ledger_of(cluster, name) == sorted(
            intervals("gpu-a1", START)
            + intervals("gpu-a2", START, START + 1_200)
            + intervals("gpu-b1", START + 1_200),
            key=lambda i: (i["node"], i["gpu_uuid"], i["start"]),
        )
        phases = [t["phase"] for t in contract_status(cluster, name)["transitions"]]
        assert phases[:3] == ["Booked", "Preparing", "Delivering"]

        clock.now_s = END
        poll(lambda: phase_of(cluster, name) == "Completed")
        assert [marks(cluster, n) for n in ("gpu-a1", "gpu-b1")] == [FREE, FREE]
        assert marks(cluster, "gpu-a2")["taints"] == [resources.TAINT_QUARANTINE]
        assert all("end" in interval for interval in ledger_of(cluster, name))
        final = contract_status(cluster, name)
        assert {"nodes", "gpus", "namespace"}.isdisjoint(final)
        # 16 GPUs for the hour, less nothing: the substitute took over in the same second.
        assert final["deliveredGpuSeconds"] == 16 * 3_600


def test_nodes_of_another_product_are_never_touched(cluster: Cluster) -> None:
    clock = Clock(START)
    clock.attach(cluster)
    add_pool(cluster)
    add_gpu_nodes(cluster, ["gpu-0"], block="a")
    add_gpu_nodes(cluster, ["a100-0"], block="a", labels={"nvidia.com/gpu.product": "A100"})
    name = add_contract(cluster, "EX-1", 8, start=timefmt.format_utc(START + 3_600),
                        end=timefmt.format_utc(START + 7_200))  # fmt: skip
    assert PRODUCT != {"nvidia.com/gpu.product": "A100"}
    with running_operator(cluster, clock=clock):
        poll(lambda: phase_of(cluster, name) == "Booked")
        clock.now_s = START + 3_600
        poll(lambda: phase_of(cluster, name) == "Delivering")
        assert marks(cluster, "a100-0") == FREE
