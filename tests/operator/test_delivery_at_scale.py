"""The scale benchmark's runner (bench/operator_at_scale.py) on a cluster small enough for a
test: it drives the real operator through booking, preparation and delivery, and counts what
it set out to count. The benchmark's figures at full size are in the README; this keeps the
runner from rotting between runs of `make bench`."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def at_scale(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))
    import operator_at_scale

    return operator_at_scale


def test_the_orders_fill_each_pool_to_at_most_its_share_in_whole_nodes(
    at_scale: Any,
) -> None:
    shape = at_scale.Shape()
    made = at_scale.orders(shape)
    assert len(made) == 1_000
    assert len({order.contract_id for order in made}) == 1_000
    for pool in range(20):
        sizes = [order.gpus // 8 for order in made if order.pool == pool]
        assert len(sizes) == 50
        assert sum(sizes) <= 240  # 96 % of 250 nodes
        assert min(sizes) >= 1
        assert max(sizes) <= 8
    assert all(order.gpus % 8 == 0 and 0 <= order.offset_s < 60 for order in made)
    assert at_scale.orders(shape) == made  # seeded


def test_a_small_run_delivers_every_contract_and_counts_its_requests(at_scale: Any) -> None:
    shape = at_scale.Shape(pools=2, nodes_per_pool=20, blocks_per_pool=2, contracts_per_pool=3)

    figures = at_scale.run(shape, interval_s=1.0, deadline_s=60.0)

    assert (figures["pools"], figures["nodes"], figures["contracts"]) == (2, 40, 6)
    assert not [key for key in figures if key.endswith("_unfinished_after_s")]
    assert figures["setup_nodes"] == 40
    # Booking: one status write and one Booked event a contract.
    booked = figures["booked_requests_operator_and_kopf_by_kind"]
    assert "patch computecontracts/status 1.00" in booked
    assert "create events 1.00" in booked
    # Delivery: each contract's namespace, created once.
    delivering = figures["delivering_requests_operator_and_kopf_by_kind"]
    assert "create namespaces 1.00" in delivering
    assert "create serviceaccounts/token 1.00" in delivering
    assert figures["live_multi_node_in_one_block"] == figures["live_place_all_in_one_block"]
    assert figures["live_in_one_block_share_of_place_all"] == 1.0
