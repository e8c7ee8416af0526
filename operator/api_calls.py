"""Calls to the gpudelivery API as the `operator` role, sent and judged in one place.

`ApiCalls` holds the HTTP client and the operator's API key (kept out of every `repr`, so
out of logs and tracebacks), sends a request, and tells a failure worth another try
(unreachable, 5xx, or one of `retryable`) from a refusal: each client (the ledger's, the
mirror's) says which statuses it may try again and which errors it raises.

Not here: what is sent (operator/ledger.py, operator/mirror.py).
"""

from __future__ import annotations

from typing import Any, ClassVar

import httpx

from gpudelivery.operator import errors

__all__ = ["ApiCalls"]

# How much of an error answer's detail goes into the error raised.
_DETAIL_CHARS = 200


class ApiCalls:
    """The base of the operator's API clients."""

    # Statuses worth another try besides 5xx: a request timed out, or the API is overloaded.
    retryable: ClassVar[frozenset[int]] = frozenset({408, 429})
    unavailable: ClassVar[type[errors.ApiUnavailableError]] = errors.ApiUnavailableError
    refused: ClassVar[type[errors.ApiRefusedError]] = errors.ApiRefusedError

    def __init__(self, client: httpx.Client, *, token: str) -> None:
        self._client = client
        self._headers = {"Authorization": f"Bearer {token}"}

    def __repr__(self) -> str:  # the token stays out of any log or traceback
        return f"{type(self).__name__}({self._client.base_url!s})"

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send a request; its answer when it succeeded, else `unavailable` (worth another
        try) or `refused`, naming the status and the API's detail."""
        try:
            response = self._client.request(method, path, headers=self._headers, **kwargs)
        except httpx.HTTPError as exc:
            raise self.unavailable(f"the API is unreachable: {exc}") from exc
        if response.is_success:
            return response
        message = f"the API answered {response.status_code}: {_detail(response)}"
        if response.status_code in self.retryable or response.status_code >= 500:
            raise self.unavailable(message)
        raise self.refused(message)

    def _object(self, response: httpx.Response) -> dict[str, Any]:
        """The JSON object an answer holds; `refused` when it holds something else."""
        try:
            body = response.json()
        except ValueError as exc:
            raise self.refused("the API answered something other than JSON") from exc
        if not isinstance(body, dict):
            raise self.refused("the API answered something other than an object")
        return body


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:_DETAIL_CHARS]
    shown = body.get("detail", body) if isinstance(body, dict) else body
    return str(shown)[:_DETAIL_CHARS]
