"""The reconcile planner of one ComputeContract: from what is, the plan that converges it.

`plan` reads plain facts (the contract, what its status records, the nodes of its pool, the
nodes other contracts hold, the time) and says the phase the contract should be in, the
nodes it should hold, and the actions (operator/actions.py) that make the cluster so. It
follows issue 5's lifecycle by the clock alone, so it is level-triggered: the same inputs
always give the same plan, whatever happened before.

- Before the window's start less the pool's lead time: nothing (`Booked`).
- Preparing: hold whole nodes (operator/claims.py says which), claim and cordon them, evict
  the pods that must leave; a node not drained `drain_timeout_s` after its drain started is
  swapped for a free one when there is one.
- From the start: hand over every held node that was cordoned, is drained, Ready and whose
  GPUs the metering agent reports healthy, and open its GPUs' ledger intervals; `Degraded`
  (and still filling the gap) while fewer than needed are handed over.
- Any time: a held node NotReady for over `not_ready_after_s`, quarantined, or with
  `GPUHealthy` False is quarantined and released, its intervals closed, and replaced by a
  free node close to it.
- At the end less the grace period the buyer is warned, once; at the end every node is
  released, every interval closed at the end, and the contract is `Completed`, or `Failed`
  when no GPU served it at all.
- Cancelled, Completed, Rejected and Failed contracts only release what they still hold; a
  live contract whose spec says it was cancelled becomes `Cancelled` (at any time: the API
  cancels only before the start, a provider may end a delivery early).

The executor carries out the actions in order, then writes the plan's phase, reason, nodes,
drain starts, warning time and the ledger intervals as the actions left them (status last),
and keeps the buyer's namespace as `buyer_namespace` says. After a plan with actions it plans
again at once (the cluster changed), else at `wake_at_s` or when a watched object changes.
It makes the plans of one pool one at a time (a lock, as booking does), so that two plans
never take the same free node at once.

Not here: Kubernetes calls, the buyer's namespace's content, reporting the ledger.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from gpudelivery import terms, timefmt
from gpudelivery.operator import actions, booking, calendar, claims, resources

__all__ = ["Contract", "Interval", "Plan", "Status", "plan"]


class Interval(Protocol):
    """A ledger interval as the status keeps it; `ledger.Interval` is one. A Protocol, not
    that class: the ledger module also holds the API client, which decisions may not import."""

    @property
    def node(self) -> str: ...
    @property
    def gpu_uuid(self) -> str: ...
    @property
    def start_s(self) -> int: ...
    @property
    def end_s(self) -> int | None: ...


@dataclass(frozen=True)
class Contract:
    """A contract to deliver: its resource name, terms and pool, and when it was cancelled
    (`spec.cancelledAt`), if it was."""

    name: str
    terms: terms.ContractTerms
    pool: resources.Pool
    cancelled_s: int | None = None


@dataclass(frozen=True)
class Status:
    """What the contract's status records: phase and reason, the nodes it holds, when each
    node's drain started, when the buyer was warned, and its ledger intervals."""

    phase: resources.Phase
    reason: str = ""
    nodes: tuple[str, ...] = ()
    drain_started_s: Mapping[str, int] = field(default_factory=dict)
    buyer_warned_s: int | None = None
    intervals: Sequence[Interval] = ()


@dataclass(frozen=True)
class Plan:
    """The actions to carry out for contract `contract`, in order, then the status to write
    (phase, reason, nodes, drain starts, warning time)."""

    contract: str
    phase: resources.Phase
    reason: str
    nodes: tuple[str, ...]
    drain_started_s: Mapping[str, int]
    buyer_warned_s: int | None
    # Whether the buyer's namespace (resources.namespace_name) should exist: over the window.
    buyer_namespace: bool
    actions: tuple[actions.Action, ...]
    # When the clock alone would change the plan next (None: never); always after now.
    wake_at_s: int | None


class _Stage(enum.Enum):
    BEFORE = enum.auto()
    PREPARING = enum.auto()
    DELIVERING = enum.auto()
    AFTER = enum.auto()
    OVER = enum.auto()  # a phase that holds nothing: Cancelled, Completed, Rejected, Failed


@dataclass(frozen=True)
class _View:
    contract: Contract
    status: Status
    facts: Mapping[str, claims.NodeFacts]
    claimant: claims.Claimant
    now_s: int
    not_ready_after_s: int

    def drain_start(self, name: str) -> int:
        return self.status.drain_started_s.get(name, self.now_s)


def plan(
    contract: Contract,
    status: Status,
    nodes: Sequence[claims.NodeFacts],
    *,
    held_elsewhere: Collection[str],
    now_s: int,
    not_ready_after_s: int = claims.NOT_READY_AFTER_S,
) -> Plan:
    """The plan for `contract` at `now_s`. `nodes` are the pool's nodes and any other node
    carrying the contract's name; `held_elsewhere` the nodes other contracts' statuses list."""
    if contract.cancelled_s is not None and status.phase in booking.LIVE:
        cancelled = f"cancelled at {_utc(contract.cancelled_s)}"
        status = replace(status, phase=resources.Phase.CANCELLED, reason=cancelled)
    claimant = claims.Claimant(contract.name, frozenset(status.nodes), frozenset(held_elsewhere))
    view = _View(contract, status, claims.index(nodes), claimant, now_s, not_ready_after_s)
    stage = _stage(contract, status.phase, now_s)
    if stage in (_Stage.PREPARING, _Stage.DELIVERING):
        return _deliver(view, stage)
    return _wind_down(view, stage)


def _stage(contract: Contract, phase: resources.Phase, now_s: int) -> _Stage:
    window = contract.terms
    if phase not in booking.LIVE:
        return _Stage.OVER
    if now_s >= window.end:
        return _Stage.AFTER
    if now_s >= window.start:
        return _Stage.DELIVERING
    if now_s >= window.start - contract.pool.lead_time_s:
        return _Stage.PREPARING
    return _Stage.BEFORE


def _wind_down(view: _View, stage: _Stage) -> Plan:
    """Hold nothing: release every node bearing the contract's name, close its intervals."""
    window, status = view.contract.terms, view.status
    prepare_s = window.start - view.contract.pool.lead_time_s
    if stage is _Stage.AFTER and not status.intervals:
        phase = resources.Phase.FAILED
        reason = f"the window ended at {_utc(window.end)} and no GPU was handed over in it"
    elif stage is _Stage.AFTER:
        phase, reason = resources.Phase.COMPLETED, f"the window ended at {_utc(window.end)}"
    elif stage is _Stage.BEFORE and status.phase is not resources.Phase.BOOKED:
        phase, reason = resources.Phase.BOOKED, f"preparation starts at {_utc(prepare_s)}"
    else:
        phase, reason = status.phase, status.reason
    releases: list[actions.Action] = [
        actions.Release(name)
        for name, node in view.facts.items()
        if view.claimant.bears_only_ours(node)
    ]
    return Plan(
        contract=view.contract.name,
        phase=phase,
        reason=reason,
        nodes=(),
        drain_started_s={},
        buyer_warned_s=status.buyer_warned_s,
        buyer_namespace=False,
        actions=(*releases, *_ledger(view, ())),
        wake_at_s=prepare_s if stage is _Stage.BEFORE else None,
    )


def _deliver(view: _View, stage: _Stage) -> Plan:
    """Hold, prepare and hand over the contract's nodes over its lead time and window."""
    contract, facts = view.contract, view.facts
    need = calendar.nodes_needed(contract.terms.gpu_count, contract.pool.gpus_per_node)
    choice = claims.choose(
        view.claimant,
        facts,
        need,
        is_failed=lambda node: claims.failed(
            node, now_s=view.now_s, not_ready_after_s=view.not_ready_after_s
        ),
        slow=[name for name, node in facts.items() if _slow(view, node)],
    )
    releases: list[actions.Action] = []
    for name in sorted((*choice.failed, *choice.surplus, *choice.swapped)):
        if name in choice.failed and not facts[name].quarantined:
            releases.append(actions.Quarantine(name))
        if view.claimant.bears_only_ours(facts[name]):
            releases.append(actions.Release(name))
    delivering = stage is _Stage.DELIVERING
    acquisitions, handed = _prepare(view, choice.held, delivering=delivering)
    warned, warning = _warning(view, delivering=delivering)
    draining = [name for name in choice.held if name not in handed]
    phase, reason = _phase(view, need, choice.held, handed, delivering=delivering)
    return Plan(
        contract=contract.name,
        phase=phase,
        reason=reason,
        nodes=choice.held,
        drain_started_s={name: view.drain_start(name) for name in draining},
        buyer_warned_s=warned,
        buyer_namespace=delivering,
        actions=(*releases, *acquisitions, *_ledger(view, handed if delivering else ()), *warning),
        wake_at_s=_wake(view, choice.held, draining, warned),
    )


def _phase(
    view: _View, need: int, held: Sequence[str], handed: Sequence[str], *, delivering: bool
) -> tuple[resources.Phase, str]:
    """Preparing, Delivering or Degraded (fewer handed over than needed), and how far."""
    nodes = "node" if need == 1 else "nodes"
    missing = "" if len(held) >= need else f"; no free node for {need - len(held)} more"
    if delivering:
        phase = resources.Phase.DELIVERING if len(handed) >= need else resources.Phase.DEGRADED
        return phase, f"{len(handed)} of {need} {nodes} handed over{missing}"
    claimant = view.claimant
    fit = sum(
        1
        for node in (view.facts[name] for name in held)
        if claimant.handed_over(node) or (claimant.drained(node) and claims.deliverable(node))
    )
    start = _utc(view.contract.terms.start)
    return resources.Phase.PREPARING, f"{fit} of {need} {nodes} ready for {start}{missing}"


def _slow(view: _View, node: claims.NodeFacts) -> bool:
    """One of the contract's nodes still draining `drain_timeout_s` after its drain began."""
    claimant = view.claimant
    if not claimant.is_ours(node) or claimant.handed_over(node) or claimant.drained(node):
        return False
    return view.now_s - view.drain_start(node.name) >= view.contract.pool.drain_timeout_s


def _prepare(
    view: _View, held: Sequence[str], *, delivering: bool
) -> tuple[list[actions.Action], list[str]]:
    """Cordon and drain the held nodes not handed over, and once the window is open hand
    over those fit for it; the actions, and the nodes handed over once they are done."""
    claimant = view.claimant
    todo: list[actions.Action] = []
    handed = []
    for name in held:
        node = view.facts[name]
        if claimant.handed_over(node):
            handed.append(name)
            continue
        if not claimant.cordoned(node):
            todo.append(actions.Cordon(name))
        todo.extend(
            actions.Evict(name, pod.namespace, pod.name)
            for pod in claimant.leaving(node)
            if not pod.terminating
        )
        # Only a node cordoned before these facts were read can be drained: on one cordoned
        # now, a pod may still land until the cordon is in place.
        if delivering and claimant.drained(node) and claims.deliverable(node):
            todo.append(actions.Handover(name))
            handed.append(name)
    return todo, handed


def _ledger(view: _View, serving: Sequence[str]) -> list[actions.Action]:
    """Close every open interval but one per GPU of the `serving` nodes; open one for each
    such GPU without one, at now (not before the window's start)."""
    window, now_s = view.contract.terms, view.now_s
    wanted = {(name, gpu) for name in serving for gpu in view.facts[name].gpu_uuids}
    closes: list[actions.Action] = []
    kept: set[tuple[str, str]] = set()
    for interval in sorted(view.status.intervals, key=_interval_key):
        if interval.end_s is not None:
            continue
        key = (interval.node, interval.gpu_uuid)
        if key in wanted and key not in kept:
            kept.add(key)
            continue
        # An interval must end after it starts (the API refuses others): one opened this
        # very second ends a second later.
        end_s = max(min(now_s, window.end), interval.start_s + 1)
        closes.append(actions.CloseInterval(*key, interval.start_s, end_s))
    at_s = max(window.start, now_s)
    opens = [actions.OpenInterval(*key, at_s) for key in sorted(wanted - kept)]
    return [*closes, *opens]


def _interval_key(interval: Interval) -> tuple[str, str, int]:
    return interval.node, interval.gpu_uuid, interval.start_s


def _warning(view: _View, *, delivering: bool) -> tuple[int | None, list[actions.Action]]:
    """When the buyer is warned (after this plan), and the warning if it is due now."""
    window, warned = view.contract.terms, view.status.buyer_warned_s
    due = delivering and view.now_s >= window.end - view.contract.pool.grace_s
    if warned is None and due:
        return view.now_s, [actions.WarnBuyer(window.end)]
    return warned, []


def _wake(
    view: _View, held: Sequence[str], draining: Sequence[str], warned: int | None
) -> int | None:
    """The next instant the clock alone changes the plan: the window starts or ends, the
    buyer is due a warning, a drain times out or a NotReady node counts as failed."""
    window, pool = view.contract.terms, view.contract.pool
    instants = [window.start, window.end]
    if warned is None:
        instants.append(window.end - pool.grace_s)
    for name in draining:
        if not view.claimant.drained(view.facts[name]):
            instants.append(view.drain_start(name) + pool.drain_timeout_s)
    for name in held:
        node = view.facts[name]
        if not node.ready:
            instants.append(node.ready_since_s + view.not_ready_after_s + 1)
    return min((instant for instant in instants if instant > view.now_s), default=None)


def _utc(epoch_s: int) -> str:
    return timefmt.format_utc(epoch_s)
