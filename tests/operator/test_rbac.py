"""The chart's ClusterRole grants the operator exactly what it uses: every (verb, group,
resource) the operator requested while it ran its scenarios against the emulator, nothing
missing, nothing more, no wildcard."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import yaml

from gpudelivery.api import auth
from gpudelivery.operator import admission, buyers, nodes, resources, runner, tenancy
from gpudelivery.operator.settings import WebhookSettings

from utils import apis, kube
from utils.factories import EPOCH, terms_json
from utils.operators import (
    Clock,
    Cluster,
    add_contract,
    add_gpu_nodes,
    add_pool,
    contract_status,
    running_operator,
)
from utils.polling import poll
from utils.routes import Access

ROOT = Path(__file__).parents[2]
HELM = ROOT / ".tools" / "bin" / "helm"
GROUP, VERSION = resources.GROUP, resources.VERSION
START, END = EPOCH, EPOCH + 3_600
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


def run_the_scenarios(cluster: Cluster, directory: Path) -> None:
    """Everything the operator does, as the chart runs it (with peering, the webhook served
    with a mounted certificate, and the API): contracts mirrored both ways, booked and
    rejected, prepared (a pod evicted), delivered (the buyer's namespace made, a pod of the
    buyer's pinned and warned), a failed node substituted, the window closed, the ledger
    reported; and a restart that resumes it all."""
    cluster.custom.create_cluster_custom_object(
        "kopf.dev", "v1", "clusterkopfpeerings", {"metadata": {"name": "gpudelivery"}}
    )
    clock = Clock(START - 3_600)
    clock.attach(cluster)
    add_pool(cluster)
    add_gpu_nodes(cluster, ["gpu-0", "gpu-1"], block="a")
    for node in ("gpu-0", "gpu-1"):
        cluster.core.create_namespaced_pod(
            "team",
            {"metadata": {"name": f"batch-{node}"}, "spec": {"nodeName": node, "containers": []}},
        )
    names = [add_contract(cluster, "EX-KUBE", 8), add_contract(cluster, "EX-BIG", 64)]
    webhook = webhook_settings(directory)
    keys = {"operator": auth.Role.OPERATOR, "cme": auth.Role.EXCHANGE}
    with apis.running_api(directory, keys, capacity={"H100-SXM-80GB": 16}) as (api, tokens):
        key_file = directory / "operator.key"
        key_file.write_text(tokens["operator"])
        exchange = {"Authorization": f"Bearer {tokens['cme']}", "Idempotency-Key": "1"}
        sent = api.post("/v1/contracts", json=terms_json(contract_id="EX-API"), headers=exchange)
        assert sent.status_code == 201, sent.text
        names.append(resources.resource_name("EX-API"))
        running = functools.partial(
            running_operator, cluster, clock=clock, peering="gpudelivery", webhook=webhook,
            api=(api, key_file),
        )  # fmt: skip
        with running():
            poll(lambda: phases(cluster, names) == ["Booked", "Rejected", "Booked"])
            clock.now_s = START
            poll(lambda: phases(cluster, names) == ["Delivering", "Rejected", "Delivering"])
            namespace = resources.namespace_name(names[0])
            renew_a_kubeconfig(cluster, names[0])
            cluster.core.create_namespaced_pod(
                namespace, {"metadata": {"name": "train"}, "spec": {"containers": []}}
            )
            (node,) = contract_status(cluster, names[0])["nodes"]
            unhealthy = {"type": nodes.CONDITION_GPU_HEALTHY, "status": "False"}
            cluster.core.patch_node_status(node, {"status": {"conditions": [unhealthy]}})
            poll(lambda: contract_status(cluster, names[0])["reason"].endswith("more"))
            # A node taken out of the pool while it serves is still the contract's, read by name.
            (served,) = contract_status(cluster, names[2])["nodes"]
            relabelled = {"metadata": {"labels": {resources.LABEL_GPU_PRODUCT: "retired"}}}
            cluster.core.patch_node(served, relabelled)
        with running():  # the second run resumes what the first left
            clock.now_s = END - 60
            poll(lambda: "buyerWarnedAt" in contract_status(cluster, names[2]))
            clock.now_s = END
            poll(lambda: phases(cluster, names) == ["Completed", "Rejected", "Completed"])
            poll(lambda: ledger_reported(cluster, names[2]))


def renew_a_kubeconfig(cluster: Cluster, name: str) -> None:
    """The operator renews a buyer's kubeconfig when the window grows or the API server cut
    its token short, which the emulator (no token cap) does not bring about in a scenario:
    the operator's adapter renews one directly, with the operator's identity."""
    api_client = kube.api_client(cluster.url)
    api_client.user_agent = runner.USER_AGENT
    namespaces = buyers.BuyerNamespaces(api_client, server=cluster.url, ca_data=None)
    written = namespaces.ensure(name, "buyer", 8, END + 3_600, START)
    assert written == [f"secrets/{tenancy.KUBECONFIG_SECRET}"]


def phases(cluster: Cluster, names: list[str]) -> list[Any]:
    """The phases of the contracts `names` (None: no phase, or no such contract yet)."""
    found = cluster.custom.list_cluster_custom_object(GROUP, VERSION, resources.CONTRACTS)
    by_name = {item["metadata"]["name"]: item for item in found["items"]}
    return [by_name.get(name, {}).get("status", {}).get("phase") for name in names]


def ledger_reported(cluster: Cluster, name: str) -> bool:
    status = contract_status(cluster, name)
    return bool(status.get("ledger", {}).get("reported"))


def webhook_settings(directory: Path) -> WebhookSettings:
    """The webhook served with a certificate mounted from a Secret, as the chart does."""
    pem, key = admission.PinningServer.build_certificate(["127.0.0.1"])
    (directory / "tls.crt").write_bytes(pem)
    (directory / "tls.key").write_bytes(key)
    return WebhookSettings(
        host="127.0.0.1",
        port=0,
        cert_file=directory / "tls.crt",
        key_file=directory / "tls.key",
    )


# What the operator needs but never requests: the API server checks `bind` on a role when
# the operator binds it (the buyer's RoleBinding to `edit`), with no request of its own.
CHECKED_NOT_REQUESTED = frozenset({Access("bind", "rbac.authorization.k8s.io", "clusterroles")})


def test_the_operators_role_grants_exactly_what_it_uses(cluster: Cluster, tmp_path: Path) -> None:
    run_the_scenarios(cluster, tmp_path)
    used = cluster.emulator.accesses_by(*OPERATOR_AGENTS) | CHECKED_NOT_REQUESTED
    granted = granted_to_the_operator()
    assert {"missing": sorted(used - granted), "unused": sorted(granted - used)} == {
        "missing": [],
        "unused": [],
    }
