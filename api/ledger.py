"""The assignment ledger: which GPU served which contract, when (written by the operator).

The operator posts an interval when it hands a GPU to a contract (`end` unset while it
runs) and posts it again with its `end` when it releases or substitutes the GPU. Posting
is idempotent: an interval is identified by (contract, node, GPU, start), so the operator
can retry while the API was down, or after a crash, without doubling anything. An end once
written is final: a different end for the same interval is refused, as is an interval that
overlaps another of the same GPU on the same contract.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlmodel import Session, col, select

from gpudelivery import evidence, timefmt
from gpudelivery.api import errors
from gpudelivery.api.models import Assignment, Contract

__all__ = ["Interval", "assignments_of", "closed_for", "record_intervals"]


@dataclass(frozen=True, slots=True)
class Interval:
    """What the operator posts: GPU `gpu_uuid` on `node` from `start_s` (to `end_s`)."""

    node: str
    gpu_uuid: str
    start_s: int
    end_s: int | None


def assignments_of(session: Session, contract_id: str) -> Sequence[Assignment]:
    return session.exec(
        select(Assignment)
        .where(Assignment.contract_id == contract_id)
        .order_by(col(Assignment.node), col(Assignment.gpu_uuid), col(Assignment.start_s))
    ).all()


def _overlaps(a: Assignment, start_s: int, end_s: int | None) -> bool:
    a_end = a.end_s if a.end_s is not None else None
    starts_before_other_ends = a_end is None or start_s < a_end
    other_starts_before_this_ends = end_s is None or a.start_s < end_s
    return starts_before_other_ends and other_starts_before_this_ends


def record_intervals(
    session: Session, *, contract: Contract, intervals: Sequence[Interval], now_s: int
) -> list[Assignment]:
    """Insert new intervals and close open ones; the stored rows, in the order posted."""
    stored = list(assignments_of(session, contract.id))
    result: list[Assignment] = []
    for index, interval in enumerate(intervals):
        where = f"assignments[{index}]"
        if interval.end_s is not None and interval.end_s <= interval.start_s:
            raise errors.UnprocessableError(f"{where}.end: must be after start")
        if interval.start_s >= contract.end_s:
            raise errors.UnprocessableError(
                f"{where}.start: after the contract's end ({timefmt.format_utc(contract.end_s)})"
            )
        same = [a for a in stored if (a.node, a.gpu_uuid) == (interval.node, interval.gpu_uuid)]
        existing = next((a for a in same if a.start_s == interval.start_s), None)
        if existing is not None:
            if interval.end_s is not None and existing.end_s not in (None, interval.end_s):
                raise errors.ConflictError(
                    f"{where}: this interval already ended at {timefmt.format_utc(existing.end_s)}"
                )
            if interval.end_s is not None and existing.end_s is None:
                existing.end_s = interval.end_s
                session.add(existing)
            result.append(existing)
            continue
        clash = next((a for a in same if _overlaps(a, interval.start_s, interval.end_s)), None)
        if clash is not None:
            raise errors.ConflictError(
                f"{where}: overlaps the interval of {interval.gpu_uuid} on {interval.node} "
                f"from {timefmt.format_utc(clash.start_s)}"
            )
        row = Assignment(
            contract_id=contract.id,
            node=interval.node,
            gpu_uuid=interval.gpu_uuid,
            start_s=interval.start_s,
            end_s=interval.end_s,
            recorded_at=now_s,
        )
        session.add(row)
        stored.append(row)
        result.append(row)
    return result


def closed_for(
    rows: Sequence[Assignment], *, contract_id: str, until_s: int
) -> list[evidence.Assignment]:
    """The ledger as the core counts it at `until_s`: open intervals run until then."""
    closed = []
    for row in rows:
        end = row.end_s if row.end_s is not None else until_s
        end = min(end, until_s)
        if end > row.start_s:
            closed.append(
                evidence.Assignment(contract_id, row.node, row.gpu_uuid, row.start_s, end)
            )
    return closed
