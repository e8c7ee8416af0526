"""Builders for the delivery planner's tests, and a tiny model of the cluster that carries
out its plans: node facts and contract statuses change exactly as the actions say
(operator/actions.py), so a test can plan, execute, plan again and watch it converge."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gpudelivery import timefmt
from gpudelivery.operator import actions, claims, delivery, ledger, resources
from gpudelivery.operator.claims import NodeFacts, Pod

from utils.factories import EPOCH, worked_terms

__all__ = [
    "END",
    "POOL",
    "PREPARE",
    "START",
    "World",
    "contract",
    "node",
    "open_intervals",
]

HOUR = 3_600
# A pool of 2-GPU nodes (small, so a node's intervals are easy to spell out).
POOL = resources.Pool(
    name="h100",
    instrument="H100-SXM-80GB",
    node_selector={resources.LABEL_GPU_PRODUCT: "H100-SXM-80GB"},
    gpus_per_node=2,
    spares=1,
    lead_time_s=600,
    drain_timeout_s=300,
    grace_s=300,
)
START = EPOCH + 2 * HOUR
END = START + HOUR
PREPARE = START - POOL.lead_time_s


def contract(name: str = "c1", gpus: int = 4, start: int = START, end: int = END) -> (
    delivery.Contract
):  # fmt: skip
    """Contract `name` (its resource name) of `gpus` GPUs over [start, end) in POOL."""
    terms = worked_terms(
        contract_id=name.upper(),
        gpu_count=gpus,
        start=timefmt.format_utc(start),
        end=timefmt.format_utc(end),
    )
    return delivery.Contract(name, terms, POOL)


def node(
    name: str,
    block: str | None = "b1",
    zone: str | None = "z1",
    *,
    pods: Iterable[Pod] = (),
    **facts: Any,
) -> NodeFacts:
    """A Ready node with healthy GPUs `GPU-<name>-0` and `-1`, nobody's, with `pods`;
    `facts` replace any other field."""
    base = NodeFacts(
        name=name,
        block=block,
        zone=zone,
        ready=True,
        ready_since_s=EPOCH,
        gpu_healthy=True,
        unschedulable=False,
        quarantined=False,
        claimed_by=None,
        contract_label=None,
        contract_taint=None,
        gpu_uuids=(f"GPU-{name}-0", f"GPU-{name}-1"),
        pods=tuple(pods),
    )
    return dataclasses.replace(base, **facts)


def open_intervals(status: delivery.Status) -> set[tuple[str, str]]:
    return {(i.node, i.gpu_uuid) for i in status.intervals if i.end_s is None}


@dataclass
class World:
    """The cluster and the contracts' statuses as the planner's facts, at `now_s`."""

    now_s: int
    nodes: dict[str, NodeFacts]
    contracts: dict[str, delivery.Contract]
    statuses: dict[str, delivery.Status]
    warnings: list[tuple[str, int]] = field(default_factory=list)

    @classmethod
    def of(cls, now_s: int, nodes: Iterable[NodeFacts], *contracts: delivery.Contract) -> World:
        return cls(
            now_s,
            {each.name: each for each in nodes},
            {each.name: each for each in contracts},
            {each.name: delivery.Status(resources.Phase.BOOKED) for each in contracts},
        )

    def held_elsewhere(self, name: str) -> frozenset[str]:
        return frozenset(
            held
            for other, status in self.statuses.items()
            if other != name
            for held in status.nodes
        )

    def plan(self, name: str) -> delivery.Plan:
        return delivery.plan(
            self.contracts[name],
            self.statuses[name],
            list(self.nodes.values()),
            held_elsewhere=self.held_elsewhere(name),
            now_s=self.now_s,
        )

    def execute(self, plan: delivery.Plan, *, crash_after: int | None = None) -> None:
        """Carry out `plan`'s actions in order, then write the status; with `crash_after`,
        stop (crash) after that many actions, before the status is written."""
        name = plan.contract
        intervals = [
            ledger.Interval(i.node, i.gpu_uuid, i.start_s, i.end_s)
            for i in self.statuses[name].intervals
        ]
        done = plan.actions if crash_after is None else plan.actions[:crash_after]
        for action in done:
            self._apply(name, action, intervals)
        if crash_after is not None:
            return
        self.statuses[name] = delivery.Status(
            phase=plan.phase,
            reason=plan.reason,
            nodes=plan.nodes,
            drain_started_s=dict(plan.drain_started_s),
            buyer_warned_s=plan.buyer_warned_s,
            intervals=tuple(sorted(intervals)),
        )

    def _apply(self, name: str, action: actions.Action, intervals: list[ledger.Interval]) -> None:
        match action:
            case actions.Cordon(node=n):
                self._patch(n, unschedulable=True, claimed_by=name)
            case actions.Evict(node=n, namespace=namespace, name=pod):
                pods = tuple(
                    dataclasses.replace(p, terminating=True)
                    if (p.namespace, p.name) == (namespace, pod)
                    else p
                    for p in self.nodes[n].pods
                )
                self._patch(n, pods=pods)
            case actions.Handover(node=n):
                self._patch(n, contract_label=name, contract_taint=name, unschedulable=False)
            case actions.Quarantine(node=n):
                self._patch(n, quarantined=True)
            case actions.Release(node=n):
                self._patch(
                    n,
                    contract_label=None,
                    contract_taint=None,
                    claimed_by=None,
                    unschedulable=False,
                )
            case actions.OpenInterval(node=n, gpu_uuid=gpu, at_s=at_s):
                assert not any(
                    (i.node, i.gpu_uuid, i.end_s) == (n, gpu, None) for i in intervals
                ), "an interval opened twice"
                intervals.append(ledger.Interval(n, gpu, at_s))
            case actions.CloseInterval(node=n, gpu_uuid=gpu, start_s=start_s, at_s=at_s):
                (index,) = (
                    k
                    for k, i in enumerate(intervals)
                    if (i.node, i.gpu_uuid, i.start_s, i.end_s) == (n, gpu, start_s, None)
                )
                assert at_s > start_s
                intervals[index] = dataclasses.replace(intervals[index], end_s=at_s)
            case actions.WarnBuyer(end_s=end_s):
                self.warnings.append((name, end_s))

    def _patch(self, name: str, **facts: Any) -> None:
        self.nodes[name] = dataclasses.replace(self.nodes[name], **facts)

    def tick(self, seconds: int) -> None:
        """Time passes: terminating pods are gone."""
        self.now_s += seconds
        for name, each in self.nodes.items():
            self._patch(name, pods=tuple(p for p in each.pods if not p.terminating))

    def settle(self, name: str, *, rounds: int = 4) -> delivery.Plan:
        """Plan and execute until a plan asks for nothing, within `rounds`; that plan, once
        its status is written, plans again the same."""
        for _ in range(rounds):
            plan = self.plan(name)
            self.execute(plan)
            if not plan.actions:
                assert self.plan(name) == plan
                return plan
        raise AssertionError(f"{name} did not converge in {rounds} rounds: {plan}")

    def marked(self, name: str) -> set[str]:
        """The nodes bearing contract `name`'s name."""
        return {n for n, facts in self.nodes.items() if name in claims.names_on(facts)}
