"""Booking through the running operator: kopf, the official client and the cluster
emulator over HTTP. Contracts are booked or rejected with their reason in their status, one
decision at a time, and a restarted operator leaves decided contracts alone."""

from __future__ import annotations

from typing import Any

from gpudelivery import terms, timefmt
from gpudelivery.operator import resources

from utils.factories import EPOCH, terms_json
from utils.operators import (
    NOW,
    PRODUCT,
    Cluster,
    add_contract,
    add_nodes,
    add_pool,
    contract_status,
    running_operator,
)
from utils.polling import poll

GROUP, VERSION = resources.GROUP, resources.VERSION
HOUR = 3_600


def decided(cluster: Cluster, name: str) -> dict[str, Any]:
    poll(lambda: "phase" in contract_status(cluster, name))
    return contract_status(cluster, name)


def test_contracts_are_booked_until_the_pool_is_full_and_then_rejected_naming_why(
    cluster: Cluster,
) -> None:
    add_pool(cluster, spares=1)
    add_nodes(cluster, 4, PRODUCT)
    add_nodes(cluster, 2, {"nvidia.com/gpu.product": "A100"}, prefix="other")
    with running_operator(cluster):
        first = decided(cluster, add_contract(cluster, "EX-1", 16))
        second = decided(cluster, add_contract(cluster, "EX-2", 9))
        third = decided(cluster, add_contract(cluster, "EX-3", 8))
        unknown = decided(cluster, add_contract(cluster, "EX-4", 8, instrument="B200"))

    window = "from 2026-03-02T23:50:00Z to 2026-03-03T01:00:00Z"
    assert (first["phase"], first["reason"], first["pool"], first["nodesNeeded"]) == (
        "Booked",
        f"booked 2 nodes of pool h100 {window}",
        "h100",
        2,
    )
    assert first["transitions"] == [
        {"phase": "Booked", "at": timefmt.format_utc(NOW), "reason": first["reason"]}
    ]
    assert (second["phase"], second["reason"]) == (
        "Rejected",
        "contract EX-2 needs 2 nodes from 2026-03-02T23:50:00Z but only 1 of 3 is free at "
        "2026-03-02T23:50:00Z (2 held by other contracts)",
    )
    assert third["phase"] == "Booked"
    assert (unknown["phase"], unknown["reason"]) == (
        "Rejected",
        "no DeliveryPool delivers instrument B200",
    )


def test_contracts_created_together_are_decided_one_at_a_time(cluster: Cluster) -> None:
    add_pool(cluster, spares=1)
    add_nodes(cluster, 4, PRODUCT)  # 3 bookable: one is a spare
    names = [add_contract(cluster, f"EX-{number}", 8) for number in range(6)]
    with running_operator(cluster):
        phases = [decided(cluster, name)["phase"] for name in names]
    assert sorted(phases) == ["Booked"] * 3 + ["Rejected"] * 3


def test_quarantined_nodes_are_not_booked_against(cluster: Cluster) -> None:
    add_pool(cluster, spares=0)
    add_nodes(cluster, 2, PRODUCT)
    cluster.core.patch_node(
        "gpu-1",
        {"spec": {"taints": [{"key": resources.TAINT_QUARANTINE, "effect": "NoSchedule"}]}},
    )
    with running_operator(cluster):
        fits = decided(cluster, add_contract(cluster, "EX-1", 8))
        full = decided(cluster, add_contract(cluster, "EX-2", 8))
    assert (fits["phase"], full["phase"]) == ("Booked", "Rejected")
    assert full["reason"] == (
        "contract EX-2 needs 1 node from 2026-03-02T23:50:00Z but only 0 of 1 are free at "
        "2026-03-02T23:50:00Z (1 held by other contracts)"
    )


def test_a_restarted_operator_leaves_decided_contracts_as_they_are(cluster: Cluster) -> None:
    add_pool(cluster, spares=1)
    add_nodes(cluster, 2, PRODUCT)  # 1 bookable
    with running_operator(cluster):
        booked = decided(cluster, add_contract(cluster, "EX-1", 8))
        rejected = decided(cluster, add_contract(cluster, "EX-2", 8))
    # More room now: a rejected contract stays rejected, and nothing is decided twice.
    add_nodes(cluster, 2, PRODUCT, prefix="more")
    with running_operator(cluster, clock=lambda: NOW + 60):
        later = decided(cluster, add_contract(cluster, "EX-3", 8))
        assert later["phase"] == "Booked"
        names = [resources.resource_name(f"EX-{number}") for number in (1, 2)]
        assert [contract_status(cluster, name) for name in names] == [booked, rejected]


def test_a_contract_with_invalid_terms_is_rejected_naming_the_field(cluster: Cluster) -> None:
    add_pool(cluster, spares=1)
    add_nodes(cluster, 2, PRODUCT)
    body = resources.contract_body(terms.parse_terms(terms_json(contract_id="EX-1")))
    body["spec"]["end"] = timefmt.format_utc(EPOCH - HOUR)
    cluster.custom.create_cluster_custom_object(GROUP, VERSION, resources.CONTRACTS, body)
    with running_operator(cluster):
        refused = decided(cluster, body["metadata"]["name"])
    assert refused["phase"] == "Rejected"
    assert refused["reason"].startswith("invalid terms: spec: end (2026-03-02T23:00:00Z) must be")


def test_a_pools_status_says_how_many_nodes_it_has_and_may_book(cluster: Cluster) -> None:
    add_pool(cluster, spares=1)
    add_nodes(cluster, 5, PRODUCT)

    def pool_status() -> dict[str, Any]:
        body = cluster.custom.get_cluster_custom_object(GROUP, VERSION, resources.POOLS, "h100")
        found: dict[str, Any] = body.get("status", {})
        return found

    with running_operator(cluster):
        poll(lambda: pool_status().get("nodes") == 5)
    assert {key: pool_status()[key] for key in ("nodes", "bookableNodes")} == {
        "nodes": 5,
        "bookableNodes": 4,
    }
