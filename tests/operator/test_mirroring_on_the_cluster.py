"""The running operator with the gpudelivery API (the real app, in process): contracts an
exchange sends to the API appear on the cluster and are delivered, a contract applied with
kubectl is registered with the API, the ledger reaches the API, and a cancellation at the
API releases the booking on the cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpudelivery import timefmt
from gpudelivery.api import auth
from gpudelivery.operator import handlers, resources

from utils import apis
from utils.factories import EPOCH, terms_json
from utils.operators import (
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
INSTRUMENT = "H100-SXM-80GB"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[httpx.Client, dict[str, str], Path]]:
    """The API app: its client, keys of the operator and an exchange, and the operator's
    key in a file (as the chart mounts it)."""
    keys = {"operator": auth.Role.OPERATOR, "cme": auth.Role.EXCHANGE}
    with apis.running_api(tmp_path, keys, capacity={INSTRUMENT: 64}) as (client, tokens):
        key_file = tmp_path / "operator.key"
        key_file.write_text(tokens["operator"] + "\n")
        yield client, tokens, key_file


def send(client: httpx.Client, token: str, **fields: Any) -> None:
    """An exchange sends a contract to the API."""
    answer = client.post(
        "/v1/contracts",
        json=terms_json(**fields),
        headers={"Authorization": f"Bearer {token}", "Idempotency-Key": fields["contract_id"]},
    )
    assert answer.status_code == 201, answer.text


def api_get(client: httpx.Client, token: str, path: str) -> httpx.Response:
    return client.get(path, headers={"Authorization": f"Bearer {token}"})


def phase_of(cluster: Cluster, contract_id: str) -> str | None:
    found: str | None = contract_status(cluster, resources.resource_name(contract_id)).get("phase")
    return found


def exists(cluster: Cluster, contract_id: str) -> bool:
    names = {
        item["metadata"]["name"]
        for item in cluster.custom.list_cluster_custom_object(
            resources.GROUP, resources.VERSION, resources.CONTRACTS
        )["items"]
    }
    return resources.resource_name(contract_id) in names


def test_contracts_are_mirrored_both_ways_delivered_and_their_ledger_reaches_the_api(
    cluster: Cluster, api: tuple[httpx.Client, dict[str, str], Path]
) -> None:
    client, tokens, key_file = api
    clock = Clock(START - 3_600)
    clock.attach(cluster)
    add_pool(cluster)
    add_gpu_nodes(cluster, ["gpu-0", "gpu-1"], block="a")
    add_gpu_nodes(cluster, ["gpu-2"], block="b")
    send(client, tokens["cme"], contract_id="EX-API", gpu_count=16)
    add_contract(cluster, "EX-KUBE", 8)  # a provider's kubectl apply
    operator = tokens["operator"]
    with running_operator(cluster, clock=clock, api=(client, key_file)):
        poll(lambda: exists(cluster, "EX-API"))
        poll(lambda: api_get(client, operator, "/v1/contracts/EX-KUBE").status_code == 200)
        registered = api_get(client, operator, "/v1/contracts/EX-KUBE").json()
        assert (registered["origin"], registered["gpu_count"]) == ("cluster", 8)
        poll(lambda: phase_of(cluster, "EX-API") == "Booked")

        clock.now_s = START
        poll(lambda: phase_of(cluster, "EX-API") == phase_of(cluster, "EX-KUBE") == "Delivering")
        name = resources.resource_name("EX-API")
        nodes = contract_status(cluster, name)["nodes"]

        def reported() -> list[tuple[str, str, str, str | None]]:
            answer = api_get(client, operator, "/v1/contracts/EX-API/assignments")
            assert answer.status_code == 200, answer.text
            return sorted(
                (item["node"], item["gpu_uuid"], item["start"], item["end"])
                for item in answer.json()["data"]
            )

        start = timefmt.format_utc(START)
        expected = sorted((n, uuid, start, None) for n in nodes for uuid in gpu_uuids(n))
        poll(lambda: reported() == expected)
        poll(lambda: (ledger_condition(cluster, name) or {}).get("status") == "True")
        assert ledger_condition(cluster, name)["reason"] == "Acknowledged"  # type: ignore[index]

        clock.now_s = END
        poll(lambda: phase_of(cluster, "EX-API") == "Completed")
        end = timefmt.format_utc(END)
        poll(lambda: reported() == [(n, u, s, end) for n, u, s, _ in expected])


def ledger_condition(cluster: Cluster, name: str) -> dict[str, Any] | None:
    for condition in contract_status(cluster, name).get("conditions", []):
        if condition["type"] == handlers.CONDITION_LEDGER_REPORTED:
            found: dict[str, Any] = condition
            return found
    return None


def test_a_contract_cancelled_at_the_api_is_cancelled_on_the_cluster(
    cluster: Cluster, api: tuple[httpx.Client, dict[str, str], Path]
) -> None:
    client, tokens, key_file = api
    # The API cancels only before the start by its own clock: a window ahead of it.
    start = timefmt.parse_utc("2099-01-01T00:00:00Z", field="start")
    clock = Clock(start - 300)
    clock.attach(cluster)
    add_pool(cluster)
    add_gpu_nodes(cluster, ["gpu-0"], block="a")
    window = {"start": timefmt.format_utc(start), "end": timefmt.format_utc(start + 3_600)}
    send(client, tokens["cme"], contract_id="EX-1", gpu_count=8, **window)
    with running_operator(cluster, clock=clock, api=(client, key_file)):
        poll(lambda: exists(cluster, "EX-1") and phase_of(cluster, "EX-1") == "Preparing")
        answer = client.post(
            "/v1/contracts/EX-1/cancel", headers={"Authorization": f"Bearer {tokens['cme']}"}
        )
        assert answer.status_code == 200, answer.text
        poll(lambda: phase_of(cluster, "EX-1") == "Cancelled")
        body = cluster.custom.get_cluster_custom_object(
            resources.GROUP, resources.VERSION, resources.CONTRACTS, resources.resource_name("EX-1")
        )
        assert body["spec"][resources.SPEC_CANCELLED_AT] == answer.json()["cancelled_at"]
        assert "nodes" not in contract_status(cluster, resources.resource_name("EX-1"))
