"""Booking a ComputeContract: the pool that delivers it, and whether that pool has room.

A new contract is booked when exactly one DeliveryPool delivers its instrument, its window
has not ended, and the pool's calendar (operator/calendar.py) has room for its whole nodes
over its hold interval next to the pool's live contracts; otherwise it is rejected, with a
reason that says which of these failed. A contract of `gpu_count` GPUs takes whole nodes:
the next whole node when the count is not a multiple of the pool's GPUs a node (only N GPUs
of it are counted, shared/SETTLEMENT.md).

The pool's capacity is the nodes its selector matches, less its spares, less the nodes held
in quarantine for repair: booking against a node that cannot serve would sell what cannot
be delivered. A decision is a plain function of these values; the operator makes them one
at a time, so two contracts created together are never both fitted into the same room.

Not here: choosing nodes (operator/placement.py), or what happens once booked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gpudelivery import terms, timefmt
from gpudelivery.operator import calendar, resources

__all__ = ["LIVE", "Contract", "Decision", "capacity_nodes", "decide", "hold_of", "pool_for"]

# The phases in which a contract holds (or will hold) nodes of its pool.
LIVE = frozenset(
    {
        resources.Phase.BOOKED,
        resources.Phase.PREPARING,
        resources.Phase.DELIVERING,
        resources.Phase.DEGRADED,
    }
)


@dataclass(frozen=True)
class Contract:
    """A ComputeContract as booking sees it: its resource name, terms and phase (None while
    it is new)."""

    name: str
    terms: terms.ContractTerms
    phase: resources.Phase | None


@dataclass(frozen=True)
class Decision:
    """Booked or rejected, why, and (when a pool was found) its name and the nodes held."""

    phase: resources.Phase
    reason: str
    pool: str | None = None
    nodes: int = 0


def pool_for(instrument: str, pools: Sequence[resources.Pool]) -> resources.Pool | str:
    """The one pool that delivers `instrument`, or why there is none to book on."""
    matching = sorted(
        (pool for pool in pools if pool.instrument == instrument), key=lambda pool: pool.name
    )
    if len(matching) == 1:
        return matching[0]
    if not matching:
        return f"no DeliveryPool delivers instrument {instrument}"
    names = ", ".join(pool.name for pool in matching)
    return f"{len(matching)} DeliveryPools deliver instrument {instrument} ({names}): keep one"


def capacity_nodes(pool: resources.Pool, *, matching: int, quarantined: int) -> int:
    """The nodes contracts may hold at once: those the selector matches, less the pool's
    spares and the nodes in quarantine (never below 0)."""
    return max(0, matching - quarantined - pool.spares)


def hold_of(pool: resources.Pool, contract: terms.ContractTerms) -> calendar.Booking:
    """The contract's booking in the pool's calendar: its whole nodes over its window's
    start, less the pool's lead time, to its end."""
    start_s, end_s = calendar.hold(contract.start, contract.end, pool.lead_time_s)
    nodes = calendar.nodes_needed(contract.gpu_count, pool.gpus_per_node)
    return calendar.Booking(contract.contract_id, nodes, start_s, end_s)


def decide(
    contract: Contract,
    *,
    pools: Sequence[resources.Pool],
    others: Sequence[Contract],
    capacity: dict[str, int],
    now_s: int,
) -> Decision:
    """Book `contract` or reject it. `others` are the cluster's other contracts (only the live
    ones of the same pool count); `capacity` holds each pool's `capacity_nodes`."""
    found = pool_for(contract.terms.instrument, pools)
    if isinstance(found, str):
        return Decision(resources.Phase.REJECTED, found)
    pool = found
    if contract.terms.end <= now_s:
        return Decision(
            resources.Phase.REJECTED,
            f"the window ended at {timefmt.format_utc(contract.terms.end)}, before booking",
            pool.name,
        )
    wanted = hold_of(pool, contract.terms)
    booked = [
        hold_of(pool, other.terms)
        for other in others
        if other.phase in LIVE
        and other.name != contract.name
        and other.terms.instrument == pool.instrument
    ]
    verdict = calendar.check(capacity.get(pool.name, 0), booked, wanted)
    if not verdict.ok:
        assert verdict.reason is not None  # a refusal says why
        return Decision(resources.Phase.REJECTED, verdict.reason, pool.name, wanted.nodes)
    reason = (
        f"booked {wanted.nodes} node{'' if wanted.nodes == 1 else 's'} of pool {pool.name} "
        f"from {timefmt.format_utc(wanted.start_s)} to {timefmt.format_utc(wanted.end_s)}"
    )
    return Decision(resources.Phase.BOOKED, reason, pool.name, wanted.nodes)
