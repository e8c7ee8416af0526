"""Registering the node key with the API, with the bootstrap token (docs/ingest.md).

A node proves its batches with its own Ed25519 key (metering.keys), generated on the node;
only its public half ever leaves it. Before the API accepts a batch, the key must be
registered for the node: `POST /v1/meter/keys` with the bootstrap token the provider
installed as a Secret. Registration is remembered in the state directory (`node.registered`:
the key id and the API it was registered with), so a restart does not register again; an
`unknown_key` answer (the key was revoked, or the API lost it) makes the shipper forget it
and register again before resending.

A refused token is an operator's mistake, not a transient fault, but the batches must not
be lost over it: it is logged as an error and retried with the shipper's capped backoff, and
the batches wait in the spool. The token is never logged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx

from gpudelivery import signing
from gpudelivery.metering import errors

__all__ = ["KEYS_PATH", "KeyRegistrar", "RegistrationRefusedError", "read_token"]

logger = logging.getLogger(__name__)

# The registration endpoint, relative to the API's base URL (docs/ingest.md).
KEYS_PATH = "/v1/meter/keys"
# In the state directory: "<key id> <API URL>" once the key is registered there.
MARKER_NAME = "node.registered"


class RegistrationRefusedError(errors.MeteringError):
    """The API refused to register the key (bad token, key of another node, bad request)."""


def read_token(path: Path) -> str:
    """The bootstrap token in `path` (a mounted Secret), without surrounding whitespace."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise errors.MeteringError(f"{path}: cannot read the bootstrap token: {exc}") from exc
    if not token:
        raise errors.MeteringError(f"{path}: the bootstrap token file is empty")
    return token


class KeyRegistrar:
    """Registers one node's key with one API, once."""

    def __init__(
        self,
        client: httpx.Client,
        *,
        node: str,
        key: signing.SigningKey,
        token: str,
        state_dir: Path,
    ) -> None:
        self.client = client
        self.node = node
        self.key = key
        self._token = token
        self._marker = state_dir / MARKER_NAME
        self._stamp = f"{key.key_id} {client.base_url}"

    def __repr__(self) -> str:  # the token stays out of any log or traceback
        return f"KeyRegistrar(node={self.node!r}, key_id={self.key.key_id!r})"

    @property
    def registered(self) -> bool:
        try:
            return self._marker.read_text(encoding="utf-8").strip() == self._stamp
        except OSError:
            return False

    def forget(self) -> None:
        """The API no longer knows the key: register it again before the next shipment."""
        self._marker.unlink(missing_ok=True)

    def register(self) -> None:
        """Register the key; raises RegistrationRefusedError, or httpx.HTTPError and
        errors.MeteringError for a busy or unreachable API (to be retried)."""
        public_pem = signing.public_pem(self.key.public_key).decode("ascii")
        body = {"node": self.node, "public_key_pem": public_pem}
        response = self.client.post(
            KEYS_PATH, json=body, headers={"Authorization": f"Bearer {self._token}"}
        )
        if response.status_code == httpx.codes.TOO_MANY_REQUESTS or response.status_code >= 500:
            raise errors.MeteringError(f"key registration: API answered {response.status_code}")
        if response.status_code not in (httpx.codes.OK, httpx.codes.CREATED):
            raise RegistrationRefusedError(
                f"the API refused to register key {self.key.key_id} for node {self.node}: "
                f"HTTP {response.status_code} {_detail(response)}"
            )
        try:
            answered = response.json()["key_id"]
        except (ValueError, KeyError, TypeError) as exc:
            raise errors.MeteringError("key registration: answer without a key_id") from exc
        if answered != self.key.key_id:
            raise RegistrationRefusedError(
                f"the API registered key {answered}, not this node's {self.key.key_id}"
            )
        temporary = self._marker.with_name(MARKER_NAME + ".tmp")
        temporary.write_text(self._stamp + "\n", encoding="utf-8")
        temporary.replace(self._marker)
        logger.info("registered key %s for node %s", self.key.key_id, self.node)


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail)[:200] if detail else response.reason_phrase
