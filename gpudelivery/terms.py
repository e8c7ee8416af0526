"""The terms of a physically delivered GPU-compute contract.

`ContractTerms` is the validated form of what an exchange sends (shared/SETTLEMENT.md,
"Terms of a delivery contract"). Validation happens once, here, so that the accounting,
the settlement and the proof never see an impossible contract: a reversed window, a
fractional second, a price as a float, a penalty tier written as a percentage. Money and
rates are `Decimal` and must arrive as decimal strings, never JSON numbers, because a
binary float cannot hold 0.1.

This module does not know who holds a contract now (the API tracks transfers) nor where it
is delivered (the operator does).
"""

from __future__ import annotations

import itertools
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

import pydantic
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from gpudelivery import errors, timefmt

__all__ = ["ContractTerms", "PenaltyTier", "parse_terms"]

_IDENTIFIER = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"


def _decimal_string(value: object) -> Decimal:
    if isinstance(value, Decimal):
        decimal = value
    elif isinstance(value, str):
        try:
            decimal = Decimal(value.strip())
        except InvalidOperation as exc:
            raise ValueError(f"{value!r} is not a decimal number") from exc
    else:
        raise ValueError(
            f'must be a decimal string such as "2.50", not a JSON {type(value).__name__}'
        )
    if not decimal.is_finite():
        raise ValueError(f"{value!r} is not a finite decimal")
    return decimal


def _timestamp(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return timefmt.parse_utc(value, field="")
    except errors.InputError as exc:
        raise ValueError(exc.reason) from exc


DecimalString = Annotated[Decimal, BeforeValidator(_decimal_string)]
EpochSeconds = Annotated[int, BeforeValidator(_timestamp)]


class PenaltyTier(BaseModel):
    """Availability below `below` costs `rate` times the contract value."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    below: DecimalString = Field(gt=0, le=1, description="availability threshold, 0 < below <= 1")
    rate: DecimalString = Field(ge=0, le=1, description="share of the contract value, 0..1")


class ContractTerms(BaseModel):
    """A delivery contract: N GPUs of one instrument for every second of [start, end)."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=False)

    contract_id: str = Field(min_length=1, max_length=128, pattern=_IDENTIFIER)
    buyer: str | None = Field(default=None, min_length=1, max_length=128)
    instrument: str = Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    gpu_count: int = Field(gt=0, le=1_000_000, strict=True)
    start: EpochSeconds
    end: EpochSeconds
    price_per_gpu_hour: DecimalString = Field(gt=0)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    penalty_tiers: tuple[PenaltyTier, ...] = ()
    ld_multiplier: DecimalString = Field(default=Decimal(0), ge=0)

    @pydantic.field_validator("penalty_tiers")
    @classmethod
    def _tiers_sorted_and_sane(cls, tiers: tuple[PenaltyTier, ...]) -> tuple[PenaltyTier, ...]:
        ordered = tuple(sorted(tiers, key=lambda tier: tier.below, reverse=True))
        for milder, severer in itertools.pairwise(ordered):
            if milder.below == severer.below:
                raise ValueError(f"two tiers share below={milder.below}")
            if severer.rate < milder.rate:
                raise ValueError(
                    f"tier below={severer.below} has rate {severer.rate}, less than the "
                    f"milder tier below={milder.below} (rate {milder.rate})"
                )
        return ordered

    @pydantic.model_validator(mode="after")
    def _window_is_forward(self) -> ContractTerms:
        if self.end <= self.start:
            raise ValueError(
                f"end ({timefmt.format_utc(self.end)}) must be after "
                f"start ({timefmt.format_utc(self.start)})"
            )
        return self

    @property
    def window_s(self) -> int:
        """|W|, the window's length in seconds."""
        return self.end - self.start

    @property
    def contracted_gpu_seconds(self) -> int:
        """N x |W|."""
        return self.gpu_count * self.window_s

    def to_json(self) -> dict[str, Any]:
        """The terms as JSON: decimals as strings, times as RFC 3339 UTC."""
        document: dict[str, Any] = {
            "contract_id": self.contract_id,
            "instrument": self.instrument,
            "gpu_count": self.gpu_count,
            "start": timefmt.format_utc(self.start),
            "end": timefmt.format_utc(self.end),
            "price_per_gpu_hour": str(self.price_per_gpu_hour),
            "currency": self.currency,
            "penalty_tiers": [
                {"below": str(tier.below), "rate": str(tier.rate)} for tier in self.penalty_tiers
            ],
            "ld_multiplier": str(self.ld_multiplier),
        }
        if self.buyer is not None:
            document["buyer"] = self.buyer
        return document


def _location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def parse_terms(data: object) -> ContractTerms:
    """Validate terms from decoded JSON; a `TermsError` names the first bad field."""
    if not isinstance(data, dict):
        raise errors.TermsError(f"terms must be a JSON object, got {type(data).__name__}")
    try:
        return ContractTerms.model_validate(data)
    except pydantic.ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = _location(first["loc"]) or None
        message = str(first["msg"]).removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown field"
        elif first["type"] == "missing":
            message = "missing"
        raise errors.TermsError(message, field=field) from exc
