"""The capacity calendar: can a pool take one more contract over its window?

Booking is the first step of a contract's lifecycle (issue 5). A pool delivers whole nodes, so
a contract of N GPUs in a pool of G GPUs per node takes ceil(N / G) nodes, and at no instant
may the nodes held by the contracts of a pool exceed the pool's nodes less its spares (the
spares stay free to substitute failed nodes). A contract that would break this is rejected
with a reason naming where it breaks.

A contract holds its nodes over its *hold interval*, not its window: from the window's start
minus the pool's lead time (the operator cordons, drains and health-checks the nodes then)
to the window's end. Back-to-back windows therefore overlap by the lead time, and over that
overlap both contracts count. This is deliberate: a node still serving one contract cannot
be prepared for the next, and selling it twice would sell what cannot be delivered on time.

Times are integer epoch seconds and intervals half-open, [start_s, end_s): a hold ending at t
does not overlap one starting at t. Everything here is a plain function of `Booking` values;
the operator reads a pool's bookings from its ComputeContract resources and passes them in.
Which nodes serve a contract is placement's business, not the calendar's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gpudelivery import timefmt

__all__ = ["Booking", "Verdict", "busiest", "check", "free", "hold", "nodes_needed", "peak"]


def nodes_needed(gpu_count: int, gpus_per_node: int) -> int:
    """The whole nodes a contract of `gpu_count` GPUs takes: a partly used node counts whole."""
    if gpu_count < 1:
        raise ValueError(f"gpu_count must be positive, got {gpu_count}")
    if gpus_per_node < 1:
        raise ValueError(f"gpus_per_node must be positive, got {gpus_per_node}")
    return -(-gpu_count // gpus_per_node)


def hold(start_s: int, end_s: int, lead_time_s: int) -> tuple[int, int]:
    """The hold interval of a window [start_s, end_s): it starts `lead_time_s` earlier."""
    if end_s <= start_s:
        raise ValueError(f"the window must end after it starts, got [{start_s}, {end_s})")
    if lead_time_s < 0:
        raise ValueError(f"lead_time_s must not be negative, got {lead_time_s}")
    return start_s - lead_time_s, end_s


@dataclass(frozen=True, slots=True)
class Booking:
    """A booked contract: `nodes` whole nodes held over [start_s, end_s), its hold interval."""

    contract_id: str
    nodes: int
    start_s: int
    end_s: int

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"contract {self.contract_id}: nodes must be positive")
        if self.end_s <= self.start_s:
            raise ValueError(f"contract {self.contract_id}: the hold must end after it starts")


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a booking fits, and why not.

    `at_s` is the busiest instant of the new hold interval (the earliest, if several tie) and
    `held` the nodes other contracts hold there; both are set whether or not the booking fits.
    `reason` is None when it fits.
    """

    ok: bool
    reason: str | None
    at_s: int
    held: int


def busiest(bookings: Iterable[Booking], start_s: int, end_s: int) -> tuple[int, int]:
    """The earliest instant of [start_s, end_s) at which `bookings` hold the most nodes, and
    how many they hold there (`start_s` and 0 when none overlaps the interval)."""
    if end_s <= start_s:
        raise ValueError(f"the interval must end after it starts, got [{start_s}, {end_s})")
    events: list[tuple[int, int]] = []
    for booking in bookings:
        first, last = max(booking.start_s, start_s), min(booking.end_s, end_s)
        if first < last:
            events.append((first, booking.nodes))
            events.append((last, -booking.nodes))
    # At one instant the releases (negative) sort before the holds: half-open intervals.
    events.sort()
    held = most = 0
    at_s = start_s
    for instant, change in events:
        held += change
        if held > most:
            most, at_s = held, instant
    return at_s, most


def peak(bookings: Iterable[Booking], start_s: int, end_s: int) -> int:
    """The most nodes `bookings` hold at any one instant of [start_s, end_s)."""
    return busiest(bookings, start_s, end_s)[1]


def free(capacity_nodes: int, booked: Iterable[Booking], start_s: int, end_s: int) -> int:
    """The nodes free over all of [start_s, end_s): capacity less the peak of `booked`."""
    _check_capacity(capacity_nodes)
    return max(0, capacity_nodes - peak(booked, start_s, end_s))


def check(capacity_nodes: int, booked: Sequence[Booking], new: Booking) -> Verdict:
    """Whether `new` fits a pool of `capacity_nodes` (its nodes less its spares) next to
    `booked`. A booking of `booked` with the id of `new` is `new` itself, checked again: it
    does not count against itself, so checking a booked contract again is idempotent."""
    _check_capacity(capacity_nodes)
    others = (each for each in booked if each.contract_id != new.contract_id)
    at_s, held = busiest(others, new.start_s, new.end_s)
    available = max(0, capacity_nodes - held)
    if new.nodes <= available:
        return Verdict(ok=True, reason=None, at_s=at_s, held=held)
    reason = (
        f"contract {new.contract_id} needs {new.nodes} node{'' if new.nodes == 1 else 's'} "
        f"from {timefmt.format_utc(new.start_s)} but only {available} of {capacity_nodes} "
        f"{'is' if available == 1 else 'are'} free at {timefmt.format_utc(at_s)} "
        f"({held} held by other contracts)"
    )
    return Verdict(ok=False, reason=reason, at_s=at_s, held=held)


def _check_capacity(capacity_nodes: int) -> None:
    if capacity_nodes < 0:
        raise ValueError(
            f"capacity_nodes must not be negative (the pool has fewer nodes than spares), "
            f"got {capacity_nodes}"
        )
