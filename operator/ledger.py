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

import httpx

from gpudelivery import timefmt
from gpudelivery.operator import errors

__all__ = ["ASSIGNMENTS_PATH", "Interval", "LedgerClient", "digest", "from_status", "to_status"]

# The API's ledger endpoint (docs: README, "The API"), relative to its base URL.
ASSIGNMENTS_PATH = "/v1/contracts/{contract_id}/assignments"
# Statuses worth another try: the API is overloaded or restarting, or does not know the
# contract yet (the operator mirrors contracts, which may lag behind a kubectl apply).
_RETRYABLE = frozenset({404, 408, 429})


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


class LedgerClient:
    """Reports a contract's intervals to the API as the `operator` role."""

    def __init__(self, client: httpx.Client, *, token: str) -> None:
        self._client = client
        self._headers = {"Authorization": f"Bearer {token}"}

    def __repr__(self) -> str:  # the token stays out of any log or traceback
        return f"LedgerClient({self._client.base_url!s})"

    def report(self, contract_id: str, intervals: Sequence[Interval]) -> None:
        """Send every interval of the contract; raises `LedgerUnavailableError` when it is
        worth trying again later, `LedgerRefusedError` when it is not."""
        if not intervals:
            return
        path = ASSIGNMENTS_PATH.format(contract_id=quote(contract_id, safe=""))
        body = {"assignments": to_status(intervals)}
        try:
            response = self._client.post(path, json=body, headers=self._headers)
        except httpx.HTTPError as exc:
            raise errors.LedgerUnavailableError(f"the API is unreachable: {exc}") from exc
        if response.is_success:
            return
        detail = _detail(response)
        if response.status_code in _RETRYABLE or response.status_code >= 500:
            raise errors.LedgerUnavailableError(
                f"the API answered {response.status_code}: {detail}"
            )
        raise errors.LedgerRefusedError(f"the API answered {response.status_code}: {detail}")


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    return str(body.get("detail", body))[:200] if isinstance(body, dict) else str(body)[:200]
