"""The assignment ledger as the operator reports it: which GPU served which contract when.

The operator keeps every assignment interval of a contract in the contract's status (so a
restarted operator knows them) and reports them whole to the API, whose endpoint is
idempotent (`POST /v1/contracts/{id}/assignments`: a known interval is acknowledged, an
open one may be closed). Reporting never blocks delivery: the caller reports after each
change and again on its timer while the API is down, and records what the API last
acknowledged (`digest`) so an unchanged ledger is not sent again.

Not here: when intervals open and close (the delivery handlers decide that).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from gpudelivery import timefmt
from gpudelivery.operator import api_calls, errors

__all__ = ["ASSIGNMENTS_PATH", "Interval", "LedgerClient", "digest", "from_status", "to_status"]

# The API's ledger endpoint (docs: README, "The API"), relative to its base URL.
ASSIGNMENTS_PATH = "/v1/contracts/{contract_id}/assignments"


@dataclass(frozen=True, order=True)
class Interval:
    """GPU `gpu_uuid` of `node` served the contract over [start_s, end_s); an open interval
    (end_s None) is still serving."""

    node: str
    gpu_uuid: str
    start_s: int
    end_s: int | None = None

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "node": self.node,
            "gpu_uuid": self.gpu_uuid,
            "start": timefmt.format_utc(self.start_s),
        }
        if self.end_s is not None:
            document["end"] = timefmt.format_utc(self.end_s)
        return document


def to_status(intervals: Sequence[Interval]) -> list[dict[str, Any]]:
    """The intervals as the contract's status keeps them (`status.ledger.intervals`)."""
    return [interval.to_json() for interval in sorted(intervals)]


def from_status(items: Sequence[Any]) -> list[Interval]:
    """The intervals a contract's status keeps; what is not one is refused by name."""
    intervals = []
    for index, item in enumerate(items):
        where = f"status.ledger.intervals[{index}]"
        if not isinstance(item, dict):
            raise errors.OperatorError(f"{where}: not an interval")
        end = item.get("end")
        intervals.append(
            Interval(
                node=str(item.get("node")),
                gpu_uuid=str(item.get("gpu_uuid")),
                start_s=timefmt.parse_utc(item.get("start"), field=f"{where}.start"),
                end_s=None if end is None else timefmt.parse_utc(end, field=f"{where}.end"),
            )
        )
    return sorted(intervals)


def digest(intervals: Sequence[Interval]) -> str:
    """What the ledger reported last is compared by: the SHA-256 of its intervals' JSON."""
    text = json.dumps(to_status(intervals), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class LedgerClient(api_calls.ApiCalls):
    """Reports a contract's intervals to the API as the `operator` role."""

    # Also worth another try: a contract the API does not know yet (the operator mirrors
    # contracts, which may lag behind a kubectl apply).
    retryable = frozenset({404, 408, 429})
    unavailable = errors.LedgerUnavailableError
    refused = errors.LedgerRefusedError

    def report(self, contract_id: str, intervals: Sequence[Interval]) -> None:
        """Send every interval of the contract; raises `LedgerUnavailableError` when it is
        worth trying again later, `LedgerRefusedError` when it is not."""
        if not intervals:
            return
        path = ASSIGNMENTS_PATH.format(contract_id=quote(contract_id, safe=""))
        self._request("POST", path, json={"assignments": to_status(intervals)})
