"""The assignment ledger the operator reports to the API: intervals to the real API app (on
SQLite) and back, kept in the contract's status, and what it does when the API cannot take
them."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from gpudelivery import errors as core_errors
from gpudelivery import timefmt
from gpudelivery.api import auth
from gpudelivery.operator import errors, ledger

from utils import apis
from utils.factories import EPOCH, terms_json

CONTRACT_ID = "EX-2026:03.1"  # a character the path escapes
GPU_A = "GPU-aaaaaaaa-0000-4000-8000-000000000000"
GPU_B = "GPU-bbbbbbbb-0000-4000-8000-000000000000"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[TestClient, str]]:
    """The API app over a fresh SQLite database, with a booked contract: the client and an
    operator key."""
    keys = {"operator": auth.Role.OPERATOR, "cme": auth.Role.EXCHANGE}
    with apis.running_api(tmp_path, keys, capacity={"H100-SXM-80GB": 8}) as (client, tokens):
        created = client.post(
            "/v1/contracts",
            json=terms_json(contract_id=CONTRACT_ID),
            headers={"Authorization": f"Bearer {tokens['cme']}", "Idempotency-Key": "k"},
        )
        assert created.status_code == 201, created.text
        yield client, tokens["operator"]


def stored(client: TestClient, token: str) -> list[dict[str, Any]]:
    answer = client.get(
        f"/v1/contracts/{CONTRACT_ID}/assignments",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert answer.status_code == 200, answer.text
    return [
        {key: item[key] for key in ("node", "gpu_uuid", "start", "end")}
        for item in answer.json()["data"]
    ]


def test_intervals_reach_the_api_and_reporting_them_again_changes_nothing(
    api: tuple[TestClient, str],
) -> None:
    client, token = api
    reporter = ledger.LedgerClient(client, token=token)
    open_intervals = [
        ledger.Interval("node-1", GPU_B, EPOCH),
        ledger.Interval("node-1", GPU_A, EPOCH),
    ]
    reporter.report(CONTRACT_ID, open_intervals)
    reporter.report(CONTRACT_ID, open_intervals)
    closed = [ledger.Interval("node-1", GPU_A, EPOCH, EPOCH + 600), open_intervals[0]]
    reporter.report(CONTRACT_ID, closed)

    start, end = timefmt.format_utc(EPOCH), timefmt.format_utc(EPOCH + 600)
    assert sorted(stored(client, token), key=lambda item: item["gpu_uuid"]) == [
        {"node": "node-1", "gpu_uuid": GPU_A, "start": start, "end": end},
        {"node": "node-1", "gpu_uuid": GPU_B, "start": start, "end": None},
    ]


def test_a_contract_the_api_does_not_know_yet_is_reported_again_later(
    api: tuple[TestClient, str],
) -> None:
    client, token = api
    with pytest.raises(errors.LedgerUnavailableError, match=r"^the API answered 404: "):
        ledger.LedgerClient(client, token=token).report(
            "EX-unknown", [ledger.Interval("node-1", GPU_A, EPOCH)]
        )


def test_a_ledger_the_api_refuses_is_not_worth_reporting_again(
    api: tuple[TestClient, str],
) -> None:
    client, token = api
    reporter = ledger.LedgerClient(client, token=token)
    reporter.report(CONTRACT_ID, [ledger.Interval("node-1", GPU_A, EPOCH, EPOCH + 600)])
    overlapping = [ledger.Interval("node-1", GPU_A, EPOCH + 300, EPOCH + 900)]
    with pytest.raises(errors.LedgerRefusedError, match=r"^the API answered 409: .*overlaps"):
        reporter.report(CONTRACT_ID, overlapping)
    with pytest.raises(errors.LedgerRefusedError, match=r"^the API answered 401: "):
        ledger.LedgerClient(client, token="gpd_nope_nope").report(CONTRACT_ID, overlapping)


def test_an_unreachable_api_is_tried_again_later() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: connections are refused
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            reporter = ledger.LedgerClient(client, token="secret-token")
            with pytest.raises(errors.LedgerUnavailableError, match=r"^the API is unreachable"):
                reporter.report(CONTRACT_ID, [ledger.Interval("node-1", GPU_A, EPOCH)])
            assert "secret-token" not in repr(reporter)


def test_nothing_is_sent_for_an_empty_ledger() -> None:
    # No server at all: an empty ledger must not even try.
    with httpx.Client(base_url="http://127.0.0.1:9") as client:
        ledger.LedgerClient(client, token="t").report(CONTRACT_ID, [])


def test_the_status_keeps_the_intervals_in_order_and_the_digest_follows_them() -> None:
    intervals = [
        ledger.Interval("node-2", GPU_A, EPOCH + 60),
        ledger.Interval("node-1", GPU_B, EPOCH, EPOCH + 60),
    ]
    kept = ledger.to_status(intervals)
    assert kept == [
        {"node": "node-1", "gpu_uuid": GPU_B, "start": "2026-03-03T00:00:00Z",
         "end": "2026-03-03T00:01:00Z"},
        {"node": "node-2", "gpu_uuid": GPU_A, "start": "2026-03-03T00:01:00Z"},
    ]  # fmt: skip
    assert ledger.from_status(kept) == sorted(intervals)
    assert ledger.digest(intervals) == ledger.digest(list(reversed(intervals)))
    closed = [intervals[1], ledger.Interval("node-2", GPU_A, EPOCH + 60, EPOCH + 120)]
    assert ledger.digest(closed) != ledger.digest(intervals)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("node-1", r"status.ledger.intervals\[0\]: not an interval"),
        ({"node": "n", "gpu_uuid": "g", "start": "soon"}, r"status.ledger.intervals\[0\].start"),
        (
            {"node": "n", "gpu_uuid": "g", "start": "2026-03-03T00:00:00Z", "end": 5},
            r"status.ledger.intervals\[0\].end",
        ),
    ],
)
def test_a_status_that_does_not_hold_intervals_is_refused_by_name(
    item: object, message: str
) -> None:
    with pytest.raises((errors.OperatorError, core_errors.InputError), match=message):
        ledger.from_status([item])
