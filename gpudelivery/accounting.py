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

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gpudelivery.evidence import Assignment, GpuKey, MeterRecord

__all__ = [
    "Accounting",
    "Span",
    "account",
    "assigned_spans",
    "coalesce",
    "delivered_gpu_seconds",
    "delivering_spans",
    "healthy_spans",
    "intersect",
    "subtract",
]

# A half-open interval [start, end) of epoch seconds, start < end.
Span = tuple[int, int]

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


def subtract(spans: list[Span], removed: list[Span]) -> list[Span]:
    """`spans` minus `removed`; both coalesced, and so is the result."""
    result: list[Span] = []
    j = 0
    for start, end in spans:
        while j < len(removed) and removed[j][1] <= start:
            j += 1
        k = j
        cursor = start
        while k < len(removed) and removed[k][0] < end:
            if removed[k][0] > cursor:
                result.append((cursor, removed[k][0]))
            cursor = max(cursor, removed[k][1])
            k += 1
        if cursor < end:
            result.append((cursor, end))
    return result


def intersect(left: list[Span], right: list[Span]) -> list[Span]:
    """The intersection of two coalesced span lists, coalesced."""
    result: list[Span] = []
    i = j = 0
    while i < len(left) and j < len(right):
        start = max(left[i][0], right[j][0])
        end = min(left[i][1], right[j][1])
        if start < end:
            result.append((start, end))
        if left[i][1] < right[j][1]:
            i += 1
        else:
            j += 1
    return result


class _SpanAccumulator:
    """Folds a stream of spans into a coalesced list in O(1) amortised per span.

    In-order spans (the usual case: a meter reports forward in time) extend or append at
    the tail. An out-of-order span is appended and the list marked unsorted; once the list
    doubles past its last compacted size it is sorted and coalesced, so memory stays
    proportional to the coalesced result, whatever the order.
    """

    __slots__ = ("compact_at", "ends", "in_order", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
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
        self.starts = [span[0] for span in merged]
        self.ends = [span[1] for span in merged]
        self.in_order = True
        self.compact_at = max(_COMPACT_FLOOR, 2 * len(merged))

    def spans(self) -> list[Span]:
        pairs = list(zip(self.starts, self.ends, strict=True))
        return pairs if self.in_order else coalesce(pairs)


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


def healthy_spans(
    records: Iterable[MeterRecord], *, window: Span, gpus: Iterable[GpuKey] | None = None
) -> dict[GpuKey, list[Span]]:
    """Per GPU, the coalesced spans of W that are metered with no unhealthy record.

    Records outside W, or (when `gpus` is given) of other GPUs, are skipped. A GPU with
    records but no metered-healthy second maps to an empty list.
    """
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
    result: dict[GpuKey, list[Span]] = {}
    for gpu in healthy.keys() | unhealthy.keys():
        good = healthy[gpu].spans() if gpu in healthy else []
        bad = unhealthy[gpu].spans() if gpu in unhealthy else []
        result[gpu] = subtract(good, bad)
    return result


def delivering_spans(
    assigned: Mapping[GpuKey, list[Span]], healthy: Mapping[GpuKey, list[Span]]
) -> dict[GpuKey, list[Span]]:
    """Per assigned GPU, the spans over which it delivers (assigned and metered-healthy)."""
    return {gpu: intersect(spans, healthy.get(gpu, [])) for gpu, spans in assigned.items()}


def delivered_gpu_seconds(gpu_count: int, delivering: Mapping[GpuKey, list[Span]]) -> int:
    """Sum over t of min(N, GPUs delivering t): substitutes never count past N."""
    boundaries: list[tuple[int, int]] = []
    for spans in delivering.values():
        for start, end in spans:
            boundaries.append((start, 1))
            boundaries.append((end, -1))
    boundaries.sort()
    total = 0
    active = 0
    previous = 0
    for instant, delta in boundaries:
        if active:
            total += (instant - previous) * (active if active < gpu_count else gpu_count)
        active += delta
        previous = instant
    return total


@dataclass(frozen=True, slots=True)
class Accounting:
    """What the settlement needs, and the per-GPU evidence a proof carries."""

    contracted_gpu_seconds: int
    delivered_gpu_seconds: int
    assigned: dict[GpuKey, list[Span]]
    healthy: dict[GpuKey, list[Span]]


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
    window); contracted GPU-seconds always cover the whole window.
    """
    counted = window if as_of_s is None else (window[0], max(window[0], min(window[1], as_of_s)))
    assigned = assigned_spans(assignments, contract_id=contract_id, window=counted)
    healthy = healthy_spans(records, window=counted, gpus=assigned.keys())
    delivered = delivered_gpu_seconds(gpu_count, delivering_spans(assigned, healthy))
    return Accounting(
        contracted_gpu_seconds=gpu_count * (window[1] - window[0]),
        delivered_gpu_seconds=delivered,
        assigned=assigned,
        healthy={gpu: healthy.get(gpu, []) for gpu in assigned},
    )
