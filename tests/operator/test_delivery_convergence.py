"""The delivery planner converges: plans carried out by a model of the cluster reach a plan
that asks for nothing, from every step of the lifecycle and from what a crash leaves behind,
and no node is ever held by two contracts."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpudelivery.operator import actions, claims, delivery, ledger
from gpudelivery.operator.claims import NodeFacts, Pod
from gpudelivery.operator.resources import Phase

from utils.deliveries import END, POOL, PREPARE, START, World, contract, node, open_intervals

JOB = Pod("team", "train-0")
LIVE = (Phase.BOOKED, Phase.PREPARING, Phase.DELIVERING, Phase.DEGRADED)


def pool_nodes() -> list[NodeFacts]:
    """Blocks a (3 nodes) and b (2 nodes, one running a job), zone z1."""
    return [
        node("a1", "a"),
        node("a2", "a"),
        node("a3", "a"),
        node("b1", "b", pods=[JOB, Pod("kube-system", "dcgm", stays=True)]),
        node("b2", "b"),
    ]


def assert_settled(world: World, name: str, plan: delivery.Plan) -> None:
    """What a plan that asks for nothing guarantees: the contract's status lists exactly the
    nodes bearing its name, each cordoned by it or handed over to it, and its open intervals
    are exactly the GPUs of the nodes handed over during the window."""
    status = world.statuses[name]
    assert status.nodes == plan.nodes
    assert world.marked(name) == set(plan.nodes)
    handed = set()
    for each in plan.nodes:
        facts = world.nodes[each]
        assert facts.claimed_by == name or claims.names_on(facts) == {name}
        if facts.contract_label == facts.contract_taint == name:
            handed.add(each)
        else:
            assert facts.unschedulable
    delivering = plan.phase in (Phase.DELIVERING, Phase.DEGRADED)
    assert open_intervals(status) == {
        (each, gpu) for each in handed if delivering for gpu in world.nodes[each].gpu_uuids
    }
    assert (plan.phase == Phase.DELIVERING) == (delivering and len(handed) == 2)


def test_a_contract_converges_at_every_step_of_its_lifecycle() -> None:
    world = World.of(PREPARE - 1, pool_nodes(), contract("c1", gpus=3))
    booked = world.settle("c1")
    assert (booked.phase, booked.nodes) == (Phase.BOOKED, ())

    world.now_s = PREPARE
    preparing = world.settle("c1")
    # Block b is the best fit: it holds the contract's 2 nodes exactly.
    assert (preparing.phase, preparing.nodes) == (Phase.PREPARING, ("b1", "b2"))
    assert preparing.reason == "1 of 2 nodes ready for 2026-03-03T02:00:00Z"
    world.tick(30)  # the evicted job is gone
    assert world.settle("c1").reason == "2 of 2 nodes ready for 2026-03-03T02:00:00Z"

    world.now_s = START
    delivering = world.settle("c1")
    assert (delivering.phase, delivering.buyer_namespace) == (Phase.DELIVERING, True)
    assert_settled(world, "c1", delivering)

    world.now_s = START + 600
    world.nodes["b2"] = dataclasses.replace(world.nodes["b2"], gpu_healthy=False)
    substituted = world.settle("c1")
    assert (substituted.phase, substituted.nodes) == (Phase.DELIVERING, ("a1", "b1"))
    assert_settled(world, "c1", substituted)
    assert world.nodes["b2"].quarantined

    world.now_s = END - POOL.grace_s
    assert world.settle("c1").buyer_warned_s == END - POOL.grace_s
    assert world.warnings == [("c1", END)]

    world.now_s = END
    completed = world.settle("c1")
    assert (completed.phase, completed.nodes, completed.wake_at_s) == (Phase.COMPLETED, (), None)
    assert world.marked("c1") == set()
    assert not any(each.unschedulable for each in world.nodes.values())
    assert world.statuses["c1"].intervals == (
        *(ledger.Interval("a1", f"GPU-a1-{g}", START + 600, END) for g in (0, 1)),
        *(ledger.Interval("b1", f"GPU-b1-{g}", START, END) for g in (0, 1)),
        *(ledger.Interval("b2", f"GPU-b2-{g}", START, START + 600) for g in (0, 1)),
    )


def handed(name: str, **facts: Any) -> NodeFacts:
    return node(name, claimed_by="c1", contract_label="c1", contract_taint="c1", **facts)


def opened(name: str, at_s: int) -> tuple[ledger.Interval, ...]:
    return tuple(ledger.Interval(name, f"GPU-{name}-{g}", at_s) for g in (0, 1))


# What a crash between the node writes and the status write (or an operator stopped for a
# while) can leave behind, during the window: (the nodes, c1's status).
LEFTOVERS = {
    "handed-over-but-not-listed": (
        [handed("a1"), handed("a2"), node("a3")],
        delivery.Status(Phase.DELIVERING, "", ("a1",), intervals=opened("a1", START)),
    ),
    "cordoned-but-not-listed": (
        [handed("a1"), handed("a2"), node("a3", claimed_by="c1", unschedulable=True)],
        delivery.Status(
            Phase.DELIVERING, "", ("a1", "a2"), intervals=opened("a1", START) + opened("a2", START)
        ),
    ),
    "interval-open-for-a-node-not-held": (
        [handed("a1"), handed("a2"), node("a3")],
        delivery.Status(
            Phase.DELIVERING,
            "",
            ("a1", "a2"),
            intervals=opened("a1", START) + opened("a2", START) + opened("a3", START),
        ),
    ),
    "listed-node-deleted": (
        [handed("a1"), node("a3")],
        delivery.Status(
            Phase.DELIVERING, "", ("a1", "a2"), intervals=opened("a1", START) + opened("a2", START)
        ),
    ),
    "half-handed-over-with-the-buyers-pods": (
        [handed("a1"), node("a2", contract_label="c1", pods=[Pod("gpud-c1", "job")])],
        delivery.Status(Phase.DELIVERING, "", ("a1", "a2"), intervals=opened("a1", START)),
    ),
    "released-but-still-listed": (
        [handed("a1"), node("a2")],
        delivery.Status(Phase.DELIVERING, "", ("a1", "a2"), intervals=opened("a1", START)),
    ),
    "listed-but-claimed-by-another": (
        [handed("a1"), node("a2", claimed_by="c2", unschedulable=True), node("a3")],
        delivery.Status(Phase.DELIVERING, "", ("a1", "a2"), intervals=opened("a1", START)),
    ),
    "too-many-after-adopting": (
        [handed("a1"), handed("a2"), handed("a3"), node("b1", "b", claimed_by="c1")],
        delivery.Status(Phase.DELIVERING, "", ("a1", "a2"), intervals=opened("a1", START)),
    ),
}


@pytest.mark.parametrize("leftover", sorted(LEFTOVERS))
def test_a_contract_converges_from_what_a_crash_leaves_behind(leftover: str) -> None:
    nodes, status = LEFTOVERS[leftover]
    world = World.of(START + 60, nodes, contract("c1", gpus=4))
    world.statuses["c1"] = status
    settled = world.settle("c1")
    assert settled.phase == Phase.DELIVERING
    assert_settled(world, "c1", settled)
    assert world.nodes.get("a2", node("a2")).claimed_by in ("c1", "c2", None)
    world.now_s = END
    world.settle("c1")
    assert world.marked("c1") == set()
    assert open_intervals(world.statuses["c1"]) == set()


def test_a_contract_that_ended_while_the_operator_was_down_is_released() -> None:
    world = World.of(END + 3_600, [handed("a1"), node("a2", claimed_by="c1")], contract("c1"))
    world.statuses["c1"] = delivery.Status(
        Phase.DELIVERING, "", ("a1",), intervals=opened("a1", START)
    )
    completed = world.settle("c1")
    assert (completed.phase, world.marked("c1"), world.warnings) == (Phase.COMPLETED, set(), [])
    assert world.statuses["c1"].intervals == tuple(
        ledger.Interval("a1", f"GPU-a1-{g}", START, END) for g in (0, 1)
    )


# The instants the lifecycle test visits, and what happens there.
STEPS = [PREPARE - 1, PREPARE, PREPARE + 400, START, START + 30, START + 200, END - 200, END]


@settings(max_examples=150, deadline=None)
@given(
    crashes=st.lists(st.none() | st.integers(0, 8), min_size=len(STEPS), max_size=len(STEPS)),
    failing=st.sampled_from([None, "a1", "b1", "b2"]),
    fail_at=st.sampled_from(STEPS),
)
def test_a_crash_at_any_action_of_any_step_still_converges(
    crashes: list[int | None], failing: str | None, fail_at: int
) -> None:
    world = World.of(PREPARE - 1, pool_nodes(), contract("c1", gpus=3))
    for instant, crash in zip(STEPS, crashes, strict=True):
        world.now_s = instant
        world.tick(0)
        if failing is not None and instant == fail_at:
            world.nodes[failing] = dataclasses.replace(world.nodes[failing], gpu_healthy=False)
        first = world.plan("c1")
        assert world.plan("c1") == first  # the same facts, the same plan
        world.execute(first, crash_after=crash)
        settled = world.settle("c1", rounds=5)
        if settled.phase != Phase.COMPLETED:
            assert_settled(world, "c1", settled)
    assert world.statuses["c1"].phase == Phase.COMPLETED
    assert world.marked("c1") == set()
    assert not any(each.unschedulable for each in world.nodes.values())
    for interval in world.statuses["c1"].intervals:
        assert interval.end_s is not None
        assert START <= interval.start_s < interval.end_s <= END


NAMES = [f"n{i}" for i in range(6)]
CONTRACTS = ["c1", "c2", "c3"]
marks = st.sampled_from([None, None, *CONTRACTS])


@st.composite
def any_node(draw: st.DrawFn, name: str) -> NodeFacts:
    """A node in any state at all, marks of several contracts included."""
    return node(
        name,
        draw(st.sampled_from(["a", "b", None])),
        "z1",
        ready=draw(st.booleans()),
        ready_since_s=START - draw(st.integers(0, 200)),
        gpu_healthy=draw(st.sampled_from([True, True, False, None])),
        unschedulable=draw(st.booleans()),
        quarantined=draw(st.booleans()),
        claimed_by=draw(marks),
        contract_label=draw(marks),
        contract_taint=draw(marks),
        pods=draw(st.sampled_from([(), (JOB,), (dataclasses.replace(JOB, terminating=True),)])),
    )


@settings(max_examples=300, deadline=None)
@given(
    nodes=st.tuples(*(any_node(name) for name in NAMES)),
    listed=st.tuples(*(st.sets(st.sampled_from(NAMES)) for _ in CONTRACTS)),
    phases=st.tuples(*(st.sampled_from(list(Phase)) for _ in CONTRACTS)),
    gpus=st.tuples(*(st.integers(1, 7) for _ in CONTRACTS)),
    now_s=st.sampled_from([PREPARE - 1, PREPARE, START - 1, START, START + 300, END - 1, END]),
)
def test_a_plan_never_takes_or_touches_a_node_that_is_another_contracts(
    nodes: tuple[NodeFacts, ...],
    listed: tuple[set[str], ...],
    phases: tuple[Phase, ...],
    gpus: tuple[int, ...],
    now_s: int,
) -> None:
    world = World.of(
        now_s, nodes, *(contract(c, gpus=g) for c, g in zip(CONTRACTS, gpus, strict=True))
    )
    for name, names, phase in zip(CONTRACTS, listed, phases, strict=True):
        world.statuses[name] = delivery.Status(phase, "", tuple(sorted(names)))
    for name in CONTRACTS:
        elsewhere = world.held_elsewhere(name)
        plan = world.plan(name)
        assert world.plan(name) == plan
        for each in plan.nodes:
            assert not_anothers(world.nodes[each], name, elsewhere)
        for action in plan.actions:
            if isinstance(action, NODE_ACTIONS):
                assert not_anothers(world.nodes[action.node], name, elsewhere)
            if isinstance(action, actions.Cordon) and action.node not in plan.nodes:
                raise AssertionError(f"{name} cordons {action.node} without holding it")
        new = set(plan.nodes) - set(world.statuses[name].nodes)
        for each in new:
            facts = world.nodes[each]
            if not claims.names_on(facts):  # taken free: fit, and nobody's cordon lifted
                assert facts.ready
                assert facts.gpu_healthy is not False
                assert not facts.quarantined
                assert not facts.unschedulable
        if phase_over(world.statuses[name].phase, now_s, name, world):
            assert plan.nodes == ()
            assert not any(isinstance(action, actions.Cordon) for action in plan.actions)


NODE_ACTIONS = (
    actions.Cordon,
    actions.Evict,
    actions.Handover,
    actions.Quarantine,
    actions.Release,
)


def not_anothers(facts: NodeFacts, name: str, elsewhere: frozenset[str]) -> bool:
    """The node bears no other contract's name, and if another contract lists it, it bears
    this one's."""
    bears = claims.names_on(facts)
    return bears <= {name} and (facts.name not in elsewhere or bears == {name})


def phase_over(phase: Phase, now_s: int, name: str, world: World) -> bool:
    return phase not in LIVE or now_s >= world.contracts[name].terms.end


events = st.one_of(
    st.tuples(st.just("plan"), st.sampled_from(CONTRACTS), st.none() | st.integers(0, 6)),
    st.tuples(st.just("tick"), st.sampled_from([1, 61, 301, 900]), st.none()),
    st.tuples(st.just("fail"), st.sampled_from(NAMES), st.sampled_from(["gpus", "down"])),
    st.tuples(st.just("repair"), st.sampled_from(NAMES), st.none()),
    st.tuples(st.just("pod"), st.sampled_from(NAMES), st.none()),
)


@settings(max_examples=200, deadline=None)
@given(
    starts=st.tuples(*(st.sampled_from([0, 600, 1_800]) for _ in CONTRACTS)),
    gpus=st.tuples(*(st.integers(1, 6) for _ in CONTRACTS)),
    steps=st.lists(events, min_size=1, max_size=40),
)
def test_no_node_is_ever_held_by_two_contracts(
    starts: tuple[int, ...], gpus: tuple[int, ...], steps: list[tuple[str, str | int, object]]
) -> None:
    """Contracts of one pool (oversold, even) planned one at a time, as the operator's lock
    makes them, while nodes fail, are repaired, run new pods, and the operator crashes."""
    contracts = [
        contract(name, gpus=g, start=START + offset, end=START + offset + 1_800)
        for name, g, offset in zip(CONTRACTS, gpus, starts, strict=True)
    ]
    nodes = [node(name, "a" if name < "n3" else "b") for name in NAMES]
    world = World.of(PREPARE, nodes, *contracts)
    for kind, what, detail in steps:
        if kind == "plan":
            crash = detail if isinstance(detail, int) else None
            world.execute(world.plan(str(what)), crash_after=crash)
        elif kind == "tick":
            world.tick(int(what))
        else:
            world.nodes[str(what)] = _event(world.nodes[str(what)], kind, detail, world.now_s)
        held = [set(world.statuses[name].nodes) for name in CONTRACTS]
        for i, mine in enumerate(held):
            for theirs in held[i + 1 :]:
                assert not mine & theirs
        for each in world.nodes.values():
            assert len(claims.names_on(each)) <= 1
        for name in CONTRACTS:
            for each in set(world.statuses[name].nodes) & set(world.nodes):
                assert claims.names_on(world.nodes[each]) <= {name}
    world.now_s = max(each.terms.end for each in contracts)
    for name in CONTRACTS:
        # Completed, or Failed when no GPU of it was ever handed over.
        served = bool(world.statuses[name].intervals)
        expected = Phase.COMPLETED if served else Phase.FAILED
        assert world.settle(name, rounds=2).phase == expected
    assert not any(claims.names_on(each) or each.unschedulable for each in world.nodes.values())


def _event(facts: NodeFacts, kind: str, detail: object, now_s: int) -> NodeFacts:
    if kind == "fail" and detail == "gpus":
        return dataclasses.replace(facts, gpu_healthy=False)
    if kind == "fail":
        return dataclasses.replace(facts, ready=False, ready_since_s=now_s)
    if kind == "repair":
        return dataclasses.replace(
            facts, gpu_healthy=True, ready=True, ready_since_s=now_s, quarantined=False
        )
    return dataclasses.replace(facts, pods=(*facts.pods, Pod("team", f"job-{now_s}")))
