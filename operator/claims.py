"""Which nodes a contract holds, which are free, and which it should hold next.

A node is a contract's when the contract's status lists it or the node carries the
contract's resource name in its claim annotation (`ANNOTATION_CLAIMED_BY`, set with the
cordon), its label or its taint; unless another contract's name is on it, or another
contract lists it and this one's name is not on it. The operator writes marks on a node
before the status that lists it (status last), so a crash between the two leaves marks that
say whose the node is. A node is free when it carries no mark and no cordon, no other
contract lists it, it is Ready, not quarantined and its GPUs are not reported unhealthy: a
node taken from the free ones is never another contract's, and a node an administrator
cordoned is never taken.

`choose` keeps a contract at its whole nodes: it drops failed nodes (issue 5: GPUs
unhealthy, NotReady for over a minute, or quarantined) and any beyond the need (after a
crash), replaces failed and slow-draining nodes by free ones close to them
(`placement.substitute`), and fills what is missing by `placement.place`.

Everything here is pure: node facts in, node names out. The Kubernetes side of a node
(reading the facts, writing the marks) is the adapter's.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from gpudelivery.operator import placement, resources

__all__ = [
    "ANNOTATION_CLAIMED_BY",
    "NOT_READY_AFTER_S",
    "Choice",
    "Claimant",
    "NodeFacts",
    "Pod",
    "choose",
    "deliverable",
    "failed",
    "index",
    "names_on",
]

# The node annotation naming the contract that cordoned a node (its resource name): how a
# cordon a crash left behind is told from an administrator's, which the operator never lifts.
ANNOTATION_CLAIMED_BY = "gpudelivery.io/claimed-by"
# Issue 5 replaces a node NotReady "for over 60 s": long enough to wait out a kubelet restart.
NOT_READY_AFTER_S = 60


@dataclass(frozen=True, slots=True)
class Pod:
    """A pod on a node. DaemonSet and mirror (static) pods `stay`, as `kubectl drain`
    leaves them; a `terminating` pod has been asked to go and is waited for."""

    namespace: str
    name: str
    stays: bool = False
    terminating: bool = False


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """What the planner needs of a node: its placement labels, its Ready condition (and when
    that last changed), its `GPUHealthy` condition (None when absent or Unknown), whether it
    is cordoned or quarantined, the contract names in its claim annotation, label and taint,
    its GPUs' UUIDs and its pods."""

    name: str
    block: str | None
    zone: str | None
    ready: bool
    ready_since_s: int
    gpu_healthy: bool | None
    unschedulable: bool
    quarantined: bool
    claimed_by: str | None
    contract_label: str | None
    contract_taint: str | None
    gpu_uuids: tuple[str, ...]
    pods: tuple[Pod, ...] = ()


def index(nodes: Sequence[NodeFacts]) -> dict[str, NodeFacts]:
    """`nodes` by name, in order of name; a name given twice is refused."""
    facts: dict[str, NodeFacts] = {}
    for node in sorted(nodes, key=lambda node: node.name):
        if node.name in facts:
            raise ValueError(f"node {node.name} is given twice")
        facts[node.name] = node
    return facts


_UNMARKED = (None, None, None)
_NO_NAMES: frozenset[str] = frozenset()


def names_on(node: NodeFacts) -> frozenset[str]:
    """The contract names a node's claim annotation, label and taint carry."""
    marks = (node.claimed_by, node.contract_label, node.contract_taint)
    if marks == _UNMARKED:
        return _NO_NAMES  # most nodes: asked for every node of a pool by every plan
    return frozenset(mark for mark in marks if mark is not None)


def failed(node: NodeFacts, *, now_s: int, not_ready_after_s: int) -> bool:
    """Issue 5's substitution rule: GPUs unhealthy, NotReady too long, or in quarantine."""
    not_ready_too_long = not node.ready and now_s - node.ready_since_s > not_ready_after_s
    return node.gpu_healthy is False or not_ready_too_long or node.quarantined


def deliverable(node: NodeFacts) -> bool:
    """Ready, with its GPUs known and reported healthy: fit to hand over once drained."""
    return node.ready and node.gpu_healthy is True and bool(node.gpu_uuids)


@dataclass(frozen=True)
class Claimant:
    """Contract `contract` (its resource name), the nodes its status lists, and the nodes
    other contracts' statuses list."""

    contract: str
    listed: frozenset[str]
    held_elsewhere: frozenset[str]

    def is_ours(self, node: NodeFacts) -> bool:
        """The contract holds `node` (the module docstring's rule)."""
        names = names_on(node)
        if names - {self.contract}:
            return False
        return bool(names) or (node.name in self.listed and node.name not in self.held_elsewhere)

    def bears_only_ours(self, node: NodeFacts) -> bool:
        """The node carries a mark, and every mark names this contract."""
        return names_on(node) == {self.contract}

    def is_free(self, node: NodeFacts) -> bool:
        """Nobody's, and fit to be taken."""
        return (
            node.ready
            and node.gpu_healthy is not False
            and not node.quarantined
            and not node.unschedulable
            and not names_on(node)
            and node.name not in self.held_elsewhere
            and node.name not in self.listed
        )

    def handed_over(self, node: NodeFacts) -> bool:
        return node.contract_label == node.contract_taint == self.contract

    def cordoned(self, node: NodeFacts) -> bool:
        """Cordoned by this contract (an administrator's cordon does not count)."""
        return node.unschedulable and node.claimed_by == self.contract

    def leaving(self, node: NodeFacts) -> list[Pod]:
        """The pods that must leave before `node` is handed over: all but those that stay
        and the buyer's own (found there after a crash mid-handover)."""
        buyers = resources.namespace_name(self.contract)
        pods = (pod for pod in node.pods if not pod.stays and pod.namespace != buyers)
        return sorted(pods, key=lambda pod: (pod.namespace, pod.name))

    def drained(self, node: NodeFacts) -> bool:
        """Cordoned by the contract, and every pod that must leave has left."""
        return self.cordoned(node) and not self.leaving(node)


@dataclass(frozen=True)
class Choice:
    """The nodes to hold (sorted), and those to let go: failed, surplus (beyond the need)
    and swapped (slow to drain, replaced)."""

    held: tuple[str, ...]
    failed: tuple[str, ...]
    surplus: tuple[str, ...]
    swapped: tuple[str, ...]


def choose(
    claimant: Claimant,
    facts: Mapping[str, NodeFacts],
    need: int,
    *,
    is_failed: Callable[[NodeFacts], bool],
    slow: Collection[str],
) -> Choice:
    """The `need` nodes the contract should hold, among `facts` (by name): its own nodes
    unless `is_failed` (kept handed over first, then drained, then listed, then by name),
    with free ones in place of failed ones first (each close to the one it replaces), then
    of the `slow` ones, then for whatever is still missing. Short when too few are free."""
    claimed = [name for name, node in facts.items() if claimant.is_ours(node)]
    broken = [name for name in claimed if is_failed(facts[name])]
    working = sorted((n for n in claimed if n not in broken), key=_keeping(claimant, facts))
    held = working[:need]
    free = [_node(node) for node in facts.values() if claimant.is_free(node)]

    def take(near: str) -> bool:
        pick = placement.substitute(_node(facts[near]), [_node(facts[n]) for n in held], free)
        if pick is not None:
            held.append(pick)
            free[:] = [node for node in free if node.name != pick]
        return pick is not None

    for name in broken:
        if len(held) >= need or not take(name):
            break
    swapped = []
    for name in sorted(set(slow) & set(working[:need])):
        if not take(name):
            break
        held.remove(name)
        swapped.append(name)
    gap = min(need - len(held), len(free))
    if gap > 0 and not held:
        held.extend(placement.place(gap, free) or ())
    elif gap > 0:
        anchor = min(held)
        for _ in range(gap):
            take(anchor)
    return Choice(tuple(sorted(held)), tuple(broken), tuple(working[need:]), tuple(swapped))


def _keeping(
    claimant: Claimant, facts: Mapping[str, NodeFacts]
) -> Callable[[str], tuple[bool, bool, bool, str]]:
    def key(name: str) -> tuple[bool, bool, bool, str]:
        node = facts[name]
        return (
            not claimant.handed_over(node),
            not claimant.drained(node),
            name not in claimant.listed,
            name,
        )

    return key


def _node(node: NodeFacts) -> placement.Node:
    return placement.Node(node.name, node.block, node.zone)
