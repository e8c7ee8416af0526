"""Webhooks: where each exchange receives final proofs and settlements, and the outbox rows
that carry them there.

An exchange registers the URL of its clearing side. Because the API then POSTs to that
URL from inside the provider's network, a URL is a request forgery risk (SSRF): only
`https` URLs whose host is, and resolves only to, globally routable addresses are accepted.
Loopback, private, link-local (the cloud metadata service), multicast, reserved,
unspecified and other non-global addresses are refused, including when they hide inside an
IPv6 address (IPv4-mapped, 6to4, NAT64) or behind a name or a numeric shorthand such as
`2130706433`. An admin may allow a private URL (and plain `http`) for tests and private
clearing networks. The check is made at registration; it does not stop a name that is
re-pointed later (DNS rebinding): the dispatcher belongs behind an egress proxy that
filters internal addresses (docs/webhooks.md).

`enqueue` writes one outbox row per active webhook of an exchange. It never commits: the
caller writes the settlement and its outbox rows in one transaction, so a settlement is
never reported that was not stored, nor stored without being reported. api.outbox signs
and delivers the rows. Service functions are keyword-only, take the session and never
commit.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from sqlmodel import Session, col, select
from sqlmodel.sql.expression import SelectOfScalar

from gpudelivery import canonical, timefmt
from gpudelivery.api import errors
from gpudelivery.api.auth import Principal, Role
from gpudelivery.api.models import OutboxMessage, Webhook

__all__ = [
    "EVENT_TYPES",
    "MAX_WEBHOOKS_PER_EXCHANGE",
    "PROOF_FINAL",
    "SETTLEMENT_FINAL",
    "Resolver",
    "check_url",
    "delete_webhook",
    "enqueue",
    "envelope",
    "forbidden_reason",
    "list_webhooks",
    "new_id",
    "register_webhook",
    "resolve_host",
]

# The event types a receiver may get (docs/webhooks.md): the final signed proof of a
# contract, and its final settlement figures.
PROOF_FINAL = "proof.final"
SETTLEMENT_FINAL = "settlement.final"
EVENT_TYPES = frozenset({PROOF_FINAL, SETTLEMENT_FINAL})

# Each webhook multiplies every message; a handful per exchange covers a primary and a
# standby receiver without letting one tenant fan the dispatcher out.
MAX_WEBHOOKS_PER_EXCHANGE = 10
MAX_URL_LENGTH = 2048  # the column's width

WEBHOOK_ID_PREFIX = "wh_"
MESSAGE_ID_PREFIX = "msg_"
# ULID's alphabet (Crockford base32: no I, L, O, U), so ids read and sort like ULIDs.
_ULID_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ULID_TIME_CHARS = 10  # 48 bits of milliseconds
_ULID_RANDOM_CHARS = 16  # 80 random bits

# NAT64's well-known prefix (RFC 6052): the last 32 bits are an IPv4 address.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

Resolver = Callable[[str, int], Iterable[str]]
"""`resolve(host, port)`: the IP addresses a host name stands for (tests inject one)."""


def resolve_host(host: str, port: int) -> list[str]:
    """The addresses `socket.getaddrinfo` gives for `host` (scope ids dropped)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]).partition("%")[0] for info in infos})


def new_id(prefix: str, *, now_s: int) -> str:
    """`prefix` and a ULID: 10 characters of time, 16 of randomness (80 bits)."""
    random_bits = 5 * _ULID_RANDOM_CHARS
    value = (now_s * 1000) << random_bits | secrets.randbits(random_bits)
    top = 5 * (_ULID_TIME_CHARS + _ULID_RANDOM_CHARS - 1)
    return prefix + "".join(_ULID_ALPHABET[(value >> shift) & 31] for shift in range(top, -1, -5))


# -- SSRF -------------------------------------------------------------------------------------


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one leads to (IPv4-mapped, 6to4, NAT64), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def forbidden_reason(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a webhook may not point at `address` ("a loopback address"), or None."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = _embedded_ipv4(address)
        if inner is not None:
            reason = forbidden_reason(inner)
            return None if reason is None else f"{reason} ({inner} in IPv6 form)"
    checks = (
        (address.is_unspecified, "an unspecified address"),
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address"),
        (address.is_multicast, "a multicast address"),
        (address.is_reserved, "a reserved address"),
        (address.is_private, "a private address"),
        # What is left: shared (carrier-grade NAT) space and other special-purpose blocks.
        (not address.is_global, "a non-global address"),
    )
    return next((reason for forbidden, reason in checks if forbidden), None)


def _refuse(detail: str) -> errors.UnprocessableError:
    return errors.UnprocessableError(f"url: {detail}")


def _literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None


def check_url(url: str, *, allow_private: bool, resolve: Resolver = resolve_host) -> None:
    """Raise UnprocessableError unless a webhook may be sent to `url`.

    With `allow_private` (an admin's decision), `http` is accepted and the host is not
    checked, nor resolved: a private clearing network's names need not resolve here.
    """
    if len(url) > MAX_URL_LENGTH:
        raise _refuse(f"must be at most {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _refuse(f"not a valid URL: {exc}") from exc
    schemes = ("https", "http") if allow_private else ("https",)
    if parts.scheme.lower() not in schemes:
        raise _refuse(f"the scheme must be {' or '.join(schemes)}")
    host = parts.hostname
    if not host:
        raise _refuse("names no host")
    if parts.username is not None or parts.password is not None:
        raise _refuse("must not hold credentials (receivers authenticate the signature)")
    if parts.fragment:
        raise _refuse("must not have a fragment")
    if allow_private:
        return
    literal = _literal(host)
    if literal is not None:
        reason = forbidden_reason(literal)
        if reason is not None:
            raise _refuse(f"{host} is {reason}; webhooks may not point into private networks")
        return
    if port is None:
        port = 443
    try:
        addresses = [ipaddress.ip_address(address) for address in resolve(host, port)]
    except (OSError, UnicodeError, ValueError) as exc:
        raise _refuse(f"cannot resolve {host}") from exc
    if not addresses:
        raise _refuse(f"cannot resolve {host}")
    for address in addresses:
        reason = forbidden_reason(address)
        if reason is not None:
            raise _refuse(
                f"{host} resolves to {address}, {reason}; "
                "webhooks may not point into private networks"
            )


# -- webhooks ---------------------------------------------------------------------------------


def _owner(principal: Principal, on_behalf_of: str | None) -> str:
    if principal.role is Role.ADMIN:
        if not on_behalf_of:
            raise errors.UnprocessableError(
                "exchange: an admin registers a webhook for an exchange; name it"
            )
        return on_behalf_of
    if principal.role is not Role.EXCHANGE:
        raise errors.ForbiddenError(f"this needs the role exchange; the key is {principal.role}")
    if on_behalf_of not in (None, principal.name):
        raise errors.ForbiddenError("exchange: an exchange registers webhooks only for itself")
    return principal.name


def _active(exchange: str | None = None) -> SelectOfScalar[Webhook]:
    query = select(Webhook).where(col(Webhook.disabled_at).is_(None))
    if exchange is not None:
        query = query.where(Webhook.exchange == exchange)
    return query.order_by(col(Webhook.created_at), col(Webhook.id))


def register_webhook(
    session: Session,
    *,
    exchange: Principal,
    url: str,
    allow_private: bool,
    now_s: int,
    resolve: Resolver = resolve_host,
    on_behalf_of: str | None = None,
) -> Webhook:
    """A new webhook of the `exchange` calling (or, for an admin, of `on_behalf_of`).

    `allow_private` is an admin's alone: ForbiddenError for anyone else.
    """
    owner = _owner(exchange, on_behalf_of)
    if allow_private and not exchange.is_admin:
        raise errors.ForbiddenError(
            "allow_private: only an admin may allow a webhook into a private network"
        )
    url = url.strip()
    check_url(url, allow_private=allow_private, resolve=resolve)
    active = session.exec(_active(owner)).all()
    for webhook in active:
        if webhook.url == url:
            raise errors.ConflictError(f"url: already registered as webhook {webhook.id}")
    if len(active) >= MAX_WEBHOOKS_PER_EXCHANGE:
        raise errors.ConflictError(
            f"{owner} has {len(active)} webhooks, the most allowed; delete one first"
        )
    webhook = Webhook(
        id=new_id(WEBHOOK_ID_PREFIX, now_s=now_s), exchange=owner, url=url, created_at=now_s
    )
    session.add(webhook)
    return webhook


def list_webhooks(session: Session, *, principal: Principal) -> list[Webhook]:
    """The active webhooks `principal` may see: its own, or every one for an admin."""
    owner = None if principal.is_admin else principal.name
    return list(session.exec(_active(owner)).all())


def delete_webhook(
    session: Session, *, principal: Principal, webhook_id: str, now_s: int
) -> Webhook:
    """Disable a webhook (its exchange's, or any for an admin); twice answers it again.

    Its undelivered messages are given up at their next attempt (api.outbox).
    """
    webhook = session.get(Webhook, webhook_id)
    if webhook is None or not (principal.is_admin or webhook.exchange == principal.name):
        raise errors.NotFoundError(f"no webhook {webhook_id}")
    if webhook.disabled_at is None:
        webhook.disabled_at = now_s
        session.add(webhook)
    return webhook


# -- outbox -----------------------------------------------------------------------------------


def envelope(*, event_type: str, payload: Mapping[str, Any], now_s: int) -> bytes:
    """The body of a message: Standard Webhooks' `{type, timestamp, data}`, canonical JSON."""
    return canonical.canonical_json(
        {"type": event_type, "timestamp": timefmt.format_utc(now_s), "data": dict(payload)}
    )


def enqueue(
    session: Session,
    *,
    exchange: str,
    event_type: str,
    payload: Mapping[str, Any],
    now_s: int,
) -> list[OutboxMessage]:
    """One outbox row per active webhook of `exchange`, due now; nothing is committed.

    An exchange without webhooks gets no rows (and no error): reporting is opt-in.
    """
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}; known: {sorted(EVENT_TYPES)}")
    body = envelope(event_type=event_type, payload=payload, now_s=now_s)
    messages = [
        OutboxMessage(
            id=new_id(MESSAGE_ID_PREFIX, now_s=now_s),
            webhook_id=webhook.id,
            event_type=event_type,
            payload=body,
            created_at=now_s,
            next_attempt_at=now_s,
        )
        for webhook in session.exec(_active(exchange)).all()
    ]
    session.add_all(messages)
    return messages
