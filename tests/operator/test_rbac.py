"""The chart's ClusterRole grants the operator exactly what it uses: every (verb, group,
resource) the operator requested while it ran its scenarios against the emulator, nothing
missing, nothing more, no wildcard."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from gpudelivery.operator import resources, runner

from utils.operators import (
    Cluster,
    add_contract,
    add_nodes,
    add_pool,
    contract_status,
    running_operator,
)
from utils.polling import poll
from utils.routes import Access

ROOT = Path(__file__).parents[2]
HELM = ROOT / ".tools" / "bin" / "helm"
GROUP, VERSION = resources.GROUP, resources.VERSION
# The operator's clients: kopf's, and its own official client.
OPERATOR_AGENTS = ("kopf/", runner.USER_AGENT)


def granted_to_the_operator() -> frozenset[Access]:
    """Every (verb, group, resource) the chart's operator ClusterRole grants."""
    command = [str(HELM), "template", "t", str(ROOT / "charts" / "gpudelivery")]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    (role,) = [
        document
        for document in yaml.safe_load_all(output)
        if document and document["kind"] == "ClusterRole"
    ]
    return frozenset(
        Access(verb, group, resource)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    )


def run_the_scenarios(cluster: Cluster) -> None:
    """What the operator does so far, as the chart runs it (with peering): pools counted,
    contracts booked and rejected, a restart."""
    cluster.custom.create_cluster_custom_object(
        "kopf.dev", "v1", "clusterkopfpeerings", {"metadata": {"name": "gpudelivery"}}
    )
    add_pool(cluster)
    add_nodes(cluster, 1)
    names = [add_contract(cluster, f"EX-{number}") for number in range(2)]

    def phases() -> list[Any]:
        return [contract_status(cluster, name).get("phase") for name in names]

    for _ in range(2):  # the second run resumes what the first left
        with running_operator(cluster, peering="gpudelivery"):
            poll(lambda: None not in phases())
            poll(lambda: "nodes" in cluster.custom.get_cluster_custom_object(
                GROUP, VERSION, resources.POOLS, "h100").get("status", {}))  # fmt: skip
    assert sorted(phases()) == ["Booked", "Rejected"]


def test_the_operators_role_grants_exactly_what_it_uses(cluster: Cluster) -> None:
    run_the_scenarios(cluster)
    used = cluster.emulator.accesses_by(*OPERATOR_AGENTS)
    granted = granted_to_the_operator()
    assert {"missing": sorted(used - granted), "unused": sorted(granted - used)} == {
        "missing": [],
        "unused": [],
    }
