"""What several route modules read the same way: the clock, instants, contract ids."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import Path

from gpudelivery import errors as core_errors
from gpudelivery import timefmt
from gpudelivery.api import errors

__all__ = ["NOT_FOUND", "ContractIdPath", "instant", "now_s"]

ContractIdPath = Annotated[str, Path(min_length=1, max_length=128)]
# The answer documented for a contract another tenant holds, or none holds.
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "No such contract, or not yours."}
}


def now_s() -> int:
    return int(time.time())


def instant(value: str, field: str) -> int:
    """An RFC 3339 UTC instant from a request; 422 naming `field` when it is not one."""
    try:
        return timefmt.parse_utc(value, field=field)
    except core_errors.InputError as exc:
        raise errors.UnprocessableError(str(exc)) from exc
