"""Delivered GPU-seconds: the worked example, the rules one by one, and a brute-force oracle."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from gpudelivery import accounting
from gpudelivery.evidence import Assignment, MeterRecord

from utils import factories
from utils.factories import EPOCH, G1, G2, G3, assignment, record
from utils.strategies import SMALL, scenarios

WINDOW = (EPOCH, EPOCH + 3600)


def delivered(
    assignments: list[Assignment],
    records: list[MeterRecord],
    gpu_count: int = 2,
    window: tuple[int, int] = WINDOW,
) -> int:
    return accounting.account(
        gpu_count=gpu_count,
        contract_id=factories.CONTRACT_ID,
        window=window,
        assignments=assignments,
        records=records,
    ).delivered_gpu_seconds


def brute_force(
    gpu_count: int,
    window: tuple[int, int],
    assignments: list[Assignment],
    records: list[MeterRecord],
    contract_id: str = factories.CONTRACT_ID,
) -> int:
    """SETTLEMENT.md read literally: walk every second, check every GPU."""
    gpus = {a.gpu for a in assignments} | {r.gpu for r in records}
    total = 0
    for second in range(*window):
        count = 0
        for gpu in gpus:
            assigned = any(
                a.gpu == gpu and a.contract_id == contract_id and a.start_s <= second < a.end_s
                for a in assignments
            )
            covering = [r for r in records if r.gpu == gpu and r.t0_s <= second < r.t1_s]
            if assigned and covering and all(r.healthy for r in covering):
                count += 1
        total += min(gpu_count, count)
    return total


def account_worked_example(as_of_s: int | None = None) -> accounting.Accounting:
    return accounting.account(
        gpu_count=2,
        contract_id=factories.CONTRACT_ID,
        window=WINDOW,
        assignments=factories.worked_assignments(),
        records=factories.worked_records(),
        as_of_s=as_of_s,
    )


def test_worked_example_delivers_6480_of_7200_gpu_seconds() -> None:
    result = account_worked_example()
    assert result.contracted_gpu_seconds == 7200
    assert result.delivered_gpu_seconds == 6480


def test_worked_example_metered_healthy_spans_cover_the_window_not_only_the_assignment() -> None:
    spans = accounting.healthy_spans(factories.worked_records(), window=WINDOW)
    assert spans == {
        G1: [(EPOCH, EPOCH + 600), (EPOCH + 720, EPOCH + 3600)],
        G2: [(EPOCH, EPOCH + 1800)],
        G3: [(EPOCH, EPOCH + 3600)],
    }


def test_unhealthy_record_overrides_healthy_one() -> None:
    records = [record(G1, 0, 3600), record(G1, 100, 200, healthy=False)]
    assert delivered([assignment(G1, 0, 3600)], records) == 3500


def test_unassigned_gpu_delivers_nothing() -> None:
    assert delivered([assignment(G1, 0, 3600)], [record(G2, 0, 3600)]) == 0


def test_assignment_to_another_contract_does_not_count() -> None:
    other = assignment(G1, 0, 3600, contract_id="OTHER-1")
    assert delivered([other], [record(G1, 0, 3600)]) == 0


def test_unmetered_seconds_are_not_delivered() -> None:
    records = [record(G1, 0, 1000), record(G1, 1060, 3600)]
    assert delivered([assignment(G1, 0, 3600)], records) == 3540


def test_substitutes_never_count_past_n() -> None:
    gpus = [G1, G2, G3]
    assignments = [assignment(gpu, 0, 3600) for gpu in gpus]
    records = [record(gpu, 0, 3600) for gpu in gpus]
    assert delivered(assignments, records, gpu_count=2) == 7200


def test_records_outside_the_window_are_ignored() -> None:
    records = [record(G1, -7200, -3600), record(G1, 3600, 7200), record(G1, -30, 30)]
    assert delivered([assignment(G1, -3600, 7200)], records) == 30


def test_overlapping_and_duplicated_records_count_once() -> None:
    records = [record(G1, 0, 600), record(G1, 300, 900), record(G1, 0, 600), record(G1, 600, 900)]
    assert delivered([assignment(G1, 0, 3600)], records) == 900


def test_provisional_accounting_counts_only_before_as_of() -> None:
    result = account_worked_example(as_of_s=EPOCH + 900)
    assert (result.contracted_gpu_seconds, result.delivered_gpu_seconds) == (7200, 1680)


def test_unsorted_input_compacts_to_the_same_spans_as_sorted_input() -> None:
    minutes = list(range(600))
    random.Random(7).shuffle(minutes)
    shuffled = [record(G1, m * 6, m * 6 + 6, healthy=m % 100 != 50) for m in minutes]
    spans = accounting.healthy_spans(shuffled, window=WINDOW)
    assert spans[G1] == [
        (EPOCH, EPOCH + 300),
        (EPOCH + 306, EPOCH + 900),
        (EPOCH + 906, EPOCH + 1500),
        (EPOCH + 1506, EPOCH + 2100),
        (EPOCH + 2106, EPOCH + 2700),
        (EPOCH + 2706, EPOCH + 3300),
        (EPOCH + 3306, EPOCH + 3600),
    ]


def test_streamed_subtract_keeps_a_cut_that_spans_two_spans() -> None:
    assert accounting.subtract([(0, 10), (12, 20), (30, 40)], [(5, 15), (35, 36)]) == [
        (0, 5),
        (15, 20),
        (30, 35),
        (36, 40),
    ]


def test_coalesce_merges_touching_spans() -> None:
    assert accounting.coalesce([(5, 9), (1, 3), (3, 4), (8, 12)]) == [(1, 4), (5, 12)]


def test_subtract_and_intersect_on_known_spans() -> None:
    spans = [(0, 10), (20, 30)]
    assert accounting.subtract(spans, [(5, 22), (25, 26)]) == [(0, 5), (22, 25), (26, 30)]
    assert accounting.intersect(spans, [(5, 22), (29, 40)]) == [(5, 10), (20, 22), (29, 30)]


@given(scenarios())
def test_accounting_equals_per_second_brute_force(
    scenario: tuple[int, list[Assignment], list[MeterRecord]],
) -> None:
    gpu_count, assignments, records = scenario
    assert delivered(assignments, records, gpu_count, SMALL) == brute_force(
        gpu_count, SMALL, assignments, records
    )


@given(scenarios(), st.randoms(use_true_random=False))
def test_permuting_or_duplicating_records_changes_nothing(
    scenario: tuple[int, list[Assignment], list[MeterRecord]], rng: random.Random
) -> None:
    gpu_count, assignments, records = scenario
    expected = delivered(assignments, records, gpu_count, SMALL)
    shuffled = records + rng.choices(records, k=len(records)) if records else []
    rng.shuffle(shuffled)
    ledger = assignments + assignments
    rng.shuffle(ledger)
    assert delivered(ledger, shuffled, gpu_count, SMALL) == expected
