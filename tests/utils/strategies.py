"""Hypothesis strategies for delivery scenarios small enough to brute-force."""

from __future__ import annotations

from hypothesis import strategies as st

from gpudelivery.evidence import Assignment, MeterRecord

from utils import factories
from utils.factories import EPOCH

# Small random cases over a 120-second window: cheap to brute-force, rich in edge cases.
SMALL = (EPOCH, EPOCH + 120)
SMALL_GPUS = [("n1", "g1"), ("n1", "g2"), ("n2", "g3"), ("n2", "g4")]
times = st.integers(min_value=-20, max_value=140)


@st.composite
def spans(draw: st.DrawFn) -> tuple[int, int]:
    start = draw(times)
    return start, start + draw(st.integers(min_value=1, max_value=80))


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, list[Assignment], list[MeterRecord]]:
    gpu_count = draw(st.integers(min_value=1, max_value=3))
    assignments = [
        Assignment(
            draw(st.sampled_from([factories.CONTRACT_ID, factories.CONTRACT_ID, "OTHER"])),
            *draw(st.sampled_from(SMALL_GPUS)),
            EPOCH + start,
            EPOCH + end,
        )
        for start, end in draw(st.lists(spans(), max_size=6))
    ]
    records = [
        MeterRecord(
            *draw(st.sampled_from(SMALL_GPUS)), EPOCH + start, EPOCH + end, draw(st.booleans())
        )
        for start, end in draw(st.lists(spans(), max_size=14))
    ]
    return gpu_count, assignments, records
