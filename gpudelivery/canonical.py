"""Canonical JSON (RFC 8785, JCS) and the digests taken over it.

Whatever is signed or hashed is first serialised as RFC 8785 canonical JSON, so that two
parties that agree on a JSON value agree on its bytes, whatever their JSON library. The
core never signs floats it did not have to: money and rates travel as decimal strings,
times as RFC 3339 strings, counts as integers.

`rfc8785` is the reference. Meter batches are canonicalised on every node every few
seconds, and `rfc8785` is pure Python, so values made only of strings, booleans, nulls,
integers below 2^53, lists and objects whose keys hold no character past U+D7FF take a
fast path through `orjson` (compiled, several times faster than even the standard
library's C encoder), which produces exactly the same bytes for them: keys sorted by code
point (equal to UTF-16 order below the surrogates), minimal escaping with lower-case hex,
no spaces. Anything else (floats above all, whose RFC 8785
form is ECMAScript's) goes to `rfc8785`. A property test holds the two paths equal.
"""

from __future__ import annotations

import hashlib
from itertools import chain
from typing import Any

import orjson
import rfc8785

from gpudelivery import errors

__all__ = ["canonical_json", "is_plain", "sha256_hex"]

# Sorted keys, and integers beyond RFC 8785's refused (the fallback then names them).
_FAST_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_STRICT_INTEGER
# RFC 8785 numbers are IEEE doubles: integers must stay below this to survive.
_MAX_SAFE_INTEGER = 2**53
# Below the surrogates, code-point order (Python's) and UTF-16 order (RFC 8785's) agree.
_FIRST_SURROGATE = "\ud800"
_SCALARS = frozenset({str, bool, type(None)})
_KINDS = _SCALARS | {int, dict, list, tuple}
# isinstance as C-level predicates for filter(): no Python frame per item.
_is_int = int.__instancecheck__
_is_dict = dict.__instancecheck__
_is_list = list.__instancecheck__
_is_tuple = tuple.__instancecheck__


def is_plain(value: Any) -> bool:
    """True when the fast encoder serialises `value` exactly as RFC 8785 does."""
    return _plain_but_for_integers(value, check_integers=True)


def _plain_but_for_integers(value: Any, *, check_integers: bool) -> bool:
    """`is_plain`, optionally leaving out the range of the integers (the fast encoder's
    `OPT_STRICT_INTEGER` refuses those beyond 2^53 itself, in C).

    It walks the value a level at a time, and each level's checks are built-ins mapped over
    the whole level (this runs over every field of every meter record): no Python code runs
    per item. Once a level's types are known to be exact JSON kinds, `isinstance` is an
    exact type test (`int` also takes the booleans, which cannot break its range check).
    """
    level = [value]
    while level:
        kinds = set(map(type, level))
        if not kinds <= _KINDS:
            return False
        if check_integers and int in kinds:
            ints = list(filter(_is_int, level))
            if max(ints) >= _MAX_SAFE_INTEGER or min(ints) <= -_MAX_SAFE_INTEGER:
                return False
        deeper: list[Any] = []
        if dict in kinds:
            objects = level if len(kinds) == 1 else list(filter(_is_dict, level))
            keys = set(chain.from_iterable(objects))
            if keys:
                if set(map(type, keys)) != {str}:
                    return False
                joined = "".join(keys)
                if not joined.isascii() and max(joined) >= _FIRST_SURROGATE:
                    return False
            deeper.extend(chain.from_iterable(map(dict.values, objects)))
        if list in kinds:
            deeper.extend(chain.from_iterable(filter(_is_list, level)))
        if tuple in kinds:
            deeper.extend(chain.from_iterable(filter(_is_tuple, level)))
        level = deeper
    return True


def canonical_json(value: Any, *, assume_plain: bool = False) -> bytes:
    """The RFC 8785 canonical bytes of a JSON value.

    `assume_plain` skips the check of `is_plain` for a producer that guarantees it by
    construction (the meter's records); the bytes are then wrong if the guarantee is.
    Integers beyond 2^53 are refused either way.
    """
    if assume_plain or _plain_but_for_integers(value, check_integers=False):
        try:
            return orjson.dumps(value, option=_FAST_OPTIONS)
        except orjson.JSONEncodeError:
            pass  # a lone surrogate or a huge integer, say: let rfc8785 refuse it
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise errors.InputError(f"cannot be canonicalised as JSON: {exc}") from exc


def sha256_hex(data: bytes) -> str:
    """Lower-case hex SHA-256 of `data`."""
    return hashlib.sha256(data).hexdigest()
