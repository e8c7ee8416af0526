"""The TokenRequest API (`serviceaccounts/token`) of the emulated API server (kube.py).

A token here is opaque random text, not a signed JWT: nothing in the emulator reviews it,
and the tests compare the tokens a component was handed with the ones issued
(`ClusterEmulator.issued_tokens`). What is emulated is the request's contract: the
expiry (`expirationSeconds`, 3600 by default, refused under 600 as the real server refuses
it) counted from the emulator's clock, and the audiences (the API server's own by default).
"""

from __future__ import annotations

import dataclasses
import datetime
import secrets
from collections.abc import Mapping
from typing import Any

from utils import apierrors, store

__all__ = ["IssuedToken", "issue_token"]

# TokenRequest's defaults and floor (seconds), and the audience of an API server by default.
_TOKEN_DEFAULT_S = 3600
_TOKEN_MIN_S = 600
_API_AUDIENCES = ("https://kubernetes.default.svc.cluster.local",)


@dataclasses.dataclass(frozen=True)
class IssuedToken:
    """A token the emulator issued for a service account."""

    namespace: str
    service_account: str
    audiences: tuple[str, ...]
    expires: datetime.datetime


def issue_token(
    namespace: str, service_account: str, spec: Mapping[str, Any], now: datetime.datetime
) -> tuple[str, IssuedToken, dict[str, Any]]:
    """A token for a TokenRequest's `spec`: (token, what was issued, the TokenRequest
    answered); 422 for an expiry the real server refuses."""
    seconds = spec.get("expirationSeconds")
    seconds = _TOKEN_DEFAULT_S if seconds is None else seconds
    if not isinstance(seconds, int) or seconds < _TOKEN_MIN_S:
        message = (
            f"spec.expirationSeconds: Invalid value: {seconds}: "
            "may not specify a duration less than 10 minutes"
        )
        raise apierrors.error(422, "Invalid", message)
    audiences = tuple(spec.get("audiences") or _API_AUDIENCES)
    expires = now + datetime.timedelta(seconds=seconds)
    token = secrets.token_urlsafe(32)
    answer = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "metadata": {"name": service_account, "namespace": namespace},
        "spec": {"audiences": list(audiences), "expirationSeconds": seconds},
        "status": {"token": token, "expirationTimestamp": store.rfc3339(expires)},
    }
    return token, IssuedToken(namespace, service_account, audiences, expires), answer
