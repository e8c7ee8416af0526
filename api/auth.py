"""Who is calling: API keys, roles, and the checks every route makes.

An API key is `gpd_<id>_<secret>`: the id finds the key, the secret proves it. Only the
SHA-256 of the secret is stored (the secret is 256 random bits, so a fast hash is as good as
a slow one), it is compared in constant time, and the key is printed once, at creation.
Each key belongs to a principal `name` with one role:

| role | may |
| --- | --- |
| `admin` | everything (provider staff) |
| `exchange` | send contracts and see those it sent |
| `buyer` | see the contracts it holds now |
| `operator` | write the assignment ledger and contract status |
| `meter` | nothing by key: meters prove themselves by their signed batches |

Ownership is by principal name: an exchange's keys share its name, a buyer's name is the
contract's holder. A read of another tenant's object answers 404, exactly as a missing one.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from sqlmodel import Session

from gpudelivery.api import errors
from gpudelivery.api.models import ApiKey

__all__ = ["Principal", "Role", "authenticate", "create_key", "revoke_key"]

TOKEN_PREFIX = "gpd"
_ID_BYTES = 6  # 12 hex digits: enough to find a key, not a secret
_SECRET_BYTES = 32


class Role(enum.StrEnum):
    ADMIN = "admin"
    EXCHANGE = "exchange"
    BUYER = "buyer"
    OPERATOR = "operator"
    METER = "meter"


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller, once authenticated."""

    key_id: str
    name: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create_key(session: Session, *, name: str, role: Role) -> tuple[ApiKey, str]:
    """A new key for `name` with `role`, and its token (shown once, never stored)."""
    key_id = secrets.token_hex(_ID_BYTES)
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    key = ApiKey(
        id=key_id,
        name=name,
        role=role.value,
        secret_hash=_hash(secret),
        created_at=int(time.time()),
    )
    session.add(key)
    return key, f"{TOKEN_PREFIX}_{key_id}_{secret}"


def revoke_key(session: Session, *, key_id: str) -> ApiKey:
    key = session.get(ApiKey, key_id)
    if key is None:
        raise errors.NotFoundError(f"no API key {key_id}")
    if key.revoked_at is None:
        key.revoked_at = int(time.time())
        session.add(key)
    return key


def authenticate(session: Session, token: str | None) -> Principal:
    """The principal a bearer token names; AuthenticationError for anything else."""
    if not token:
        raise errors.AuthenticationError("an API key is required (Authorization: Bearer ...)")
    prefix, _, rest = token.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != TOKEN_PREFIX or not key_id or not secret:
        raise errors.AuthenticationError("not a gpudelivery API key")
    key = session.get(ApiKey, key_id)
    # The hash is compared even for an unknown id, so timing tells nothing about ids.
    expected = key.secret_hash if key is not None else _hash("")
    if not hmac.compare_digest(expected, _hash(secret)) or key is None:
        raise errors.AuthenticationError("unknown or wrong API key")
    if key.revoked_at is not None:
        raise errors.AuthenticationError("this API key was revoked")
    return Principal(key_id=key.id, name=key.name, role=Role(key.role))


def require(principal: Principal, *roles: Role) -> Principal:
    """The principal, if its role is one of `roles` (admin always is)."""
    if principal.is_admin or principal.role in roles:
        return principal
    allowed = ", ".join(role.value for role in roles) or "admin"
    raise errors.ForbiddenError(f"this needs the role {allowed}; the key is {principal.role}")
