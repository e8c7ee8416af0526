"""Roll-ups stand for their records in a proof: the same document, byte for byte."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpudelivery import accounting, proof, rollup, signing, timefmt
from gpudelivery.evidence import Assignment, MeterRecord
from gpudelivery.rollup import MeterRollup, RollupAccumulator

from utils import factories
from utils.factories import EPOCH
from utils.strategies import SMALL, SMALL_GPUS, spans

KEY = signing.generate()
utilizations = st.one_of(
    st.none(),
    st.integers(min_value=0, max_value=100),
    st.floats(min_value=0, max_value=100, allow_nan=False),
    st.sampled_from([12.5, 99.9, 33.0]),
)
energies = st.one_of(st.none(), st.integers(min_value=0, max_value=2**40))


@st.composite
def metered(draw: st.DrawFn) -> list[MeterRecord]:
    """Records of a few GPUs: overlapping, adjacent or apart, with and without summaries."""
    records = []
    for start, end in draw(st.lists(spans(), max_size=16)):
        node, gpu = draw(st.sampled_from(SMALL_GPUS))
        records.append(
            MeterRecord(
                node,
                gpu,
                EPOCH + start,
                EPOCH + end,
                draw(st.booleans()),
                draw(utilizations),
                draw(energies),
            )
        )
    # Runs of adjacent one-second records, as a meter sends them: what roll-ups are for.
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        node, gpu = draw(st.sampled_from(SMALL_GPUS))
        first = EPOCH + draw(st.integers(min_value=-10, max_value=120))
        healthy = draw(st.booleans())
        for second in range(draw(st.integers(min_value=1, max_value=40))):
            records.append(
                MeterRecord(
                    node,
                    gpu,
                    first + second,
                    first + second + 1,
                    healthy,
                    draw(utilizations),
                    draw(energies),
                )
            )
    return draw(st.permutations(records))


@st.composite
def ledgers(draw: st.DrawFn) -> list[Assignment]:
    return [
        Assignment(factories.CONTRACT_ID, *draw(st.sampled_from(SMALL_GPUS)), EPOCH + s, EPOCH + e)
        for s, e in draw(st.lists(spans(), max_size=5))
    ]


def build(records: list[Any], assignments: list[Assignment], as_of_s: int | None) -> Any:
    return proof.build_proof(
        terms=factories.worked_terms(gpu_count=2, end=timefmt.format_utc(SMALL[1])),
        assignments=assignments,
        records=records,
        meter_evidence=proof.MeterEvidence(proof.LEAVES_METER_BATCHES, 7, "ab" * 32),
        key=KEY,
        issued_at_s=SMALL[1],
        as_of_s=as_of_s,
    )


def standing_in(
    records: list[MeterRecord], assignments: list[Assignment], as_of_s: int | None, width_s: int
) -> list[Any]:
    """What the API feeds a proof: roll-ups, except in the buckets where one crosses the
    edge of an assigned span; there, every record of that GPU and bucket."""
    end = SMALL[1] if as_of_s is None else as_of_s
    assigned = accounting.assigned_spans(
        assignments, contract_id=factories.CONTRACT_ID, window=(SMALL[0], end)
    )
    rolled = rollup.roll_up(records, width_s=width_s)
    crossed = set()
    for each in rolled:
        overlap = sum(
            max(0, min(each.t1_s, e) - max(each.t0_s, s)) for s, e in assigned.get(each.gpu, [])
        )
        if overlap not in (0, each.t1_s - each.t0_s):
            crossed.add((each.gpu, rollup.bucket_of(each.t0_s, width_s)))
    evidence: list[Any] = [
        each for each in rolled if (each.gpu, rollup.bucket_of(each.t0_s, width_s)) not in crossed
    ]
    evidence.extend(r for r in records if (r.gpu, rollup.bucket_of(r.t0_s, width_s)) in crossed)
    return evidence


@given(
    metered(),
    ledgers(),
    st.sampled_from([7, 30, 60, 3600]),
    st.one_of(st.none(), st.integers(min_value=1, max_value=119)),
)
def test_roll_ups_give_the_proof_of_their_records(
    records: list[MeterRecord], assignments: list[Assignment], width_s: int, as_of: int | None
) -> None:
    as_of_s = None if as_of is None else EPOCH + as_of
    expected = build(records, assignments, as_of_s)
    assert build(standing_in(records, assignments, as_of_s, width_s), assignments, as_of_s) == (
        expected
    )


@given(metered(), st.sampled_from([1, 7, 60]))
def test_roll_ups_partition_their_records_by_bucket(
    records: list[MeterRecord], width_s: int
) -> None:
    rolled = rollup.roll_up(records, width_s=width_s)
    assert sum(each.records for each in rolled) == len(records)
    for each in rolled:
        assert each.t0_s < each.t1_s
        inside = [
            r
            for r in records
            if r.gpu == each.gpu
            and r.healthy == each.healthy
            and rollup.bucket_of(r.t0_s, width_s) == rollup.bucket_of(each.t0_s, width_s)
            and each.t0_s <= r.t0_s
            and r.t1_s <= each.t1_s
        ]
        # Its records, and any of another roll-up within its hull, cover it exactly.
        assert accounting.coalesce((r.t0_s, r.t1_s) for r in inside) == [(each.t0_s, each.t1_s)]


def test_a_roll_up_sums_exactly() -> None:
    records = [
        MeterRecord("n1", "g1", EPOCH, EPOCH + 2, True, 12.5, 10),
        MeterRecord("n1", "g1", EPOCH + 2, EPOCH + 3, True, 90, None),
        MeterRecord("n1", "g1", EPOCH + 3, EPOCH + 4, True, None, 7),
    ]
    (rolled,) = rollup.roll_up(records, width_s=60)
    assert rolled == MeterRollup("n1", "g1", EPOCH, EPOCH + 4, True, 3, Fraction(25) + 90, 3, 17)


def test_records_apart_or_of_other_health_or_bucket_start_new_roll_ups() -> None:
    records = [
        MeterRecord("n1", "g1", EPOCH, EPOCH + 1, True),
        MeterRecord("n1", "g1", EPOCH + 2, EPOCH + 3, True),  # a second apart
        MeterRecord("n1", "g1", EPOCH + 3, EPOCH + 4, False),  # unhealthy
        MeterRecord("n1", "g1", EPOCH + 60, EPOCH + 61, True),  # next bucket, adjacent? no
        MeterRecord("n1", "g1", EPOCH + 59, EPOCH + 60, True),  # joins nothing of bucket 60
    ]
    hulls = sorted(
        (r.t0_s - EPOCH, r.t1_s - EPOCH, r.healthy) for r in rollup.roll_up(records, width_s=60)
    )
    assert hulls == [(0, 1, True), (2, 3, True), (3, 4, False), (59, 60, True), (60, 61, True)]


def test_a_record_that_does_not_connect_is_refused() -> None:
    accumulator = RollupAccumulator.of(MeterRecord("n1", "g1", EPOCH, EPOCH + 1, True), width_s=60)
    with pytest.raises(ValueError, match="does not connect"):
        accumulator.add(MeterRecord("n1", "g1", EPOCH + 5, EPOCH + 6, True))
    for other in (
        MeterRecord("n1", "g1", EPOCH + 1, EPOCH + 2, False),
        MeterRecord("n1", "g2", EPOCH + 1, EPOCH + 2, True),
        MeterRecord("n2", "g1", EPOCH + 1, EPOCH + 2, True),
    ):
        assert not accumulator.connects(other)
    edge = RollupAccumulator.of(MeterRecord("n1", "g1", EPOCH + 59, EPOCH + 60, True), width_s=60)
    assert not edge.connects(MeterRecord("n1", "g1", EPOCH + 60, EPOCH + 61, True))
    assert edge.connects(MeterRecord("n1", "g1", EPOCH + 58, EPOCH + 59, True))


def test_a_roll_up_across_an_assigned_edge_is_refused() -> None:
    records = [MeterRecord("n1", "g1", EPOCH + s, EPOCH + s + 1, True, 50, 5) for s in range(20)]
    assignments = [Assignment(factories.CONTRACT_ID, "n1", "g1", EPOCH + 10, EPOCH + 100)]
    with pytest.raises(ValueError, match="crosses the edge of an assigned span"):
        build(rollup.roll_up(records, width_s=60), assignments, None)


def test_fractions_round_trip_as_text() -> None:
    for value in (Fraction(0), Fraction(45), Fraction(1, 3), Fraction(-7, 2), Fraction(2**80, 3)):
        assert rollup.parse_fraction(rollup.fraction_text(value)) == value
    assert rollup.fraction_text(90) == "90"
