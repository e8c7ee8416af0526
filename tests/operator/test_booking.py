"""Booking: which pool delivers a contract, and whether its calendar has room."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gpudelivery import terms, timefmt
from gpudelivery.operator import booking, resources
from gpudelivery.operator.resources import Phase

from utils.factories import EPOCH, terms_json

HOUR = 3_600
POOL = resources.Pool(
    name="h100",
    instrument="H100-SXM-80GB",
    node_selector={"nvidia.com/gpu.product": "H100-SXM-80GB"},
    gpus_per_node=8,
    spares=1,
    lead_time_s=600,
    drain_timeout_s=300,
    grace_s=300,
)
CAPACITY = {"h100": 3}


def contract(name: str, gpus: int, start_h: float, end_h: float, phase: Phase | None = None,
             **fields: Any) -> booking.Contract:  # fmt: skip
    document = terms_json(
        contract_id=name.upper(),
        gpu_count=gpus,
        start=timefmt.format_utc(EPOCH + int(start_h * HOUR)),
        end=timefmt.format_utc(EPOCH + int(end_h * HOUR)),
        **fields,
    )
    return booking.Contract(name, terms.parse_terms(document), phase)


def decide(new: booking.Contract, *others: booking.Contract, now_h: float = 0) -> booking.Decision:
    return booking.decide(
        new, pools=[POOL], others=others, capacity=CAPACITY, now_s=EPOCH + int(now_h * HOUR)
    )


def test_a_contract_that_fits_is_booked_for_its_whole_nodes_from_its_lead_time() -> None:
    assert decide(contract("a", 16, 9, 17)) == booking.Decision(
        Phase.BOOKED,
        "booked 2 nodes of pool h100 from 2026-03-03T08:50:00Z to 2026-03-03T17:00:00Z",
        "h100",
        2,
    )


def test_a_part_of_a_node_takes_the_whole_node() -> None:
    assert decide(contract("a", 9, 9, 17)).nodes == 2
    assert decide(contract("b", 1, 9, 17)).nodes == 1


def test_a_contract_that_would_oversell_the_pool_is_rejected_naming_where() -> None:
    a = contract("a", 16, 9, 17, Phase.DELIVERING)
    assert decide(contract("b", 9, 12, 13), a) == booking.Decision(
        Phase.REJECTED,
        "contract B needs 2 nodes from 2026-03-03T11:50:00Z but only 1 of 3 is free at "
        "2026-03-03T11:50:00Z (2 held by other contracts)",
        "h100",
        2,
    )
    assert decide(contract("c", 8, 12, 13), a).phase == Phase.BOOKED


def test_back_to_back_windows_overlap_by_the_lead_time() -> None:
    a = contract("a", 16, 9, 17, Phase.BOOKED)
    after = decide(contract("d", 16, 17, 18), a)
    assert after.phase == Phase.REJECTED
    assert "free at 2026-03-03T16:50:00Z" in after.reason
    assert decide(contract("e", 16, 17 + 1 / 6, 18), a).phase == Phase.BOOKED


def test_only_live_contracts_of_the_same_pool_hold_nodes() -> None:
    held = [
        contract("r", 24, 9, 17, Phase.REJECTED),
        contract("c", 24, 9, 17, Phase.COMPLETED),
        contract("x", 24, 9, 17, Phase.CANCELLED),
        contract("n", 24, 9, 17, None),  # not booked yet: decided after this one
        contract("o", 24, 9, 17, Phase.BOOKED, instrument="A100-SXM-80GB"),
    ]
    assert decide(contract("a", 24, 9, 17), *held).phase == Phase.BOOKED
    for phase in booking.LIVE:
        live = contract("l", 8, 9, 17, phase)
        assert decide(contract("a", 24, 9, 17), live).phase == Phase.REJECTED


def test_deciding_a_booked_contract_again_gives_the_same_answer() -> None:
    a = contract("a", 24, 9, 17, Phase.BOOKED)
    assert decide(a, a).phase == Phase.BOOKED


def test_a_contract_is_rejected_without_exactly_one_pool_for_its_instrument() -> None:
    other = contract("a", 8, 9, 17, instrument="B200")
    assert decide(other).reason == "no DeliveryPool delivers instrument B200"
    twin = resources.Pool(**{**POOL.__dict__, "name": "h100-b"})
    rejected = booking.decide(
        contract("a", 8, 9, 17), pools=[twin, POOL], others=[], capacity=CAPACITY, now_s=EPOCH
    )
    assert rejected == booking.Decision(
        Phase.REJECTED,
        "2 DeliveryPools deliver instrument H100-SXM-80GB (h100, h100-b): keep one",
    )


def test_a_window_that_has_ended_is_not_booked() -> None:
    late = decide(contract("a", 8, 9, 17), now_h=17)
    assert (late.phase, late.reason) == (
        Phase.REJECTED,
        "the window ended at 2026-03-03T17:00:00Z, before booking",
    )
    assert decide(contract("a", 8, 9, 17), now_h=16.9).phase == Phase.BOOKED


def test_capacity_is_matching_nodes_less_quarantined_and_spares() -> None:
    assert booking.capacity_nodes(POOL, matching=10, quarantined=2) == 7
    assert booking.capacity_nodes(POOL, matching=1, quarantined=1) == 0


# Contracts of 1 to 24 GPUs over whole hours of one day, in the order they arrive.
_ARRIVALS = st.lists(
    st.tuples(st.integers(1, 24), st.integers(0, 22), st.integers(1, 6)), max_size=12
)


@given(_ARRIVALS, st.integers(0, 5))
def test_contracts_booked_one_by_one_never_hold_more_nodes_than_the_pool_has(
    arrivals: list[tuple[int, int, int]], capacity: int
) -> None:
    decided: list[booking.Contract] = []
    for number, (gpus, start_h, hours) in enumerate(arrivals):
        new = contract(f"c{number}", gpus, start_h, min(24, start_h + hours))
        verdict = booking.decide(
            new, pools=[POOL], others=decided, capacity={"h100": capacity}, now_s=EPOCH
        )
        decided.append(booking.Contract(new.name, new.terms, verdict.phase))
    held = [booking.hold_of(POOL, c.terms) for c in decided if c.phase == Phase.BOOKED]
    # Every second of the day (and the lead time before it), counted plainly.
    for second in range(EPOCH - 600, EPOCH + 24 * HOUR, 300):
        assert sum(h.nodes for h in held if h.start_s <= second < h.end_s) <= capacity
    # And a contract is refused only when it would not have fitted.
    for number, c in enumerate(decided):
        if c.phase == Phase.REJECTED:
            before = [d for d in decided[:number] if d.phase == Phase.BOOKED]
            wanted = booking.hold_of(POOL, c.terms)
            busiest = max(
                sum(booking.hold_of(POOL, d.terms).nodes for d in before
                    if booking.hold_of(POOL, d.terms).start_s <= second
                    < booking.hold_of(POOL, d.terms).end_s)
                for second in range(wanted.start_s, wanted.end_s, 300)
            )  # fmt: skip
            assert busiest + wanted.nodes > capacity
