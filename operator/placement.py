"""Which nodes serve a contract: whole nodes, kept close together on the network.

A multi-node job runs at the speed of the links between its nodes, so a contract's nodes
should share one network block (label `gpudelivery.io/network-block`: a leaf switch, an
InfiniBand or NVLink island) and, failing that, one zone (`topology.kubernetes.io/zone`).
`place` chooses the nodes of one contract by these rules, in order:

1. all in one block, if any block has enough free nodes: the block with the *fewest* free
   nodes that still fits (best fit), which keeps big blocks whole for big contracts;
2. else all in one zone, in as few blocks as possible: the fullest blocks whole and the rest
   from the smallest block that still covers it (no fewer blocks can cover the need, and the
   partly used block is the smallest that can be). Among the zones that can hold them, the
   one needing fewest blocks, then the one with fewest free nodes (best fit again);
3. else as few zones as possible, chosen by the same rule (fullest zones whole, the rest from
   the smallest zone covering it), then as few blocks of those zones as possible, as in 2.

`place_all` places contracts that start together jointly: it first maximises the number of
multi-node contracts that go whole into one block (an exact search, below), then places the
rest one by one with `place`, largest first. `substitute` picks a spare for a failed node.

A node without a block label is a block of its own, and a node without a zone label a zone of
its own: nothing is known of its links, so it is never taken to be close to any other node.
Two unlabelled nodes are never "in one block"; a labelled block is one block whatever zones
its nodes report. Within a block, nodes are taken in order of name, so the same input always
gives the same answer.

Everything here is pure: nodes in, node names out. Which nodes are free (not cordoned, not
serving a contract, not held back as spares) is the caller's business.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "EXACT_BLOCKS",
    "EXACT_CONTRACTS",
    "SEARCH_STEPS",
    "Node",
    "could_be_in_one_block",
    "in_one_block",
    "place",
    "place_all",
    "substitute",
]

# Up to this many multi-node contracts and blocks that can take one, `place_all` searches
# exhaustively with no limit, so it is exact there (the benchmark compares it with an
# exhaustive search on such instances); the hardest of that size a search for them found
# took 0.3 s.
EXACT_CONTRACTS = 12
EXACT_BLOCKS = 8
# Beyond that size the same search stops after this many steps (0.1 to 0.2 s on a 2-core CI
# machine) and keeps the best packing found so far, or best-fit-decreasing's when that is
# better: still exact whenever the search finishes, as it did on nearly every pool of 250
# nodes and 50 contracts we tried, however tightly packed.
SEARCH_STEPS = 20_000


@dataclass(frozen=True, slots=True)
class Node:
    """A free node: its name, network block and zone labels (None when unlabelled)."""

    name: str
    block: str | None
    zone: str | None


# A node's block or zone: (0, label) when labelled, else (1, node name), a singleton.
_Key = tuple[int, str]


def _block_of(node: Node) -> _Key:
    return (1, node.name) if node.block is None else (0, node.block)


def _zone_of(node: Node) -> _Key:
    return (1, node.name) if node.zone is None else (0, node.zone)


def in_one_block(nodes: Sequence[Node]) -> bool:
    """True when `nodes` all share one network block (a lone node always does)."""
    return len({_block_of(node) for node in nodes}) <= 1


def could_be_in_one_block(need: int, free: Sequence[Node]) -> bool:
    """True when some block has `need` free nodes."""
    _check_need(need)
    blocks = _group(_unique(free), _block_of)
    return any(len(nodes) >= need for nodes in blocks.values())


def place(need: int, free: Sequence[Node]) -> tuple[str, ...] | None:
    """The names of `need` nodes of `free` for one contract, by the module's rules; None
    when fewer than `need` are free."""
    _check_need(need)
    nodes = _unique(free)
    return _names(_choose(need, nodes)) if len(nodes) >= need else None


def place_all(
    requests: Sequence[tuple[str, int]], free: Sequence[Node]
) -> dict[str, tuple[str, ...]]:
    """Nodes for contracts that start together, as {contract id: node names}.

    Contracts are admitted in the order given while enough free nodes remain (a contract too
    big for what is left is passed over and left out of the result, for the caller to
    report; a later, smaller one may still be admitted). Of the admitted ones, as many
    multi-node contracts as possible go whole into one block each; the others are placed
    by `place`'s rules on the nodes left, largest first. The result is in request order.
    """
    ids = [contract_id for contract_id, _ in requests]
    if len(set(ids)) != len(ids):
        raise ValueError("each contract may be requested only once")
    for _, need in requests:
        _check_need(need)
    nodes = _unique(free)
    admitted: list[tuple[int, int]] = []
    room = len(nodes)
    for index, (_, need) in enumerate(requests):
        if need <= room:
            admitted.append((need, index))
            room -= need
    chosen = _fill_blocks(admitted, nodes)
    taken = {name for names in chosen.values() for name in names}
    for need, index in sorted(admitted, key=_biggest_first):
        if index not in chosen:
            chosen[index] = _names(_choose(need, [n for n in nodes if n.name not in taken]))
            taken.update(chosen[index])
    return {requests[index][0]: chosen[index] for index in sorted(chosen)}


def substitute(failed: Node, assigned: Sequence[Node], spares: Sequence[Node]) -> str | None:
    """The spare to replace `failed`, a node of `assigned` (the contract's nodes): one in the
    failed node's block if any, else in its zone, else any; within each, one in a block
    already serving the contract first, then by name. None when no spare is left."""
    serving = {node.name for node in assigned} | {failed.name}
    blocks = {_block_of(node) for node in assigned if node.name != failed.name}

    def preference(spare: Node) -> tuple[int, bool, str]:
        if failed.block is not None and spare.block == failed.block:
            level = 0
        elif failed.zone is not None and spare.zone == failed.zone:
            level = 1
        else:
            level = 2
        return level, _block_of(spare) not in blocks, spare.name

    candidates = [spare for spare in spares if spare.name not in serving]
    return min(candidates, key=preference).name if candidates else None


def _choose(need: int, nodes: list[Node]) -> list[Node]:
    """`place`'s rules, for `nodes` sorted by name and at least `need` of them."""
    fitting = [group for group in _group(nodes, _block_of).values() if len(group) >= need]
    if fitting:
        return min(fitting, key=_size_then_name)[:need]
    zones = list(_group(nodes, _zone_of).values())
    options = []
    for zone in zones:
        if len(zone) >= need:
            cover = _cover(need, list(_group(zone, _block_of).values()))
            options.append((len(cover), len(zone), zone[0].name, cover))
    if options:
        return _take(need, min(options, key=lambda option: option[:3])[3])
    pooled = sorted((node for zone in _cover(need, zones) for node in zone), key=_by_name)
    return _take(need, _cover(need, list(_group(pooled, _block_of).values())))


def _fill_blocks(admitted: list[tuple[int, int]], nodes: list[Node]) -> dict[int, tuple[str, ...]]:
    """Nodes for the most multi-node contracts of `admitted` ((need, request index)) whole in
    one block each, as {request index: names}: within a block, the biggest contract first
    takes the first nodes by name."""
    blocks = [
        block for key, block in _group(nodes, _block_of).items() if key[0] == 0 and len(block) >= 2
    ]
    whole = _whole(sorted(item for item in admitted if item[0] >= 2), [len(b) for b in blocks])
    chosen: dict[int, tuple[str, ...]] = {}
    for where, block in enumerate(blocks):
        at = 0
        for need, index in sorted(
            (item for item, b in whole.items() if b == where), key=_biggest_first
        ):
            chosen[index] = _names(block[at : at + need])
            at += need
    return chosen


class _OutOfSteps(Exception):
    """The search used up its steps."""


def _whole(multi: list[tuple[int, int]], sizes: list[int]) -> dict[tuple[int, int], int]:
    """The most of `multi` ((need, index) sorted by need) that go whole into blocks of
    `sizes` free nodes, as {item: block position}.

    If some k contracts fit whole, the k smallest do too (give each block the smaller ones
    in place of the bigger ones), so the best k is found by adding contracts smallest first
    while the smallest k still fit: each into the block with least room that takes it (best
    fit, which keeps big blocks whole), and when none takes it, by searching every packing
    of the k smallest anew. Fitting is monotone in k, so the first k that fails ends it.
    """
    if not multi or not sizes:
        return {}
    limit = None if len(multi) <= EXACT_CONTRACTS and len(sizes) <= EXACT_BLOCKS else SEARCH_STEPS
    steps = [limit]
    packed: dict[tuple[int, int], int] = {}
    room = list(sizes)
    for count, item in enumerate(multi, start=1):
        fits = [b for b in range(len(room)) if room[b] >= item[0]]
        if fits:
            b = min(fits, key=lambda b: (room[b], b))
            packed[item] = b
            room[b] -= item[0]
            continue
        smallest = sorted(multi[:count], key=_biggest_first)
        try:
            found = _fit([need for need, _ in smallest], sizes, steps)
        except _OutOfSteps:
            greedy = _best_fit_decreasing(multi, sizes)
            return greedy if len(greedy) > len(packed) else packed
        if found is None:
            break
        packed = dict(zip(smallest, found, strict=True))
        room = list(sizes)
        for (need, _), b in packed.items():
            room[b] -= need
    return packed


def _fit(needs: list[int], sizes: list[int], steps: list[int | None]) -> list[int] | None:
    """Block positions for `needs` (in decreasing order) so that no block of `sizes` gets
    more than its size, or None if there are none: a depth-first search trying blocks with
    least room first, skipping blocks with the same room as one tried (they lead to the same
    packings) and states already known to fail, and pruning when the room left in blocks that
    can still take a contract is less than the needs left. Each state counts one step."""
    room = list(sizes)
    where = [0] * len(needs)
    left = [sum(needs[i:]) for i in range(len(needs) + 1)]
    failed: set[tuple[int, tuple[int, ...]]] = set()
    # Per depth: the state and the blocks still to try there, the next one last.
    trail: list[tuple[tuple[int, ...], list[int]]] = []
    depth = 0
    while depth < len(needs):
        if steps[0] is not None:
            if steps[0] == 0:
                raise _OutOfSteps
            steps[0] -= 1
        state = tuple(sorted(room))
        tries: list[int] = []
        usable = sum(r for r in room if r >= needs[-1])
        if (depth, state) not in failed and usable >= left[depth]:
            seen: set[int] = set()
            for b in sorted(range(len(room)), key=lambda b: (room[b], b)):
                if room[b] >= needs[depth] and room[b] not in seen:
                    seen.add(room[b])
                    tries.append(b)
            tries.reverse()
        trail.append((state, tries))
        while not trail[-1][1]:
            failed.add((depth, trail.pop()[0]))
            if not trail:
                return None
            depth -= 1
            room[where[depth]] += needs[depth]
        where[depth] = trail[-1][1].pop()
        room[where[depth]] -= needs[depth]
        depth += 1
    return where


def _best_fit_decreasing(
    multi: list[tuple[int, int]], sizes: list[int]
) -> dict[tuple[int, int], int]:
    """Biggest contracts first, each whole into the block with least room that takes it."""
    packed: dict[tuple[int, int], int] = {}
    room = list(sizes)
    for item in sorted(multi, key=_biggest_first):
        fits = [b for b in range(len(room)) if room[b] >= item[0]]
        if fits:
            b = min(fits, key=lambda b: (room[b], b))
            packed[item] = b
            room[b] -= item[0]
    return packed


def _cover(need: int, groups: list[list[Node]]) -> list[list[Node]]:
    """The fewest of `groups` (at least `need` nodes in all) to draw `need` nodes from: the
    fullest whole, the last the smallest covering what is left. Taken in that order."""
    by_size = sorted(groups, key=lambda group: (-len(group), group[0].name))
    whole: list[list[Node]] = []
    count = 0
    for group in by_size:
        if count + len(group) >= need:
            break
        whole.append(group)
        count += len(group)
    rest = [group for group in by_size[len(whole) :] if len(group) >= need - count]
    return [*whole, min(rest, key=_size_then_name)]


def _take(need: int, groups: list[list[Node]]) -> list[Node]:
    return [node for group in groups for node in group][:need]


def _group(nodes: list[Node], key: Callable[[Node], _Key]) -> dict[_Key, list[Node]]:
    groups: dict[_Key, list[Node]] = {}
    for node in nodes:
        groups.setdefault(key(node), []).append(node)
    return groups


def _unique(nodes: Sequence[Node]) -> list[Node]:
    """`nodes` sorted by name, refusing a name given twice."""
    ordered = sorted(nodes, key=_by_name)
    for before, after in itertools.pairwise(ordered):
        if before.name == after.name:
            raise ValueError(f"node {before.name} is given twice")
    return ordered


def _biggest_first(item: tuple[int, int]) -> tuple[int, int]:
    """Order (need, request index) pairs by need, biggest first, then in request order."""
    return -item[0], item[1]


def _by_name(node: Node) -> str:
    return node.name


def _size_then_name(group: list[Node]) -> tuple[int, str]:
    return len(group), group[0].name


def _names(nodes: Sequence[Node]) -> tuple[str, ...]:
    return tuple(node.name for node in nodes)


def _check_need(need: int) -> None:
    if need < 1:
        raise ValueError(f"need must be positive, got {need}")
