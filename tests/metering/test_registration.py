"""Registering the node key with the bootstrap token, and shipping with a registrar: first
shipment, refused tokens, keys of another node, revoked keys, restarts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gpudelivery import signing, timefmt
from gpudelivery.metering import errors, registration, shipping, spool

from utils.factories import EPOCH
from utils.receiver import IngestDouble

NODE = "gpu-node-7"
TOKEN = "bootstrap-s3cret-token"


@pytest.fixture
def receiver() -> Iterator[IngestDouble]:
    double = IngestDouble([], bootstrap_token=TOKEN)
    double.start()
    yield double
    double.stop()


@pytest.fixture
def key() -> signing.SigningKey:
    return signing.generate()


def registrar_for(
    receiver: IngestDouble, key: signing.SigningKey, state_dir: Path, *, token: str = TOKEN
) -> registration.KeyRegistrar:
    client = httpx.Client(base_url=receiver.url, timeout=5)
    return registration.KeyRegistrar(client, node=NODE, key=key, token=token, state_dir=state_dir)


def test_a_key_is_registered_with_the_token_and_remembered(
    receiver: IngestDouble, key: signing.SigningKey, tmp_path: Path
) -> None:
    registrar = registrar_for(receiver, key, tmp_path)
    assert registrar.registered is False
    registrar.register()
    assert registrar.registered is True
    assert receiver.key_nodes == {key.key_id: NODE}
    assert receiver.registrations == [(201, f"Bearer {TOKEN}")]
    assert (tmp_path / "node.registered").read_text() == f"{key.key_id} {receiver.url}\n"
    # A restarted agent (a new registrar over the same state) knows it is registered.
    assert registrar_for(receiver, key, tmp_path).registered is True


def test_registering_again_is_accepted(
    receiver: IngestDouble, key: signing.SigningKey, tmp_path: Path
) -> None:
    registrar_for(receiver, key, tmp_path).register()
    registrar = registrar_for(receiver, key, tmp_path)
    registrar.forget()
    registrar.register()
    assert [status for status, _ in receiver.registrations] == [201, 200]
    assert registrar.registered is True


def test_a_refused_token_registers_nothing_and_names_the_key_and_status(
    receiver: IngestDouble, key: signing.SigningKey, tmp_path: Path
) -> None:
    registrar = registrar_for(receiver, key, tmp_path, token="wrong")
    with pytest.raises(registration.RegistrationRefusedError) as caught:
        registrar.register()
    assert str(caught.value) == (
        f"the API refused to register key {key.key_id} for node {NODE}: "
        "HTTP 401 bootstrap token required"
    )
    assert receiver.key_nodes == {}
    assert registrar.registered is False


def test_the_key_of_another_node_is_refused(
    receiver: IngestDouble, key: signing.SigningKey, tmp_path: Path
) -> None:
    (tmp_path / "other").mkdir()
    client = httpx.Client(base_url=receiver.url, timeout=5)
    other = registration.KeyRegistrar(
        client, node="other-node", key=key, token=TOKEN, state_dir=tmp_path / "other"
    )
    other.register()
    with pytest.raises(registration.RegistrationRefusedError) as caught:
        registrar_for(receiver, key, tmp_path).register()
    assert str(caught.value).endswith("HTTP 409 key registered for another node")
    assert receiver.key_nodes == {key.key_id: "other-node"}


def test_a_busy_api_is_a_retryable_error(
    receiver: IngestDouble, key: signing.SigningKey, tmp_path: Path
) -> None:
    receiver.busy_answers = 1
    registrar = registrar_for(receiver, key, tmp_path)
    with pytest.raises(errors.MeteringError) as caught:
        registrar.register()
    assert not isinstance(caught.value, registration.RegistrationRefusedError)
    assert str(caught.value) == "key registration: API answered 503"
    registrar.register()
    assert registrar.registered is True


def test_the_token_never_shows_in_the_registrars_repr(
    receiver: IngestDouble, key: signing.SigningKey, tmp_path: Path
) -> None:
    assert TOKEN not in repr(registrar_for(receiver, key, tmp_path))


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read the bootstrap token"), ("  \n", "the bootstrap token file is empty")],
)
def test_an_unreadable_or_empty_token_file_is_named(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(errors.MeteringError) as caught:
        registration.read_token(path)
    assert str(caught.value).startswith(f"{path}: {message}")


def test_read_token_strips_the_trailing_newline(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    assert registration.read_token(tmp_path / "token") == TOKEN


# -- shipping with a registrar --------------------------------------------------------------


def fill(store: spool.Spool, count: int) -> None:
    for i in range(count):
        record = {
            "gpu_uuid": "GPU-aaaa",
            "t0": timefmt.format_utc(EPOCH + 10 * i),
            "t1": timefmt.format_utc(EPOCH + 10 * i + 10),
            "healthy": True,
        }
        store.append([record], span=(EPOCH + 10 * i, EPOCH + 10 * i + 10))


def shipper_for(
    receiver: IngestDouble, key: signing.SigningKey, tmp_path: Path, *, token: str = TOKEN
) -> shipping.Shipper:
    store = spool.Spool(tmp_path / "spool.sqlite3", node=NODE, key=key)
    fill(store, 3)
    registrar = registrar_for(receiver, key, tmp_path, token=token)
    return shipping.Shipper(store, client=registrar.client, registrar=registrar)


def test_the_first_shipment_registers_the_key_then_ships(
    receiver: IngestDouble, key: signing.SigningKey, tmp_path: Path
) -> None:
    shipper = shipper_for(receiver, key, tmp_path)
    assert shipper.ship_once() == 3
    assert [status for status, _ in receiver.registrations] == [201]
    assert [document["seq"] for document in receiver.stored[(NODE, key.key_id)]] == [0, 1, 2]
    assert shipper.stats.rejected == {}


def test_a_refused_token_keeps_every_batch_in_the_spool_for_later(
    receiver: IngestDouble, key: signing.SigningKey, tmp_path: Path
) -> None:
    shipper = shipper_for(receiver, key, tmp_path, token="wrong")
    with pytest.raises(shipping.RetryableShipError) as caught:
        shipper.ship_once()
    assert "HTTP 401" in str(caught.value)
    assert shipper.store.depth() == 3
    assert receiver.stored == {}


def test_a_revoked_key_is_registered_again_and_its_batches_resent(
    receiver: IngestDouble, key: signing.SigningKey, tmp_path: Path
) -> None:
    shipper = shipper_for(receiver, key, tmp_path)
    shipper.ship_once()
    receiver.revoke(key.key_id)
    fill(shipper.store, 2)  # the chain goes on: seq 3 and 4
    with pytest.raises(shipping.RetryableShipError) as caught:
        shipper.ship_once()
    assert str(caught.value) == f"the API does not know key {key.key_id}: registering it again"
    assert shipper.store.depth() == 2  # not rejected: waiting
    assert shipper.ship_once() == 2
    assert [status for status, _ in receiver.registrations] == [201, 201]
    assert [document["seq"] for document in receiver.stored[(NODE, key.key_id)]] == [0, 1, 2, 3, 4]
    assert shipper.stats.rejected == {}


def test_without_a_registrar_an_unknown_key_is_rejected_and_kept(
    receiver: IngestDouble, key: signing.SigningKey, tmp_path: Path
) -> None:
    store = spool.Spool(tmp_path / "spool.sqlite3", node=NODE, key=key)
    fill(store, 2)
    client = httpx.Client(base_url=receiver.url, timeout=5)
    shipper = shipping.Shipper(store, client=client)
    assert shipper.ship_once() == 2
    assert shipper.stats.rejected == {"unknown_key": 2}
    assert store.count(spool.REJECTED) == 2
