"""The delivery planner, rule by rule (issue 5, Lifecycle): what one plan says in each
situation. tests/operator/test_delivery_convergence.py executes plans until they converge."""

from __future__ import annotations

from typing import Any

import pytest

from gpudelivery import timefmt
from gpudelivery.operator import delivery, ledger
from gpudelivery.operator.actions import (
    CloseInterval,
    Cordon,
    Evict,
    Handover,
    OpenInterval,
    Quarantine,
    Release,
    WarnBuyer,
)
from gpudelivery.operator.claims import NodeFacts, Pod
from gpudelivery.operator.resources import Phase

from utils.deliveries import END, POOL, PREPARE, START, World, contract, node

C1 = contract("c1", gpus=3)  # 2 nodes of 2 GPUs
JOB = Pod("team", "train-0")
DAEMON = Pod("kube-system", "dcgm-exporter-x", stays=True)


def claimed(name: str, *, handed: bool = False, **facts: Any) -> NodeFacts:
    """A node of block b1 that c1 cordoned (and handed over, with `handed`)."""
    marks: dict[str, Any] = {"contract_label": "c1", "contract_taint": "c1"} if handed else {}
    return node(name, unschedulable=not handed, claimed_by="c1", **marks, **facts)


def status(phase: Phase, *nodes: str, **fields: Any) -> delivery.Status:
    return delivery.Status(phase, "", tuple(nodes), **fields)


def opened(node: str, at_s: int) -> list[ledger.Interval]:
    return [ledger.Interval(node, f"GPU-{node}-{gpu}", at_s) for gpu in (0, 1)]


def plan(
    state: delivery.Status,
    *nodes: NodeFacts,
    now_s: int,
    elsewhere: frozenset[str] = frozenset(),
    of: delivery.Contract = C1,
) -> delivery.Plan:
    return delivery.plan(of, state, nodes, held_elsewhere=elsewhere, now_s=now_s)


def utc(epoch_s: int) -> str:
    return timefmt.format_utc(epoch_s)


def test_before_the_lead_time_nothing_happens() -> None:
    booked = delivery.Status(Phase.BOOKED, "booked 2 nodes of pool h100")
    assert plan(booked, node("a1"), node("a2"), now_s=PREPARE - 1) == delivery.Plan(
        contract="c1",
        phase=Phase.BOOKED,
        reason="booked 2 nodes of pool h100",
        nodes=(),
        drain_started_s={},
        buyer_warned_s=None,
        buyer_namespace=False,
        actions=(),
        wake_at_s=PREPARE,
    )


def test_at_the_lead_time_whole_nodes_of_one_block_are_claimed_cordoned_and_drained() -> None:
    nodes = [
        node("a1", "big", pods=[JOB, DAEMON]),
        node("a2", "big"),
        node("a3", "big"),
        node("b1", "small", pods=[DAEMON]),
        node("b2", "small", pods=[JOB, Pod("ml", "eval", terminating=True)]),
        node("u1", None),
    ]
    assert plan(status(Phase.BOOKED), *nodes, now_s=PREPARE) == delivery.Plan(
        contract="c1",
        phase=Phase.PREPARING,
        reason=f"0 of 2 nodes ready for {utc(START)}",
        nodes=("b1", "b2"),
        drain_started_s={"b1": PREPARE, "b2": PREPARE},
        buyer_warned_s=None,
        buyer_namespace=False,
        # DaemonSet and mirror pods stay; a terminating pod is waited for, not asked again.
        actions=(Cordon("b1"), Cordon("b2"), Evict("b2", "team", "train-0")),
        wake_at_s=PREPARE + POOL.drain_timeout_s,
    )


@pytest.mark.parametrize(
    "unfit",
    [
        node("x", ready=False),
        node("x", gpu_healthy=False),
        node("x", quarantined=True),
        node("x", unschedulable=True),  # an administrator's cordon
        node("x", claimed_by="c2", unschedulable=True),
        node("x", contract_label="c2", contract_taint="c2"),
        node("x", contract_label="c2"),
    ],
    ids=["not-ready", "gpus-unhealthy", "quarantined", "cordoned", "claimed", "handed", "label"],
)
def test_a_node_that_is_not_free_is_never_taken(unfit: NodeFacts) -> None:
    result = plan(status(Phase.BOOKED), unfit, node("a1"), now_s=PREPARE)
    assert result.nodes == ("a1",)
    assert result.reason == f"0 of 2 nodes ready for {utc(START)}; no free node for 1 more"


def test_a_node_another_contract_holds_is_never_taken() -> None:
    result = plan(status(Phase.BOOKED), node("a1"), node("a2"), node("a3"), now_s=PREPARE,
                  elsewhere=frozenset({"a1"}))  # fmt: skip
    assert result.nodes == ("a2", "a3")


def test_a_node_whose_gpu_health_is_not_reported_yet_may_be_taken_but_waits() -> None:
    unknown = claimed("a2", gpu_healthy=None)
    result = plan(status(Phase.PREPARING, "a1", "a2"), claimed("a1"), unknown, now_s=START)
    assert result.actions[0] == Handover("a1")
    assert Handover("a2") not in result.actions
    assert (result.phase, result.reason) == (Phase.DEGRADED, "1 of 2 nodes handed over")
    assert result.drain_started_s == {"a2": START}


def test_a_held_node_tops_up_near_the_nodes_held() -> None:
    nodes = [claimed("a1"), node("b1", "b"), node("a2"), node("c1", "c", "z2")]
    result = plan(status(Phase.PREPARING, "a1"), *nodes, now_s=PREPARE + 5)
    assert result.nodes == ("a1", "a2")
    assert result.actions == (Cordon("a2"),)


def test_a_node_that_does_not_drain_in_time_is_swapped_for_a_free_one() -> None:
    stuck = claimed("a2", pods=[JOB])
    state = status(Phase.PREPARING, "a1", "a2", drain_started_s={"a1": PREPARE, "a2": PREPARE})
    timeout = PREPARE + POOL.drain_timeout_s
    before = plan(state, claimed("a1"), stuck, node("a3"), now_s=timeout - 1)
    assert before.nodes == ("a1", "a2")
    assert before.actions == (Evict("a2", "team", "train-0"),)
    after = plan(state, claimed("a1"), stuck, node("a3"), now_s=timeout)
    assert after.nodes == ("a1", "a3")
    assert after.actions == (Release("a2"), Cordon("a3"))
    assert after.drain_started_s == {"a1": PREPARE, "a3": timeout}


def test_a_slow_node_keeps_draining_when_there_is_nothing_to_swap_it_for() -> None:
    state = status(Phase.PREPARING, "a1", "a2", drain_started_s={"a1": PREPARE, "a2": PREPARE})
    slow = claimed("a2", pods=[Pod("team", "train-0", terminating=True)])
    result = plan(state, claimed("a1"), slow, now_s=PREPARE + 500)
    assert (result.nodes, result.actions) == (("a1", "a2"), ())
    assert result.wake_at_s == START


def test_at_the_start_drained_healthy_nodes_are_handed_over_and_their_gpus_assigned() -> None:
    state = status(Phase.PREPARING, "a1", "a2", drain_started_s={"a1": PREPARE, "a2": PREPARE})
    nodes = [claimed("a1", pods=[DAEMON]), claimed("a2")]
    assert plan(state, *nodes, now_s=START) == delivery.Plan(
        contract="c1",
        phase=Phase.DELIVERING,
        reason="2 of 2 nodes handed over",
        nodes=("a1", "a2"),
        drain_started_s={},
        buyer_warned_s=None,
        buyer_namespace=True,
        actions=(
            Handover("a1"),
            Handover("a2"),
            *(OpenInterval(n, f"GPU-{n}-{g}", START) for n in ("a1", "a2") for g in (0, 1)),
        ),
        wake_at_s=END - POOL.grace_s,
    )


def test_a_node_cordoned_by_this_very_plan_is_handed_over_only_by_the_next() -> None:
    result = plan(status(Phase.BOOKED), node("a1"), node("a2"), now_s=START)
    assert result.actions == (Cordon("a1"), Cordon("a2"))
    assert (result.phase, result.reason) == (Phase.DEGRADED, "0 of 2 nodes handed over")
    assert result.buyer_namespace


def test_the_buyers_own_pods_never_block_a_handover() -> None:
    buyers = Pod("gpud-c1", "train-0")
    result = plan(status(Phase.DEGRADED, "a1"), claimed("a1", pods=[buyers]), now_s=START + 9,
                  of=contract("c1", gpus=2))  # fmt: skip
    assert result.actions[0] == Handover("a1")


def test_a_node_whose_gpus_fail_is_quarantined_released_and_replaced_in_its_block() -> None:
    state = status(
        Phase.DELIVERING, "a1", "a2", intervals=opened("a1", START) + opened("a2", START)
    )
    nodes = [
        claimed("a1", handed=True),
        claimed("a2", handed=True, gpu_healthy=False),
        node("b1", "b2"),
        node("a3"),
    ]
    now = START + 100
    assert plan(state, *nodes, now_s=now) == delivery.Plan(
        contract="c1",
        phase=Phase.DEGRADED,
        reason="1 of 2 nodes handed over",
        nodes=("a1", "a3"),
        drain_started_s={"a3": now},
        buyer_warned_s=None,
        buyer_namespace=True,
        actions=(
            Quarantine("a2"),
            Release("a2"),
            Cordon("a3"),
            CloseInterval("a2", "GPU-a2-0", START, now),
            CloseInterval("a2", "GPU-a2-1", START, now),
        ),
        wake_at_s=now + POOL.drain_timeout_s,
    )


def test_a_node_not_ready_is_waited_for_a_minute_then_replaced() -> None:
    state = status(
        Phase.DELIVERING, "a1", "a2", intervals=opened("a1", START) + opened("a2", START)
    )
    down = claimed("a2", handed=True, ready=False, ready_since_s=START + 10)
    nodes = [claimed("a1", handed=True), down, node("a3")]
    waiting = plan(state, *nodes, now_s=START + 70)
    assert (waiting.actions, waiting.phase) == ((), Phase.DELIVERING)
    assert waiting.wake_at_s == START + 71
    replaced = plan(state, *nodes, now_s=START + 71)
    assert replaced.nodes == ("a1", "a3")
    assert replaced.actions[:3] == (Quarantine("a2"), Release("a2"), Cordon("a3"))


def test_a_failed_node_with_no_spare_leaves_the_contract_degraded() -> None:
    state = status(
        Phase.DELIVERING, "a1", "a2", intervals=opened("a1", START) + opened("a2", START)
    )
    nodes = [claimed("a1", handed=True), claimed("a2", handed=True, quarantined=True)]
    result = plan(state, *nodes, now_s=START + 5)
    assert result.nodes == ("a1",)
    assert result.actions[0] == Release("a2")  # already quarantined: by a person, maybe
    assert result.reason == "1 of 2 nodes handed over; no free node for 1 more"


def test_the_buyer_is_warned_once_at_the_end_less_the_grace_period() -> None:
    state = status(Phase.DELIVERING, "a1", intervals=opened("a1", START))
    one = contract("c1", gpus=2)
    at = END - POOL.grace_s
    assert plan(state, claimed("a1", handed=True), now_s=at - 1, of=one).actions == ()
    warned = plan(state, claimed("a1", handed=True), now_s=at, of=one)
    assert (warned.actions, warned.buyer_warned_s, warned.wake_at_s) == ((WarnBuyer(END),), at, END)
    state = status(Phase.DELIVERING, "a1", intervals=opened("a1", START), buyer_warned_s=at)
    assert plan(state, claimed("a1", handed=True), now_s=at + 1, of=one).actions == ()


def test_at_the_end_everything_is_released_and_the_ledger_closed_at_the_end() -> None:
    state = status(Phase.DEGRADED, "a1", "a2", intervals=opened("a1", START))
    nodes = [claimed("a1", handed=True), claimed("a2"), node("a3")]
    assert plan(state, *nodes, now_s=END + 30) == delivery.Plan(
        contract="c1",
        phase=Phase.COMPLETED,
        reason=f"the window ended at {utc(END)}",
        nodes=(),
        drain_started_s={},
        buyer_warned_s=None,
        buyer_namespace=False,
        actions=(
            Release("a1"),
            Release("a2"),
            CloseInterval("a1", "GPU-a1-0", START, END),
            CloseInterval("a1", "GPU-a1-1", START, END),
        ),
        wake_at_s=None,
    )


@pytest.mark.parametrize("phase", [Phase.CANCELLED, Phase.FAILED, Phase.REJECTED, Phase.COMPLETED])
def test_a_contract_that_is_over_only_releases_what_it_still_holds(phase: Phase) -> None:
    state = delivery.Status(phase, "why", ("a1",), intervals=opened("a1", START))
    nodes = [claimed("a1", handed=True), node("a2"), node("a3", claimed_by="c2")]
    assert plan(state, *nodes, now_s=START + 50) == delivery.Plan(
        contract="c1",
        phase=phase,
        reason="why",
        nodes=(),
        drain_started_s={},
        buyer_warned_s=None,
        buyer_namespace=False,
        actions=(
            Release("a1"),
            CloseInterval("a1", "GPU-a1-0", START, START + 50),
            CloseInterval("a1", "GPU-a1-1", START, START + 50),
        ),
        wake_at_s=None,
    )


def test_an_interval_opened_this_second_ends_a_second_later() -> None:
    state = status(Phase.DELIVERING, "a1", intervals=opened("a1", START + 7))
    result = plan(state, claimed("a1", handed=True, gpu_healthy=False), now_s=START + 7,
                  of=contract("c1", gpus=2))  # fmt: skip
    assert CloseInterval("a1", "GPU-a1-0", START + 7, START + 8) in result.actions


def test_a_node_no_longer_in_the_cluster_is_dropped_and_its_intervals_closed() -> None:
    state = status(
        Phase.DELIVERING, "a1", "gone", intervals=opened("a1", START) + opened("gone", START)
    )
    result = plan(state, claimed("a1", handed=True), now_s=START + 9)
    assert result.nodes == ("a1",)
    assert result.actions == (
        CloseInterval("gone", "GPU-gone-0", START, START + 9),
        CloseInterval("gone", "GPU-gone-1", START, START + 9),
    )


def test_a_node_given_twice_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^node a1 is given twice$"):
        plan(status(Phase.BOOKED), node("a1"), node("a1"), now_s=PREPARE)


def test_a_plan_carried_out_is_not_asked_again() -> None:
    world = World.of(PREPARE, [node("a1", pods=[JOB]), node("a2")], C1)
    first = world.plan("c1")
    world.execute(first)
    again = world.plan("c1")
    assert (first.actions, again.actions) == (
        (Cordon("a1"), Evict("a1", "team", "train-0"), Cordon("a2")),
        (),
    )


def test_a_contract_no_gpu_ever_served_fails_at_the_end() -> None:
    state = status(Phase.DEGRADED, "a1")
    nodes = [claimed("a1"), node("a2")]
    assert plan(state, *nodes, now_s=END) == delivery.Plan(
        contract="c1",
        phase=Phase.FAILED,
        reason=f"the window ended at {utc(END)} and no GPU was handed over in it",
        nodes=(),
        drain_started_s={},
        buyer_warned_s=None,
        buyer_namespace=False,
        actions=(Release("a1"),),
        wake_at_s=None,
    )
