"""Booking: whole nodes per contract, hold intervals, and refusals that say where they break."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpudelivery.operator import calendar
from gpudelivery.operator.calendar import Booking

from utils.factories import EPOCH

MINUTE = 60
HOUR = 3600
# A pool of 10 nodes with 2 spares, and its default lead time (issue 5).
CAPACITY = 8
LEAD_TIME_S = 10 * MINUTE


def at(hh: int, mm: int = 0) -> int:
    """The epoch seconds of hh:mm on 2026-03-03."""
    return EPOCH + hh * HOUR + mm * MINUTE


def exactly(message: str) -> str:
    """A `match` pattern for `message` and nothing else."""
    return f"^{re.escape(message)}$"


def booking(contract_id: str, nodes: int, start_s: int, end_s: int) -> Booking:
    """A booking of the window [start_s, end_s), held from the lead time before it."""
    return Booking(contract_id, nodes, *calendar.hold(start_s, end_s, LEAD_TIME_S))


@pytest.mark.parametrize(
    ("gpu_count", "gpus_per_node", "nodes"),
    [(1, 8, 1), (8, 8, 1), (9, 8, 2), (16, 8, 2), (17, 8, 3), (5, 1, 5), (3, 4, 1)],
)
def test_a_contract_takes_whole_nodes(gpu_count: int, gpus_per_node: int, nodes: int) -> None:
    assert calendar.nodes_needed(gpu_count, gpus_per_node) == nodes


@pytest.mark.parametrize(
    ("gpu_count", "gpus_per_node", "message"),
    [
        (0, 8, "gpu_count must be positive, got 0"),
        (-8, 8, "gpu_count must be positive, got -8"),
        (8, 0, "gpus_per_node must be positive, got 0"),
    ],
)
def test_nodes_needed_refuses_non_positive_counts(
    gpu_count: int, gpus_per_node: int, message: str
) -> None:
    with pytest.raises(ValueError, match=exactly(message)):
        calendar.nodes_needed(gpu_count, gpus_per_node)


def test_the_hold_starts_the_lead_time_before_the_window() -> None:
    assert calendar.hold(at(9), at(10), LEAD_TIME_S) == (at(8, 50), at(10))
    assert calendar.hold(at(9), at(10), 0) == (at(9), at(10))


def test_hold_refuses_an_empty_window_and_a_negative_lead_time() -> None:
    with pytest.raises(
        ValueError, match=exactly(f"the window must end after it starts, got [{at(9)}, {at(9)})")
    ):
        calendar.hold(at(9), at(9), LEAD_TIME_S)
    with pytest.raises(ValueError, match=exactly("lead_time_s must not be negative, got -1")):
        calendar.hold(at(9), at(10), -1)


def test_a_booking_refuses_no_nodes_and_an_empty_hold() -> None:
    with pytest.raises(ValueError, match=exactly("contract A: nodes must be positive")):
        Booking("A", 0, at(9), at(10))
    with pytest.raises(ValueError, match=exactly("contract A: the hold must end after it starts")):
        Booking("A", 1, at(10), at(9))


def test_holds_that_touch_do_not_overlap() -> None:
    first = Booking("A", 3, at(8), at(9))
    second = Booking("B", 4, at(9), at(10))
    assert calendar.peak([first, second], at(8), at(10)) == 4
    assert calendar.busiest([first, second], at(8), at(10)) == (at(9), 4)
    assert calendar.peak([first, second, Booking("C", 2, at(8, 59), at(9, 1))], at(8), at(10)) == 6


def test_peak_counts_only_the_interval_asked_about() -> None:
    bookings = [Booking("A", 3, at(8), at(9)), Booking("B", 4, at(8, 30), at(10))]
    assert calendar.peak(bookings, at(8), at(10)) == 7
    assert calendar.busiest(bookings, at(8), at(10)) == (at(8, 30), 7)
    assert calendar.peak(bookings, at(9), at(11)) == 4
    assert calendar.peak(bookings, at(10), at(11)) == 0
    assert calendar.busiest(bookings, at(10), at(11)) == (at(10), 0)
    assert calendar.busiest([], at(10), at(11)) == (at(10), 0)


def test_peak_refuses_an_empty_interval() -> None:
    with pytest.raises(
        ValueError, match=exactly(f"the interval must end after it starts, got [{at(9)}, {at(9)})")
    ):
        calendar.peak([], at(9), at(9))


def test_oversold_contract_is_refused_with_where_and_by_how_much() -> None:
    booked = [booking("A", 4, at(9), at(10)), Booking("C", 2, at(9), at(11))]
    new = booking("B", 3, at(9), at(12))
    verdict = calendar.check(CAPACITY, booked, new)
    assert verdict == calendar.Verdict(
        ok=False,
        reason=(
            "contract B needs 3 nodes from 2026-03-03T08:50:00Z but only 2 of 8 are free at "
            "2026-03-03T09:00:00Z (6 held by other contracts)"
        ),
        at_s=at(9),
        held=6,
    )


def test_a_contract_that_fits_is_booked_and_told_the_busiest_instant() -> None:
    booked = [booking("A", 4, at(9), at(10)), Booking("C", 2, at(9), at(11))]
    verdict = calendar.check(CAPACITY, booked, booking("B", 2, at(9), at(12)))
    assert verdict == calendar.Verdict(ok=True, reason=None, at_s=at(9), held=6)
    assert calendar.free(CAPACITY, booked, *calendar.hold(at(9), at(12), LEAD_TIME_S)) == 2
    assert calendar.free(CAPACITY, booked, at(10), at(12)) == 6
    assert calendar.free(CAPACITY, booked, at(11), at(12)) == 8


def test_back_to_back_windows_overlap_by_the_lead_time() -> None:
    earlier = booking("A", 5, at(8), at(9))
    later = booking("B", 4, at(9), at(10))
    verdict = calendar.check(CAPACITY, [earlier], later)
    assert verdict.reason == (
        "contract B needs 4 nodes from 2026-03-03T08:50:00Z but only 3 of 8 are free at "
        "2026-03-03T08:50:00Z (5 held by other contracts)"
    )
    # Without a lead time the same windows only touch, and both fit.
    assert calendar.check(
        CAPACITY, [Booking("A", 5, at(8), at(9))], Booking("B", 4, at(9), at(10))
    ).ok


def test_a_booked_contract_checked_again_does_not_count_against_itself() -> None:
    first = booking("A", 4, at(9), at(10))
    second = booking("B", 4, at(9), at(10))
    assert calendar.check(CAPACITY, [first, second], second).ok
    assert calendar.check(CAPACITY, [first, second], first).ok
    # A booking changed under the same id is checked against the others only.
    grown = booking("B", 5, at(9), at(10))
    assert calendar.check(CAPACITY, [first, second], grown).reason == (
        "contract B needs 5 nodes from 2026-03-03T08:50:00Z but only 4 of 8 are free at "
        "2026-03-03T08:50:00Z (4 held by other contracts)"
    )


def test_the_reason_speaks_of_one_node_in_the_singular() -> None:
    booked = [booking("A", 7, at(9), at(10))]
    assert calendar.check(CAPACITY, booked, booking("B", 2, at(9), at(10))).reason == (
        "contract B needs 2 nodes from 2026-03-03T08:50:00Z but only 1 of 8 is free at "
        "2026-03-03T08:50:00Z (7 held by other contracts)"
    )
    assert calendar.check(0, [], booking("B", 1, at(9), at(10))).reason == (
        "contract B needs 1 node from 2026-03-03T08:50:00Z but only 0 of 0 are free at "
        "2026-03-03T08:50:00Z (0 held by other contracts)"
    )


def test_a_pool_already_overbooked_has_no_free_nodes_not_fewer() -> None:
    booked = [booking("A", 6, at(9), at(10)), booking("C", 5, at(9), at(10))]
    window = calendar.hold(at(9), at(10), LEAD_TIME_S)
    assert calendar.free(CAPACITY, booked, *window) == 0
    assert calendar.check(CAPACITY, booked, booking("B", 1, at(9), at(10))).reason == (
        "contract B needs 1 node from 2026-03-03T08:50:00Z but only 0 of 8 are free at "
        "2026-03-03T08:50:00Z (11 held by other contracts)"
    )


def test_a_negative_capacity_is_refused() -> None:
    message = "capacity_nodes must not be negative (the pool has fewer nodes than spares), got -1"
    with pytest.raises(ValueError, match=exactly(message)):
        calendar.check(-1, [], booking("B", 1, at(9), at(10)))
    with pytest.raises(ValueError, match=exactly(message)):
        calendar.free(-1, [], at(9), at(10))


# Small random calendars over a 160-second span: cheap to scan second by second.
offsets = st.integers(min_value=-20, max_value=140)
contract_ids = st.sampled_from(["A", "B", "C", "D"])


@st.composite
def bookings(draw: st.DrawFn) -> Booking:
    start = draw(offsets)
    return Booking(
        draw(contract_ids),
        draw(st.integers(min_value=1, max_value=5)),
        EPOCH + start,
        EPOCH + start + draw(st.integers(min_value=1, max_value=80)),
    )


@st.composite
def intervals(draw: st.DrawFn) -> tuple[int, int]:
    start = draw(offsets)
    return EPOCH + start, EPOCH + start + draw(st.integers(min_value=1, max_value=80))


def held_at(booked: list[Booking], second: int) -> int:
    return sum(each.nodes for each in booked if each.start_s <= second < each.end_s)


@given(st.lists(bookings(), max_size=10), intervals())
def test_peak_is_the_most_held_at_any_second(
    booked: list[Booking], interval: tuple[int, int]
) -> None:
    held = [held_at(booked, second) for second in range(*interval)]
    most = max(held)
    assert calendar.peak(booked, *interval) == most
    assert calendar.busiest(booked, *interval) == (interval[0] + held.index(most), most)


@given(st.lists(bookings(), max_size=10), bookings(), st.integers(min_value=0, max_value=12))
def test_check_agrees_with_a_second_by_second_scan(
    booked: list[Booking], new: Booking, capacity: int
) -> None:
    others = [each for each in booked if each.contract_id != new.contract_id]
    held = [held_at(others, second) for second in range(new.start_s, new.end_s)]
    verdict = calendar.check(capacity, booked, new)
    assert verdict.ok == all(each + new.nodes <= capacity for each in held)
    assert verdict.held == max(held)
    assert verdict.at_s == new.start_s + held.index(max(held))
    assert (verdict.reason is None) == verdict.ok
    assert calendar.free(capacity, others, new.start_s, new.end_s) == max(
        0, min(capacity - each for each in held)
    )
