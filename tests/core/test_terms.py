"""Contract terms: what is accepted, how it is normalised, and how refusals name the field."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from gpudelivery import errors, terms

from utils import factories


def refusal(**overrides: Any) -> str:
    with pytest.raises(errors.TermsError) as caught:
        terms.parse_terms(factories.terms_json(**overrides))
    return str(caught.value)


def test_worked_example_terms_parse_to_exact_values() -> None:
    contract = factories.worked_terms()
    assert contract.gpu_count == 2
    assert contract.window_s == 3600
    assert contract.contracted_gpu_seconds == 7200
    assert contract.price_per_gpu_hour == Decimal("2.00")
    assert contract.ld_multiplier == Decimal("1.5")


def test_tiers_are_stored_mildest_first_whatever_the_input_order() -> None:
    contract = factories.worked_terms(
        penalty_tiers=[{"below": "0.95", "rate": "0.25"}, {"below": "0.99", "rate": "0.10"}]
    )
    assert [tier.below for tier in contract.penalty_tiers] == [Decimal("0.99"), Decimal("0.95")]


def test_terms_round_trip_through_json() -> None:
    contract = factories.worked_terms()
    assert terms.parse_terms(contract.to_json()) == contract


def test_optional_fields_take_their_defaults() -> None:
    contract = factories.worked_terms(buyer=None, penalty_tiers=None, ld_multiplier=None)
    assert (contract.buyer, contract.penalty_tiers, contract.ld_multiplier) == (None, (), 0)


def test_reversed_window_is_refused_naming_both_ends() -> None:
    message = refusal(start="2026-03-03T01:00:00Z", end="2026-03-03T00:00:00Z")
    assert message == "end (2026-03-03T00:00:00Z) must be after start (2026-03-03T01:00:00Z)"


def test_empty_window_is_refused() -> None:
    assert "must be after start" in refusal(end="2026-03-03T00:00:00Z")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"colour": "red"}, "colour: unknown field"),
        ({"gpu_count": None}, "gpu_count: missing"),
        ({"gpu_count": 0}, "gpu_count: Input should be greater than 0"),
        ({"gpu_count": "2"}, "gpu_count: Input should be a valid integer"),
        ({"gpu_count": 2.0}, "gpu_count: Input should be a valid integer"),
        ({"gpu_count": True}, "gpu_count: Input should be a valid integer"),
        (
            {"price_per_gpu_hour": 2.5},
            'price_per_gpu_hour: must be a decimal string such as "2.50", not a JSON float',
        ),
        ({"price_per_gpu_hour": "two"}, "price_per_gpu_hour: 'two' is not a decimal number"),
        ({"price_per_gpu_hour": "NaN"}, "price_per_gpu_hour: 'NaN' is not a finite decimal"),
        ({"price_per_gpu_hour": "0"}, "price_per_gpu_hour: Input should be greater than 0"),
        ({"currency": "usd"}, "currency: String should match pattern '^[A-Z]{3}$'"),
        (
            {"start": "2026-03-03T02:00:00+02:00"},
            "start: '2026-03-03T02:00:00+02:00' is not in UTC (use a Z suffix)",
        ),
        (
            {"start": "2026-03-03T00:00:00"},
            "start: '2026-03-03T00:00:00' has no UTC offset (add a Z suffix)",
        ),
        (
            {"start": "2026-03-03T00:00:00.5Z"},
            "start: '2026-03-03T00:00:00.5Z' has fractional seconds; use whole seconds",
        ),
        (
            {"start": "yesterday"},
            "start: 'yesterday' is not an RFC 3339 timestamp like 2026-03-03T09:00:00Z",
        ),
        ({"ld_multiplier": "-1"}, "ld_multiplier: Input should be greater than or equal to 0"),
        (
            {"penalty_tiers": [{"below": "95", "rate": "0.25"}]},
            "penalty_tiers[0].below: Input should be less than or equal to 1",
        ),
        (
            {"penalty_tiers": [{"below": "0.95", "rate": "25"}]},
            "penalty_tiers[0].rate: Input should be less than or equal to 1",
        ),
        (
            {"penalty_tiers": [{"below": "0.95", "rate": "0.1", "cap": "1"}]},
            "penalty_tiers[0].cap: unknown field",
        ),
        (
            {"penalty_tiers": [{"below": "0.95", "rate": "0.1"}, {"below": "0.95", "rate": "0.2"}]},
            "penalty_tiers: two tiers share below=0.95",
        ),
        (
            {"penalty_tiers": [{"below": "0.99", "rate": "0.3"}, {"below": "0.95", "rate": "0.2"}]},
            "penalty_tiers: tier below=0.95 has rate 0.2, less than the milder tier below=0.99 "
            "(rate 0.3)",
        ),
    ],
)
def test_invalid_terms_are_refused_naming_the_field(
    overrides: dict[str, Any], expected: str
) -> None:
    assert refusal(**overrides) == expected


def test_terms_that_are_not_an_object_are_refused() -> None:
    with pytest.raises(errors.TermsError, match="terms must be a JSON object, got list"):
        terms.parse_terms([])
