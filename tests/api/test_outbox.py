"""The outbox: written with what it reports, signed, delivered to a real HTTP receiver,
retried with backoff for 72 hours, delivered once, deduplicated by the receiver.

Time is fake (`now_s` values); the receiver is a real `ThreadingHTTPServer` on 127.0.0.1
(registered with allow_private, as an admin would) that checks every request with
`outbox.verify_signature`, as docs/webhooks.md tells receivers to. Every test runs on
SQLite and on PostgreSQL (tests/api/conftest.py) unless it says otherwise."""

from __future__ import annotations

import base64
import email.utils
import itertools
import json
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select

from gpudelivery import canonical, signing
from gpudelivery import errors as core_errors
from gpudelivery.api import outbox, webhooks
from gpudelivery.api.auth import Principal, Role
from gpudelivery.api.models import OutboxMessage, Webhook

T0 = 1_800_000_000
HOUR = 3600
MESSAGE_ID = re.compile(r"msg_[0-9A-HJKMNP-TV-Z]{26}")
ADMIN = Principal(key_id="k0", name="provider-staff", role=Role.ADMIN)
PROOF = {"contract_id": "EX-1", "signature": "c2ln", "as_of": "2027-01-15T08:00:00Z"}


class Receiver:
    """An exchange's clearing side: verifies, deduplicates on webhook-id, processes once.

    `now_s` is its clock (the tests' fake time); `script` holds the answers to give first,
    as (status, headers); after them it answers 204. `seen` lists the webhook-id of every
    request that verified, `timestamps` their webhook-timestamp, `processed` the body of
    each message the first time it came (what a receiver acts upon).
    """

    def __init__(self, public_key: ed25519.Ed25519PublicKey) -> None:
        self.public_key = public_key
        self.now_s = T0
        self.script: list[tuple[int, dict[str, str]]] = []
        self.seen: list[str] = []
        self.timestamps: list[int] = []
        self.processed: dict[str, bytes] = {}
        self.rejected: list[str] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/clearing/hooks"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                status, headers = receiver.receive(
                    {name.lower(): value for name, value in self.headers.items()}, body
                )
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        return Handler

    def receive(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str]]:
        with self._lock:
            try:
                message_id = outbox.verify_signature(
                    self.public_key, headers, body, now_s=self.now_s
                )
            except core_errors.SignatureError as exc:
                self.rejected.append(str(exc))
                return 401, {}
            self.seen.append(message_id)
            self.timestamps.append(int(headers["webhook-timestamp"]))
            if self.script:
                return self.script.pop(0)
            self.processed.setdefault(message_id, body)  # a duplicate is acknowledged only
            return 204, {}

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


@pytest.fixture
def key() -> signing.SigningKey:
    return signing.generate()


@pytest.fixture
def receiver(key: signing.SigningKey) -> Iterator[Receiver]:
    with Receiver(key.public_key) as running:
        yield running


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    # No proxies from the environment: the receiver is on loopback.
    with httpx.Client(trust_env=False) as http:
        yield http


def add_webhook(engine: Engine, url: str, exchange: str = "cme") -> str:
    with Session(engine) as session:
        webhook = webhooks.register_webhook(
            session,
            exchange=ADMIN,
            url=url,
            allow_private=True,
            now_s=T0 - HOUR,
            on_behalf_of=exchange,
        )
        session.commit()
        return webhook.id


def send_proof(engine: Engine, *, now_s: int = T0, exchange: str = "cme") -> list[str]:
    with Session(engine) as session:
        messages = webhooks.enqueue(
            session, exchange=exchange, event_type="proof.final", payload=PROOF, now_s=now_s
        )
        session.commit()
        return [message.id for message in messages]


def dispatch(
    engine: Engine,
    client: httpx.Client,
    key: signing.SigningKey,
    now_s: int,
    receiver: Receiver | None = None,
) -> outbox.DispatchStats:
    """One run of the dispatcher job at `now_s`: a batch, then the commit."""
    if receiver is not None:
        receiver.now_s = now_s
    with Session(engine) as session:
        stats = outbox.dispatch_due(session, client=client, key=key, now_s=now_s)
        session.commit()
    return stats


def message(engine: Engine, message_id: str) -> OutboxMessage:
    with Session(engine) as session:
        row = session.get(OutboxMessage, message_id)
        assert row is not None
        return row


def count_outbox(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.exec(select(func.count()).select_from(OutboxMessage)).one())


# -- signing ----------------------------------------------------------------------------------


def test_headers_carry_an_ed25519_signature_over_id_timestamp_and_body(
    key: signing.SigningKey,
) -> None:
    body = b'{"data":{},"type":"proof.final"}'
    headers = outbox.sign_headers(key, message_id="msg_1", timestamp_s=T0, body=body)
    signature = key.private_key.sign(b"msg_1.1800000000." + body)
    assert headers == {
        "webhook-id": "msg_1",
        "webhook-timestamp": "1800000000",
        "webhook-signature": "v1a," + base64.b64encode(signature).decode(),
    }
    assert outbox.verify_signature(key.public_key, headers, body, now_s=T0 + 300) == "msg_1"


def test_a_receiver_refuses_what_the_provider_key_did_not_sign_as_sent(
    key: signing.SigningKey,
) -> None:
    body = b'{"type":"proof.final"}'
    headers = outbox.sign_headers(key, message_id="msg_1", timestamp_s=T0, body=body)
    stranger = signing.generate()
    as_hmac = {**headers, "webhook-signature": "v1," + headers["webhook-signature"][4:]}
    cases = [
        (headers, body + b" ", "no v1a signature verifies"),
        ({**headers, "webhook-id": "msg_2"}, body, "no v1a signature verifies"),
        ({**headers, "webhook-timestamp": str(T0 + 1)}, body, "no v1a signature verifies"),
        ({k: v for k, v in headers.items() if k != "webhook-id"}, body, "missing header"),
        (as_hmac, body, "no v1a signature verifies"),  # v1 is HMAC: not ours to check
    ]
    for case_headers, case_body, reason in cases:
        with pytest.raises(core_errors.SignatureError, match=reason):
            outbox.verify_signature(key.public_key, case_headers, case_body, now_s=T0)
    with pytest.raises(core_errors.SignatureError, match="no v1a signature verifies"):
        outbox.verify_signature(stranger.public_key, headers, body, now_s=T0)
    with pytest.raises(core_errors.SignatureError) as replayed:
        outbox.verify_signature(key.public_key, headers, body, now_s=T0 + 301)
    assert str(replayed.value) == (
        "webhook-timestamp: 1800000000 is more than 300 s from now (1800000301)"
    )


def test_one_valid_signature_among_several_is_enough(key: signing.SigningKey) -> None:
    body = b"{}"
    headers = outbox.sign_headers(key, message_id="msg_1", timestamp_s=T0, body=body)
    old = outbox.sign_headers(signing.generate(), message_id="msg_1", timestamp_s=T0, body=body)
    rotating = {
        "Webhook-Id": "msg_1",
        "Webhook-Timestamp": str(T0),
        "Webhook-Signature": "v1,aG1hYw== "
        + old["webhook-signature"]
        + " "
        + headers["webhook-signature"],
    }
    assert outbox.verify_signature(key.public_key, rotating, body, now_s=T0) == "msg_1"


def test_the_backoff_doubles_from_5_s_with_full_jitter_up_to_an_hour() -> None:
    for failed in range(1, 40):
        window = min(5 * 2 ** (failed - 1), 3600)
        delays = {outbox.backoff_s(failed) for _ in range(50)}
        assert min(delays) >= 1
        assert max(delays) <= window
    assert len({outbox.backoff_s(12) for _ in range(50)}) > 1  # jittered, not fixed


# -- the transactional outbox -----------------------------------------------------------------


def test_enqueued_messages_exist_only_if_their_transaction_commits(
    engine: Engine, receiver: Receiver
) -> None:
    add_webhook(engine, receiver.url)
    with Session(engine) as session:
        written = webhooks.enqueue(
            session, exchange="cme", event_type="proof.final", payload=PROOF, now_s=T0
        )
        assert len(written) == 1
        session.rollback()  # the settlement failed: nothing of it may be reported
    assert count_outbox(engine) == 0
    assert len(send_proof(engine)) == 1
    assert count_outbox(engine) == 1


def test_one_message_per_active_webhook_of_the_exchange(engine: Engine, receiver: Receiver) -> None:
    first = add_webhook(engine, receiver.url)
    second = add_webhook(engine, receiver.url + "/standby")
    gone = add_webhook(engine, receiver.url + "/old")
    add_webhook(engine, receiver.url, exchange="ice")
    with Session(engine) as session:
        webhooks.delete_webhook(session, principal=ADMIN, webhook_id=gone, now_s=T0 - 1)
        session.commit()
    ids = send_proof(engine)
    rows = [message(engine, message_id) for message_id in ids]
    assert len(set(ids)) == 2
    assert all(MESSAGE_ID.fullmatch(message_id) for message_id in ids)
    assert {row.webhook_id for row in rows} == {first, second}
    body = canonical.canonical_json(
        {"type": "proof.final", "timestamp": "2027-01-15T08:00:00Z", "data": PROOF}
    )
    for row in rows:
        assert (row.event_type, row.payload, row.created_at, row.next_attempt_at) == (
            "proof.final",
            body,
            T0,
            T0,
        )
        assert (row.attempts, row.delivered_at, row.given_up_at, row.last_error) == (
            0,
            None,
            None,
            None,
        )


def test_an_unknown_event_type_is_a_programming_error(session: Session) -> None:
    with pytest.raises(ValueError, match=r"^unknown event type 'proof\.draft'"):
        webhooks.enqueue(session, exchange="cme", event_type="proof.draft", payload={}, now_s=T0)


# -- delivery ---------------------------------------------------------------------------------


def test_a_message_is_delivered_signed_and_only_once(
    engine: Engine, client: httpx.Client, key: signing.SigningKey, receiver: Receiver
) -> None:
    add_webhook(engine, receiver.url)
    (message_id,) = send_proof(engine)
    assert dispatch(engine, client, key, T0, receiver) == outbox.DispatchStats(delivered=1)
    assert dispatch(engine, client, key, T0 + 60, receiver) == outbox.DispatchStats()
    assert (receiver.seen, receiver.timestamps, receiver.rejected) == ([message_id], [T0], [])
    delivered = json.loads(receiver.processed[message_id])
    assert delivered == {"type": "proof.final", "timestamp": "2027-01-15T08:00:00Z", "data": PROOF}
    row = message(engine, message_id)
    assert (row.delivered_at, row.attempts, row.last_error) == (T0, 1, None)


def test_a_500_is_retried_after_a_jittered_backoff(
    engine: Engine, client: httpx.Client, key: signing.SigningKey, receiver: Receiver
) -> None:
    add_webhook(engine, receiver.url)
    (message_id,) = send_proof(engine)
    receiver.script = [(500, {})]
    assert dispatch(engine, client, key, T0, receiver) == outbox.DispatchStats(retrying=1)
    failed = message(engine, message_id)
    assert (failed.attempts, failed.last_error, failed.delivered_at) == (1, "HTTP 500", None)
    assert T0 + 1 <= failed.next_attempt_at <= T0 + 5
    assert dispatch(engine, client, key, failed.next_attempt_at - 1, receiver) == (
        outbox.DispatchStats()
    )
    retry_at = failed.next_attempt_at
    assert dispatch(engine, client, key, retry_at, receiver) == outbox.DispatchStats(delivered=1)
    assert (receiver.seen, receiver.timestamps) == ([message_id, message_id], [T0, retry_at])
    assert list(receiver.processed) == [message_id]
    row = message(engine, message_id)
    assert (row.delivered_at, row.attempts, row.last_error) == (retry_at, 2, None)


@pytest.mark.parametrize(
    ("status", "retry_after"),
    [(429, "120"), (503, email.utils.formatdate(T0 + 120, usegmt=True))],
)
def test_retry_after_is_honoured_on_429_and_503(
    engine: Engine,
    client: httpx.Client,
    key: signing.SigningKey,
    receiver: Receiver,
    status: int,
    retry_after: str,
) -> None:
    add_webhook(engine, receiver.url)
    (message_id,) = send_proof(engine)
    receiver.script = [(status, {"Retry-After": retry_after})]
    assert dispatch(engine, client, key, T0, receiver) == outbox.DispatchStats(retrying=1)
    row = message(engine, message_id)
    assert (row.next_attempt_at, row.last_error) == (T0 + 120, f"HTTP {status}")
    assert dispatch(engine, client, key, T0 + 119, receiver) == outbox.DispatchStats()
    assert dispatch(engine, client, key, T0 + 120, receiver) == outbox.DispatchStats(delivered=1)
    assert receiver.timestamps == [T0, T0 + 120]


@pytest.mark.parametrize(
    ("retry_after", "earliest", "latest"),
    [
        ("86400", T0 + HOUR, T0 + HOUR),
        ("soon", T0 + 1, T0 + 5),
        (email.utils.formatdate(T0 - 60, usegmt=True), T0 + 1, T0 + 1),  # in the past
    ],
)
def test_retry_after_is_capped_at_an_hour_and_ignored_when_unreadable(
    engine: Engine,
    client: httpx.Client,
    key: signing.SigningKey,
    receiver: Receiver,
    retry_after: str,
    earliest: int,
    latest: int,
) -> None:
    add_webhook(engine, receiver.url)
    (message_id,) = send_proof(engine)
    receiver.script = [(429, {"Retry-After": retry_after})]
    assert dispatch(engine, client, key, T0, receiver) == outbox.DispatchStats(retrying=1)
    assert earliest <= message(engine, message_id).next_attempt_at <= latest


def test_a_message_is_given_up_after_72_hours_of_failures(
    engine: Engine, client: httpx.Client, key: signing.SigningKey, receiver: Receiver
) -> None:
    add_webhook(engine, receiver.url)
    (message_id,) = send_proof(engine)
    receiver.script = [(500, {})] * 1000
    now_s, given_up = T0, 0
    for _ in range(1000):  # each pass is one run of the job at the message's next attempt
        stats = dispatch(engine, client, key, now_s, receiver)
        given_up += stats.given_up
        row = message(engine, message_id)
        if row.given_up_at is not None:
            break
        now_s = row.next_attempt_at
    assert given_up == 1
    assert (row.given_up_at, row.delivered_at) == (now_s, None)
    assert row.last_error == "HTTP 500 (retried for 259200 s)"
    attempts = receiver.timestamps
    assert row.attempts == len(attempts) == len(receiver.seen)
    assert attempts[-1] == now_s >= T0 + 72 * HOUR > attempts[-2]
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    assert 1 <= gaps[0] <= 5
    assert all(1 <= gap <= HOUR for gap in gaps)
    assert dispatch(engine, client, key, now_s + 10 * HOUR, receiver) == outbox.DispatchStats()
    assert receiver.processed == {}


def test_an_unreachable_receiver_is_retried_and_its_error_names_no_url(
    engine: Engine, client: httpx.Client, key: signing.SigningKey
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    add_webhook(engine, f"http://127.0.0.1:{port}/hooks?token=s3cret")
    (message_id,) = send_proof(engine)
    assert dispatch(engine, client, key, T0) == outbox.DispatchStats(retrying=1)
    row = message(engine, message_id)
    assert (row.attempts, row.last_error, row.delivered_at) == (1, "ConnectError", None)


def test_a_redirect_is_a_failure_and_is_not_followed(
    engine: Engine, client: httpx.Client, key: signing.SigningKey, receiver: Receiver
) -> None:
    add_webhook(engine, receiver.url)
    (message_id,) = send_proof(engine)
    receiver.script = [(307, {"Location": receiver.url + "/elsewhere"})]
    assert dispatch(engine, client, key, T0, receiver) == outbox.DispatchStats(retrying=1)
    assert (receiver.seen, message(engine, message_id).last_error) == ([message_id], "HTTP 307")


def test_410_gone_disables_the_webhook_and_gives_its_messages_up(
    engine: Engine, client: httpx.Client, key: signing.SigningKey, receiver: Receiver
) -> None:
    webhook_id = add_webhook(engine, receiver.url)
    first, second = send_proof(engine)[0], send_proof(engine, now_s=T0 + 1)[0]
    receiver.script = [(410, {})]
    assert dispatch(engine, client, key, T0 + 1, receiver) == outbox.DispatchStats(given_up=2)
    assert receiver.seen == [first]  # the second is given up without a request
    assert message(engine, first).last_error == "HTTP 410: the receiver is gone; webhook disabled"
    assert message(engine, second).last_error == "the webhook is disabled"
    with Session(engine) as session:
        webhook = session.get(Webhook, webhook_id)
        assert webhook is not None
        assert webhook.disabled_at == T0 + 1
    assert send_proof(engine, now_s=T0 + 2) == []


def test_a_deleted_webhooks_pending_message_is_given_up_unsent(
    engine: Engine, client: httpx.Client, key: signing.SigningKey, receiver: Receiver
) -> None:
    webhook_id = add_webhook(engine, receiver.url)
    (message_id,) = send_proof(engine)
    with Session(engine) as session:
        webhooks.delete_webhook(session, principal=ADMIN, webhook_id=webhook_id, now_s=T0)
        session.commit()
    assert dispatch(engine, client, key, T0, receiver) == outbox.DispatchStats(given_up=1)
    row = message(engine, message_id)
    assert (row.given_up_at, row.attempts, row.last_error) == (T0, 0, "the webhook is disabled")
    assert receiver.seen == []


def test_a_crash_before_commit_resends_and_the_receiver_dedups_on_the_webhook_id(
    engine: Engine, client: httpx.Client, key: signing.SigningKey, receiver: Receiver
) -> None:
    add_webhook(engine, receiver.url)
    (message_id,) = send_proof(engine)
    with Session(engine) as session:
        stats = outbox.dispatch_due(session, client=client, key=key, now_s=T0)
        assert stats == outbox.DispatchStats(delivered=1)
        session.rollback()  # the dispatcher died before its commit
    assert message(engine, message_id).delivered_at is None
    assert dispatch(engine, client, key, T0 + 5, receiver) == outbox.DispatchStats(delivered=1)
    assert receiver.seen == [message_id, message_id]  # at least once ...
    assert list(receiver.processed) == [message_id]  # ... and processed once
    assert message(engine, message_id).delivered_at == T0 + 5


def test_dispatch_sends_due_messages_oldest_first_up_to_the_limit(
    engine: Engine, client: httpx.Client, key: signing.SigningKey, receiver: Receiver
) -> None:
    add_webhook(engine, receiver.url)
    ids = [send_proof(engine, now_s=T0 + n)[0] for n in range(3)]
    send_proof(engine, now_s=T0 + 100)  # not due yet
    with Session(engine) as session:
        stats = outbox.dispatch_due(session, client=client, key=key, now_s=T0 + 10, limit=2)
        session.commit()
    assert (stats, receiver.seen) == (outbox.DispatchStats(delivered=2), ids[:2])
    assert dispatch(engine, client, key, T0 + 10, receiver) == outbox.DispatchStats(delivered=1)
    assert receiver.seen == ids
    with Session(engine) as session:
        pending = session.exec(
            select(OutboxMessage).where(col(OutboxMessage.delivered_at).is_(None))
        ).all()
    assert [row.created_at for row in pending] == [T0 + 100]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_concurrent_dispatchers_skip_the_rows_another_one_holds(
    engine: Engine, client: httpx.Client, key: signing.SigningKey, receiver: Receiver
) -> None:
    add_webhook(engine, receiver.url)
    (message_id,) = send_proof(engine)
    with Session(engine) as first, Session(engine) as second:
        assert outbox.dispatch_due(first, client=client, key=key, now_s=T0) == (
            outbox.DispatchStats(delivered=1)
        )
        # The first has not committed: its row is locked, and the second passes it by.
        assert outbox.dispatch_due(second, client=client, key=key, now_s=T0) == (
            outbox.DispatchStats()
        )
        second.commit()
        first.commit()
    assert receiver.seen == [message_id]
    assert message(engine, message_id).delivered_at == T0
