"""The operator benchmark's scale part (issue 5): the real operator delivering many contracts
that start in the same minute, against the cluster emulator over HTTP.

The cluster: `pools` DeliveryPools (20 at full size) of 250 GPU nodes each, 8 GPUs a node,
in 10 network blocks of 25, every node as a node looks once its metering agent runs (Ready,
`GPUHealthy` True, GPU UUIDs published: tests/utils/operators.add_gpu_nodes). 50 contracts
a pool, of 8 to 64 GPUs in whole nodes, drawn (seeded) until they fill at most 96 % of the
pool, with windows of an hour starting within the same minute. The operator runs as the
tests run it (tests/utils/operators.running_operator: kopf in a thread, standalone, no API
and no webhook) but at the reconcile interval asked for, on a clock the benchmark moves.

Timed, in wall time, each step until every contract has reached it (polled every half
second by a client of the benchmark's own):
- **setup**: pools and nodes created over HTTP, then the contracts (before the operator
  starts, so that booking is timed alone);
- **booked**: from the operator's start until every contract is Booked;
- **prepared**: the clock moved to the windows' start less the pool's lead time, until every
  contract is Preparing with all its nodes ready (claimed, cordoned, drained);
- **delivering**: the clock moved past the last window's start, until every contract is
  Delivering (nodes handed over, GPUs in the ledger, the buyer's namespace made).

Booking is the baseline the other steps compare with. Requests are counted from the
emulator's record of every request (kmock keeps them all), per step and per client: the
operator's own calls (User-Agent `runner.USER_AGENT`), kopf's (`kopf/...`: watches, events,
its own annotations) and the benchmark's; by RBAC verb and resource. Placement as delivered
is checked against what could be: multi-node contracts whose nodes share one network block.

Not here: pods on the nodes (nothing to evict, so drains end at once), the metering agent
(GPU health never changes), the API (no ledger reports, no mirroring), a second replica.
"""

from __future__ import annotations

import contextlib
import random
import resource
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import profiling

from gpudelivery import timefmt
from gpudelivery.operator import placement, resources, runner

# tests/utils holds the emulator and the operator's harness, imported as the tests import
# them; mypy checks bench/ without tests/ on its path, so their names are Any here.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from utils import operators, routes  # type: ignore[import-not-found]

__all__ = ["Shape", "run"]

SEED = 20261126
GPUS_PER_NODE = 8
# The busiest the draw may leave a pool: a few free nodes, as a provider keeps.
MOST_FILLED = 0.96
# How often the benchmark reads the contracts to see whether a step is done: every half
# second, or a fiftieth of the time the step has taken (a poll of 1,000 contracts loads the
# emulator, which shares the process with the operator).
POLL_S = 0.5
POLL_SHARE = 0.02
# A step that has not finished by then is reported as not finished.
STEP_DEADLINE_S = 3_600.0
# The windows: an hour, starting within the first minute after EPOCH (the operator's clock
# starts an hour before it); the pools' lead time, their default.
EPOCH_S: int = operators.NOW + 3_600
WINDOW_S = 3_600
LEAD_TIME_S = 600
# The clients, by the prefix of their User-Agent.
KOPF_AGENT = "kopf/"


@dataclass(frozen=True)
class Shape:
    """How big the cluster is: `pools` pools of `nodes_per_pool` nodes in `blocks_per_pool`
    network blocks, and `contracts_per_pool` contracts each."""

    pools: int = 20
    nodes_per_pool: int = 250
    blocks_per_pool: int = 10
    contracts_per_pool: int = 50

    @property
    def nodes(self) -> int:
        return self.pools * self.nodes_per_pool

    @property
    def contracts(self) -> int:
        return self.pools * self.contracts_per_pool


@dataclass(frozen=True)
class Order:
    """A contract the benchmark creates: its id, pool, GPUs, and when it starts in the
    minute after EPOCH_S."""

    contract_id: str
    pool: int
    gpus: int
    offset_s: int


def instrument(pool: int) -> str:
    return f"H100-BENCH-{pool:02}"


def block_name(pool: int, block: int) -> str:
    return f"p{pool:02}-b{block:02}"


def zone_name(shape: Shape, pool: int, block: int) -> str:
    """Two zones a pool, of half its blocks each."""
    return f"p{pool:02}-z{block * 2 // shape.blocks_per_pool}"


def node_name(pool: int, block: int, number: int) -> str:
    return f"{block_name(pool, block)}-n{number:03}"


def orders(shape: Shape) -> list[Order]:
    """Every pool's contracts: whole nodes, 1 to 8 each, drawn again until they fit."""
    rng = random.Random(SEED)
    made = []
    for pool in range(shape.pools):
        while True:
            sizes = [rng.randint(1, 8) for _ in range(shape.contracts_per_pool)]
            if sum(sizes) <= MOST_FILLED * shape.nodes_per_pool:
                break
        made += [
            Order(f"BENCH-P{pool:02}-C{n:03}", pool, size * GPUS_PER_NODE, rng.randrange(60))
            for n, size in enumerate(sizes)
        ]
    return made


# -- the cluster ------------------------------------------------------------------------


def build_nodes(cluster: Any, shape: Shape) -> dict[str, Any]:
    """The pools and their nodes, timed: all, and the first and last tenth of the nodes (kmock
    keeps every request, so a cost growing with them shows as a difference)."""
    started = time.perf_counter()
    for pool in range(shape.pools):
        operators.add_pool(cluster, f"pool-{pool:02}", instrument(pool))
    per_block = shape.nodes_per_pool // shape.blocks_per_pool
    names = [
        (pool, block, node_name(pool, block, number))
        for pool in range(shape.pools)
        for block in range(shape.blocks_per_pool)
        for number in range(per_block)
    ]
    tenth = max(1, len(names) // 10)
    seconds = []
    for pool, block, name in names:
        began = time.perf_counter()
        operators.add_gpu_nodes(
            cluster,
            [name],
            block=block_name(pool, block),
            zone=zone_name(shape, pool, block),
            labels={resources.LABEL_GPU_PRODUCT: instrument(pool)},
            gpus=GPUS_PER_NODE,
        )
        seconds.append(time.perf_counter() - began)
    return {
        "setup_nodes": len(names),
        "setup_nodes_s": round(time.perf_counter() - started, 1),
        "setup_node_create_ms_first_tenth": round(1000 * sum(seconds[:tenth]) / tenth, 2),
        "setup_node_create_ms_last_tenth": round(1000 * sum(seconds[-tenth:]) / tenth, 2),
    }


def build_contracts(cluster: Any, made: list[Order]) -> None:
    """The contracts, created through the API."""
    for order in made:
        start_s = EPOCH_S + order.offset_s
        operators.add_contract(
            cluster,
            order.contract_id,
            order.gpus,
            instrument=instrument(order.pool),
            start=timefmt.format_utc(start_s),
            end=timefmt.format_utc(start_s + WINDOW_S),
        )


def contracts(cluster: Any) -> list[dict[str, Any]]:
    found = cluster.custom.list_cluster_custom_object(
        resources.GROUP, resources.VERSION, resources.CONTRACTS
    )
    items: list[dict[str, Any]] = found["items"]
    return items


def is_booked(body: Mapping[str, Any]) -> bool:
    return bool((body.get("status") or {}).get("phase") == resources.Phase.BOOKED.value)


def is_prepared(body: Mapping[str, Any]) -> bool:
    """Preparing with every node it needs ready (the planner's reason says how many)."""
    status = body.get("status") or {}
    need = status.get("nodesNeeded")
    return bool(
        status.get("phase") == resources.Phase.PREPARING.value
        and str(status.get("reason", "")).startswith(f"{need} of {need} ")
    )


def is_delivering(body: Mapping[str, Any]) -> bool:
    return bool((body.get("status") or {}).get("phase") == resources.Phase.DELIVERING.value)


@dataclass
class Step:
    """One step's measurement: wall and process CPU seconds, and where the emulator's record
    of requests stood when it began and ended."""

    name: str
    wall_s: float = 0.0
    # When the first contract reached the step: the rest is the operator working through them.
    first_s: float | None = None
    cpu_s: float = 0.0
    first_request: int = 0
    last_request: int = 0
    finished: bool = False


def wait_for(
    cluster: Any,
    step: Step,
    done: Callable[[Mapping[str, Any]], bool],
    move: Callable[[], None],
    deadline_s: float = STEP_DEADLINE_S,
) -> Step:
    """Do `move`, then poll until `done` holds for every contract (or `deadline_s`)."""
    step.first_request = len(list(cluster.emulator))
    began, cpu = time.perf_counter(), time.process_time()
    move()
    while time.perf_counter() - began < deadline_s:
        reached = [done(body) for body in contracts(cluster)]
        if any(reached) and step.first_s is None:
            step.first_s = time.perf_counter() - began
        if all(reached):
            step.finished = True
            break
        time.sleep(max(POLL_S, POLL_SHARE * (time.perf_counter() - began)))
    step.wall_s = time.perf_counter() - began
    step.cpu_s = time.process_time() - cpu
    step.last_request = len(list(cluster.emulator))
    return step


# -- requests ---------------------------------------------------------------------------


def client_of(request: Any) -> str:
    """Who made a request: the operator, kopf, or the benchmark itself (setup, polls)."""
    agent = str(request.headers.get("User-Agent", ""))
    if agent.startswith(runner.USER_AGENT):
        return "operator"
    if agent.startswith(KOPF_AGENT):
        return "kopf"
    return "bench"


def kind_of(request: Any) -> str:
    """A request's RBAC verb and resource (`patch nodes`), or `discovery`."""
    resource = request.resource
    if resource is None or resource.plural is None:
        return "discovery"
    verb = routes.rbac_verb(str(request.method.value), request.name, request.params)
    plural = str(resource.plural)
    return f"{verb} {plural}/{request.subresource}" if request.subresource else f"{verb} {plural}"


def requests_of(cluster: Any, step: Step) -> Counter[tuple[str, str]]:
    """The step's requests by (client, kind)."""
    made = list(cluster.emulator)[step.first_request : step.last_request]
    return Counter((client_of(request), kind_of(request)) for request in made)


def step_figures(cluster: Any, setup: Step, steps: list[Step], count: int) -> dict[str, Any]:
    """Each step's time, per contract and against booking's, its share of CPU, and the
    requests it took per contract by client; the setup's requests."""
    figures: dict[str, Any] = {
        "setup_requests": setup.last_request - setup.first_request,
        "setup_s": round(setup.wall_s, 1),
    }
    baseline = steps[0].wall_s if steps else 0.0
    for step in steps:
        name = step.name
        if not step.finished:
            figures[f"{name}_unfinished_after_s"] = round(step.wall_s)
        figures[f"{name}_s"] = round(step.wall_s, 1)
        if step.first_s is not None:
            figures[f"{name}_first_contract_s"] = round(step.first_s, 1)
        figures[f"{name}_ms_per_contract"] = round(1000 * step.wall_s / count, 1)
        if step is not steps[0] and baseline:
            figures[f"{name}_vs_booked"] = round(step.wall_s / baseline, 2)
        figures[f"{name}_cpu_share_of_wall"] = round(step.cpu_s / step.wall_s, 2)
        made = requests_of(cluster, step)
        for client in ("operator", "kopf", "bench"):
            total = sum(n for (who, _), n in made.items() if who == client)
            figures[f"{name}_requests_{client}_per_contract"] = round(total / count, 2)
        operator = Counter(
            {kind: n for (who, kind), n in made.items() if who in ("operator", "kopf")}
        )
        figures[f"{name}_requests_operator_and_kopf_by_kind"] = ", ".join(
            f"{kind} {n / count:.2f}" for kind, n in operator.most_common()
        )
    if steps:
        total = sum(
            n
            for step in steps
            for (who, _), n in requests_of(cluster, step).items()
            if who in ("operator", "kopf")
        )
        figures["requests_operator_and_kopf_per_contract_all_steps"] = round(total / count, 2)
    figures["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return figures


# -- placement --------------------------------------------------------------------------


def placement_figures(cluster: Any, shape: Shape, made: list[Order]) -> dict[str, Any]:
    """Multi-node contracts delivered in one network block, against `place_all` on the same
    pools and contracts (in the order the operator takes them: start, then name) and against
    those some block could hold alone."""
    bodies = {body["metadata"]["name"]: body for body in contracts(cluster)}
    per_block = shape.nodes_per_pool // shape.blocks_per_pool
    whole = planned = multi = 0
    names = {order.contract_id: resources.resource_name(order.contract_id) for order in made}
    for pool in range(shape.pools):
        pool_nodes = [
            placement.Node(
                node_name(pool, block, number),
                block_name(pool, block),
                zone_name(shape, pool, block),
            )
            for block in range(shape.blocks_per_pool)
            for number in range(per_block)
        ]
        ordered = sorted(
            (o for o in made if o.pool == pool), key=lambda o: (o.offset_s, names[o.contract_id])
        )
        requests = [(names[o.contract_id], o.gpus // GPUS_PER_NODE) for o in ordered]
        joint = placement.place_all(requests, pool_nodes)
        by_name = {node.name: node for node in pool_nodes}
        for name, need in requests:
            if need < 2:
                continue
            multi += 1
            held = (bodies[name].get("status") or {}).get("nodes") or []
            whole += placement.in_one_block([by_name[node] for node in held])
            planned += name in joint and placement.in_one_block(
                [by_name[node] for node in joint[name]]
            )
    return {
        "live_multi_node_contracts": multi,
        "live_multi_node_in_one_block": whole,
        "live_place_all_in_one_block": planned,
        "live_in_one_block_share_of_place_all": round(whole / planned, 4) if planned else 1.0,
    }


# -- the run ----------------------------------------------------------------------------


def run(
    shape: Shape,
    *,
    interval_s: float,
    profile: bool = False,
    profile_lines: int = 40,
    deadline_s: float = STEP_DEADLINE_S,
) -> dict[str, Any]:
    """Build the cluster, run the operator through the steps (each given `deadline_s`; one
    that does not finish in it ends the run); the figures."""
    made = orders(shape)
    figures: dict[str, Any] = {
        "pools": shape.pools,
        "nodes": shape.nodes,
        "contracts": len(made),
        "reconcile_interval_s": interval_s,
        "gpus_contracted": sum(order.gpus for order in made),
    }
    steps: list[Step] = []
    with (
        profiling.profiled(profile) as profiles,
        tempfile.TemporaryDirectory() as directory,
        operators.cluster_at(Path(directory)) as cluster,
    ):
        clock = operators.Clock()
        clock.attach(cluster)
        built = time.perf_counter()
        figures |= build_nodes(cluster, shape)
        began = time.perf_counter()
        build_contracts(cluster, made)
        figures["setup_contracts_s"] = round(time.perf_counter() - began, 1)
        setup = Step("setup", last_request=len(list(cluster.emulator)))
        setup.wall_s = time.perf_counter() - built

        def later(to_s: int) -> Callable[[], None]:
            return lambda: setattr(clock, "now_s", to_s)

        with contextlib.ExitStack() as operator:

            def start() -> None:
                running = operators.running_operator(
                    cluster, clock=clock, reconcile_interval_s=interval_s
                )
                operator.enter_context(running)

            steps.append(wait_for(cluster, Step("booked"), is_booked, start, deadline_s))
            if steps[-1].finished:
                prepare_s = EPOCH_S + 59 - LEAD_TIME_S
                prepared = Step("prepared")
                steps.append(wait_for(cluster, prepared, is_prepared, later(prepare_s), deadline_s))
            if steps[-1].finished:
                steps.append(
                    wait_for(
                        cluster,
                        Step("delivering"),
                        is_delivering,
                        later(EPOCH_S + 59),
                        deadline_s,
                    )
                )
        figures |= step_figures(cluster, setup, steps, len(made))
        if steps[-1].finished and steps[-1].name == "delivering":
            figures |= placement_figures(cluster, shape, made)
    if profile:
        profiling.print_profile(profiles, profile_lines)
    return figures
