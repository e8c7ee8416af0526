"""Delivery through the running operator: kopf, the official client and the cluster emulator
over HTTP, with a clock the test moves. A contract's nodes are claimed, cordoned and drained
over its lead time, handed over at its start (labelled, tainted, uncordoned, their GPUs in
the ledger), a failed node is quarantined and replaced, and at the end everything is given
back and the ledger closed."""

from __future__ import annotations

import base64
from typing import Any

from kubernetes import client

from gpudelivery import timefmt
from gpudelivery.operator import claims, executor, nodes, resources, tenancy

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
LABEL_PRODUCT = resources.LABEL_GPU_PRODUCT


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


def add_pod(
    cluster: Cluster, namespace: str, name: str, on: str, labels: dict[str, str] | None = None
) -> None:
    cluster.core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
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


def namespaces(cluster: Cluster) -> list[str]:
    return sorted(item.metadata.name for item in cluster.core.list_namespace().items)


def namespace_objects(cluster: Cluster, namespace: str) -> dict[str, Any]:
    """The buyer's quota, and the names of its secrets and service accounts."""
    core = cluster.core
    (quota,) = core.list_namespaced_resource_quota(namespace).items
    return {
        "quota": quota.spec.hard,
        "secrets": sorted(
            item.metadata.name for item in core.list_namespaced_secret(namespace).items
        ),
        "service accounts": sorted(
            item.metadata.name for item in core.list_namespaced_service_account(namespace).items
        ),
    }


def kubeconfig_of(cluster: Cluster, namespace: str) -> str:
    secret = cluster.core.read_namespaced_secret(tenancy.KUBECONFIG_SECRET, namespace)
    return base64.b64decode(secret.data["kubeconfig"]).decode()


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
        ready = "2 of 2 nodes ready for 2026-03-03T00:00:00Z"
        poll(lambda: contract_status(cluster, name)["reason"] == ready)
        assert contract_status(cluster, name)["nodes"] == ["gpu-a1", "gpu-a2"]  # one block
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
        namespace = resources.namespace_name(name)
        assert contract_status(cluster, name)["namespace"] == namespace
        assert namespace_objects(cluster, namespace) == {
            "quota": {"requests.nvidia.com/gpu": "16"},
            "secrets": [tenancy.KUBECONFIG_SECRET],
            "service accounts": [tenancy.SERVICE_ACCOUNT],
        }
        ((token, issued),) = cluster.emulator.issued_tokens.items()
        assert (issued.namespace, issued.expires.timestamp()) == (namespace, END)
        assert f'token: "{token}"' in kubeconfig_of(cluster, namespace)

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
        poll(lambda: namespace not in namespaces(cluster))
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


def test_a_node_whose_drain_a_disruption_budget_blocks_is_swapped_after_the_drain_timeout(
    cluster: Cluster,
) -> None:
    clock = Clock(START - 600)  # the pool's lead time: preparation starts now
    clock.attach(cluster)
    add_pool(cluster, drainTimeoutSeconds=120)
    add_gpu_nodes(cluster, ["gpu-a"], block="a")
    add_gpu_nodes(cluster, ["gpu-b"], block="b")
    name = add_contract(cluster, "EX-1", 8)
    with running_operator(cluster, clock=clock):
        poll(lambda: phase_of(cluster, name) == "Preparing")
        (first,) = contract_status(cluster, name)["nodes"]
        other = {"gpu-a": "gpu-b", "gpu-b": "gpu-a"}[first]
        # A database that may not lose its one replica lands on the node being prepared.
        add_pod(cluster, "team", "db-0", on=first, labels={"app": "db"})
        client.PolicyV1Api(cluster.core.api_client).create_namespaced_pod_disruption_budget(
            "team",
            {
                "metadata": {"name": "db", "namespace": "team"},
                "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "db"}}},
            },
        )
        poll(lambda: contract_status(cluster, name)["reason"].startswith("0 of 1 node ready"))
        assert pods_on(cluster, first) == ["team/db-0"]  # refused, asked again each pass
        assert contract_status(cluster, name)["drainStarted"] == [
            {"node": first, "at": timefmt.format_utc(START - 600)}
        ]

        clock.now_s = START - 600 + 120
        poll(lambda: contract_status(cluster, name)["nodes"] == [other])
        poll(lambda: marks(cluster, first) == FREE)
        assert pods_on(cluster, first) == ["team/db-0"]  # the budget was honoured

        clock.now_s = START
        poll(lambda: phase_of(cluster, name) == "Delivering")
        assert marks(cluster, other)["label"] == name
        assert marks(cluster, first) == FREE


def test_a_cancelled_contract_releases_its_nodes_and_its_booking(cluster: Cluster) -> None:
    clock = Clock(START - 300)
    clock.attach(cluster)
    add_pool(cluster)
    add_gpu_nodes(cluster, ["gpu-0", "gpu-1"], block="a")
    name = add_contract(cluster, "EX-1", 16)
    with running_operator(cluster, clock=clock):
        poll(lambda: phase_of(cluster, name) == "Preparing")
        poll(lambda: marks(cluster, "gpu-1")["cordoned"])
        cancelled_at = timefmt.format_utc(START - 200)
        cluster.custom.patch_cluster_custom_object(
            resources.GROUP,
            resources.VERSION,
            resources.CONTRACTS,
            name,
            {"spec": {resources.SPEC_CANCELLED_AT: cancelled_at}},
        )
        poll(lambda: phase_of(cluster, name) == "Cancelled")
        poll(lambda: [marks(cluster, n) for n in ("gpu-0", "gpu-1")] == [FREE, FREE])
        status = contract_status(cluster, name)
        assert status["reason"] == f"cancelled at {cancelled_at}"
        assert "nodes" not in status
        # The room is free again: a contract for the same window now fits.
        again = add_contract(cluster, "EX-2", 16)
        poll(lambda: phase_of(cluster, again) is not None)
        assert phase_of(cluster, again) == "Booked"
        clock.now_s = START
        poll(lambda: phase_of(cluster, again) == "Delivering")
        assert phase_of(cluster, name) == "Cancelled"


def test_three_pools_of_forty_nodes_deliver_their_contracts_and_give_every_node_back(
    cluster: Cluster,
) -> None:
    clock = Clock()
    clock.attach(cluster)
    pools = {  # pool: (instrument, {block: nodes})
        "h100": ("H100-SXM-80GB", {"h1": 8, "h2": 8}),
        "a100": ("A100-SXM4-80GB", {"a1": 4, "a2": 4, "a3": 4, "a4": 4}),
        "l40s": ("L40S", {"l1": 8}),
    }
    for pool, (instrument, blocks) in pools.items():
        add_pool(cluster, pool, instrument, spares=1)
        for block, count in blocks.items():
            names = [f"{block}-{number}" for number in range(count)]
            add_gpu_nodes(cluster, names, block=block, labels={LABEL_PRODUCT: instrument})
    hour = timefmt.format_utc
    wanted = {  # contract: (instrument, GPUs, start, end)
        "H-1": ("H100-SXM-80GB", 64, START, END),  # 8 nodes: one whole block
        "H-2": ("H100-SXM-80GB", 56, START, END),  # 7 nodes: the other block, less a spare
        "H-3": ("H100-SXM-80GB", 8, START, END),  # the pool is full: rejected
        "A-1": ("A100-SXM4-80GB", 32, START, END),  # 4 nodes: one block
        "A-2": ("A100-SXM4-80GB", 24, START, END),  # 3 nodes
        "A-3": ("A100-SXM4-80GB", 16, START + 1_800, END),  # later in the window
        "L-1": ("L40S", 40, START, START + 1_800),  # 5 nodes, half the window
        "L-2": ("L40S", 16, START + 1_800, END),  # after L-1, on its nodes
    }
    names = {}
    with running_operator(cluster, clock=clock):
        for contract_id, (instrument, gpus, start, end) in wanted.items():
            names[contract_id] = add_contract(
                cluster, contract_id, gpus, instrument=instrument, start=hour(start), end=hour(end)
            )
            poll(lambda name=names[contract_id]: phase_of(cluster, name) is not None)
        assert {c: phase_of(cluster, n) for c, n in names.items()} == {
            c: "Rejected" if c == "H-3" else "Booked" for c in wanted
        }

        clock.now_s = START
        live = ["H-1", "H-2", "A-1", "A-2", "L-1"]
        poll(lambda: all(phase_of(cluster, names[c]) == "Delivering" for c in live))
        held = {c: contract_status(cluster, names[c])["nodes"] for c in live}
        assert {c: len(nodes_) for c, nodes_ in held.items()} == {
            "H-1": 8, "H-2": 7, "A-1": 4, "A-2": 3, "L-1": 5,
        }  # fmt: skip
        for contract_id, nodes_ in held.items():  # each in one network block
            assert len({node.rsplit("-", 1)[0] for node in nodes_}) == 1, (contract_id, nodes_)
        every = [node for nodes_ in held.values() for node in nodes_]
        assert len(every) == len(set(every))  # never two contracts on one node
        for contract_id, nodes_ in held.items():
            assert {marks(cluster, node)["label"] for node in nodes_} == {names[contract_id]}

        clock.now_s = START + 1_800
        poll(lambda: phase_of(cluster, names["L-1"]) == "Completed")
        poll(lambda: phase_of(cluster, names["L-2"]) == "Delivering")
        poll(lambda: phase_of(cluster, names["A-3"]) == "Delivering")
        a3 = contract_status(cluster, names["A-3"])["nodes"]
        assert len(a3) == 2
        assert not set(a3) & set(every)

        clock.now_s = END
        ended = [c for c in wanted if c != "H-3"]
        poll(lambda: all(phase_of(cluster, names[c]) == "Completed" for c in ended))
        poll(lambda: all(marks(cluster, n) == FREE for n in all_nodes(cluster)))
        for contract_id in ended:
            status = contract_status(cluster, names[contract_id])
            instrument, gpus, start, end = wanted[contract_id]
            assert status["deliveredGpuSeconds"] == gpus * (end - start), contract_id
    assert len(all_nodes(cluster)) == 40


def all_nodes(cluster: Cluster) -> list[str]:
    return sorted(node.metadata.name for node in cluster.core.list_node().items)


def test_a_contract_whose_status_cannot_be_read_is_reported_and_the_others_are_delivered(
    cluster: Cluster,
) -> None:
    clock = Clock(START)
    clock.attach(cluster)
    add_pool(cluster)
    add_gpu_nodes(cluster, ["gpu-0", "gpu-1"], block="a")
    broken = add_contract(cluster, "EX-1", 8)
    cluster.custom.patch_cluster_custom_object_status(
        resources.GROUP,
        resources.VERSION,
        resources.CONTRACTS,
        broken,
        {"status": {"phase": "Bogus", "pool": "h100"}},
    )
    name = add_contract(cluster, "EX-2", 8)
    with running_operator(cluster, clock=clock):
        poll(lambda: phase_of(cluster, name) == "Delivering")
        poll(lambda: bool(warnings_about(cluster, broken)))
        clock.now_s += 120  # a later pass (it counts 2 minutes of 8 GPUs) posts nothing again
        poll(lambda: contract_status(cluster, name).get("deliveredGpuSeconds") == 960)
    assert warnings_about(cluster, broken) == [
        ("ActionFailed", "status.phase: 'Bogus' is not a phase")
    ]
    assert phase_of(cluster, broken) == "Bogus"


def warnings_about(cluster: Cluster, name: str) -> list[tuple[str, str]]:
    found = cluster.core.list_event_for_all_namespaces().items
    return [
        (event.reason, event.message)
        for event in found
        if event.involved_object.name == name and event.type == "Warning"
    ]


def test_an_object_deleted_from_the_buyers_namespace_is_made_again_at_the_next_check(
    cluster: Cluster,
) -> None:
    clock = Clock(START)
    clock.attach(cluster)
    add_pool(cluster)
    add_gpu_nodes(cluster, ["gpu-0"], block="a")
    name = add_contract(cluster, "EX-1", 8)
    namespace = resources.namespace_name(name)
    networking = client.NetworkingV1Api(cluster.core.api_client)

    def policies() -> list[str]:
        found = networking.list_namespaced_network_policy(namespace).items
        return [item.metadata.name for item in found]

    with running_operator(cluster, clock=clock):
        poll(lambda: phase_of(cluster, name) == "Delivering")
        networking.delete_namespaced_network_policy(tenancy.NETWORK_POLICY, namespace)
        clock.now_s = START + executor.NAMESPACE_CHECK_S - 1
        poll(lambda: contract_status(cluster, name).get("deliveredGpuSeconds") == 8 * 299)
        assert policies() == []  # not checked again yet
        clock.now_s = START + executor.NAMESPACE_CHECK_S
        poll(lambda: policies() == [tenancy.NETWORK_POLICY])
