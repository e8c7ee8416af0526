"""Settlement figures: the worked example, tier boundaries, rounding and sign."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpudelivery import settlement

from utils import factories


def test_worked_example_figures() -> None:
    result = settlement.settle(factories.worked_terms(), delivered_gpu_seconds=6480)
    assert result.to_json() == factories.WORKED_SETTLEMENT
    assert result.tier_rate == Decimal("0.25")


def test_full_delivery_pays_the_contract_value_without_penalty() -> None:
    result = settlement.settle(factories.worked_terms(), delivered_gpu_seconds=7200)
    assert (result.charge, result.penalty, result.net) == (Decimal("4.00"), 0, Decimal("4.00"))


def test_availability_equal_to_a_threshold_does_not_cross_it() -> None:
    terms = factories.worked_terms(ld_multiplier="0")
    at_99 = settlement.settle(terms, delivered_gpu_seconds=7128)  # exactly 0.99
    just_below = settlement.settle(terms, delivered_gpu_seconds=7127)
    assert (at_99.tier_rate, at_99.penalty) == (0, Decimal("0.00"))
    assert (just_below.tier_rate, just_below.penalty) == (Decimal("0.10"), Decimal("0.40"))


def test_nothing_delivered_makes_net_negative() -> None:
    result = settlement.settle(factories.worked_terms(), delivered_gpu_seconds=0)
    assert (result.charge, result.penalty, result.net) == (
        Decimal("0.00"),
        Decimal("7.00"),
        Decimal("-7.00"),
    )


def test_money_rounds_half_to_even_only_at_the_end() -> None:
    # 100 GPU-seconds at 0.18/GPU-hour is exactly 0.005; at 0.54 exactly 0.015.
    plain = {"penalty_tiers": [], "ld_multiplier": "0", "gpu_count": 1}
    low = settlement.settle(
        factories.worked_terms(price_per_gpu_hour="0.18", **plain), delivered_gpu_seconds=100
    )
    high = settlement.settle(
        factories.worked_terms(price_per_gpu_hour="0.54", **plain), delivered_gpu_seconds=100
    )
    assert (low.charge, high.charge) == (Decimal("0.00"), Decimal("0.02"))


def test_ratios_are_reported_to_six_places() -> None:
    result = settlement.settle(factories.worked_terms(), delivered_gpu_seconds=7199)
    assert (str(result.availability), str(result.shortfall_gpu_hours)) == ("0.999861", "0.000278")


def test_delivered_beyond_contracted_is_refused() -> None:
    with pytest.raises(ValueError, match=r"outside 0\.\.7200"):
        settlement.settle(factories.worked_terms(), delivered_gpu_seconds=7201)


@given(
    delivered=st.integers(min_value=0, max_value=7199),
    price=st.decimals(min_value="0.01", max_value="999.99", places=2),
    multiplier=st.decimals(min_value="0", max_value="5", places=1),
)
def test_delivering_more_never_lowers_net(
    delivered: int, price: Decimal, multiplier: Decimal
) -> None:
    terms = factories.worked_terms(price_per_gpu_hour=str(price), ld_multiplier=str(multiplier))
    before = settlement.settle(terms, delivered_gpu_seconds=delivered)
    after = settlement.settle(terms, delivered_gpu_seconds=delivered + 1)
    assert after.net >= before.net
    assert after.penalty <= before.penalty
