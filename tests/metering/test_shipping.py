"""Shipping spooled batches to the ingest endpoint: answers, retries, outages and refusals."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tenacity

from gpudelivery import batches, signing, timefmt
from gpudelivery.metering import shipping, spool

from utils.factories import EPOCH
from utils.polling import poll
from utils.receiver import IngestDouble

KEY = signing.generate()
NODE = "gpu-node-7"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[spool.Spool]:
    spooled = spool.Spool(tmp_path / "spool.sqlite3", node=NODE, key=KEY)
    yield spooled
    spooled.close()


def fill(store: spool.Spool, count: int) -> None:
    for i in range(count):
        record = {
            "gpu_uuid": "GPU-aaaa",
            "t0": timefmt.format_utc(EPOCH + 10 * i),
            "t1": timefmt.format_utc(EPOCH + 10 * i + 10),
            "healthy": True,
        }
        store.append([record], span=(EPOCH + 10 * i, EPOCH + 10 * i + 10))


@pytest.fixture
def receiver() -> Iterator[IngestDouble]:
    double = IngestDouble([KEY.public_key])
    yield double
    double.stop()


def shipper_for(store: spool.Spool, receiver: IngestDouble, **options: int) -> shipping.Shipper:
    client = httpx.Client(base_url=receiver.url, timeout=5)
    return shipping.Shipper(store, client=client, **options)


def stored_seqs(receiver: IngestDouble) -> list[int]:
    return [document["seq"] for document in receiver.stored.get((NODE, KEY.key_id), [])]


def test_accepted_batches_are_marked_shipped(store: spool.Spool, receiver: IngestDouble) -> None:
    receiver.start()
    fill(store, 5)
    shipper = shipper_for(store, receiver, batch_limit=3)
    assert (shipper.ship_once(), shipper.ship_once(), shipper.ship_once()) == (3, 2, 0)
    assert stored_seqs(receiver) == [0, 1, 2, 3, 4]
    assert (store.depth(), shipper.stats.shipped, receiver.answers) == (
        0,
        5,
        [["accepted"] * 3, ["accepted"] * 2],
    )


def test_a_resend_after_a_lost_answer_is_a_duplicate_stored_once(
    store: spool.Spool, receiver: IngestDouble, tmp_path: Path
) -> None:
    receiver.start()
    fill(store, 3)
    shipper = shipper_for(store, receiver)
    shipper.ship_once()
    with sqlite3.connect(tmp_path / "spool.sqlite3") as db:  # as if the answer never came
        db.execute("UPDATE batches SET state = 'pending'")
    assert shipper.ship_once() == 1  # pruning kept only the chain head
    assert receiver.answers[-1] == ["duplicate"]
    assert stored_seqs(receiver) == [0, 1, 2]
    assert store.depth() == 0


def test_receiver_down_then_back_loses_and_duplicates_nothing(
    store: spool.Spool, receiver: IngestDouble
) -> None:
    fill(store, 12)
    shipper = shipper_for(store, receiver, batch_limit=5)
    stop = threading.Event()
    worker = threading.Thread(target=shipper.run, args=(stop,), kwargs={"idle_s": 0.01})
    worker.start()
    try:
        poll(lambda: shipper.stats.failures >= 2)
        assert store.depth() == 12
        receiver.start()
        poll(lambda: store.depth() == 0)
    finally:
        stop.set()
        worker.join(timeout=10)
    assert not worker.is_alive()
    assert stored_seqs(receiver) == list(range(12))
    documents = receiver.stored[(NODE, KEY.key_id)]
    assert [b.seq for b in batches.verify_chain(documents, KEY.public_key)] == list(range(12))


def test_busy_answers_are_retried_until_accepted(
    store: spool.Spool, receiver: IngestDouble
) -> None:
    receiver.start()
    receiver.busy_answers = 3
    fill(store, 2)
    shipper = shipper_for(store, receiver)
    stop = threading.Event()
    worker = threading.Thread(target=shipper.run, args=(stop,), kwargs={"idle_s": 0.01})
    worker.start()
    try:
        poll(lambda: store.depth() == 0)
    finally:
        stop.set()
        worker.join(timeout=10)
    assert (receiver.requests >= 4, shipper.stats.failures, stored_seqs(receiver)) == (
        True,
        3,
        [0, 1],
    )


def test_retry_after_is_honoured_and_the_backoff_is_capped(store: spool.Spool) -> None:
    shipper = shipping.Shipper(store, client=httpx.Client(base_url="http://127.0.0.1:9"))
    state = tenacity.RetryCallState(tenacity.Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = 1
    state.set_exception(
        (shipping.RetryableShipError, shipping.RetryableShipError("busy", retry_after_s=7), None)
    )
    assert 7 <= shipper._wait(state) <= shipping.BACKOFF_CAP_S
    state.attempt_number = 40
    state.set_exception(
        (shipping.RetryableShipError, shipping.RetryableShipError("busy", retry_after_s=3600), None)
    )
    assert shipper._wait(state) == shipping.BACKOFF_CAP_S


def test_a_fork_is_rejected_kept_as_evidence_and_not_retried(
    store: spool.Spool, receiver: IngestDouble, tmp_path: Path
) -> None:
    receiver.start()
    other = spool.Spool(tmp_path / "other.sqlite3", node=NODE, key=KEY)
    unhealthy = {
        "gpu_uuid": "GPU-aaaa",
        "t0": timefmt.format_utc(EPOCH),
        "t1": timefmt.format_utc(EPOCH + 10),
        "healthy": False,
    }
    other.append([unhealthy], span=(EPOCH, EPOCH + 10))  # the API already holds another seq 0
    shipper_for(other, receiver).ship_once()
    fill(store, 2)
    shipper = shipper_for(store, receiver)
    assert shipper.ship_once() == 2
    assert receiver.answers[-1] == ["fork", "out_of_order"]
    assert (store.depth(), store.count(spool.REJECTED)) == (0, 2)
    assert shipper.stats.rejected == {"fork": 1, "out_of_order": 1}
    assert shipper.ship_once() == 0
    other.close()


def test_an_unknown_key_is_rejected(store: spool.Spool) -> None:
    stranger = IngestDouble([signing.generate().public_key])
    stranger.start()
    try:
        fill(store, 1)
        shipper = shipper_for(store, stranger)
        shipper.ship_once()
        assert shipper.stats.rejected == {"unknown_key": 1}
    finally:
        stranger.stop()


def test_a_refused_request_rejects_its_batches_and_is_not_retried(
    store: spool.Spool, receiver: IngestDouble
) -> None:
    receiver.start()
    receiver.refuse_with = 400
    fill(store, 3)
    shipper = shipper_for(store, receiver)
    assert shipper.ship_once() == 3
    assert (store.count(spool.REJECTED), shipper.stats.rejected) == (3, {"http_400": 3})
    assert receiver.requests == 1


def test_a_request_too_large_is_split(store: spool.Spool, receiver: IngestDouble) -> None:
    receiver.start()
    receiver.refuse_with = 413
    fill(store, 8)
    shipper = shipper_for(store, receiver, batch_limit=8)
    assert shipper.ship_once() == 0
    assert (shipper.batch_limit, store.depth()) == (4, 8)
    receiver.refuse_with = None
    assert shipper.ship_once() == 4


def test_batch_limit_is_checked(store: spool.Spool) -> None:
    with pytest.raises(ValueError, match=r"batch_limit must be 1\.\.100"):
        shipping.Shipper(store, client=httpx.Client(), batch_limit=101)
