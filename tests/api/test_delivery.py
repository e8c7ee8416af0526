"""The ledger, proofs and settlements over HTTP, from meter batches the API ingested.

A contract for 2 GPUs over a 10-minute window that has ended; the node's meter reports
GPU A healthy all along and GPU B healthy for the first half only; the operator posts both
GPUs for the whole window. Delivered: 600 + 300 = 900 of 1,200 GPU-seconds."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gpudelivery import batches, proof, signing, timefmt
from gpudelivery.api.auth import Role

from utils.factories import BOOTSTRAP_TOKEN

Tokens = Callable[[str, Role], dict[str, str]]
NODE = "gpu-node-7"
GPU_A, GPU_B = (
    "GPU-aaaaaaaa-0000-4000-8000-000000000000",
    "GPU-bbbbbbbb-0000-4000-8000-000000000000",
)
WINDOW_S = 600


@pytest.fixture
def headers(client: TestClient, token_for: Tokens) -> dict[str, dict[str, str]]:
    keys = {
        "admin": token_for("provider-staff", Role.ADMIN),
        "exchange": token_for("cme", Role.EXCHANGE),
        "other_exchange": token_for("ice", Role.EXCHANGE),
        "buyer": token_for("acme-ai", Role.BUYER),
        "other_buyer": token_for("globex", Role.BUYER),
        "operator": token_for("operator", Role.OPERATOR),
    }
    client.put("/v1/capacity/H100-SXM-80GB", json={"gpus": 8}, headers=keys["operator"])
    return keys


def contract(client: TestClient, headers: dict[str, str], *, start_s: int,
             contract_id: str = "EX-1") -> dict[str, Any]:  # fmt: skip
    document = {
        "contract_id": contract_id,
        "buyer": "acme-ai",
        "instrument": "H100-SXM-80GB",
        "gpu_count": 2,
        "start": timefmt.format_utc(start_s),
        "end": timefmt.format_utc(start_s + WINDOW_S),
        "price_per_gpu_hour": "3.00",
        "currency": "USD",
        "penalty_tiers": [{"below": "0.95", "rate": "0.10"}, {"below": "0.80", "rate": "0.25"}],
    }
    answer = client.post(
        "/v1/contracts", json=document, headers={**headers, "Idempotency-Key": contract_id}
    )
    assert answer.status_code == 201, answer.text
    return document


def meter_node(client: TestClient, *, start_s: int, minutes: int = 10) -> signing.SigningKey:
    """Register a node key and ingest a minute per batch: A healthy, B healthy then not."""
    key = signing.generate()
    registered = client.post(
        "/v1/meter/keys",
        json={"node": NODE, "public_key_pem": signing.public_pem(key.public_key).decode()},
        headers={"Authorization": f"Bearer {BOOTSTRAP_TOKEN}"},
    )
    assert registered.status_code == 201, registered.text
    documents, previous = [], None
    for minute in range(minutes):
        t0, t1 = start_s + 60 * minute, start_s + 60 * (minute + 1)
        records = [
            {"gpu_uuid": GPU_A, "t0": timefmt.format_utc(t0), "t1": timefmt.format_utc(t1),
             "healthy": True, "utilization_gpu_pct": 90, "energy_mj": 39_000_000},
            {"gpu_uuid": GPU_B, "t0": timefmt.format_utc(t0), "t1": timefmt.format_utc(t1),
             "healthy": minute < minutes // 2},
        ]  # fmt: skip
        document = batches.sign_batch(
            key=key,
            node=NODE,
            seq=minute,
            prev_hash=None if previous is None else batches.batch_hash(previous),
            records=records,
        )
        documents.append(document)
        previous = document
    answer = client.post("/v1/meter/batches", json={"batches": documents})
    assert answer.status_code == 200, answer.text
    assert {result["status"] for result in answer.json()["results"]} == {"accepted"}
    return key


def post_ledger(client: TestClient, headers: dict[str, str], terms: dict[str, Any],
                **options: Any) -> Any:  # fmt: skip
    intervals = [
        {"node": NODE, "gpu_uuid": gpu, "start": terms["start"], "end": terms["end"], **options}
        for gpu in (GPU_A, GPU_B)
    ]
    return client.post(
        f"/v1/contracts/{terms['contract_id']}/assignments",
        json={"assignments": intervals},
        headers=headers,
    )


def ended_window() -> int:
    return (int(time.time()) // 60 - 30) * 60  # started 30 minutes ago, ended 20 ago


# -- the ledger ---------------------------------------------------------------------------


def test_the_operator_records_the_ledger_idempotently(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    terms = contract(client, headers["exchange"], start_s=ended_window())
    first = post_ledger(client, headers["operator"], terms)
    again = post_ledger(client, headers["operator"], terms)
    assert (first.status_code, again.status_code) == (200, 200)
    listed = client.get("/v1/contracts/EX-1/assignments", headers=headers["buyer"]).json()
    assert listed["count"] == 2
    assert listed["data"][0] == {
        "contract_id": "EX-1",
        "node": NODE,
        "gpu_uuid": GPU_A,
        "start": terms["start"],
        "end": terms["end"],
    }


def test_an_open_interval_is_closed_later_but_never_moved(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    terms = contract(client, headers["exchange"], start_s=ended_window())
    path = "/v1/contracts/EX-1/assignments"
    opened = {"node": NODE, "gpu_uuid": GPU_A, "start": terms["start"]}
    assert (
        client.post(path, json={"assignments": [opened]}, headers=headers["operator"]).json()[
            "data"
        ][0]["end"]
        is None
    )
    closed = {**opened, "end": terms["end"]}
    answer = client.post(path, json={"assignments": [closed]}, headers=headers["operator"])
    assert answer.json()["data"][0]["end"] == terms["end"]
    moved = {**opened, "end": timefmt.format_utc(timefmt.parse_utc(terms["end"], field="") - 60)}
    refused = client.post(path, json={"assignments": [moved]}, headers=headers["operator"])
    assert refused.status_code == 409
    assert refused.json()["detail"] == (
        f"assignments[0]: this interval already ended at {terms['end']}"
    )


def test_overlapping_intervals_of_one_gpu_are_refused(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    terms = contract(client, headers["exchange"], start_s=ended_window())
    start = timefmt.parse_utc(terms["start"], field="")
    path = "/v1/contracts/EX-1/assignments"
    first = {"node": NODE, "gpu_uuid": GPU_A, "start": terms["start"], "end": terms["end"]}
    inside = {**first, "start": timefmt.format_utc(start + 60)}
    client.post(path, json={"assignments": [first]}, headers=headers["operator"])
    refused = client.post(path, json={"assignments": [inside]}, headers=headers["operator"])
    assert refused.status_code == 409
    assert refused.json()["detail"].startswith("assignments[0]: overlaps the interval of")


@pytest.mark.parametrize(("role", "status"), [("exchange", 403), ("buyer", 403), ("admin", 200)])
def test_only_the_operator_writes_the_ledger(
    client: TestClient, headers: dict[str, dict[str, str]], role: str, status: int
) -> None:
    terms = contract(client, headers["exchange"], start_s=ended_window())
    assert post_ledger(client, headers[role], terms).status_code == status


# -- proofs and settlements ---------------------------------------------------------------


def test_the_proof_of_an_ended_window_is_final_and_verifies(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    start = ended_window()
    terms = contract(client, headers["exchange"], start_s=start)
    meter_node(client, start_s=start)
    post_ledger(client, headers["operator"], terms)
    answer = client.get("/v1/contracts/EX-1/proof", headers=headers["buyer"])
    assert answer.status_code == 200, answer.text
    document = answer.json()
    provider = client.get("/v1/keys").json()["data"][0]
    public_key = signing.load_public_pem(provider["public_key_pem"].encode())
    outcome = proof.verify(document, public_key)
    assert outcome.ok, outcome.problems
    assert document["status"] == "final"
    assert document["meter_evidence"]["leaves"] == "meter-batches"
    assert document["meter_evidence"]["tree_size"] == 10
    head = client.get("/v1/evidence/tree-head").json()
    assert document["meter_evidence"]["root_hash"] == head["root_hash"]
    assert document["settlement"] == {
        "contract_id": "EX-1",
        "contracted_gpu_seconds": 1200,
        "delivered_gpu_seconds": 900,
        "availability": "0.750000",
        "shortfall_gpu_hours": "0.083333",
        "charge": "0.75",  # 900 GPU-seconds at 3.00 an hour
        "penalty": "0.25",  # availability below 0.80: 25 % of the 1.00 contract value
        "net": "0.50",
        "currency": "USD",
    }
    gpus = {entry["gpu_uuid"]: entry["healthy_spans"] for entry in document["gpus"]}
    assert gpus == {
        GPU_A: [[terms["start"], terms["end"]]],
        GPU_B: [[terms["start"], timefmt.format_utc(start + 300)]],
    }


def test_the_settlement_answers_the_same_figures(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    start = ended_window()
    terms = contract(client, headers["exchange"], start_s=start)
    meter_node(client, start_s=start)
    post_ledger(client, headers["operator"], terms)
    answer = client.get("/v1/contracts/EX-1/settlement", headers=headers["exchange"])
    assert answer.status_code == 200, answer.text
    settled = answer.json()
    assert (settled["status"], settled["as_of"]) == ("provisional", terms["end"])
    assert settled["figures"]["delivered_gpu_seconds"] == 900
    assert settled["figures"]["net"] == "0.50"


def test_a_running_window_gets_a_provisional_proof_counted_up_to_now(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    start = (int(time.time()) // 60 - 5) * 60
    terms = contract(client, headers["exchange"], start_s=start)
    meter_node(client, start_s=start, minutes=4)
    post_ledger(client, headers["operator"], terms)
    document = client.get("/v1/contracts/EX-1/proof", headers=headers["buyer"]).json()
    assert document["status"] == "provisional"
    assert timefmt.parse_utc(document["as_of"], field="") >= start + 300
    assert document["settlement"]["delivered_gpu_seconds"] == 240 + 120


def test_a_window_not_yet_started_has_no_proof(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    contract(client, headers["exchange"], start_s=int(time.time()) // 60 * 60 + 3600)
    answer = client.get("/v1/contracts/EX-1/proof", headers=headers["exchange"])
    assert answer.status_code == 409
    assert answer.json() == {
        "detail": "contract EX-1 has not started: there is no delivery to prove yet"
    }


@pytest.mark.parametrize("path", ["proof", "settlement", "assignments"])
@pytest.mark.parametrize("role", ["other_exchange", "other_buyer"])
def test_another_tenants_proof_settlement_and_ledger_answer_404(
    client: TestClient, headers: dict[str, dict[str, str]], path: str, role: str
) -> None:
    contract(client, headers["exchange"], start_s=ended_window())
    answer = client.get(f"/v1/contracts/EX-1/{path}", headers=headers[role])
    assert (answer.status_code, answer.json()) == (404, {"detail": "no contract EX-1"})
