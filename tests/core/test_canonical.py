"""Canonical JSON: the fast path gives exactly RFC 8785's bytes, and refuses what it refuses."""

from __future__ import annotations

from typing import Any

import pytest
import rfc8785
from hypothesis import given
from hypothesis import strategies as st

from gpudelivery import canonical, errors

keys = st.text(max_size=6)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**60), max_value=2**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=25,
)


def reference(value: Any) -> bytes | None:
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, ValueError, TypeError):
        return None


@given(values)
def test_canonical_json_equals_the_rfc8785_reference(value: Any) -> None:
    expected = reference(value)
    if expected is None:
        with pytest.raises(errors.InputError, match=r"^cannot be canonicalised as JSON"):
            canonical.canonical_json(value)
    else:
        assert canonical.canonical_json(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        {"é": 1, "e": 2, "\u20ac": 3, "\U0001f600": 4, "\ue000": 5},  # UTF-16 vs code point order
        {"text": 'quote " backslash \\ control \x01\x1f tab\t del\x7f euro \u20ac'},
        {"big": 2**53 - 1, "negative": -(2**53) + 1},
        [1.5, 1e21, 1e-7, -0.0, 100.0],
        {"looks like numbers": '1.5 1e3 9007199254740993 \\"2.5\\"', "n": 7, "t": True},
        {'escaped \\" quote': ["\\", '"', 12345678901234, -123456789012345]},
        [9_007_199_254_740_991, "x", 1, "y", 2],  # 16 digits, below 2^53: the slow path
    ],
)
def test_edge_cases_match_the_reference(value: Any) -> None:
    assert canonical.canonical_json(value) == rfc8785.dumps(value)


@pytest.mark.parametrize("value", [2**53, {"x": float("nan")}, "\ud800", {"k": {1, 2}}])
def test_values_rfc8785_cannot_hold_are_refused(value: Any) -> None:
    with pytest.raises(errors.InputError, match=r"^cannot be canonicalised as JSON"):
        canonical.canonical_json(value)


@pytest.mark.parametrize("value", [2**53, -(2**53), {"records": [{"energy_mj": 2**60}]}])
def test_integers_rfc8785_cannot_hold_are_refused_even_from_a_plain_producer(
    value: Any,
) -> None:
    with pytest.raises(errors.InputError, match=r"^cannot be canonicalised as JSON"):
        canonical.canonical_json(value, assume_plain=True)


@pytest.mark.parametrize(
    ("value", "plain"),
    [
        ({"a": [1, "x", None, True, {"b": (2, 3)}]}, True),
        ([True, False, 2**53 - 1, -(2**53) + 1], True),
        ([True, 2**53], False),
        ([[[-(2**53)]]], False),
        ({"a": [{"b": 1.0}]}, False),
        ({"a": {1: "x"}}, False),
        ({"a": {"\ue000": 1}}, False),
        ({"a": {"\u20ac": 1}}, True),
        ([{"x": {1, 2}}], False),
        ([], True),
        ({}, True),
    ],
)
def test_is_plain_says_exactly_which_values_the_fast_encoder_takes(value: Any, plain: bool) -> None:
    assert canonical.is_plain(value) is plain


@given(values)
def test_is_plain_values_encode_to_the_rfc8785_bytes(value: Any) -> None:
    if canonical.is_plain(value):
        assert canonical.canonical_json(value, assume_plain=True) == rfc8785.dumps(value)
