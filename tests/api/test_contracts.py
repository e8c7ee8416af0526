"""Contracts over HTTP: creation with idempotency, capacity, ownership, cancel, transfer.

Every test runs on SQLite and on PostgreSQL (tests/api/conftest.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gpudelivery import timefmt
from gpudelivery.api.auth import Role

Tokens = Callable[[str, Role], dict[str, str]]
HOUR = 3600


def terms(contract_id: str = "EX-1", *, gpus: int = 16, start_in_h: int = 48, hours: int = 8,
          buyer: str | None = "acme-ai") -> dict[str, Any]:  # fmt: skip
    start = (int(time.time()) // HOUR + start_in_h) * HOUR
    document: dict[str, Any] = {
        "contract_id": contract_id,
        "instrument": "H100-SXM-80GB",
        "gpu_count": gpus,
        "start": timefmt.format_utc(start),
        "end": timefmt.format_utc(start + hours * HOUR),
        "price_per_gpu_hour": "2.50",
        "currency": "USD",
        "penalty_tiers": [{"below": "0.99", "rate": "0.10"}],
    }
    if buyer is not None:
        document["buyer"] = buyer
    return document


@pytest.fixture
def headers(client: TestClient, token_for: Tokens) -> dict[str, dict[str, str]]:
    """Keys of every role; the provider declares 32 H100s."""
    keys = {
        "admin": token_for("provider-staff", Role.ADMIN),
        "exchange": token_for("cme", Role.EXCHANGE),
        "other_exchange": token_for("ice", Role.EXCHANGE),
        "buyer": token_for("acme-ai", Role.BUYER),
        "other_buyer": token_for("globex", Role.BUYER),
        "operator": token_for("operator", Role.OPERATOR),
        "meter": token_for("node-1", Role.METER),
    }
    answer = client.put("/v1/capacity/H100-SXM-80GB", json={"gpus": 32}, headers=keys["operator"])
    assert answer.status_code == 200, answer.text
    return keys


def send(client: TestClient, headers: dict[str, str], document: dict[str, Any],
         key: str = "k-1") -> Any:  # fmt: skip
    return client.post("/v1/contracts", json=document, headers={**headers, "Idempotency-Key": key})


def test_an_exchange_creates_a_contract_and_reads_it_back(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    document = terms()
    answer = send(client, headers["exchange"], document)
    assert answer.status_code == 201, answer.text
    created = answer.json()
    assert (created["contract_id"], created["exchange"], created["holder"]) == (
        "EX-1",
        "cme",
        "acme-ai",
    )
    assert (created["status"], created["gpu_count"], created["start"]) == (
        "booked",
        16,
        document["start"],
    )
    assert created["terms"]["price_per_gpu_hour"] == "2.50"
    fetched = client.get("/v1/contracts/EX-1", headers=headers["exchange"])
    assert fetched.json() == created


def test_the_same_idempotency_key_and_terms_answer_the_same_contract(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    document = terms()
    first = send(client, headers["exchange"], document)
    again = send(client, headers["exchange"], document)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()
    listed = client.get("/v1/contracts", headers=headers["admin"]).json()
    assert listed["count"] == 1


def test_a_used_idempotency_key_with_other_terms_is_refused(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    send(client, headers["exchange"], terms())
    answer = send(client, headers["exchange"], terms(gpus=8))
    assert answer.status_code == 409
    assert answer.json() == {
        "detail": "Idempotency-Key 'k-1' was used for other terms (contract EX-1)"
    }


def test_an_existing_contract_id_is_refused(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    send(client, headers["exchange"], terms())
    answer = send(client, headers["exchange"], terms(), key="k-2")
    assert (answer.status_code, answer.json()) == (409, {"detail": "contract EX-1 exists"})


def test_overselling_capacity_is_refused_and_capacity_is_reported(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    assert send(client, headers["exchange"], terms("EX-1", gpus=24)).status_code == 201
    # Overlaps EX-1 for 4 of its 8 hours: 24 + 16 > 32 at once.
    answer = send(client, headers["exchange"], terms("EX-2", gpus=16, start_in_h=52), key="k-2")
    assert answer.status_code == 409
    assert answer.json() == {
        "detail": "oversold: 16 GPUs of H100-SXM-80GB asked, 8 free over the whole window"
    }
    window = terms(start_in_h=48, hours=16)
    free = client.get(
        "/v1/capacity",
        params={"instrument": "H100-SXM-80GB", "from": window["start"], "to": window["end"]},
        headers=headers["exchange"],
    )
    assert free.status_code == 200, free.text
    assert free.json() == {
        "instrument": "H100-SXM-80GB",
        "from": window["start"],
        "to": window["end"],
        "capacity_gpus": 32,
        "free_gpus": 8,
        "free_gpu_hours": "320.000000",  # 32 x 16 - 24 x 8
    }
    fits = send(client, headers["exchange"], terms("EX-3", gpus=8, start_in_h=52), key="k-3")
    assert fits.status_code == 201


def test_an_instrument_without_declared_capacity_is_not_sold(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    document = {**terms(), "instrument": "B200"}
    answer = send(client, headers["exchange"], document)
    assert answer.status_code == 404
    assert answer.json() == {"detail": "the provider declares no capacity for B200"}


def test_invalid_terms_are_refused_naming_the_field(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    answer = send(client, headers["exchange"], {**terms(), "price_per_gpu_hour": 2.5})
    assert answer.status_code == 422
    assert answer.json() == {"detail": "body.price_per_gpu_hour: Input should be a valid string"}
    reversed_window = {**terms(), "end": terms()["start"]}
    later = send(client, headers["exchange"], reversed_window, key="k-2")
    assert later.status_code == 422
    assert later.json()["detail"].startswith("end (")
    assert client.get("/v1/contracts", headers=headers["admin"]).json()["count"] == 0


def test_only_an_exchange_sends_contracts(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    for role in ("buyer", "operator", "meter"):
        answer = send(client, headers[role], terms())
        assert answer.status_code == 403, role
        assert answer.json()["detail"].startswith("this needs the role exchange")


def test_without_a_valid_key_nothing_is_answered(client: TestClient) -> None:
    missing = client.get("/v1/contracts")
    wrong = client.get("/v1/contracts", headers={"Authorization": "Bearer gpd_abc_def"})
    assert (missing.status_code, wrong.status_code) == (401, 401)
    assert missing.json() == {"detail": "an API key is required (Authorization: Bearer ...)"}
    assert wrong.json() == {"detail": "unknown or wrong API key"}


def test_each_role_sees_only_its_own_contracts(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    send(client, headers["exchange"], terms("EX-1", gpus=8))
    send(client, headers["other_exchange"], terms("EX-2", gpus=8, buyer="globex"), key="k-9")
    seen = {
        role: [c["contract_id"] for c in client.get("/v1/contracts", headers=h).json()["data"]]
        for role, h in headers.items()
    }
    assert seen == {
        "admin": ["EX-1", "EX-2"],
        "operator": ["EX-1", "EX-2"],
        "exchange": ["EX-1"],
        "other_exchange": ["EX-2"],
        "buyer": ["EX-1"],
        "other_buyer": ["EX-2"],
        "meter": [],
    }


@pytest.mark.parametrize(
    ("role", "status"),
    [
        ("admin", 200),
        ("operator", 200),
        ("exchange", 200),
        ("buyer", 200),
        ("other_exchange", 404),
        ("other_buyer", 404),
        ("meter", 404),
    ],
)
def test_reading_another_tenants_contract_answers_404(
    client: TestClient, headers: dict[str, dict[str, str]], role: str, status: int
) -> None:
    send(client, headers["exchange"], terms())
    for path in ("/v1/contracts/EX-1", "/v1/contracts/NO-SUCH"):
        answer = client.get(path, headers=headers[role])
        expected = status if path.endswith("EX-1") else 404
        assert answer.status_code == expected, (role, path)
    hidden = client.get("/v1/contracts/EX-1", headers=headers["other_buyer"]).json()
    missing = client.get("/v1/contracts/NO-SUCH", headers=headers["other_buyer"]).json()
    assert hidden == {"detail": "no contract EX-1"}
    assert missing == {"detail": "no contract NO-SUCH"}


def test_cancelling_releases_the_capacity(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    send(client, headers["exchange"], terms("EX-1", gpus=32))
    assert send(client, headers["exchange"], terms("EX-2", gpus=8), key="k-2").status_code == 409
    cancelled = client.post("/v1/contracts/EX-1/cancel", headers=headers["exchange"])
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["cancelled_at"] is not None
    assert send(client, headers["exchange"], terms("EX-2", gpus=8), key="k-2").status_code == 201


def test_only_the_sending_exchange_may_cancel(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    send(client, headers["exchange"], terms())
    assert client.post("/v1/contracts/EX-1/cancel", headers=headers["buyer"]).status_code == 403
    other = client.post("/v1/contracts/EX-1/cancel", headers=headers["other_exchange"])
    assert other.status_code == 404
    status = client.get("/v1/contracts/EX-1", headers=headers["admin"]).json()["status"]
    assert status == "booked"


def test_a_started_contract_cannot_be_cancelled(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    send(client, headers["exchange"], terms(start_in_h=-1, hours=4))
    answer = client.post("/v1/contracts/EX-1/cancel", headers=headers["exchange"])
    assert answer.status_code == 409
    assert answer.json()["detail"].endswith("it can no longer be cancelled")


def test_a_transfer_moves_the_contract_to_its_new_holder_at_its_instant(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    send(client, headers["exchange"], terms())
    now = timefmt.format_utc(int(time.time()) - 1)
    moved = client.post(
        "/v1/contracts/EX-1/transfers",
        json={"to_holder": "globex", "at": now},
        headers=headers["exchange"],
    )
    assert moved.status_code == 201, moved.text
    assert moved.json() == {
        "contract_id": "EX-1",
        "from_holder": "acme-ai",
        "to_holder": "globex",
        "at": now,
    }
    assert client.get("/v1/contracts/EX-1", headers=headers["buyer"]).status_code == 404
    held = client.get("/v1/contracts/EX-1", headers=headers["other_buyer"])
    assert (held.status_code, held.json()["holder"]) == (200, "globex")


def test_a_future_transfer_takes_effect_only_at_its_instant(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    document = terms()
    send(client, headers["exchange"], document)
    client.post(
        "/v1/contracts/EX-1/transfers",
        json={"to_holder": "globex", "at": document["start"]},
        headers=headers["exchange"],
    )
    assert client.get("/v1/contracts/EX-1", headers=headers["buyer"]).json()["holder"] == "acme-ai"
    assert client.get("/v1/contracts/EX-1", headers=headers["other_buyer"]).status_code == 404


def test_a_transfer_before_a_recorded_one_or_after_the_end_is_refused(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    document = terms()
    send(client, headers["exchange"], document)
    path = "/v1/contracts/EX-1/transfers"
    first = client.post(
        path, json={"to_holder": "globex", "at": document["start"]}, headers=headers["exchange"]
    )
    assert first.status_code == 201
    earlier = client.post(
        path,
        json={"to_holder": "initech", "at": timefmt.format_utc(int(time.time()))},
        headers=headers["exchange"],
    )
    assert earlier.status_code == 409
    late = client.post(
        path, json={"to_holder": "initech", "at": document["end"]}, headers=headers["exchange"]
    )
    assert (late.status_code, late.json()) == (
        422,
        {"detail": "at: must be before the contract's end"},
    )
    naive = client.post(
        path,
        json={"to_holder": "initech", "at": "2026-12-01T00:00:00"},
        headers=headers["exchange"],
    )
    assert naive.status_code == 422
    assert naive.json()["detail"].startswith("at: ")


# -- contracts registered from the cluster ---------------------------------------------------


def register(client: TestClient, headers: dict[str, str], document: dict[str, Any]) -> Any:
    return client.put(f"/v1/contracts/{document['contract_id']}", json=document, headers=headers)


def test_the_operator_registers_a_cluster_contract_once(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    document = terms("K-1")
    first = register(client, headers["operator"], document)
    again = register(client, headers["operator"], document)
    assert (first.status_code, again.status_code) == (201, 200), first.text
    registered = first.json()
    assert again.json() == registered
    assert (registered["exchange"], registered["origin"], registered["holder"]) == (
        "operator",
        "cluster",
        "acme-ai",
    )
    assert (registered["status"], registered["terms"]["gpu_count"]) == ("booked", 16)
    seen = {
        role: client.get("/v1/contracts/K-1", headers=headers[role]).status_code
        for role in ("admin", "operator", "buyer", "exchange", "other_buyer")
    }
    assert seen == {"admin": 200, "operator": 200, "buyer": 200, "exchange": 404,
                    "other_buyer": 404}  # fmt: skip


def test_registering_other_terms_under_a_held_id_is_refused_naming_the_differences(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    register(client, headers["operator"], terms("K-1"))
    changed = {**terms("K-1", gpus=8), "price_per_gpu_hour": "3.00"}
    answer = register(client, headers["operator"], changed)
    assert (answer.status_code, answer.json()) == (
        409,
        {
            "detail": "contract K-1 exists with other terms: gpu_count is 16, not 8; "
            'price_per_gpu_hour is "2.50", not "3.00"'
        },
    )
    held = client.get("/v1/contracts/K-1", headers=headers["admin"]).json()
    assert (held["gpu_count"], held["terms"]["price_per_gpu_hour"]) == (16, "2.50")


def test_registering_an_exchanges_contract_answers_it_and_never_overwrites_it(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    sent = send(client, headers["exchange"], terms("EX-1")).json()
    same = register(client, headers["operator"], terms("EX-1"))
    assert (same.status_code, same.json()) == (200, sent)
    assert sent["origin"] == "exchange"
    other = register(client, headers["operator"], terms("EX-1", buyer=None))
    assert (other.status_code, other.json()) == (
        409,
        {"detail": 'contract EX-1 exists with other terms: buyer is "acme-ai", not absent'},
    )


def test_a_registered_contracts_id_must_be_the_paths(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    answer = client.put("/v1/contracts/K-2", json=terms("K-1"), headers=headers["operator"])
    assert (answer.status_code, answer.json()) == (
        422,
        {"detail": "contract_id: 'K-1' is not the path's contract id 'K-2'"},
    )
    invalid = client.put(
        "/v1/contracts/K-1", json={**terms("K-1"), "gpu_count": 0}, headers=headers["operator"]
    )
    assert (invalid.status_code, invalid.json()) == (
        422,
        {"detail": "body.gpu_count: Input should be greater than or equal to 1"},
    )
    assert client.get("/v1/contracts", headers=headers["admin"]).json()["count"] == 0


def test_only_the_operator_registers_cluster_contracts(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    answers = {
        role: register(client, headers[role], terms("K-1"))
        for role in ("exchange", "buyer", "meter")
    }
    assert {role: answer.status_code for role, answer in answers.items()} == {
        "exchange": 403,
        "buyer": 403,
        "meter": 403,
    }
    assert answers["exchange"].json() == {
        "detail": "this needs the role operator; the key is exchange"
    }


def test_a_registered_contract_skips_the_capacity_check_but_counts_against_capacity(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    assert send(client, headers["exchange"], terms("EX-1", gpus=32)).status_code == 201
    # The cluster booked it against its own pools already: the API records it.
    assert register(client, headers["operator"], terms("K-1", gpus=8)).status_code == 201
    cancelled = client.post("/v1/contracts/EX-1/cancel", headers=headers["exchange"])
    assert cancelled.status_code == 200
    refused = send(client, headers["exchange"], terms("EX-2", gpus=32), key="k-2")
    assert refused.json() == {
        "detail": "oversold: 32 GPUs of H100-SXM-80GB asked, 24 free over the whole window"
    }


def test_the_operator_cancels_only_the_contracts_it_registered(
    client: TestClient, headers: dict[str, dict[str, str]], token_for: Tokens
) -> None:
    register(client, headers["operator"], terms("K-1", gpus=32))
    send(client, headers["exchange"], terms("EX-1", gpus=8, start_in_h=100))
    forbidden = client.post("/v1/contracts/EX-1/cancel", headers=headers["operator"])
    other_operator = token_for("operator-eu", Role.OPERATOR)
    not_its_own = client.post("/v1/contracts/K-1/cancel", headers=other_operator)
    detail = (
        "only the exchange that sent a contract, or the operator that registered it from its "
        "cluster, may cancel it"
    )
    assert (forbidden.status_code, forbidden.json()) == (403, {"detail": detail})
    assert (not_its_own.status_code, not_its_own.json()) == (403, {"detail": detail})
    cancelled = client.post("/v1/contracts/K-1/cancel", headers=headers["operator"])
    assert cancelled.status_code == 200, cancelled.text
    assert (cancelled.json()["status"], cancelled.json()["origin"]) == ("cancelled", "cluster")
    # Cancelled before its start: its booking is released.
    assert send(client, headers["exchange"], terms("EX-2", gpus=32), key="k-2").status_code == 201
    statuses = {
        c["contract_id"]: c["status"]
        for c in client.get("/v1/contracts", headers=headers["admin"]).json()["data"]
    }
    assert statuses == {"K-1": "cancelled", "EX-2": "booked", "EX-1": "booked"}


def test_a_started_registered_contract_cannot_be_cancelled(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    register(client, headers["operator"], terms("K-1", start_in_h=-1, hours=4))
    answer = client.post("/v1/contracts/K-1/cancel", headers=headers["operator"])
    assert answer.status_code == 409
    assert answer.json()["detail"].endswith("it can no longer be cancelled")


def test_exchanges_may_not_use_the_idempotency_keys_of_registered_contracts(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    answer = send(client, headers["exchange"], terms(), key="cluster:anything")
    assert (answer.status_code, answer.json()) == (
        400,
        {
            "detail": "Idempotency-Key: the prefix 'cluster:' is reserved for contracts "
            "registered from the cluster"
        },
    )


def test_the_operator_pages_through_every_contract(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    for index in range(5):
        document = terms(f"EX-{index}", gpus=1, start_in_h=48 + index)
        assert send(client, headers["exchange"], document, key=f"k-{index}").status_code == 201
    register(client, headers["operator"], terms("K-1", gpus=1, start_in_h=50))
    pages = [
        client.get(
            "/v1/contracts", params={"offset": offset, "limit": 2}, headers=headers["operator"]
        ).json()
        for offset in (0, 2, 4, 6)
    ]
    assert [page["count"] for page in pages] == [6, 6, 6, 6]
    assert [[c["contract_id"] for c in page["data"]] for page in pages] == [
        ["EX-0", "EX-1"],
        ["EX-2", "K-1"],
        ["EX-3", "EX-4"],
        [],
    ]
    booked = client.get(
        "/v1/contracts", params={"status": "cancelled"}, headers=headers["operator"]
    ).json()
    assert booked == {"data": [], "count": 0}


def test_an_offset_beyond_what_a_database_counts_is_refused_naming_it(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    answer = client.get("/v1/contracts", params={"offset": 2**63}, headers=headers["operator"])
    assert answer.status_code == 422
    assert answer.json() == {
        "detail": "query.offset: Input should be less than or equal to 2147483647"
    }
