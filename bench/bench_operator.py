"""Benchmark: the delivery operator (issue 5): placement quality, and delivery at scale.

The issue's benchmark: 5,000 nodes in 20 pools, 1,000 contracts whose windows start in the
same minute: the time from the start to every contract Delivering against the emulator, the
API calls per contract, and placement quality.

Placement quality: the share of multi-node contracts placed in one network block where one
could hold them, a pure function (`placement.place_all`). Small instances (<= 6 contracts,
<= 4 blocks, <= 12 nodes, seeded): the operator's joint placement against an exhaustive
search over every assignment of each multi-node contract to a block or to "split" (goal:
equal on every instance). The full size (20 pools of 250 nodes in blocks of 8 to 32, 50
contracts a pool starting together, sized so they fill 80 to 100 % of the pool): the share
kept in one block, against the upper bound of contracts that some block could hold alone,
and the placement time per pool.

Delivery at scale (bench/operator_at_scale.py): the real operator books, prepares and
delivers the contracts of 20 pools of 250 nodes against the cluster emulator over HTTP, the
emulator and the operator sharing this process. `--scale` takes a share of the pools (each
keeps its 250 nodes and 50 contracts); the default is the issue's size, four to six minutes
on the 2-core development machine. `--profile` prints where each thread's CPU went.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import random
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import operator_at_scale
import report

from gpudelivery.operator import placement
from gpudelivery.operator.settings import TimingSettings

SEED = 20261125
SMALL_INSTANCES = 2_000
POOLS = 20
NODES_PER_POOL = 250
CONTRACTS_PER_POOL = 50
# The share of the issue's pools delivered by default: all of them.
DEFAULT_SCALE = 1.0


def small_instance(rng: random.Random) -> tuple[list[tuple[str, int]], list[placement.Node]]:
    blocks = rng.randint(1, 4)
    nodes = []
    for block in range(blocks):
        zone = f"z{rng.randint(0, 1)}"
        for number in range(rng.randint(1, 12 // blocks)):
            nodes.append(placement.Node(f"b{block}-n{number}", f"b{block}", zone))
    requests = [(f"c{number}", rng.randint(1, 5)) for number in range(rng.randint(1, 6))]
    return requests, nodes


def whole_in_one_block(
    placed: dict[str, tuple[str, ...]],
    requests: Sequence[tuple[str, int]],
    nodes: Sequence[placement.Node],
) -> int:
    by_name = {node.name: node for node in nodes}
    return sum(
        1
        for contract_id, need in requests
        if need >= 2
        and contract_id in placed
        and placement.in_one_block([by_name[name] for name in placed[contract_id]])
    )


def exhaustive_best(requests: Sequence[tuple[str, int]], nodes: Sequence[placement.Node]) -> int:
    """The most multi-node contracts any placement keeps whole in one block, with every
    contract placed that `place_all` places (the same admission: first come, first served
    while nodes remain), found by trying every assignment."""
    admitted, left = [], len(nodes)
    for contract_id, need in requests:
        if need <= left:
            admitted.append((contract_id, need))
            left -= need
    sizes = Counter(node.block or node.name for node in nodes)
    blocks = sorted(sizes)
    multi = [need for _, need in admitted if need >= 2]
    best = 0
    for choice in itertools.product([None, *blocks], repeat=len(multi)):
        room = dict(sizes)
        whole = 0
        for need, block in zip(multi, choice, strict=True):
            if block is None:
                continue
            room[block] -= need
            whole += 1
        if all(value >= 0 for value in room.values()):
            best = max(best, whole)
    return best


def bench_small(instances: int) -> dict[str, Any]:
    rng = random.Random(SEED)
    equal = placed_whole = best_whole = 0
    for _ in range(instances):
        requests, nodes = small_instance(rng)
        placed = placement.place_all(requests, nodes)
        ours = whole_in_one_block(placed, requests, nodes)
        best = exhaustive_best(requests, nodes)
        equal += ours == best
        placed_whole += ours
        best_whole += best
    return {
        "small_instances": instances,
        "small_equal_to_exhaustive_share": round(equal / instances, 4),
        "small_multi_node_whole_ours": placed_whole,
        "small_multi_node_whole_exhaustive": best_whole,
    }


def full_pool(
    rng: random.Random, number: int
) -> tuple[list[tuple[str, int]], list[placement.Node]]:
    nodes: list[placement.Node] = []
    block = 0
    while len(nodes) < NODES_PER_POOL:
        size = min(rng.choice([8, 16, 32]), NODES_PER_POOL - len(nodes))
        zone = f"p{number}-z{block % 3}"
        nodes += [
            placement.Node(f"p{number}-b{block}-n{i}", f"p{number}-b{block}", zone)
            for i in range(size)
        ]
        block += 1
    fill = rng.uniform(0.8, 1.0) * NODES_PER_POOL
    weights = [rng.choice([1, 1, 2, 4, 8, 16]) for _ in range(CONTRACTS_PER_POOL)]
    scale = fill / sum(weights)
    requests = [(f"p{number}-c{i}", max(1, round(w * scale))) for i, w in enumerate(weights)]
    return requests, nodes


def bench_full() -> dict[str, Any]:
    rng = random.Random(SEED + 1)
    whole = could = placed_count = 0
    seconds: list[float] = []
    for number in range(POOLS):
        requests, nodes = full_pool(rng, number)
        started = time.perf_counter()
        placed = placement.place_all(requests, nodes)
        seconds.append(time.perf_counter() - started)
        placed_count += len(placed)
        whole += whole_in_one_block(placed, requests, nodes)
        could += sum(
            1
            for contract_id, need in requests
            if need >= 2 and contract_id in placed and placement.could_be_in_one_block(need, nodes)
        )
    return {
        "full_pools": POOLS,
        "full_contracts": POOLS * CONTRACTS_PER_POOL,
        "full_contracts_placed": placed_count,
        "full_multi_node_whole": whole,
        "full_multi_node_could_be_whole_alone": could,
        "full_whole_share_of_upper_bound": round(whole / could, 4) if could else 1.0,
        "full_place_all_ms_per_pool_max": round(max(seconds) * 1000, 1),
        "full_place_all_ms_per_pool_median": round(sorted(seconds)[len(seconds) // 2] * 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer small instances")
    parser.add_argument(
        "--part", choices=("placement", "delivery", "all"), default="all", help="what to run"
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=DEFAULT_SCALE,
        help=f"the share of the issue's {POOLS} pools to deliver (each of {NODES_PER_POOL} "
        f"nodes and {CONTRACTS_PER_POOL} contracts); 1 is the issue's size "
        f"(default {DEFAULT_SCALE})",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=TimingSettings().reconcile_interval_s,
        help="the operator's reconcile interval in seconds (default: the operator's)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print a CPU profile of every thread of the delivery (several times slower)",
    )
    options = parser.parse_args()
    if options.part in ("placement", "all"):
        figures = bench_small(200 if options.quick else SMALL_INSTANCES) | bench_full()
        report.print_figures("operator: placement quality", figures)
    if options.part in ("delivery", "all"):
        issue = operator_at_scale.Shape()
        shape = dataclasses.replace(issue, pools=max(1, round(issue.pools * options.scale)))
        figures = operator_at_scale.run(shape, interval_s=options.interval, profile=options.profile)
        report.print_figures("operator: delivery at scale", figures)


if __name__ == "__main__":
    main()
