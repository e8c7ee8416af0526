"""Placement: whole nodes in one block, else one zone, best fit; joint placement as good as an
exhaustive search; spares close to the node they replace."""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gpudelivery.operator import placement
from gpudelivery.operator.placement import Node


def exactly(message: str) -> str:
    """A `match` pattern for `message` and nothing else."""
    return f"^{re.escape(message)}$"


def block(name: str, size: int, zone: str | None) -> list[Node]:
    return [Node(f"{name}{i}", name, zone) for i in range(1, size + 1)]


# Zone z1: blocks a (4 free), b (6), c (3); zone z2: blocks d (5), e (2) and an unlabelled
# node u1; u2 has no label at all.
LAYOUT = [
    *block("a", 4, "z1"),
    *block("b", 6, "z1"),
    *block("c", 3, "z1"),
    *block("d", 5, "z2"),
    *block("e", 2, "z2"),
    Node("u1", None, "z2"),
    Node("u2", None, None),
]


def names(prefix: str, *numbers: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{n}" for n in numbers)


@pytest.mark.parametrize(
    ("need", "chosen"),
    [
        # Unlabelled nodes are singleton blocks: the best fit for one node.
        (1, ("u1",)),
        (2, names("e", 1, 2)),
        (3, names("c", 1, 2, 3)),
        (4, names("a", 1, 2, 3, 4)),
        (5, names("d", 1, 2, 3, 4, 5)),
        (6, names("b", 1, 2, 3, 4, 5, 6)),
    ],
)
def test_a_contract_goes_to_the_smallest_block_that_holds_it(
    need: int, chosen: tuple[str, ...]
) -> None:
    assert placement.place(need, LAYOUT) == chosen


def test_without_a_block_big_enough_it_takes_the_zone_needing_fewest_blocks() -> None:
    # Both zones need two blocks for 7 nodes (b + c, d + e): z2 is the smaller zone.
    assert placement.place(7, LAYOUT) == (*names("d", 1, 2, 3, 4, 5), "e1", "e2")
    # Only z1 holds 9: all of b, and the rest from c, the smallest block covering it.
    assert placement.place(9, LAYOUT) == (*names("b", 1, 2, 3, 4, 5, 6), "c1", "c2", "c3")
    # 8 in z1 takes two blocks (b + c), in z2 (8 nodes) three (d + e + u1).
    assert placement.place(8, LAYOUT) == (*names("b", 1, 2, 3, 4, 5, 6), "c1", "c2")


def test_without_a_zone_big_enough_it_takes_fewest_zones_then_fewest_blocks() -> None:
    # No zone has 14 nodes: all of z1 (13) and the smallest zone left, u2's own.
    assert placement.place(14, LAYOUT) == (
        *names("b", 1, 2, 3, 4, 5, 6),
        *names("a", 1, 2, 3, 4),
        *names("c", 1, 2, 3),
        "u2",
    )
    assert sorted(placement.place(22, LAYOUT) or ()) == sorted(node.name for node in LAYOUT)


def test_place_gives_nothing_when_too_few_nodes_are_free() -> None:
    assert placement.place(23, LAYOUT) is None
    assert placement.place(1, []) is None


def test_place_does_not_depend_on_the_order_nodes_come_in() -> None:
    assert placement.place(4, LAYOUT[::-1]) == names("a", 1, 2, 3, 4)
    assert placement.place(7, LAYOUT[::-1]) == placement.place(7, LAYOUT)


def test_place_refuses_a_non_positive_need_and_a_node_given_twice() -> None:
    with pytest.raises(ValueError, match=exactly("need must be positive, got 0")):
        placement.place(0, LAYOUT)
    with pytest.raises(ValueError, match=exactly("node a1 is given twice")):
        placement.place(1, [*LAYOUT, Node("a1", "b", "z2")])


def test_only_labelled_nodes_share_a_block() -> None:
    # A block is one block even across zones.
    a1, a2, b1 = Node("a1", "a", "z1"), Node("a2", "a", "z2"), Node("b1", "b", "z1")
    u1, u2 = Node("u1", None, "z1"), Node("u2", None, "z1")
    assert placement.in_one_block([a1, a2])
    assert placement.in_one_block([u1])
    assert placement.in_one_block([])
    assert not placement.in_one_block([a1, b1])
    assert not placement.in_one_block([u1, u2])
    assert not placement.in_one_block([a1, u1])
    # An unlabelled node is not in a block labelled with its name.
    assert not placement.in_one_block([Node("n1", "x", None), Node("x", None, None)])


def test_could_be_in_one_block_asks_whether_some_block_has_enough_free_nodes() -> None:
    assert placement.could_be_in_one_block(1, LAYOUT)
    assert placement.could_be_in_one_block(6, LAYOUT)
    assert not placement.could_be_in_one_block(7, LAYOUT)
    assert not placement.could_be_in_one_block(1, [])
    assert not placement.could_be_in_one_block(2, [Node("u1", None, "z"), Node("u2", None, "z")])


def test_joint_placement_keeps_every_contract_whole_where_one_by_one_cannot() -> None:
    free = [*block("p", 5, "z"), *block("q", 5, "z")]
    requests = [("A", 2), ("B", 2), ("C", 3), ("D", 3)]
    # One by one, A and B fill p up to one node, C goes to q, and no block is left for D.
    taken: set[str] = set()
    for _, need in requests[:3]:
        taken.update(placement.place(need, [n for n in free if n.name not in taken]) or ())
    assert taken == {"p1", "p2", "p3", "p4", "q1", "q2", "q3"}
    assert not placement.could_be_in_one_block(3, [n for n in free if n.name not in taken])
    assert placement.place_all(requests, free) == {
        "A": names("p", 4, 5),
        "B": names("q", 4, 5),
        "C": names("p", 1, 2, 3),
        "D": names("q", 1, 2, 3),
    }


def test_joint_placement_finds_the_packing_greedy_rules_miss() -> None:
    # Best fit, smallest first, fills p with A and B and q with C, leaving no room for D;
    # best fit decreasing puts D in p, C in q, A in q and has no room for B. Only 2 + 3 in p
    # and 2 + 4 in q keeps all four whole: the search has to try D in q.
    free = [*block("p", 5, "z"), *block("q", 6, "z")]
    assert placement.place_all([("A", 2), ("B", 2), ("C", 3), ("D", 4)], free) == {
        "A": names("p", 4, 5),
        "B": names("q", 5, 6),
        "C": names("p", 1, 2, 3),
        "D": names("q", 1, 2, 3, 4),
    }


def test_contracts_that_cannot_be_whole_are_split_in_fewest_blocks() -> None:
    free = [*block("p", 3, "z1"), *block("q", 3, "z1"), *block("r", 2, "z2"), Node("u", None, None)]
    assert placement.place_all([("A", 4), ("B", 1), ("C", 2)], free) == {
        "A": (*names("p", 1, 2, 3), "q1"),
        "B": ("u",),
        "C": names("r", 1, 2),
    }


def test_contracts_left_to_split_are_placed_biggest_first() -> None:
    free = [
        Node("p1", "p", "z1"),
        *block("q", 2, "z1"),
        Node("r1", "r", "z2"),
        Node("u1", None, "z2"),
        Node("u2", None, "z2"),
    ]
    # A first would take p1, the first lone node by name, and leave B three blocks of z2.
    assert placement.place_all([("A", 1), ("B", 3)], free) == {
        "A": ("r1",),
        "B": ("q1", "q2", "p1"),
    }


def test_contracts_are_admitted_in_order_while_nodes_remain() -> None:
    free = block("p", 5, "z")
    assert placement.place_all([("A", 3), ("B", 4), ("C", 2)], free) == {
        "A": names("p", 1, 2, 3),
        "C": names("p", 4, 5),
    }
    assert placement.place_all([], free) == {}
    assert placement.place_all([("A", 1)], []) == {}


def test_place_all_refuses_a_contract_requested_twice_or_for_no_nodes() -> None:
    with pytest.raises(ValueError, match=exactly("each contract may be requested only once")):
        placement.place_all([("A", 1), ("A", 2)], LAYOUT)
    with pytest.raises(ValueError, match=exactly("need must be positive, got 0")):
        placement.place_all([("A", 0)], LAYOUT)


def test_out_of_search_steps_it_keeps_the_better_of_its_packing_and_best_fit_decreasing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(placement, "EXACT_CONTRACTS", 0)
    monkeypatch.setattr(placement, "SEARCH_STEPS", 0)
    # Smallest first packs A and B into p, C into q, then must search for D: best fit
    # decreasing (C, D, then A and B in what is left) keeps all four whole.
    free = [*block("p", 5, "z"), *block("q", 5, "z")]
    placed = placement.place_all([("A", 2), ("B", 2), ("C", 3), ("D", 3)], free)
    assert placed == {
        "A": names("p", 4, 5),
        "B": names("q", 4, 5),
        "C": names("p", 1, 2, 3),
        "D": names("q", 1, 2, 3),
    }
    # Here best fit decreasing puts E into p and keeps only three whole: the four smallest,
    # packed before the search ran out, stay.
    unlabelled = [Node(name, None, None) for name in ("u1", "u2", "u3")]
    free = [*block("p", 4, "z"), *block("q", 4, "z"), *unlabelled]
    placed = placement.place_all([("A", 2), ("B", 2), ("C", 2), ("D", 2), ("E", 3)], free)
    assert placed == {
        "A": names("p", 1, 2),
        "B": names("p", 3, 4),
        "C": names("q", 1, 2),
        "D": names("q", 3, 4),
        "E": ("u1", "u2", "u3"),
    }


def test_a_spare_comes_from_the_failed_nodes_block_then_zone_then_anywhere() -> None:
    failed = Node("a1", "a", "z1")
    assigned = [failed, Node("a2", "a", "z1")]
    same_block, same_zone, elsewhere = (
        Node("a9", "a", "z1"),
        Node("b9", "b", "z1"),
        Node("d9", "d", "z2"),
    )
    assert placement.substitute(failed, assigned, [elsewhere, same_zone, same_block]) == "a9"
    assert placement.substitute(failed, assigned, [elsewhere, same_zone]) == "b9"
    assert placement.substitute(failed, assigned, [elsewhere]) == "d9"
    assert placement.substitute(failed, assigned, []) is None


def test_a_spare_already_serving_the_contract_is_not_chosen() -> None:
    failed = Node("a1", "a", "z1")
    assigned = [failed, Node("a2", "a", "z1")]
    assert placement.substitute(failed, assigned, [Node("a2", "a", "z1")]) is None
    assert placement.substitute(failed, assigned, [failed, Node("x", None, None)]) == "x"


def test_among_equals_a_spare_in_a_block_already_serving_the_contract_comes_first() -> None:
    failed = Node("a1", "a", "z1")
    assigned = [failed, Node("c1", "c", "z1")]
    spares = [Node("b9", "b", "z1"), Node("c9", "c", "z1")]
    assert placement.substitute(failed, assigned, spares) == "c9"
    assert placement.substitute(failed, [failed], spares) == "b9"


def test_an_unlabelled_failed_node_has_no_block_or_zone_to_prefer() -> None:
    failed = Node("u1", None, None)
    # b9, unlabelled too, shares neither block nor zone with it: the first by name wins.
    spares = [Node("b9", None, None), Node("a9", "a", None)]
    assert placement.substitute(failed, [failed], spares) == "a9"


# Small random pools: at most 12 free nodes in blocks b0..b3 (each in one zone of z0..z2, or
# unlabelled) and unlabelled nodes, and at most 6 contracts: cheap to search exhaustively.
BLOCKS = ["b0", "b1", "b2", "b3"]
zones = st.sampled_from(["z0", "z1", "z2", None])


@st.composite
def pools(draw: st.DrawFn) -> list[Node]:
    # Block sizes are drawn, not labels node by node: few, well-filled blocks are the
    # instances where packing them well is hard.
    labels: list[str | None] = []
    for label in BLOCKS:
        labels += [label] * draw(st.integers(min_value=0, max_value=min(6, 12 - len(labels))))
    labels += [None] * draw(st.integers(min_value=0, max_value=min(3, 12 - len(labels))))
    zone_of = {label: draw(zones) for label in BLOCKS}
    # Names in another order than blocks, so that taking nodes by name is exercised.
    numbers = draw(st.permutations(range(len(labels))))
    nodes = [
        Node(f"n{number:02}", label, draw(zones) if label is None else zone_of[label])
        for number, label in zip(numbers, labels, strict=True)
    ]
    return draw(st.permutations(nodes))


requests = st.lists(st.integers(min_value=1, max_value=5), max_size=6).map(
    lambda needs: [(f"C{i}", need) for i, need in enumerate(needs)]
)


def block_of(node: Node) -> object:
    return ("block", node.block) if node.block is not None else ("node", node.name)


def zone_of(node: Node) -> object:
    return ("zone", node.zone) if node.zone is not None else ("node", node.name)


def fewest(need: int, sizes: Sequence[int]) -> int | None:
    """The fewest of `sizes` adding up to `need` or more, by trying every subset."""
    for count in range(1, len(sizes) + 1):
        if any(sum(chosen) >= need for chosen in itertools.combinations(sizes, count)):
            return count
    return None


@given(st.integers(min_value=1, max_value=13), pools())
def test_place_follows_block_then_zone_then_fewest_zones(need: int, free: list[Node]) -> None:
    chosen = placement.place(need, free)
    if len(free) < need:
        assert chosen is None
        return
    assert chosen is not None
    assert len(set(chosen)) == need
    by_name = {node.name: node for node in free}
    nodes = [by_name[name] for name in chosen]
    blocks = Counter(block_of(node) for node in free)
    zone_counts = Counter(zone_of(node) for node in free)
    if placement.could_be_in_one_block(need, free):
        assert placement.in_one_block(nodes)
        assert blocks[block_of(nodes[0])] == min(size for size in blocks.values() if size >= need)
        return
    assert not any(size >= need for size in blocks.values())
    zones_with_room = [zone for zone, size in zone_counts.items() if size >= need]
    if zones_with_room:
        assert len({zone_of(node) for node in nodes}) == 1
        fewest_blocks = min(
            fewest(need, list(Counter(block_of(n) for n in free if zone_of(n) == zone).values()))
            or len(free)
            for zone in zones_with_room
        )
        assert len({block_of(node) for node in nodes}) == fewest_blocks
    else:
        assert len({zone_of(node) for node in nodes}) == fewest(need, list(zone_counts.values()))


def most_whole(admitted: list[tuple[str, int]], free: list[Node]) -> int:
    """Exhaustive search: every multi-node contract either whole in a block or split; the
    most contracts whole in any assignment that no block overfills."""
    room = Counter(node.block for node in free if node.block is not None)
    multi = [need for _, need in admitted if need >= 2]
    best = 0
    for where in itertools.product([None, *room], repeat=len(multi)):
        load = Counter[str | None]()
        for need, block in zip(multi, where, strict=True):
            load[block] += need
        if all(load[block] <= room[block] for block in room):
            best = max(best, sum(block is not None for block in where))
    return best


def admitted_of(asked: list[tuple[str, int]], free: list[Node]) -> list[tuple[str, int]]:
    admitted, room = [], len(free)
    for contract_id, need in asked:
        if need <= room:
            admitted.append((contract_id, need))
            room -= need
    return admitted


@given(requests, pools())
# Best fit, smallest first or biggest first, keeps two whole here; C2 in s and C0 and C1 in r
# keep three (C4 is not admitted: no node is left for it).
@example(
    [("C0", 2), ("C1", 2), ("C2", 3), ("C3", 3), ("C4", 1)],
    [
        Node("n00", "p", "z0"),
        Node("n01", "q", "z0"),
        *(Node(f"n0{i}", "r", "z0") for i in range(2, 6)),
        *(Node(f"n0{i}", "s", "z1") for i in range(6, 9)),
        Node("n09", None, None),
    ],
)
def test_place_all_keeps_as_many_whole_as_an_exhaustive_search(
    asked: list[tuple[str, int]], free: list[Node]
) -> None:
    placed = placement.place_all(asked, free)
    admitted = admitted_of(asked, free)
    assert sorted(placed) == sorted(contract_id for contract_id, _ in admitted)
    if sum(need for _, need in asked) <= len(free):
        assert len(placed) == len(asked)
    for contract_id, need in admitted:
        assert len(placed[contract_id]) == need
    every = [name for chosen in placed.values() for name in chosen]
    assert len(every) == len(set(every))
    by_name = {node.name: node for node in free}
    assert set(every) <= set(by_name)
    whole = sum(
        placement.in_one_block([by_name[name] for name in placed[contract_id]])
        for contract_id, need in admitted
        if need >= 2
    )
    assert whole == most_whole(admitted, free)
    assert placement.place_all(asked, free[::-1]) == placed


@given(pools(), pools())
def test_substitute_prefers_block_then_zone_then_anything(
    assigned: list[Node], spares: list[Node]
) -> None:
    if not assigned:
        return
    failed = assigned[0]
    spares = [Node(f"s{node.name}", node.block, node.zone) for node in spares]
    chosen = placement.substitute(failed, assigned, spares)
    if not spares:
        assert chosen is None
        return
    spare = next(node for node in spares if node.name == chosen)

    def level(node: Node) -> int:
        if failed.block is not None and node.block == failed.block:
            return 0
        return 1 if failed.zone is not None and node.zone == failed.zone else 2

    assert level(spare) == min(level(node) for node in spares)


@st.composite
def packable(draw: st.DrawFn) -> tuple[list[tuple[str, int]], list[Node]]:
    """Blocks cut into contracts (so a placement keeping every contract whole exists), the
    contracts shuffled: the instances where best-fit rules most often miss."""
    labels: list[str] = []
    needs: list[int] = []
    for label in BLOCKS:
        size = draw(st.integers(min_value=0, max_value=6))
        labels += [label] * size
        while size >= 2:
            needs.append(draw(st.integers(min_value=2, max_value=min(size, 5))))
            size -= needs[-1]
    numbers = draw(st.permutations(range(len(labels))))
    free = [
        Node(f"n{number:02}", label, "z0") for number, label in zip(numbers, labels, strict=True)
    ]
    needs = draw(st.permutations(needs))[:6]
    return [(f"C{i}", need) for i, need in enumerate(needs)], free


@given(packable())
def test_place_all_keeps_every_contract_whole_when_a_packing_allows_it(
    instance: tuple[list[tuple[str, int]], list[Node]],
) -> None:
    asked, free = instance
    placed = placement.place_all(asked, free)
    by_name = {node.name: node for node in free}
    assert sorted(placed) == sorted(contract_id for contract_id, _ in asked)
    for contract_id, need in asked:
        assert len(placed[contract_id]) == need
        assert placement.in_one_block([by_name[name] for name in placed[contract_id]])
