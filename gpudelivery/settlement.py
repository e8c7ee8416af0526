"""Money for a delivery: charge, penalty and net, per shared/SETTLEMENT.md, "Money".

Every intermediate figure is an exact rational (`fractions.Fraction`): GPU-hours are
GPU-seconds / 3600, which no finite decimal holds. Only the reported figures are rounded,
each half-even from its exact value, once, at the very end: money to 2 places, availability
and shortfall GPU-hours to 6. An exchange that follows SETTLEMENT.md to the letter gets the
same strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

from gpudelivery.terms import ContractTerms

__all__ = ["SETTLEMENT_FIELDS", "Settlement", "settle", "tier_rate"]

# Places of the reported figures: money in cents; ratios "at least 6 places" (SETTLEMENT.md).
MONEY_PLACES = 2
RATIO_PLACES = 6
_SECONDS_PER_HOUR = 3600

# The output keys of `gpudelivery settle`, in the order SETTLEMENT.md lists them.
SETTLEMENT_FIELDS = (
    "contract_id",
    "contracted_gpu_seconds",
    "delivered_gpu_seconds",
    "availability",
    "shortfall_gpu_hours",
    "charge",
    "penalty",
    "net",
)


def _round_half_even(value: Fraction, places: int) -> Decimal:
    scaled = round(value * 10**places)  # Fraction.__round__ rounds half to even
    return Decimal(scaled).scaleb(-places)


def tier_rate(terms: ContractTerms, *, delivered: int, contracted: int) -> Decimal:
    """Rate of the most severe tier crossed (availability < below), 0 if none is."""
    crossed = [tier for tier in terms.penalty_tiers if delivered < tier.below * contracted]
    return min(crossed, key=lambda tier: tier.below).rate if crossed else Decimal(0)


@dataclass(frozen=True, slots=True)
class Settlement:
    """The settlement figures of one contract."""

    contract_id: str
    currency: str
    contracted_gpu_seconds: int
    delivered_gpu_seconds: int
    availability: Decimal
    shortfall_gpu_hours: Decimal
    tier_rate: Decimal
    charge: Decimal
    penalty: Decimal
    net: Decimal

    def to_json(self) -> dict[str, Any]:
        """The keys of SETTLEMENT.md's offline calculator, decimals as strings."""
        return {
            "contract_id": self.contract_id,
            "contracted_gpu_seconds": self.contracted_gpu_seconds,
            "delivered_gpu_seconds": self.delivered_gpu_seconds,
            "availability": str(self.availability),
            "shortfall_gpu_hours": str(self.shortfall_gpu_hours),
            "charge": str(self.charge),
            "penalty": str(self.penalty),
            "net": str(self.net),
        }


def settle(terms: ContractTerms, *, delivered_gpu_seconds: int) -> Settlement:
    """Settle `terms` given the delivered GPU-seconds the accounting found."""
    contracted = terms.contracted_gpu_seconds
    if not 0 <= delivered_gpu_seconds <= contracted:
        raise ValueError(
            f"delivered GPU-seconds {delivered_gpu_seconds} outside 0..{contracted} for "
            f"contract {terms.contract_id}"
        )
    price = Fraction(terms.price_per_gpu_hour)
    shortfall_s = contracted - delivered_gpu_seconds
    rate = tier_rate(terms, delivered=delivered_gpu_seconds, contracted=contracted)
    charge = Fraction(delivered_gpu_seconds, _SECONDS_PER_HOUR) * price
    contract_value = Fraction(contracted, _SECONDS_PER_HOUR) * price
    liquidated = Fraction(terms.ld_multiplier) * Fraction(shortfall_s, _SECONDS_PER_HOUR) * price
    penalty = Fraction(rate) * contract_value + liquidated
    return Settlement(
        contract_id=terms.contract_id,
        currency=terms.currency,
        contracted_gpu_seconds=contracted,
        delivered_gpu_seconds=delivered_gpu_seconds,
        availability=_round_half_even(Fraction(delivered_gpu_seconds, contracted), RATIO_PLACES),
        shortfall_gpu_hours=_round_half_even(
            Fraction(shortfall_s, _SECONDS_PER_HOUR), RATIO_PLACES
        ),
        tier_rate=rate,
        charge=_round_half_even(charge, MONEY_PLACES),
        penalty=_round_half_even(penalty, MONEY_PLACES),
        net=_round_half_even(charge - penalty, MONEY_PLACES),
    )
