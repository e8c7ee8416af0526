"""Delivered GPU-seconds, exactly as shared/SETTLEMENT.md defines them.

A GPU g delivers second t of the window W to contract C when the ledger assigns g to C over
t, at least one meter record of g covers t, and no record of g covering t says unhealthy.
At each second, D(t) = min(N, GPUs delivering t); delivered GPU-seconds = sum of D(t).

Nothing here walks seconds. Per GPU, meter records fold into two coalesced span lists
(healthy records, unhealthy records) as they stream in; the metered-healthy spans are the
first minus the second, intersected with the GPU's assignment; one sweep over the span
endpoints of all GPUs then integrates min(N, count). Cost grows with records (one constant
step each) and spans (a sort), never with the window's length in seconds; memory grows with
the number of coalesced spans, not with the number of records, even for unsorted input.

The same functions serve `gpudelivery settle`, the API and `gpudelivery verify` (which
starts from the spans a proof carries instead of from raw records).
"""

from __future__ import annotations

import heapq
from array import array
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from gpudelivery.evidence import Assignment, GpuKey, MeterRecord

__all__ = [
    "Accounting",
    "MeteredInterval",
    "Span",
    "account",
    "assigned_spans",
    "coalesce",
    "delivered_gpu_seconds",
    "delivering_spans",
    "healthy_spans",
    "intersect",
    "iter_intersect",
    "iter_subtract",
    "subtract",
]

# A half-open interval [start, end) of epoch seconds, start < end.
Span = tuple[int, int]


class MeteredInterval(Protocol):
    """What the accounting reads of a meter record, or of a roll-up of records (a union of
    them, all healthy or all not: `rollup.MeterRollup`)."""

    @property
    def node(self) -> str: ...
    @property
    def gpu_uuid(self) -> str: ...
    @property
    def t0_s(self) -> int: ...
    @property
    def t1_s(self) -> int: ...
    @property
    def healthy(self) -> bool: ...


# Below this many raw spans an accumulator never compacts: sorting tiny lists is not worth it.
_COMPACT_FLOOR = 64


def coalesce(spans: Iterable[Span]) -> list[Span]:
    """Sorted, disjoint, non-adjacent spans covering exactly the union of `spans`."""
    merged: list[Span] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def iter_subtract(spans: Iterable[Span], removed: Iterable[Span]) -> Iterator[Span]:
    """`spans` minus `removed`, both coalesced, streamed in order (coalesced too)."""
    removed_iter = iter(removed)
    cut = next(removed_iter, None)
    for start, end in spans:
        cursor = start
        while cut is not None and cut[0] < end:
            if cut[1] <= cursor:
                cut = next(removed_iter, None)
                continue
            if cut[0] > cursor:
                yield (cursor, cut[0])
            cursor = cut[1]
            if cursor >= end:
                break
            cut = next(removed_iter, None)
        if cursor < end:
            yield (cursor, end)


def iter_intersect(left: Iterable[Span], right: Iterable[Span]) -> Iterator[Span]:
    """The intersection of two coalesced span streams, streamed in order."""
    left_iter, right_iter = iter(left), iter(right)
    a, b = next(left_iter, None), next(right_iter, None)
    while a is not None and b is not None:
        start, end = max(a[0], b[0]), min(a[1], b[1])
        if start < end:
            yield (start, end)
        if a[1] < b[1]:
            a = next(left_iter, None)
        else:
            b = next(right_iter, None)


def subtract(spans: Iterable[Span], removed: Iterable[Span]) -> list[Span]:
    """`spans` minus `removed`; both coalesced, and so is the result."""
    return list(iter_subtract(spans, removed))


def intersect(left: Iterable[Span], right: Iterable[Span]) -> list[Span]:
    """The intersection of two coalesced span lists, coalesced."""
    return list(iter_intersect(left, right))


class _SpanAccumulator:
    """Folds a stream of spans into a coalesced list in O(1) amortised per span.

    In-order spans (the usual case: a meter reports forward in time) extend or append at
    the tail. An out-of-order span is appended and the list marked unsorted; once the list
    doubles past its last compacted size it is sorted and coalesced, so memory stays
    proportional to the coalesced result, whatever the order.
    """

    __slots__ = ("compact_at", "ends", "in_order", "starts")

    def __init__(self) -> None:
        # Machine integers, 16 bytes a span: the per-GPU state of a month of meter data.
        self.starts = array("q")
        self.ends = array("q")
        self.in_order = True
        self.compact_at = _COMPACT_FLOOR

    def add(self, start: int, end: int) -> None:
        starts, ends = self.starts, self.ends
        if starts and starts[-1] <= start <= ends[-1]:
            if end > ends[-1]:
                ends[-1] = end
            return
        if starts and start < starts[-1]:
            self.in_order = False
        starts.append(start)
        ends.append(end)
        if len(starts) > self.compact_at:
            self._compact()

    def _compact(self) -> None:
        merged = self.spans()
        self.starts = array("q", [span[0] for span in merged])
        self.ends = array("q", [span[1] for span in merged])
        self.in_order = True
        self.compact_at = max(_COMPACT_FLOOR, 2 * len(merged))

    def spans(self) -> list[Span]:
        pairs = list(zip(self.starts, self.ends, strict=True))
        return pairs if self.in_order else coalesce(pairs)

    def iter_spans(self) -> Iterator[Span]:
        """The coalesced spans, without building a list when already in order."""
        if self.in_order:
            return zip(self.starts, self.ends, strict=True)
        return iter(coalesce(zip(self.starts, self.ends, strict=True)))


def assigned_spans(
    assignments: Iterable[Assignment], *, contract_id: str, window: Span
) -> dict[GpuKey, list[Span]]:
    """Per GPU, the coalesced spans of W over which the ledger assigns it to `contract_id`."""
    low, high = window
    per_gpu: dict[GpuKey, list[Span]] = {}
    for assignment in assignments:
        if assignment.contract_id != contract_id:
            continue
        start, end = max(assignment.start_s, low), min(assignment.end_s, high)
        if start < end:
            per_gpu.setdefault(assignment.gpu, []).append((start, end))
    return {gpu: coalesce(spans) for gpu, spans in per_gpu.items()}


def _accumulate(
    records: Iterable[MeteredInterval], window: Span, gpus: Iterable[GpuKey] | None
) -> tuple[dict[GpuKey, _SpanAccumulator], dict[GpuKey, _SpanAccumulator]]:
    """Fold records into per-GPU (healthy records, unhealthy records) span accumulators."""
    low, high = window
    wanted = None if gpus is None else set(gpus)
    healthy: dict[GpuKey, _SpanAccumulator] = {}
    unhealthy: dict[GpuKey, _SpanAccumulator] = {}
    for record in records:
        start = record.t0_s if record.t0_s > low else low
        end = record.t1_s if record.t1_s < high else high
        if start >= end:
            continue
        gpu = (record.node, record.gpu_uuid)
        if wanted is not None and gpu not in wanted:
            continue
        table = healthy if record.healthy else unhealthy
        accumulator = table.get(gpu)
        if accumulator is None:
            accumulator = table[gpu] = _SpanAccumulator()
        accumulator.add(start, end)
    return healthy, unhealthy


def _iter_healthy(
    gpu: GpuKey,
    healthy: Mapping[GpuKey, _SpanAccumulator],
    unhealthy: Mapping[GpuKey, _SpanAccumulator],
) -> Iterator[Span]:
    good = healthy[gpu].iter_spans() if gpu in healthy else iter(())
    bad = unhealthy[gpu].iter_spans() if gpu in unhealthy else iter(())
    return iter_subtract(good, bad)


def healthy_spans(
    records: Iterable[MeteredInterval], *, window: Span, gpus: Iterable[GpuKey] | None = None
) -> dict[GpuKey, list[Span]]:
    """Per GPU, the coalesced spans of W that are metered with no unhealthy record.

    Records outside W, or (when `gpus` is given) of other GPUs, are skipped. A GPU with
    records but no metered-healthy second maps to an empty list.
    """
    healthy, unhealthy = _accumulate(records, window, gpus)
    return {
        gpu: list(_iter_healthy(gpu, healthy, unhealthy))
        for gpu in healthy.keys() | unhealthy.keys()
    }


def delivering_spans(
    assigned: Mapping[GpuKey, list[Span]], healthy: Mapping[GpuKey, list[Span]]
) -> dict[GpuKey, list[Span]]:
    """Per assigned GPU, the spans over which it delivers (assigned and metered-healthy)."""
    return {gpu: intersect(spans, healthy.get(gpu, [])) for gpu, spans in assigned.items()}


def _boundaries(spans: Iterable[Span]) -> Iterator[tuple[int, int]]:
    for start, end in spans:
        yield (start, 1)
        yield (end, -1)


def delivered_gpu_seconds(gpu_count: int, delivering: Mapping[GpuKey, Iterable[Span]]) -> int:
    """Sum over t of min(N, GPUs delivering t): substitutes never count past N.

    Each GPU's spans must be coalesced and in order; they are merged lazily, so the sweep
    holds one boundary per GPU, not every span of every GPU.
    """
    total = 0
    active = 0
    previous = 0
    for instant, delta in heapq.merge(*(_boundaries(spans) for spans in delivering.values())):
        if active:
            total += (instant - previous) * (active if active < gpu_count else gpu_count)
        active += delta
        previous = instant
    return total


@dataclass(frozen=True, slots=True)
class Accounting:
    """Contracted and delivered GPU-seconds of one contract."""

    contracted_gpu_seconds: int
    delivered_gpu_seconds: int


def account(
    *,
    gpu_count: int,
    contract_id: str,
    window: Span,
    assignments: Iterable[Assignment],
    records: Iterable[MeterRecord],
    as_of_s: int | None = None,
) -> Accounting:
    """Delivered GPU-seconds of one contract from its ledger and raw meter records.

    `as_of_s` counts delivery only before that instant (a provisional figure during the
    window); contracted GPU-seconds always cover the whole window. Only the per-GPU span
    accumulators are held; spans are streamed from them into the sweep.
    """
    counted = window if as_of_s is None else (window[0], max(window[0], min(window[1], as_of_s)))
    assigned = assigned_spans(assignments, contract_id=contract_id, window=counted)
    healthy, unhealthy = _accumulate(records, counted, assigned.keys())
    delivering = {
        gpu: iter_intersect(spans, _iter_healthy(gpu, healthy, unhealthy))
        for gpu, spans in assigned.items()
    }
    return Accounting(
        contracted_gpu_seconds=gpu_count * (window[1] - window[0]),
        delivered_gpu_seconds=delivered_gpu_seconds(gpu_count, delivering),
    )
