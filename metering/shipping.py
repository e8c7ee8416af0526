"""Shipping spooled batches to the API (docs/ingest.md), with retries and honest reporting.

The shipper sends the oldest unshipped batches, up to `batch_limit` a request. Each batch's
answer decides its fate: `accepted` and `duplicate` mark it shipped; `out_of_order`,
`fork`, `unknown_key` and `invalid` mark it rejected, kept in the spool as evidence and
reported, never retried. A busy or unreachable API (429, 503, other 5xx, connection
errors, timeouts) is retried with jittered exponential backoff, capped, honouring
`Retry-After`, for as long as it takes: the spool holds the batches meanwhile. A 413 halves
the request; any other 4xx for the request as a whole rejects its batches, reported.

With a `KeyRegistrar` (a bootstrap token is configured), the node key is registered before
the first shipment, and an `unknown_key` answer is not a rejection: the key is registered
again and the batches resent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import tenacity

from gpudelivery.metering import errors, registration, spool

__all__ = ["INGEST_PATH", "ShipStats", "Shipper"]

logger = logging.getLogger(__name__)

# The ingest endpoint, relative to the API's base URL (docs/ingest.md).
INGEST_PATH = "/v1/meter/batches"
# At most this many batches a request (the API refuses more than 100).
MAX_BATCHES_PER_REQUEST = 100
SHIPPED_STATUSES = frozenset({"accepted", "duplicate"})
UNKNOWN_KEY = "unknown_key"
# Backoff: 0.5 s doubling, jittered, never more than a minute between tries.
BACKOFF_MULTIPLIER_S = 0.5
BACKOFF_CAP_S = 60.0


class RetryableShipError(errors.MeteringError):
    """The API is busy or unreachable: try again later."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class ShipStats:
    """What the shipper has done, for metrics and health."""

    shipped: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    failures: int = 0
    last_success_at_s: float | None = None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class Shipper:
    """Ships one spool's batches to one API."""

    def __init__(
        self,
        store: spool.Spool,
        *,
        client: httpx.Client,
        batch_limit: int = 50,
        registrar: registration.KeyRegistrar | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < batch_limit <= MAX_BATCHES_PER_REQUEST:
            raise ValueError(f"batch_limit must be 1..{MAX_BATCHES_PER_REQUEST}")
        self.store = store
        self.client = client
        self.batch_limit = batch_limit
        self.registrar = registrar
        self.stats = ShipStats()
        self._clock = clock

    def ship_once(self) -> int:
        """Send one request of pending batches; how many were settled (shipped or rejected).

        Raises `RetryableShipError` when the API should be tried again later.
        """
        if self.registrar is not None and not self.registrar.registered:
            self._register(self.registrar)
        pending = self.store.pending(self.batch_limit)
        if not pending:
            return 0
        try:
            response = self.client.post(INGEST_PATH, json={"batches": pending})
        except httpx.HTTPError as exc:
            self.stats.failures += 1
            raise RetryableShipError(f"API unreachable: {exc}") from exc
        if response.status_code == httpx.codes.REQUEST_ENTITY_TOO_LARGE and len(pending) > 1:
            self.batch_limit = max(1, len(pending) // 2)
            return 0
        if response.status_code == httpx.codes.TOO_MANY_REQUESTS or response.status_code >= 500:
            self.stats.failures += 1
            raise RetryableShipError(
                f"API answered {response.status_code}", retry_after_s=_retry_after(response)
            )
        keys = [(batch["key_id"], batch["seq"]) for batch in pending]
        if response.status_code != httpx.codes.OK:
            detail = f"HTTP {response.status_code}: {response.text[:200]}"
            logger.error("ingest refused %d batches: %s", len(pending), detail)
            self._reject(keys, f"http_{response.status_code}", detail)
            return len(keys)
        try:
            results = response.json()["results"]
            answers = [(str(r["status"]), r.get("detail")) for r in results]
        except (ValueError, KeyError, TypeError) as exc:
            self.stats.failures += 1
            raise RetryableShipError("API answered 200 without a results list") from exc
        if len(answers) != len(keys):
            self.stats.failures += 1
            raise RetryableShipError(f"API answered {len(answers)} results for {len(keys)} batches")
        shipped = [
            key
            for key, (status, _) in zip(keys, answers, strict=True)
            if status in SHIPPED_STATUSES
        ]
        self.store.mark(shipped, spool.SHIPPED)
        self.stats.shipped += len(shipped)
        self.stats.last_success_at_s = self._clock()
        unknown = [
            key for key, (status, _) in zip(keys, answers, strict=True) if status == UNKNOWN_KEY
        ]
        if unknown and self.registrar is not None:
            self.registrar.forget()
            self.stats.failures += 1
            raise RetryableShipError(
                f"the API does not know key {unknown[0][0]}: registering it again"
            )
        for key, (status, detail) in zip(keys, answers, strict=True):
            if status not in SHIPPED_STATUSES:
                logger.error(
                    "ingest rejected seq %d of key %s: %s %s", key[1], key[0], status, detail or ""
                )
                self._reject([key], status, detail)
        return len(keys)

    def _register(self, registrar: registration.KeyRegistrar) -> None:
        try:
            registrar.register()
        except registration.RegistrationRefusedError as exc:
            self.stats.failures += 1
            logger.error("%s", exc)  # the provider must fix the token; batches wait meanwhile
            raise RetryableShipError(str(exc)) from exc
        except (httpx.HTTPError, errors.MeteringError) as exc:
            self.stats.failures += 1
            raise RetryableShipError(f"key registration failed: {exc}") from exc

    def _reject(self, keys: list[tuple[str, int]], status: str, detail: Any) -> None:
        self.store.mark(keys, spool.REJECTED, f"{status}: {detail}" if detail else status)
        self.stats.rejected[status] = self.stats.rejected.get(status, 0) + len(keys)

    def _wait(self, state: tenacity.RetryCallState) -> float:
        backoff = tenacity.wait_random_exponential(
            multiplier=BACKOFF_MULTIPLIER_S, max=BACKOFF_CAP_S
        )(state)
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        if isinstance(error, RetryableShipError) and error.retry_after_s is not None:
            return min(BACKOFF_CAP_S, max(backoff, error.retry_after_s))
        return backoff

    def run(self, stop: threading.Event, *, idle_s: float = 1.0) -> None:
        """Ship until `stop` is set: retry while the API is down, rest while nothing waits."""

        def pause(seconds: float) -> None:
            stop.wait(seconds)

        while not stop.is_set():
            retrying = tenacity.Retrying(
                retry=tenacity.retry_if_exception_type(RetryableShipError),
                wait=self._wait,
                stop=lambda _state: stop.is_set(),
                sleep=pause,
                reraise=True,
            )
            try:
                settled = retrying(self.ship_once)
            except RetryableShipError:
                return  # stopped while retrying
            if not settled:
                stop.wait(idle_s)
