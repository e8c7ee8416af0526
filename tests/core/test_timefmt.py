"""RFC 3339 UTC instants: exact parsing and formatting, and refusals that a cache of parsed
instants never turns into acceptances."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpudelivery import errors, timefmt

# 1970-01-01 to 9999-12-31.
instants = st.integers(min_value=0, max_value=253_402_300_799)


@given(instants)
def test_a_formatted_instant_parses_back_to_itself(epoch_s: int) -> None:
    text = timefmt.format_utc(epoch_s)

    assert timefmt.parse_utc(text, field="t0") == epoch_s
    assert timefmt.parse_utc(text, field="t1") == epoch_s  # from the cache this time


def test_known_instants() -> None:
    assert timefmt.parse_utc("1970-01-01T00:00:00Z", field="t") == 0
    assert timefmt.parse_utc("2026-03-03T09:00:00Z", field="t") == 1_772_528_400
    assert timefmt.parse_utc("2026-03-03T09:00:00+00:00", field="t") == 1_772_528_400
    assert timefmt.format_utc(1_772_528_400) == "2026-03-03T09:00:00Z"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("2026-03-03 09:00:00Z", "is not an RFC 3339 timestamp like 2026-03-03T09:00:00Z"),
        ("2026-03-03T09:00Z", "is not an RFC 3339 timestamp like 2026-03-03T09:00:00Z"),
        ("2026-02-30T09:00:00Z", "is not an RFC 3339 timestamp like 2026-03-03T09:00:00Z"),
        ("2026-03-03T09:00:00", "has no UTC offset (add a Z suffix)"),
        ("2026-03-03T09:00:00+01:00", "is not in UTC (use a Z suffix)"),
        ("2026-03-03T09:00:00.5Z", "has fractional seconds; use whole seconds"),
    ],
)
def test_a_bad_instant_is_refused_every_time_naming_the_field_asked(text: str, reason: str) -> None:
    for field in ("t0", "t1", "t0"):
        with pytest.raises(errors.InputError) as refused:
            timefmt.parse_utc(text, field=field)
        assert (refused.value.field, refused.value.reason) == (field, f"{text!r} {reason}")


def test_a_good_instant_parsed_before_does_not_vouch_for_a_bad_one() -> None:
    assert timefmt.parse_utc("2026-03-03T09:00:00Z", field="t0") == 1_772_528_400

    with pytest.raises(errors.InputError, match="fractional seconds"):
        timefmt.parse_utc("2026-03-03T09:00:00.000001Z", field="t0")


@pytest.mark.parametrize("value", [None, 1_772_528_400, b"2026-03-03T09:00:00Z", ["x"]])
def test_a_value_that_is_not_a_string_is_refused_by_its_type(value: object) -> None:
    with pytest.raises(errors.InputError) as refused:
        timefmt.parse_utc(value, field="from")

    assert refused.value.field == "from"
    assert refused.value.reason == (
        f"must be an RFC 3339 UTC timestamp string, got {type(value).__name__}"
    )


class _Text(str):
    """A str subclass: parsed as its text, never answered from the cache of exact strings."""

    __slots__ = ()


def test_a_string_subclass_parses_as_its_text() -> None:
    assert timefmt.parse_utc(_Text("2026-03-03T09:00:00Z"), field="t") == 1_772_528_400
    with pytest.raises(errors.InputError, match="has no UTC offset"):
        timefmt.parse_utc(_Text("2026-03-03T09:00:00"), field="t")
