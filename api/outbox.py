"""Delivering the outbox: signed POSTs to the exchanges' webhooks, retried for 72 hours.

Messages are signed in the Standard Webhooks style (docs/webhooks.md): the headers
`webhook-id` (the message id, the same on every attempt, which receivers deduplicate on),
`webhook-timestamp` (the attempt's epoch seconds) and `webhook-signature`, `v1a,` and the
base64 Ed25519 signature of `{webhook-id}.{webhook-timestamp}.{body}` under the provider
key that GET /v1/keys publishes. `verify_signature` is what a receiver does.

`dispatch_due` sends each due message once. A 2xx answer marks it delivered; anything else
(another status, a redirect, which is never followed, a timeout, a refused connection)
schedules the next attempt after a jittered exponential backoff (`backoff_s`), or after the
receiver's `Retry-After` on 429 and 503, until the message is 72 hours old: the first
failure after that gives it up. A 410 Gone disables the webhook, as the Standard says.

Delivery is at least once, never "at most": `dispatch_due` does not commit, and writes
`delivered_at` only after a 2xx, so a crash before the caller's commit leaves the messages
it sent due, to be sent again with the same `webhook-id`, which the receiver drops as a
duplicate. On PostgreSQL the due rows are locked `FOR UPDATE SKIP LOCKED` until that
commit, so concurrent dispatchers share the work instead of doubling it. The scheduler's
`dispatch` job (api.jobs) runs one batch per transaction.
"""

from __future__ import annotations

import datetime
import email.utils
import logging
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import httpx
import tenacity
from cryptography.hazmat.primitives.asymmetric import ed25519
from sqlmodel import Session, col, select

from gpudelivery import errors as core_errors
from gpudelivery import signing
from gpudelivery.api.models import OutboxMessage, Webhook

__all__ = [
    "DELIVER_FOR_S",
    "FIRST_BACKOFF_S",
    "HEADER_ID",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "MAX_BACKOFF_S",
    "SIGNATURE_VERSION",
    "DispatchStats",
    "backoff_s",
    "dispatch_due",
    "sign_headers",
    "signed_content",
    "verify_signature",
]

logger = logging.getLogger(__name__)

HEADER_ID = "webhook-id"
HEADER_TIMESTAMP = "webhook-timestamp"
HEADER_SIGNATURE = "webhook-signature"
# Standard Webhooks' identifier of an asymmetric (Ed25519) signature; `v1` is HMAC.
SIGNATURE_VERSION = "v1a"

# How long a message is retried: a clearing house closed over a long weekend still gets
# Friday's settlements on Monday morning.
DELIVER_FOR_S = 72 * 3600
# Backoff: the window starts at 5 s and doubles up to an hour (full jitter: the next attempt
# falls anywhere in it, so receivers that come back are not hit by every sender at once).
# An hour caps it so a receiver that recovers waits at most that long for its backlog.
FIRST_BACKOFF_S = 5
MAX_BACKOFF_S = 3600
_BACKOFF = tenacity.wait_random_exponential(multiplier=FIRST_BACKOFF_S, max=MAX_BACKOFF_S, min=1)
# A receiver's Retry-After is followed, within the backoff's cap.
MAX_RETRY_AFTER_S = MAX_BACKOFF_S
# The Standard recommends 15 to 30 s for a receiver to answer.
REQUEST_TIMEOUT_S = 15.0
TOLERANCE_S = 300  # what receivers accept between the timestamp and their clock
_THROTTLED = frozenset({429, 503})
_GONE = 410
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_MAX_ERROR_CHARS = 200


def signed_content(*, message_id: str, timestamp_s: int, body: bytes) -> bytes:
    """The bytes signed: `{webhook-id}.{webhook-timestamp}.{body}`."""
    return f"{message_id}.{timestamp_s}.".encode("ascii") + body


def sign_headers(
    key: signing.SigningKey, *, message_id: str, timestamp_s: int, body: bytes
) -> dict[str, str]:
    """The three Standard Webhooks headers of one attempt to deliver `body`."""
    if not message_id or "." in message_id or not message_id.isascii():
        raise ValueError("a webhook id is ASCII without a '.'")
    content = signed_content(message_id=message_id, timestamp_s=timestamp_s, body=body)
    return {
        HEADER_ID: message_id,
        HEADER_TIMESTAMP: str(timestamp_s),
        HEADER_SIGNATURE: f"{SIGNATURE_VERSION},{key.sign(content)}",
    }


def verify_signature(
    public_key: ed25519.Ed25519PublicKey,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now_s: int,
    tolerance_s: int = TOLERANCE_S,
) -> str:
    """What a receiver does: the `webhook-id` of a message whose headers sign `body` under
    `public_key`, sent within `tolerance_s` of `now_s`; SignatureError otherwise.

    `body` must be the raw bytes received, not JSON parsed and serialised again. The
    signature header may list several signatures; one valid `v1a` one is enough.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    missing = [
        name for name in (HEADER_ID, HEADER_TIMESTAMP, HEADER_SIGNATURE) if name not in lowered
    ]
    if missing:
        raise core_errors.SignatureError(f"missing header {', '.join(missing)}")
    message_id, timestamp = lowered[HEADER_ID], lowered[HEADER_TIMESTAMP]
    if not message_id or "." in message_id or not message_id.isascii():
        raise core_errors.SignatureError(f"{HEADER_ID}: not a webhook id")
    if not _TIMESTAMP.fullmatch(timestamp):
        raise core_errors.SignatureError(f"{HEADER_TIMESTAMP}: not integer epoch seconds")
    if abs(now_s - int(timestamp)) > tolerance_s:
        raise core_errors.SignatureError(
            f"{HEADER_TIMESTAMP}: {timestamp} is more than {tolerance_s} s from now ({now_s})"
        )
    content = signed_content(message_id=message_id, timestamp_s=int(timestamp), body=body)
    for entry in lowered[HEADER_SIGNATURE].split(" "):
        version, _, signature = entry.partition(",")
        if version != SIGNATURE_VERSION:
            continue
        try:
            signing.verify(public_key, content, signature)
        except core_errors.SignatureError:
            continue
        return message_id
    raise core_errors.SignatureError(
        f"{HEADER_SIGNATURE}: no {SIGNATURE_VERSION} signature verifies under key "
        f"{signing.key_id(public_key)}"
    )


def backoff_s(failed_attempts: int) -> int:
    """Seconds to wait after the `failed_attempts`-th failure: uniform in
    [1, min(5 * 2^(failed_attempts - 1), 3600)], rounded up (tenacity's full jitter)."""
    state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
    state.attempt_number = max(1, failed_attempts)
    return max(1, math.ceil(_BACKOFF(state)))


def _retry_after_s(value: str | None, now_s: int) -> int | None:
    """A Retry-After header (delta seconds or an HTTP date) as seconds from now."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        delay = int(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
            if when.tzinfo is None:  # "-0000": UTC by RFC 5322, not local time
                when = when.replace(tzinfo=datetime.UTC)
            delay = int(when.timestamp()) - now_s
        except (TypeError, ValueError):
            return None
    return min(max(delay, 1), MAX_RETRY_AFTER_S)


@dataclass(frozen=True, slots=True)
class DispatchStats:
    """What one `dispatch_due` did."""

    delivered: int = 0
    retrying: int = 0  # failed, another attempt scheduled
    given_up: int = 0


_DELIVERED, _RETRYING, _GIVEN_UP = "delivered", "retrying", "given_up"


def _give_up(message: OutboxMessage, now_s: int, error: str) -> str:
    message.given_up_at, message.last_error = now_s, error[:_MAX_ERROR_CHARS]
    logger.warning(
        "gave up webhook message %s to %s after %d attempts: %s",
        message.id,
        message.webhook_id,
        message.attempts,
        error,
    )
    return _GIVEN_UP


def _attempt(
    message: OutboxMessage,
    webhook: Webhook,
    *,
    client: httpx.Client,
    key: signing.SigningKey,
    now_s: int,
    deliver_for_s: int,
    timeout_s: float,
) -> str:
    headers = sign_headers(key, message_id=message.id, timestamp_s=now_s, body=message.payload)
    headers["content-type"] = "application/json"
    message.attempts += 1
    retry_after_s: int | None = None
    try:
        # Streamed so that the receiver's answer body, never needed, is never read.
        with client.stream(
            "POST",
            webhook.url,
            content=message.payload,
            headers=headers,
            timeout=timeout_s,
            follow_redirects=False,  # a redirect could lead anywhere, inside included
        ) as response:
            status = response.status_code
            retry_after = response.headers.get("retry-after")
    except httpx.HTTPError as exc:
        # The class name only: the message may quote the URL, whose query may be a secret.
        error = type(exc).__name__
    else:
        if 200 <= status < 300:
            message.delivered_at, message.last_error = now_s, None
            logger.info("delivered webhook message %s to %s", message.id, webhook.id)
            return _DELIVERED
        error = f"HTTP {status}"
        if status == _GONE:
            webhook.disabled_at = now_s
            return _give_up(message, now_s, f"{error}: the receiver is gone; webhook disabled")
        if status in _THROTTLED:
            retry_after_s = _retry_after_s(retry_after, now_s)
    if now_s - message.created_at >= deliver_for_s:
        return _give_up(message, now_s, f"{error} (retried for {deliver_for_s} s)")
    message.last_error = error[:_MAX_ERROR_CHARS]
    delay_s = retry_after_s if retry_after_s is not None else backoff_s(message.attempts)
    message.next_attempt_at = now_s + delay_s
    logger.warning(
        "webhook message %s to %s failed (attempt %d, %s); next in %d s",
        message.id,
        webhook.id,
        message.attempts,
        error,
        delay_s,
    )
    return _RETRYING


def dispatch_due(
    session: Session,
    *,
    client: httpx.Client,
    key: signing.SigningKey,
    now_s: int,
    limit: int = 100,
    deliver_for_s: int = DELIVER_FOR_S,
    timeout_s: float = REQUEST_TIMEOUT_S,
) -> DispatchStats:
    """Attempt every message due at `now_s` (at most `limit`, oldest first); the caller
    commits. Messages of a disabled webhook are given up without a request."""
    due = session.exec(
        select(OutboxMessage)
        .where(
            col(OutboxMessage.delivered_at).is_(None),
            col(OutboxMessage.given_up_at).is_(None),
            OutboxMessage.next_attempt_at <= now_s,
        )
        .order_by(col(OutboxMessage.next_attempt_at), col(OutboxMessage.id))
        .limit(limit)
        # SQLite has no row locks (SQLAlchemy leaves the clause out there): one writer at a
        # time, and a message sent twice is deduplicated by its receiver.
        .with_for_update(skip_locked=True)
    ).all()
    webhook_ids = {message.webhook_id for message in due}
    webhooks = {
        webhook.id: webhook
        for webhook in session.exec(select(Webhook).where(col(Webhook.id).in_(webhook_ids)))
    }
    outcomes: Counter[str] = Counter()
    # Nothing is flushed while requests are in flight: on SQLite that would hold the one
    # write lock across slow receivers.
    with session.no_autoflush:
        for message in due:
            webhook = webhooks[message.webhook_id]
            if webhook.disabled_at is not None:
                outcome = _give_up(message, now_s, "the webhook is disabled")
            else:
                outcome = _attempt(
                    message,
                    webhook,
                    client=client,
                    key=key,
                    now_s=now_s,
                    deliver_for_s=deliver_for_s,
                    timeout_s=timeout_s,
                )
            session.add(message)
            session.add(webhook)
            outcomes[outcome] += 1
    return DispatchStats(
        delivered=outcomes[_DELIVERED], retrying=outcomes[_RETRYING], given_up=outcomes[_GIVEN_UP]
    )
