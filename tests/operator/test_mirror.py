"""Mirroring contracts between the API and the cluster: the plan (pure; exact outcomes, and
the property that carrying a plan out leaves nothing to do), and the client that carries it
to the real API app (on SQLite), as tests/operator/test_ledger.py runs it."""

from __future__ import annotations

import copy
import dataclasses
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from gpudelivery import terms, timefmt
from gpudelivery.api import auth
from gpudelivery.operator import errors, mirror, mirroring, resources

from utils import apis
from utils.factories import EPOCH, terms_json

HOUR = 3600
BEFORE = EPOCH - HOUR  # an hour before the worked example's window
DURING = EPOCH + 600
AFTER = EPOCH + 2 * HOUR
CLUSTER, EXCHANGE = mirroring.Origin.CLUSTER, mirroring.Origin.EXCHANGE


def contract(contract_id: str = "EX-1", **overrides: Any) -> terms.ContractTerms:
    """The worked example's terms (window [EPOCH, EPOCH + 1 h)) under another id."""
    return terms.parse_terms(terms_json(contract_id=contract_id, **overrides))


def api(contract_id: str = "EX-1", *, origin: mirroring.Origin = EXCHANGE,
        cancelled_at_s: int | None = None, **overrides: Any) -> mirroring.ApiContract:  # fmt: skip
    return mirroring.ApiContract(contract(contract_id, **overrides), origin, cancelled_at_s)


def body(contract_id: str = "EX-1", *, name: str | None = None,
         cancelled_at_s: int | None = None, **overrides: Any) -> dict[str, Any]:  # fmt: skip
    """A ComputeContract as a provider applies it (any name) or the mirror creates it."""
    document = resources.contract_body(contract(contract_id, **overrides))
    if name is not None:
        document["metadata"]["name"] = name
    if cancelled_at_s is not None:
        document["spec"][mirroring.CANCELLED_AT] = timefmt.format_utc(cancelled_at_s)
    return document


def cancelled_body(contract_id: str, at_s: int) -> dict[str, Any]:
    return body(contract_id, cancelled_at_s=at_s)


# -- the plan: exact outcomes ---------------------------------------------------------------


def test_each_contract_of_the_api_gets_its_resource() -> None:
    outcome = mirroring.plan([api("EX-1"), api("EX-2", gpu_count=8)], [], now_s=BEFORE)
    assert outcome == mirroring.Plan(create=(body("EX-1"), body("EX-2", gpu_count=8)))
    assert outcome.create[0]["metadata"]["name"] == resources.resource_name("EX-1")


def test_a_contract_cancelled_in_the_api_gets_a_cancelled_resource() -> None:
    outcome = mirroring.plan([api(cancelled_at_s=BEFORE - 60)], [], now_s=BEFORE)
    assert outcome == mirroring.Plan(create=(cancelled_body("EX-1", BEFORE - 60),))
    assert outcome.create[0]["spec"]["cancelledAt"] == "2026-03-02T22:59:00Z"


def test_a_contract_whose_window_has_ended_gets_no_resource() -> None:
    assert mirroring.plan([api()], [], now_s=EPOCH + HOUR) == mirroring.Plan()
    during = mirroring.plan([api()], [], now_s=EPOCH + HOUR - 1)
    assert during == mirroring.Plan(create=(body(),))  # late, still worth delivering


def test_a_contract_applied_on_the_cluster_is_registered_whatever_its_name() -> None:
    applied = body("K-1", name="my-contract")
    for now_s in (BEFORE, AFTER):  # after its window too: its settlement needs the API
        outcome = mirroring.plan([], [applied], now_s=now_s)
        assert outcome == mirroring.Plan(register=(contract("K-1"),))


def test_a_contract_applied_cancelled_is_registered_then_cancelled() -> None:
    applied = body("K-1", name="my-contract", cancelled_at_s=BEFORE - 60)
    outcome = mirroring.plan([], [applied], now_s=BEFORE)
    assert outcome == mirroring.Plan(register=(contract("K-1"),), cancel=("K-1",))


def test_agreeing_sides_leave_nothing_to_do() -> None:
    both = mirroring.plan(
        [api("EX-1"), api("K-1", origin=CLUSTER, cancelled_at_s=BEFORE)],
        # Both cancelled agree, whatever the two instants.
        [body("EX-1"), body("K-1", name="my-contract", cancelled_at_s=BEFORE - 600)],
        now_s=DURING,
    )
    assert both == mirroring.Plan()
    assert not both.has_actions


def test_a_cancellation_in_the_api_is_written_on_the_resource() -> None:
    applied = body("K-1", name="my-contract")
    outcome = mirroring.plan(
        [api("EX-1", cancelled_at_s=BEFORE), api("K-1", origin=CLUSTER, cancelled_at_s=BEFORE)],
        [body("EX-1"), applied],
        now_s=BEFORE + 5,
    )
    assert outcome == mirroring.Plan(
        mark_cancelled=(
            mirroring.MarkCancelled(resources.resource_name("EX-1"), "EX-1", BEFORE),
            mirroring.MarkCancelled("my-contract", "K-1", BEFORE),
        )
    )
    assert outcome.mark_cancelled[0].patch() == {"spec": {"cancelledAt": "2026-03-02T23:00:00Z"}}


def test_a_cancellation_on_the_cluster_of_a_registered_contract_is_sent_before_its_start() -> None:
    outcome = mirroring.plan(
        [api("K-1", origin=CLUSTER)], [cancelled_body("K-1", BEFORE)], now_s=EPOCH - 1
    )
    assert outcome == mirroring.Plan(cancel=("K-1",))


def test_a_cancellation_on_the_cluster_after_the_start_is_reported_not_sent() -> None:
    resource = cancelled_body("K-1", BEFORE)
    outcome = mirroring.plan([api("K-1", origin=CLUSTER)], [resource], now_s=EPOCH)
    assert outcome == mirroring.Plan(
        findings=(
            mirroring.Finding(
                mirroring.FindingKind.CANCEL_NOT_MIRRORED,
                resources.resource_name("K-1"),
                "K-1",
                "contract K-1 started at 2026-03-03T00:00:00Z, and the API cancels only before "
                "the start: it keeps the contract live despite spec.cancelledAt "
                "2026-03-02T23:00:00Z",
            ),
        )
    )


def test_an_exchanges_contract_cancelled_on_the_cluster_is_reported_not_sent() -> None:
    outcome = mirroring.plan([api("EX-1")], [cancelled_body("EX-1", BEFORE)], now_s=BEFORE)
    assert outcome == mirroring.Plan(
        findings=(
            mirroring.Finding(
                mirroring.FindingKind.CANCEL_NOT_MIRRORED,
                resources.resource_name("EX-1"),
                "EX-1",
                "contract EX-1 was sent by an exchange, which alone may cancel it: the API "
                "keeps it live despite spec.cancelledAt 2026-03-02T23:00:00Z",
            ),
        )
    )


def test_different_terms_are_reported_and_neither_side_is_overwritten() -> None:
    resource = body("EX-1", gpu_count=8, buyer=None, cancelled_at_s=BEFORE)
    outcome = mirroring.plan([api("EX-1", cancelled_at_s=BEFORE)], [resource], now_s=BEFORE)
    assert outcome == mirroring.Plan(
        findings=(
            mirroring.Finding(
                mirroring.FindingKind.TERMS_DIFFER,
                resources.resource_name("EX-1"),
                "EX-1",
                "contract EX-1: the API holds other terms, and neither side is overwritten: "
                'spec.buyer is absent here, "acme-ai" in the API; spec.gpuCount is 8 here, 2 '
                "in the API",
            ),
        )
    )
    # Not even the cancellation crosses over while the terms disagree.
    live = mirroring.plan([api("EX-1", cancelled_at_s=BEFORE)], [body(gpu_count=8)], now_s=BEFORE)
    assert (live.mark_cancelled, len(live.findings)) == ((), 1)


def test_a_resource_that_is_not_a_contract_is_reported_and_blocks_its_id() -> None:
    bad_count = body("EX-1", name="bad-count")
    bad_count["spec"]["gpuCount"] = 0
    bad_cancel = body("K-1", name="bad-cancel")
    bad_cancel["spec"]["cancelledAt"] = "yesterday"
    no_id = {"metadata": {"name": "no-id"}, "spec": {"gpuCount": 1}}
    outcome = mirroring.plan([api("EX-1")], [bad_count, bad_cancel, no_id], now_s=BEFORE)
    invalid = mirroring.FindingKind.INVALID_SPEC
    prefix = "this ComputeContract cannot be mirrored with the API: "
    assert outcome == mirroring.Plan(
        findings=(
            mirroring.Finding(invalid, "no-id", None, prefix + "spec.contractId: missing"),
            mirroring.Finding(
                invalid, "bad-count", "EX-1", prefix + "spec.gpuCount: Input should be greater "
                "than 0"
            ),
            mirroring.Finding(
                invalid, "bad-cancel", "K-1", prefix + "spec.cancelledAt: 'yesterday' is not an "
                "RFC 3339 timestamp like 2026-03-03T09:00:00Z"
            ),
        )
    )  # fmt: skip


def test_two_resources_of_one_contract_are_reported_and_left_alone() -> None:
    resources_ = [body("K-1", name="one"), body("K-1", name="two", gpu_count=4)]
    outcome = mirroring.plan([], resources_, now_s=BEFORE)
    message = (
        "contract K-1 is held by 2 ComputeContracts (one, two): none of them is mirrored "
        "until all but one are deleted"
    )
    kind = mirroring.FindingKind.DUPLICATE
    assert outcome == mirroring.Plan(
        findings=(
            mirroring.Finding(kind, "one", "K-1", message),
            mirroring.Finding(kind, "two", "K-1", message),
        )
    )


def test_a_resource_holding_another_contracts_name_is_reported() -> None:
    squatter = body("K-1", name=resources.resource_name("EX-1"))
    outcome = mirroring.plan([api("EX-1"), api("K-1", origin=CLUSTER)], [squatter], now_s=BEFORE)
    name = resources.resource_name("EX-1")
    assert outcome == mirroring.Plan(
        findings=(
            mirroring.Finding(
                mirroring.FindingKind.NAME_TAKEN,
                name,
                "K-1",
                f"contract EX-1 of the API cannot get its ComputeContract {name}: this "
                "resource holds that name",
            ),
        )
    )


def test_planning_changes_neither_side() -> None:
    api_side = [api("EX-1", cancelled_at_s=BEFORE), api("EX-2")]
    cluster_side = [body("EX-1"), body("K-1", cancelled_at_s=BEFORE)]
    kept = copy.deepcopy((api_side, cluster_side))
    outcome = mirroring.plan(api_side, cluster_side, now_s=BEFORE)
    assert outcome.has_actions
    outcome.create[0]["spec"]["gpuCount"] = 99  # the plan's bodies are its own
    assert (api_side, cluster_side) == kept
    assert mirroring.plan(api_side, cluster_side, now_s=BEFORE).create[0] == body("EX-2")


# -- the plan: carrying it out leaves nothing to do -----------------------------------------

IDS = ("EX-1", "EX-2", "K-1")


@st.composite
def sides(draw: st.DrawFn) -> tuple[list[mirroring.ApiContract], list[dict[str, Any]], int]:
    """Both sides of a few contracts, in any state, and the instant of planning."""
    starts = {contract_id: EPOCH + index * HOUR for index, contract_id in enumerate(IDS)}
    # Before every window, at each start, and inside each window.
    instants = st.sampled_from(
        [EPOCH - 2 * HOUR, EPOCH - 1]
        + [start + offset for start in starts.values() for offset in (0, HOUR // 2)]
    )

    def variant(contract_id: str) -> dict[str, Any]:
        start = starts[contract_id]
        return {
            "start": timefmt.format_utc(start),
            "end": timefmt.format_utc(start + HOUR),
            "gpu_count": draw(st.sampled_from([2, 2, 4])),
        }

    api_side = []
    cluster_side: list[dict[str, Any]] = []
    names: set[str] = set()
    for contract_id in IDS:
        if draw(st.booleans()):
            api_side.append(
                api(
                    contract_id,
                    origin=draw(st.sampled_from(list(mirroring.Origin))),
                    cancelled_at_s=draw(st.none() | instants),
                    **variant(contract_id),
                )
            )
        for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2]))):
            name = draw(
                st.sampled_from([resources.resource_name(other) for other in IDS])
                | st.just(f"applied-{contract_id.lower()}-{len(names)}")
            )
            if name in names:
                continue
            names.add(name)
            resource = body(
                contract_id,
                name=name,
                cancelled_at_s=draw(st.none() | instants),
                **variant(contract_id),
            )
            if draw(st.integers(0, 9)) == 0:
                resource["spec"]["gpuCount"] = -1
            cluster_side.append(resource)
    return api_side, cluster_side, draw(instants)


def carry_out(
    outcome: mirroring.Plan,
    api_side: list[mirroring.ApiContract],
    cluster_side: list[dict[str, Any]],
    now_s: int,
) -> tuple[list[mirroring.ApiContract], list[dict[str, Any]]]:
    """Both sides after the plan, as the API and the cluster would answer it."""
    held = {item.contract_id: item for item in api_side}
    for registered in outcome.register:
        assert registered.contract_id not in held  # never a PUT the API would answer 409
        held[registered.contract_id] = mirroring.ApiContract(registered, CLUSTER)
    for contract_id in outcome.cancel:
        target = held[contract_id]
        assert target.origin is CLUSTER
        assert target.cancelled_at_s is None
        assert now_s < target.terms.start  # the API cancels only before the start
        held[contract_id] = dataclasses.replace(target, cancelled_at_s=now_s)
    cluster = copy.deepcopy(cluster_side)
    by_name: dict[str, Mapping[str, Any]] = {item["metadata"]["name"]: item for item in cluster}
    for created in outcome.create:
        assert created["metadata"]["name"] not in by_name  # the API server would answer 409
        cluster.append(copy.deepcopy(created))
    for mark in outcome.mark_cancelled:
        by_name[mark.resource]["spec"].update(mark.patch()["spec"])
    return list(held.values()), cluster


@settings(max_examples=400, deadline=None)
@given(sides())
def test_carrying_out_a_plan_leaves_nothing_to_do(
    case: tuple[list[mirroring.ApiContract], list[dict[str, Any]], int],
) -> None:
    api_side, cluster_side, now_s = case
    first = mirroring.plan(api_side, cluster_side, now_s=now_s)
    api_after, cluster_after = carry_out(first, api_side, cluster_side, now_s)
    again = mirroring.plan(api_after, cluster_after, now_s=now_s)
    assert again == mirroring.Plan(findings=first.findings)


# -- the client, against the real API app --------------------------------------------------


@pytest.fixture
def api_app(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """The API app over a fresh SQLite database: the client and tokens of an operator, a
    second operator and an exchange; the provider declares 64 H100s."""
    keys = {
        "operator": auth.Role.OPERATOR,
        "operator-eu": auth.Role.OPERATOR,
        "cme": auth.Role.EXCHANGE,
    }
    with apis.running_api(tmp_path, keys, capacity={"H100-SXM-80GB": 64}) as running:
        yield running


def future_terms(contract_id: str, *, start_in_h: int = 24, **overrides: Any) -> dict[str, Any]:
    start = (int(time.time()) // HOUR + start_in_h) * HOUR
    return terms_json(
        contract_id=contract_id,
        start=timefmt.format_utc(start),
        end=timefmt.format_utc(start + HOUR),
        **overrides,
    )


def send(client: TestClient, token: str, document: dict[str, Any]) -> None:
    headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": document["contract_id"]}
    answer = client.post("/v1/contracts", json=document, headers=headers)
    assert answer.status_code == 201, answer.text


def test_the_client_pages_through_every_contract(
    api_app: tuple[TestClient, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, tokens = api_app
    monkeypatch.setattr(mirror, "PAGE_SIZE", 2)
    for index in range(4):
        send(client, tokens["cme"], future_terms(f"EX-{index}", start_in_h=24 + index))
    contracts = mirror.ContractsClient(client, token=tokens["operator"])
    contracts.register(terms.parse_terms(future_terms("K-1", start_in_h=30)))
    listed = contracts.list_all()
    assert [(item.contract_id, item.origin, item.cancelled_at_s) for item in listed] == [
        ("EX-0", EXCHANGE, None),
        ("EX-1", EXCHANGE, None),
        ("EX-2", EXCHANGE, None),
        ("EX-3", EXCHANGE, None),
        ("K-1", CLUSTER, None),
    ]
    assert listed[0].terms == terms.parse_terms(future_terms("EX-0"))


def test_the_client_registers_once_and_never_overwrites(
    api_app: tuple[TestClient, dict[str, str]],
) -> None:
    client, tokens = api_app
    contracts = mirror.ContractsClient(client, token=tokens["operator"])
    applied = terms.parse_terms(future_terms("K:2026.1"))  # characters the path escapes
    first = contracts.register(applied)
    assert first == mirroring.ApiContract(applied, CLUSTER)
    assert contracts.register(applied) == first
    other = applied.model_copy(update={"gpu_count": 4})
    with pytest.raises(
        errors.ApiRefusedError,
        match=r"^the API answered 409: contract K:2026.1 exists with other terms: gpu_count is 2, "
        r"not 4$",
    ):
        contracts.register(other)
    assert contracts.list_all() == [first]


def test_the_client_cancels_only_what_the_operator_registered(
    api_app: tuple[TestClient, dict[str, str]],
) -> None:
    client, tokens = api_app
    send(client, tokens["cme"], future_terms("EX-1"))
    contracts = mirror.ContractsClient(client, token=tokens["operator"])
    contracts.register(terms.parse_terms(future_terms("K-1")))
    before = int(time.time())
    cancelled = contracts.cancel("K-1")
    assert cancelled.cancelled_at_s is not None
    assert before <= cancelled.cancelled_at_s <= int(time.time())
    assert contracts.cancel("K-1") == cancelled
    with pytest.raises(errors.ApiRefusedError, match=r"^the API answered 403: only the exchange"):
        contracts.cancel("EX-1")
    contracts.register(terms.parse_terms(future_terms("K-2")))
    other_operator = mirror.ContractsClient(client, token=tokens["operator-eu"])
    with pytest.raises(errors.ApiRefusedError, match=r"^the API answered 403: only the exchange"):
        other_operator.cancel("K-2")
    with pytest.raises(errors.ApiRefusedError, match=r"^the API answered 404: no contract NO-1$"):
        contracts.cancel("NO-1")
    assert [item.cancelled_at_s is None for item in contracts.list_all()] == [True, False, True]


def test_an_unreachable_api_is_tried_again_later_and_the_token_never_shows() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: connections are refused
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            contracts = mirror.ContractsClient(client, token="secret-token")
            with pytest.raises(errors.ApiUnavailableError, match=r"^the API is unreachable"):
                contracts.list_all()
            assert "secret-token" not in repr(contracts)


def test_a_server_error_is_tried_again_and_a_bad_key_is_not() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.headers["Authorization"] == "Bearer busy":
            return httpx.Response(503, json={"detail": "restarting"})
        return httpx.Response(401, json={"detail": "unknown or wrong API key"})

    with httpx.Client(transport=httpx.MockTransport(answer), base_url="http://api") as client:
        with pytest.raises(errors.ApiUnavailableError, match=r"^the API answered 503: restarting$"):
            mirror.ContractsClient(client, token="busy").cancel("K-1")
        with pytest.raises(
            errors.ApiRefusedError, match=r"^the API answered 401: unknown or wrong API key$"
        ):
            mirror.ContractsClient(client, token="wrong").list_all()


def test_a_plan_carried_out_against_the_api_leaves_both_sides_agreeing(
    api_app: tuple[TestClient, dict[str, str]],
) -> None:
    client, tokens = api_app
    send(client, tokens["cme"], future_terms("EX-1"))
    send(client, tokens["cme"], future_terms("EX-2"))
    exchange = {"Authorization": f"Bearer {tokens['cme']}"}
    assert client.post("/v1/contracts/EX-2/cancel", headers=exchange).status_code == 200
    contracts = mirror.ContractsClient(client, token=tokens["operator"])
    now_s = int(time.time())
    applied = resources.contract_body(terms.parse_terms(future_terms("K-1")))
    applied["metadata"]["name"] = "provider-k1"
    cancelled = resources.contract_body(terms.parse_terms(future_terms("K-2")))
    cancelled["spec"]["cancelledAt"] = timefmt.format_utc(now_s)
    cluster = [applied, cancelled, resources.contract_body(terms.parse_terms(future_terms("EX-2")))]

    outcome = mirroring.plan(contracts.list_all(), cluster, now_s=now_s)
    assert [item.contract_id for item in outcome.register] == ["K-1", "K-2"]
    assert (outcome.cancel, outcome.findings) == (("K-2",), ())
    assert [item["spec"]["contractId"] for item in outcome.create] == ["EX-1"]
    assert [item.contract_id for item in outcome.mark_cancelled] == ["EX-2"]
    for registered in outcome.register:
        contracts.register(registered)
    for contract_id in outcome.cancel:
        contracts.cancel(contract_id)
    cluster += outcome.create
    for mark in outcome.mark_cancelled:
        (target,) = (item for item in cluster if item["metadata"]["name"] == mark.resource)
        target["spec"].update(mark.patch()["spec"])

    assert mirroring.plan(contracts.list_all(), cluster, now_s=now_s) == mirroring.Plan()
    statuses = {
        item.contract_id: (item.origin, item.cancelled_at_s is not None)
        for item in contracts.list_all()
    }
    assert statuses == {
        "EX-1": (EXCHANGE, False),
        "EX-2": (EXCHANGE, True),
        "K-1": (CLUSTER, False),
        "K-2": (CLUSTER, True),
    }
