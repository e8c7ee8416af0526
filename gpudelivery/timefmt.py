"""RFC 3339 UTC timestamps at the edges, integer epoch seconds inside.

Every time the core computes with is an `int` of seconds since the Unix epoch, UTC: the
settlement rules work in whole seconds, and integers make the accounting exact and fast.
Text crossing a boundary (files, proofs, HTTP bodies) is RFC 3339 in UTC with whole seconds,
written with a `Z` (`2026-03-03T09:00:00Z`). Offsets other than UTC and fractional seconds
are refused rather than converted: a contract window is a legal term, and silently moving it
is worse than failing.
"""

from __future__ import annotations

import functools
import time
from datetime import datetime, timedelta

from gpudelivery import errors

__all__ = ["format_utc", "parse_utc"]

_ZERO = timedelta(0)


# Instants repeat heavily: every GPU of a node reports the same seconds, and one record's t1
# is the next one's t0. A full ingest request (100 batches of 10 s) holds about 1,000.
_CACHED_INSTANTS = 8192


class _NotAnInstant(ValueError):
    """Why a string is not an instant this module takes (the message names the string)."""


def parse_utc(value: object, *, field: str) -> int:
    """Parse an RFC 3339 UTC timestamp with whole seconds into epoch seconds."""
    if not isinstance(value, str):
        raise errors.InputError(
            f"must be an RFC 3339 UTC timestamp string, got {type(value).__name__}", field=field
        )
    try:
        # Only exact strings are cached: a subclass may compare equal to text it is not.
        return _epoch_s(value) if type(value) is str else _epoch_s.__wrapped__(value)
    except _NotAnInstant as exc:
        raise errors.InputError(str(exc), field=field) from exc


@functools.lru_cache(maxsize=_CACHED_INSTANTS)
def _epoch_s(value: str) -> int:
    """The epoch seconds of `value`, parsed once per process while it stays in the cache (a
    refusal raises, and is not cached: it is checked again each time)."""
    if len(value) < 19 or value[10] not in "Tt":
        raise _NotAnInstant(f"{value!r} is not an RFC 3339 timestamp like 2026-03-03T09:00:00Z")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise _NotAnInstant(
            f"{value!r} is not an RFC 3339 timestamp like 2026-03-03T09:00:00Z"
        ) from exc
    if parsed.tzinfo is None:
        raise _NotAnInstant(f"{value!r} has no UTC offset (add a Z suffix)")
    if parsed.utcoffset() != _ZERO:
        raise _NotAnInstant(f"{value!r} is not in UTC (use a Z suffix)")
    if parsed.microsecond:
        raise _NotAnInstant(f"{value!r} has fractional seconds; use whole seconds")
    return int(parsed.timestamp())


@functools.lru_cache(maxsize=1024)
def format_utc(epoch_s: int) -> str:
    """Format epoch seconds as `YYYY-MM-DDTHH:MM:SSZ`."""
    # time.gmtime, not datetime: a third of the cost, and the meter formats a new second
    # every round.
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))
