"""Carrying out the delivery plans (operator/delivery.py) on the cluster, one pool at a time.

Each pass over a DeliveryPool (a kopf timer) reads the pool's nodes and every contract once,
then, for each contract booked in the pool, plans, carries the plan's actions out and writes
the contract's status last, and plans again at once while a plan had something to do
(`MAX_ROUNDS` at most: a node is cordoned, drained, handed over and put in the ledger in
four). Contracts of a pool are taken one at a time (kopf runs a timer of one object
sequentially), so two plans never take the same free node at once; between pools, every node
write names the resourceVersion read, so a node another pool's pass took meanwhile answers
409 and the contract is planned again from fresh facts.

The nodes read at the start of a pass are kept up to date with what each write answers, so a
contract's rounds cost only the writes and the pod lists of the nodes it is draining. Nothing
is remembered between passes: a restarted operator starts again from the cluster's marks and
the contracts' statuses (the planner's level-triggered contract).

Beyond the plans, a pass also releases the nodes whose marks name a contract that no longer
exists, and deletes the buyer namespaces (`Tenancy`) of contracts that are gone or over.

Not here: decisions (operator/delivery.py), the buyer's namespace's content
(operator/buyers.py), reporting the ledger to the API (operator/handlers.py's ledger timer).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any, Protocol

from gpudelivery import errors as core_errors
from gpudelivery import timefmt
from gpudelivery.operator import (
    actions,
    booking,
    claims,
    cluster,
    delivery,
    errors,
    ledger,
    nodes,
    resources,
)

__all__ = [
    "ANNOTATION_WINDOW_ENDS",
    "MAX_ROUNDS",
    "NAMESPACE_CHECK_S",
    "Announce",
    "PoolDelivery",
    "Tenancy",
]

# Plan-and-carry-out rounds a contract gets in one pass: the planner converges in five when
# nothing else moves (cordon, evict, hand over, open the ledger, and the plan with nothing to
# do), and a node that changed under a write costs one more.
MAX_ROUNDS = 8
# The annotation the end-of-window warning puts on the buyer's pods: when the window ends.
ANNOTATION_WINDOW_ENDS = "gpudelivery.io/window-ends-at"
# The Event reason of the end-of-window warning.
EVENT_WINDOW_ENDING = "WindowEnding"
# The Event reason of a node action or eviction the API server refused.
EVENT_FAILED_ACTION = "ActionFailed"
# How often a buyer's namespace is made whole again (seconds), beyond when it is missing:
# an object deleted in it is back, and a token the API server cut short renewed, this late.
NAMESPACE_CHECK_S = 300
# How many phase transitions a status keeps (the newest): a contract flapping between
# Delivering and Degraded must not grow its status without end.
MAX_TRANSITIONS = 50
# deliveredGpuSeconds alone is rewritten once it has grown by a minute of every GPU serving:
# the count is for people, and a write a second per contract would load the API server.
DELIVERED_REFRESH_S = 60
# The actions that name no node of their own to write.
_LEDGER_ACTIONS = (actions.OpenInterval, actions.CloseInterval, actions.WarnBuyer)
# Phases whose Event is a Warning.
_WARNING_PHASES = frozenset({resources.Phase.DEGRADED, resources.Phase.FAILED})


class Tenancy(Protocol):
    """The buyers' namespaces (operator/buyers.py): made while a window is open, deleted
    after it."""

    def ensure(
        self, contract_name: str, buyer: str, gpus: int, end_s: int, now_s: int
    ) -> Sequence[str]:
        """Make whatever of the contract's namespace and its objects is missing; what it
        wrote (`<resource>/<name>`). `errors.NamespaceTerminatingError` while the namespace
        of an earlier window is still being deleted."""

    def remove(self, contract_name: str) -> None:
        """Delete the contract's namespace (done when there is none)."""

    def listed(self) -> Mapping[str, str]:
        """The buyers' namespaces that exist: namespace name -> contract name."""


# Posts an Event about an object: (its body, "Normal" or "Warning", reason, message).
Announce = Callable[[Mapping[str, Any], str, str, str], None]


_NOBODY: frozenset[str] = frozenset()


class _Pass:
    """What one pass over a pool knows: the nodes (kept as written) and the planner's facts
    of each without its pods, the nodes each contract's status lists (and, by node, which
    contracts list it), the buyers' namespaces, and the contracts that exist."""

    def __init__(
        self,
        pool: resources.Pool,
        found: Mapping[str, dict[str, Any]],
        held: Mapping[str, tuple[str, ...]],
        namespaces: dict[str, str],
    ) -> None:
        self.pool = pool
        self.nodes: dict[str, dict[str, Any]] = {}
        self.bare: dict[str, claims.NodeFacts] = {}
        for name, node in found.items():
            self.put_node(name, node)
        self._held: dict[str, tuple[str, ...]] = {}
        self._holders: dict[str, set[str]] = {}
        for contract, listed in held.items():
            self.hold(contract, listed)
        self.namespaces = namespaces
        self.existing = frozenset(held)
        # The contract names the nodes' marks carried when the pass began.
        self.marked = frozenset(
            mark for facts in self.bare.values() for mark in claims.names_on(facts)
        )

    def put_node(self, name: str, node: dict[str, Any] | None) -> None:
        """Node `name` as last read or written; None: it is gone."""
        if node is None:
            self.nodes.pop(name, None)
            self.bare.pop(name, None)
        else:
            self.nodes[name] = node
            self.bare[name] = nodes.facts(node, ())

    def hold(self, contract: str, listed: tuple[str, ...]) -> None:
        """The nodes `contract`'s status now lists."""
        for name in self._held.get(contract, ()):
            self._holders.get(name, set()).discard(contract)
        self._held[contract] = listed
        for name in listed:
            self._holders.setdefault(name, set()).add(contract)

    def held_elsewhere(self, contract: str) -> set[str]:
        """The pass's nodes that other contracts' statuses list (the planner reads no other)."""
        holders = self._holders
        return {name for name in self.nodes if holders.get(name, _NOBODY) - {contract}}


class PoolDelivery:
    """Delivers the contracts of one pool at a time (`run`)."""

    def __init__(
        self,
        api: cluster.Cluster,
        *,
        clock: Callable[[], float],
        not_ready_after_s: int,
        tenancy: Tenancy | None,
        announce: Announce,
        logger: logging.Logger | logging.LoggerAdapter[Any],
        checked: MutableMapping[str, int] | None = None,
    ) -> None:
        self._api = api
        self._clock = clock
        self._not_ready_after_s = not_ready_after_s
        self._tenancy = tenancy
        self._announce = announce
        self._logger = logger
        # When each contract's namespace was last made whole (`Tenancy.ensure`), kept by the
        # caller across passes; an operator that starts knows none, so it checks them all.
        self._checked = {} if checked is None else checked

    def run(self, pool: resources.Pool) -> dict[str, resources.Phase]:
        """One pass over `pool`: every contract booked in it brought as far as it can go now;
        the phase each is left in."""
        bodies = self._api.contracts()
        held = {_name(body): _listed_nodes(body) for body in bodies}
        found = {_name(node): node for node in self._api.nodes(pool.node_selector)}
        ours = [body for body in bodies if _status(body).get("pool") == pool.name]
        for name in sorted({n for body in ours for n in _listed_nodes(body)} - set(found)):
            node = self._api.node(name)  # listed, but the pool's selector no longer finds it
            if node is not None:
                found[name] = node
        listed = dict(self._tenancy.listed()) if self._tenancy is not None else {}
        state = _Pass(pool, found, held, listed)
        self._release_orphans(state)
        phases = {}
        for body in sorted(ours, key=_start_then_name):
            try:
                phase = self._deliver(state, body)
            except (core_errors.InputError, errors.OperatorError) as exc:
                self._announce(body, "Warning", EVENT_FAILED_ACTION, str(exc))
                self._logger.warning("contract %s: %s", _name(body), exc)
                continue
            if phase is not None:
                phases[_name(body)] = phase
        self._remove_namespaces(state)
        return phases

    def _release_orphans(self, state: _Pass) -> None:
        """Release the nodes whose marks name only contracts that no longer exist (deleted
        with their nodes still held)."""
        for name, facts in sorted(state.bare.items()):
            marks = claims.names_on(facts)
            if marks and not marks & state.existing:
                self._logger.info("node %s: released from deleted %s", name, sorted(marks))
                self._write_node(state, actions.Release(name), next(iter(sorted(marks))))

    def _remove_namespaces(self, state: _Pass) -> None:
        if self._tenancy is None:
            return
        for namespace, contract_name in sorted(state.namespaces.items()):
            if contract_name not in state.existing:
                self._tenancy.remove(contract_name)
                del state.namespaces[namespace]
                self._checked.pop(contract_name, None)

    def _deliver(self, state: _Pass, body: dict[str, Any]) -> resources.Phase | None:
        """Plan and carry out until the plan asks for nothing (or `MAX_ROUNDS`); the phase
        left, None for a contract this pass has nothing to do with."""
        name = _name(body)
        phase = _status(body).get("phase")
        if phase is None:
            return None  # not booked yet: the booking handler decides it first
        try:
            current = resources.Phase(phase)
        except ValueError as exc:
            raise errors.OperatorError(f"status.phase: {phase!r} is not a phase") from exc
        if current not in booking.LIVE and not _holds_anything(state, body):
            return current
        status = _planner_status(body)
        assert status is not None  # it has a phase
        contract = delivery.Contract(
            name, resources.terms_from_body(body), state.pool, resources.cancelled_at_s(body)
        )
        for _ in range(MAX_ROUNDS):
            plan = self._plan(state, contract, status)
            try:
                self._keep_namespace(state, contract, plan)
                intervals = self._carry_out(state, body, plan, status)
            except errors.StaleObjectError as exc:
                self._logger.info("contract %s: %s; planning again", name, exc)
                self._reread_nodes(state, plan)
                continue
            body = self._write_status(body, contract, plan, intervals)
            status = _planner_status(body) or status
            state.hold(name, plan.nodes)
            if not plan.actions:
                break
        return status.phase

    def _plan(
        self, state: _Pass, contract: delivery.Contract, status: delivery.Status
    ) -> delivery.Plan:
        """The plan on the pass's nodes, with the pods of the nodes the contract is draining."""
        elsewhere = state.held_elsewhere(contract.name)
        claimant = claims.Claimant(contract.name, frozenset(status.nodes), frozenset(elsewhere))
        facts = []
        for name, bare in state.bare.items():
            if claimant.is_ours(bare) and not claimant.handed_over(bare):
                facts.append(nodes.facts(state.nodes[name], self._api.pods_on(name)))
            else:
                facts.append(bare)
        return delivery.plan(
            contract,
            status,
            facts,
            held_elsewhere=elsewhere,
            now_s=int(self._clock()),
            not_ready_after_s=self._not_ready_after_s,
        )

    def _keep_namespace(
        self, state: _Pass, contract: delivery.Contract, plan: delivery.Plan
    ) -> None:
        """The buyer's namespace exists, whole, while the window is open, and not after. It is
        made whole when missing, when this operator has not yet checked it (after a restart:
        a crash may have left it half made), and every `NAMESPACE_CHECK_S` (an object deleted
        in it, a token cut short)."""
        if self._tenancy is None:
            return
        namespace = resources.namespace_name(contract.name)
        now_s = int(self._clock())
        if plan.buyer_namespace:
            checked_s = self._checked.get(contract.name)
            listed = namespace in state.namespaces
            if listed and checked_s is not None and now_s - checked_s < NAMESPACE_CHECK_S:
                return
            window = contract.terms
            try:
                written = self._tenancy.ensure(
                    contract.name, window.buyer or "", window.gpu_count, window.end, now_s
                )
            except errors.NamespaceTerminatingError as exc:
                self._logger.info("contract %s: %s; creating it later", contract.name, exc)
                return  # the nodes go on being prepared meanwhile
            if written:
                self._logger.info(
                    "contract %s: namespace %s: %s", contract.name, namespace, written
                )
            state.namespaces[namespace] = contract.name
            self._checked[contract.name] = now_s
        elif namespace in state.namespaces:
            self._tenancy.remove(contract.name)
            del state.namespaces[namespace]
            self._checked.pop(contract.name, None)

    def _carry_out(
        self, state: _Pass, body: Mapping[str, Any], plan: delivery.Plan, status: delivery.Status
    ) -> list[ledger.Interval]:
        """Carry out the plan's actions in order; the ledger intervals they leave."""
        intervals = [
            ledger.Interval(i.node, i.gpu_uuid, i.start_s, i.end_s) for i in status.intervals
        ]
        for action in plan.actions:
            match action:
                case actions.Cordon() | actions.Handover() | actions.Quarantine():
                    self._write_node(state, action, plan.contract)
                case actions.Release():
                    self._write_node(state, action, plan.contract)
                case actions.Evict(node=node, namespace=namespace, name=pod):
                    if not self._api.evict(namespace, pod):
                        self._logger.info(
                            "contract %s: eviction of %s/%s from node %s refused by its "
                            "disruption budget; asking again later",
                            plan.contract, namespace, pod, node,
                        )  # fmt: skip
                case actions.OpenInterval(node=node, gpu_uuid=gpu, at_s=at_s):
                    intervals.append(ledger.Interval(node, gpu, at_s))
                case actions.CloseInterval(node=node, gpu_uuid=gpu, start_s=start_s, at_s=at_s):
                    intervals = [
                        ledger.Interval(node, gpu, start_s, at_s)
                        if (i.node, i.gpu_uuid, i.start_s, i.end_s) == (node, gpu, start_s, None)
                        else i
                        for i in intervals
                    ]
                case actions.WarnBuyer(end_s=end_s):
                    self._warn_buyer(body, plan.contract, end_s)
        return sorted(intervals)

    def _write_node(self, state: _Pass, action: actions.Action, contract: str) -> None:
        node = getattr(action, "node")  # noqa: B009  (every node action names its node)
        patch = nodes.patch(action, contract, state.nodes[node])
        state.put_node(node, self._api.patch_node(node, patch))
        self._logger.info("contract %s: node %s: %s", contract, node, type(action).__name__)

    def _reread_nodes(self, state: _Pass, plan: delivery.Plan) -> None:
        """Read again the nodes a plan meant to write (one changed under it)."""
        touched = {str(a.node) for a in plan.actions if not isinstance(a, _LEDGER_ACTIONS)}
        for name in sorted(touched):
            state.put_node(name, self._api.node(name))

    def _warn_buyer(self, body: Mapping[str, Any], contract: str, end_s: int) -> None:
        """The end-of-window warning: an Event on the contract, an annotation on each pod."""
        end = timefmt.format_utc(end_s)
        self._announce(body, "Warning", EVENT_WINDOW_ENDING, f"the window ends at {end}")
        namespace = resources.namespace_name(contract)
        for pod in self._api.pods_in(namespace):
            self._api.annotate_pod(namespace, _name(pod), {ANNOTATION_WINDOW_ENDS: end})

    def _write_status(
        self,
        body: dict[str, Any],
        contract: delivery.Contract,
        plan: delivery.Plan,
        intervals: Sequence[ledger.Interval],
    ) -> dict[str, Any]:
        """Write the plan's status when it differs from the one written (status last); the
        contract as it now is."""
        now_s = int(self._clock())
        current = _status(body)
        wanted = _status_document(contract, plan, intervals, now_s)
        if not _worth_writing(current, wanted):
            return body
        phase_changed = current.get("phase") != plan.phase.value
        if phase_changed:
            transition = {"phase": plan.phase.value, "at": timefmt.format_utc(now_s)}
            transition["reason"] = plan.reason
            kept = list(current.get("transitions") or [])[-(MAX_TRANSITIONS - 1) :]
            wanted["transitions"] = [*kept, transition]
        written = self._api.patch_contract_status(contract.name, wanted)
        if phase_changed:
            kind = "Warning" if plan.phase in _WARNING_PHASES else "Normal"
            self._announce(written, kind, plan.phase.value, plan.reason)
            self._logger.info("contract %s: %s: %s", contract.name, plan.phase, plan.reason)
        return written


def _status_document(
    contract: delivery.Contract,
    plan: delivery.Plan,
    intervals: Sequence[ledger.Interval],
    now_s: int,
) -> dict[str, Any]:
    """The status fields a plan sets (a merge patch: None removes a field)."""
    window = contract.terms
    serving = [interval for interval in intervals if interval.end_s is None]
    delivered = sum(
        max(0, min(now_s if i.end_s is None else i.end_s, window.end) - i.start_s)
        for i in intervals
    )
    document: dict[str, Any] = {
        "phase": plan.phase.value,
        "reason": plan.reason,
        "nodes": list(plan.nodes),
        "gpus": [{"node": i.node, "uuid": i.gpu_uuid} for i in serving],
        "deliveredGpuSeconds": delivered or None,
        "drainStarted": [
            {"node": node, "at": timefmt.format_utc(at_s)}
            for node, at_s in sorted(plan.drain_started_s.items())
        ],
        "buyerWarnedAt": None
        if plan.buyer_warned_s is None
        else timefmt.format_utc(plan.buyer_warned_s),
        "namespace": resources.namespace_name(contract.name) if plan.buyer_namespace else None,
        "ledger": {"intervals": ledger.to_status(intervals) or None},
    }
    # An empty list is written as no field at all (a merge patch's None removes it): the
    # status of a contract that holds nothing stays as booking left it.
    return {key: value if value != [] else None for key, value in document.items()}


def _worth_writing(current: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Whether `wanted` changes anything but deliveredGpuSeconds, or that by a minute."""
    for key, value in wanted.items():
        if key == "deliveredGpuSeconds":
            continue
        if key == "ledger":
            if (current.get("ledger") or {}).get("intervals") != value["intervals"]:
                return True
        elif current.get(key) != value:
            return True
    grown = int(wanted["deliveredGpuSeconds"] or 0) - int(current.get("deliveredGpuSeconds") or 0)
    return grown >= DELIVERED_REFRESH_S * max(1, len(wanted["gpus"] or ()))


def _holds_anything(state: _Pass, body: Mapping[str, Any]) -> bool:
    """Whether an over contract still has something to give back: nodes its status lists
    or that bear its name, open ledger intervals, or its buyer's namespace."""
    name = _name(body)
    if _listed_nodes(body) or name in state.marked:
        return True
    if resources.namespace_name(name) in state.namespaces:
        return True
    intervals = (_status(body).get("ledger") or {}).get("intervals") or []
    return any(item.get("end") is None for item in intervals if isinstance(item, dict))


def _planner_status(body: Mapping[str, Any]) -> delivery.Status | None:
    """The planner's view of a contract's status; None before it is booked or rejected."""
    status = _status(body)
    phase = status.get("phase")
    if phase is None:
        return None
    drains = status.get("drainStarted") or []
    warned = status.get("buyerWarnedAt")
    return delivery.Status(
        phase=resources.Phase(phase),
        reason=str(status.get("reason") or ""),
        nodes=_listed_nodes(body),
        drain_started_s={
            str(item.get("node")): timefmt.parse_utc(item.get("at"), field="status.drainStarted")
            for item in drains
        },
        buyer_warned_s=None
        if warned is None
        else timefmt.parse_utc(warned, field="status.buyerWarnedAt"),
        intervals=ledger.from_status((status.get("ledger") or {}).get("intervals") or []),
    )


def _status(body: Mapping[str, Any]) -> Mapping[str, Any]:
    return body.get("status") or {}


def _name(body: Mapping[str, Any]) -> str:
    return str((body.get("metadata") or {}).get("name"))


def _listed_nodes(body: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(str(node) for node in _status(body).get("nodes") or ())


def _start_then_name(body: Mapping[str, Any]) -> tuple[str, str]:
    return str((body.get("spec") or {}).get("start")), _name(body)
