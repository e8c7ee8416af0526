"""The meter routes over HTTP: key registration and revocation, ingest (docs/ingest.md),
and the public evidence log (docs/evidence-log.md)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from gpudelivery import batches, canonical, merkle, signing, timefmt
from gpudelivery.api import auth
from gpudelivery.api.app import create_app
from gpudelivery.api.models import Incident, MeterBatch, MeterKey, MeterRecordRow, TreeHead
from gpudelivery.api.settings import ApiSettings

from utils import meters

NODE = "gpu-node-07"
OTHER_NODE = "gpu-node-08"
BOOTSTRAP = {"Authorization": "Bearer bootstrap-token-for-tests"}
TokenFor = Callable[[str, auth.Role], dict[str, str]]


@contextmanager
def _client(engine: Engine, tmp_path: Path, **settings: Any) -> Iterator[TestClient]:
    """The API over the test database with `settings` (no bootstrap token unless given)."""
    app = create_app(
        ApiSettings(
            database_url=engine.url.render_as_string(hide_password=False),
            provider_key_file=tmp_path / "provider.key",
            jobs_enabled=False,
            **settings,
        ),
        engine=engine,
    )
    with TestClient(app) as client:
        yield client


def _pem(key: signing.SigningKey) -> str:
    return signing.public_pem(key.public_key).decode("ascii")


def _register(client: TestClient, key: signing.SigningKey, node: str = NODE) -> None:
    response = client.post(
        "/v1/meter/keys", json={"node": node, "public_key_pem": _pem(key)}, headers=BOOTSTRAP
    )
    assert response.status_code == 201, response.text


def _ship(client: TestClient, documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    response = client.post("/v1/meter/batches", json={"batches": documents})
    assert response.status_code == 200, response.text
    results: list[dict[str, Any]] = response.json()["results"]
    return results


def _statuses(results: list[dict[str, Any]]) -> list[tuple[int, str]]:
    return [(result["seq"], result["status"]) for result in results]


def _nothing_stored(engine: Engine) -> bool:
    tables = (MeterKey, MeterBatch, MeterRecordRow, Incident)
    return all(meters.count(engine, table) == 0 for table in tables)


# -- registration --------------------------------------------------------------------------


def test_a_new_key_is_registered_for_its_node(client: TestClient, engine: Engine) -> None:
    key = signing.generate()
    before = int(time.time())

    response = client.post(
        "/v1/meter/keys", json={"node": NODE, "public_key_pem": _pem(key)}, headers=BOOTSTRAP
    )

    assert response.status_code == 201
    body = response.json()
    assert body == {
        "node": NODE,
        "key_id": key.key_id,
        "registered_at": body["registered_at"],
        "revoked_at": None,
    }
    assert before <= timefmt.parse_utc(body["registered_at"], field="t") <= int(time.time())
    assert meters.count(engine, MeterKey) == 1


def test_registering_a_key_again_for_its_node_answers_200(client: TestClient) -> None:
    key = signing.generate()
    request = {"node": NODE, "public_key_pem": _pem(key)}
    first = client.post("/v1/meter/keys", json=request, headers=BOOTSTRAP)

    again = client.post("/v1/meter/keys", json=request, headers=BOOTSTRAP)

    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()


def test_a_key_registered_for_another_node_is_a_conflict(
    client: TestClient, engine: Engine
) -> None:
    key = signing.generate()
    _register(client, key, OTHER_NODE)

    response = client.post(
        "/v1/meter/keys", json={"node": NODE, "public_key_pem": _pem(key)}, headers=BOOTSTRAP
    )

    assert (response.status_code, response.json()) == (
        409,
        {"detail": f"key {key.key_id} is registered for another node"},
    )
    assert meters.count(engine, MeterKey) == 1


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({}, "the bootstrap token is required (Authorization: Bearer)"),
        ({"Authorization": "Bearer not-the-token"}, "wrong bootstrap token"),
        ({"Authorization": "Basic Ym9vdHN0cmFw"}, "the bootstrap token is required "
         "(Authorization: Bearer)"),
    ],
)  # fmt: skip
def test_registration_without_the_bootstrap_token_is_refused(
    client: TestClient, engine: Engine, headers: dict[str, str], detail: str
) -> None:
    response = client.post(
        "/v1/meter/keys",
        json={"node": NODE, "public_key_pem": _pem(signing.generate())},
        headers=headers,
    )

    assert (response.status_code, response.json()) == (401, {"detail": detail})
    assert _nothing_stored(engine)


def test_registration_is_refused_when_the_api_has_no_bootstrap_token(
    engine: Engine, tmp_path: Path
) -> None:
    with _client(engine, tmp_path) as client:
        response = client.post(
            "/v1/meter/keys",
            json={"node": NODE, "public_key_pem": _pem(signing.generate())},
            headers=BOOTSTRAP,
        )

    assert (response.status_code, response.json()) == (
        403,
        {"detail": "meter key registration is disabled: the API has no bootstrap token"},
    )
    assert _nothing_stored(engine)


def _rsa_pem() -> str:
    public = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


@pytest.mark.parametrize(
    ("request_body", "detail"),
    [
        (
            {"node": NODE, "public_key_pem": "-----BEGIN PUBLIC KEY-----\nAAAA\n"},
            "public_key_pem: not a PEM public key",
        ),
        (
            {"node": NODE, "public_key_pem": _rsa_pem()},
            "public_key_pem: not an Ed25519 key but RSAPublicKey",
        ),
        (
            {"node": "GPU node 7", "public_key_pem": _pem(signing.generate())},
            "node 'GPU node 7' is not a Kubernetes node name (a DNS-1123 subdomain)",
        ),
    ],
)
def test_registration_of_a_bad_key_or_node_is_unprocessable(
    client: TestClient, engine: Engine, request_body: dict[str, str], detail: str
) -> None:
    response = client.post("/v1/meter/keys", json=request_body, headers=BOOTSTRAP)

    assert (response.status_code, response.json()) == (422, {"detail": detail})
    assert _nothing_stored(engine)


# -- revocation ----------------------------------------------------------------------------


def test_an_admin_revokes_a_key_and_its_batches_become_unknown(
    client: TestClient, engine: Engine, token_for: TokenFor
) -> None:
    key = signing.generate()
    _register(client, key)
    documents = meters.chain(key, NODE, 2)
    _ship(client, documents[:1])
    admin = token_for("ops", auth.Role.ADMIN)
    before = int(time.time())

    response = client.delete(f"/v1/meter/keys/{key.key_id}", headers=admin)

    assert response.status_code == 200
    body = response.json()
    assert (body["node"], body["key_id"]) == (NODE, key.key_id)
    assert before <= timefmt.parse_utc(body["revoked_at"], field="t") <= int(time.time())
    assert _statuses(_ship(client, documents)) == [(0, "unknown_key"), (1, "unknown_key")]
    assert meters.count(engine, MeterBatch) == 1


def test_revoking_a_revoked_key_answers_it_unchanged(
    client: TestClient, token_for: TokenFor
) -> None:
    key = signing.generate()
    _register(client, key)
    admin = token_for("ops", auth.Role.ADMIN)
    first = client.delete(f"/v1/meter/keys/{key.key_id}", headers=admin)

    again = client.delete(f"/v1/meter/keys/{key.key_id}", headers=admin)

    assert (again.status_code, again.json()) == (200, first.json())


def test_a_revoked_key_cannot_be_registered_again(client: TestClient, token_for: TokenFor) -> None:
    key = signing.generate()
    _register(client, key)
    client.delete(f"/v1/meter/keys/{key.key_id}", headers=token_for("ops", auth.Role.ADMIN))

    response = client.post(
        "/v1/meter/keys", json={"node": NODE, "public_key_pem": _pem(key)}, headers=BOOTSTRAP
    )

    assert (response.status_code, response.json()) == (
        409,
        {"detail": f"key {key.key_id} was revoked; the node needs a new key to register"},
    )


@pytest.mark.parametrize(
    ("role", "status", "detail"),
    [
        (None, 401, "an API key is required (Authorization: Bearer ...)"),
        (auth.Role.EXCHANGE, 403, "this needs the role admin; the key is exchange"),
        (auth.Role.METER, 403, "this needs the role admin; the key is meter"),
    ],
)
def test_only_an_admin_revokes_keys(
    client: TestClient,
    engine: Engine,
    token_for: TokenFor,
    role: auth.Role | None,
    status: int,
    detail: str,
) -> None:
    key = signing.generate()
    _register(client, key)
    headers = {} if role is None else token_for("someone", role)

    response = client.delete(f"/v1/meter/keys/{key.key_id}", headers=headers)

    assert (response.status_code, response.json()) == (status, {"detail": detail})
    assert _statuses(_ship(client, meters.chain(key, NODE, 1))) == [(0, "accepted")]


def test_revoking_an_unknown_key_is_not_found(client: TestClient, token_for: TokenFor) -> None:
    response = client.delete(
        "/v1/meter/keys/ed25519:00000000000000000000000000000000",
        headers=token_for("ops", auth.Role.ADMIN),
    )

    assert (response.status_code, response.json()) == (
        404,
        {"detail": "no meter key ed25519:00000000000000000000000000000000"},
    )


# -- ingest --------------------------------------------------------------------------------


def test_batches_are_accepted_without_an_api_key(client: TestClient, engine: Engine) -> None:
    key = signing.generate()
    _register(client, key)

    results = _ship(client, meters.chain(key, NODE, 2))

    assert results == [
        {"node": NODE, "key_id": key.key_id, "seq": seq, "status": "accepted"} for seq in (0, 1)
    ]
    assert (meters.count(engine, MeterBatch), meters.count(engine, MeterRecordRow)) == (2, 4)


def test_a_batch_reshipped_after_a_lost_answer_is_a_duplicate(
    client: TestClient, engine: Engine
) -> None:
    key = signing.generate()
    _register(client, key)
    documents = meters.chain(key, NODE, 3)
    _ship(client, documents[:2])

    results = _ship(client, documents)

    assert results == [
        {"node": NODE, "key_id": key.key_id, "seq": 0, "status": "duplicate"},
        {"node": NODE, "key_id": key.key_id, "seq": 1, "status": "duplicate"},
        {"node": NODE, "key_id": key.key_id, "seq": 2, "status": "accepted"},
    ]
    assert meters.count(engine, MeterBatch) == 3


def test_out_of_order_answers_name_the_expected_seq(client: TestClient, engine: Engine) -> None:
    key = signing.generate()
    _register(client, key)
    documents = meters.chain(key, NODE, 4)

    results = _ship(client, [documents[0], documents[2], documents[3]])

    assert results[0] == {"node": NODE, "key_id": key.key_id, "seq": 0, "status": "accepted"}
    assert [(r["seq"], r["status"], r["expected_seq"]) for r in results[1:]] == [
        (2, "out_of_order", 1),
        (3, "out_of_order", 1),
    ]
    assert (meters.count(engine, MeterBatch), meters.count(engine, Incident)) == (1, 1)


def test_a_forked_batch_is_refused_with_a_detail(client: TestClient, engine: Engine) -> None:
    key = signing.generate()
    _register(client, key)
    documents = meters.chain(key, NODE, 2)
    _ship(client, documents)
    rewritten = meters.follow(key, documents[0], records=[])

    (result,) = _ship(client, [rewritten])

    assert result == {
        "node": NODE,
        "key_id": key.key_id,
        "seq": 1,
        "status": "fork",
        "detail": f"key {key.key_id}: seq 1 has hash {batches.batch_hash(rewritten)}, but the "
        f"stored batch with that seq has hash {batches.batch_hash(documents[1])}",
    }
    assert meters.count(engine, MeterBatch) == 2


def _body(batch_count: int) -> bytes:
    key = signing.generate()
    return json.dumps({"batches": meters.chain(key, NODE, batch_count)}).encode()


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"{not json", "the body is not JSON: "),
        (b'[{"batches": []}]', 'the body must be {"batches": [...]}'),
        (b'{"batches": {}}', 'the body must be {"batches": [...]}'),
        (b'{"batches": [], "node": "x"}', 'the body must be {"batches": [...]}'),
        (b'{"batches": []}', "a request carries 1 to 100 batches, not 0"),
        (_body(101), "a request carries 1 to 100 batches, not 101"),
    ],
)
def test_a_malformed_request_is_refused_whole(
    client: TestClient, engine: Engine, body: bytes, detail: str
) -> None:
    key = signing.generate()
    _register(client, key)

    response = client.post(
        "/v1/meter/batches", content=body, headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 400
    assert response.json()["detail"].startswith(detail)
    assert (meters.count(engine, MeterBatch), meters.count(engine, Incident)) == (0, 0)


def test_a_body_over_the_limit_is_refused_with_413(engine: Engine, tmp_path: Path) -> None:
    key = signing.generate()
    meters.register_in(engine, key, NODE)
    body = json.dumps({"batches": meters.chain(key, NODE, 3)}).encode()
    assert len(body) > 1024

    with _client(engine, tmp_path, max_body_bytes=1024) as client:
        response = client.post(
            "/v1/meter/batches", content=body, headers={"Content-Type": "application/json"}
        )

    assert (response.status_code, response.json()) == (
        413,
        {"detail": "the request body is larger than 1024 bytes"},
    )
    assert meters.count(engine, MeterBatch) == 0


# -- evidence log --------------------------------------------------------------------------


def _provider_key(client: TestClient) -> Any:
    (key,) = client.get("/v1/keys").json()["data"]
    return signing.load_public_pem(key["public_key_pem"].encode("ascii"))


def _fill(client: TestClient, count: int) -> list[bytes]:
    """`count` batches of each of two nodes shipped; the canonical bytes of each leaf."""
    keys = {node: signing.generate() for node in (NODE, OTHER_NODE)}
    for node, key in keys.items():
        _register(client, key, node)
    chains = [meters.chain(key, node, count) for node, key in keys.items()]
    documents = [document for pair in zip(*chains, strict=True) for document in pair]
    assert {r["status"] for r in _ship(client, documents)} == {"accepted"}
    return [canonical.canonical_json(document) for document in documents]


def _verify_head(client: TestClient, head: dict[str, Any]) -> None:
    statement = canonical.canonical_json(
        {key: head[key] for key in ("format", "size", "root_hash", "timestamp")}
    )
    signing.verify(_provider_key(client), statement, head["signature"])


def test_the_tree_head_is_public_and_signed_by_the_provider_key(
    client: TestClient, engine: Engine
) -> None:
    leaves = _fill(client, 2)

    response = client.get("/v1/evidence/tree-head")

    assert response.status_code == 200
    head = response.json()
    assert set(head) == {"format", "size", "root_hash", "timestamp", "key_id", "signature"}
    assert (head["format"], head["size"], head["root_hash"]) == (
        "gpudelivery.tree-head/v1",
        4,
        merkle.root_of(leaves)[1].hex(),
    )
    _verify_head(client, head)
    assert meters.count(engine, TreeHead) == 1


def test_every_leaf_proves_its_inclusion_in_the_current_head(client: TestClient) -> None:
    leaves = _fill(client, 3)
    head = client.get("/v1/evidence/tree-head").json()

    for index, leaf in enumerate(leaves):
        response = client.get(f"/v1/evidence/{index}/inclusion")
        assert response.status_code == 200
        proof = response.json()
        assert (proof["leaf_index"], proof["tree_size"], proof["leaf_hash"]) == (
            index,
            6,
            merkle.leaf_hash(leaf).hex(),
        )
        assert merkle.verify_inclusion(
            merkle.leaf_hash(leaf),
            index,
            head["size"],
            [bytes.fromhex(node) for node in proof["hashes"]],
            bytes.fromhex(head["root_hash"]),
        )


def test_a_later_head_proves_consistent_with_an_earlier_one(client: TestClient) -> None:
    leaves = _fill(client, 1)
    old = client.get("/v1/evidence/tree-head").json()
    leaves += _fill(client, 2)
    new = client.get("/v1/evidence/tree-head").json()
    _verify_head(client, new)

    response = client.get(f"/v1/evidence/consistency?from={old['size']}&to={new['size']}")

    assert response.status_code == 200
    proof = response.json()
    assert (proof["old_size"], proof["new_size"]) == (2, 6)
    assert merkle.verify_consistency(
        2,
        6,
        [bytes.fromhex(node) for node in proof["hashes"]],
        bytes.fromhex(old["root_hash"]),
        bytes.fromhex(new["root_hash"]),
    )
    inclusion = client.get("/v1/evidence/1/inclusion?size=2").json()
    assert merkle.verify_inclusion(
        merkle.leaf_hash(leaves[1]),
        1,
        2,
        [bytes.fromhex(node) for node in inclusion["hashes"]],
        bytes.fromhex(old["root_hash"]),
    )


@pytest.mark.parametrize(
    ("path", "status", "detail"),
    [
        ("/v1/evidence/2/inclusion", 404, "the evidence log has no leaf 2"),
        ("/v1/evidence/1/inclusion?size=3", 404, "the evidence log has 2 leaves, not 3"),
        ("/v1/evidence/1/inclusion?size=1", 422, "leaf 1 is not in a tree of size 1"),
        ("/v1/evidence/consistency?from=1&to=3", 404, "the evidence log has 2 leaves, not 3"),
        (
            "/v1/evidence/consistency?from=2&to=1",
            422,
            "a consistency proof needs 0 <= from <= to, not from 2 to 1",
        ),
    ],
)
def test_proofs_of_trees_the_log_never_had_are_refused(
    client: TestClient, path: str, status: int, detail: str
) -> None:
    _fill(client, 1)

    response = client.get(path)

    assert (response.status_code, response.json()) == (status, {"detail": detail})


def test_a_batch_outside_the_agents_usual_shape_is_judged_and_stored_the_same(
    client: TestClient, engine: Engine
) -> None:
    """A body holding one batch the typed decoder does not take (a float, an unknown record
    field) is decoded as plain JSON: the same answers, the same bytes stored."""
    key = signing.generate()
    _register(client, key)
    usual = meters.chain(key, NODE, 1)
    odd_records = [
        meters.record(meters.GPU_A, meters.EPOCH + 10, utilization_gpu_pct=97.5),
        meters.record(meters.GPU_B, meters.EPOCH + 10, firmware="96.00.5E.00.01"),
    ]
    odd = batches.sign_batch(
        key=key, node=NODE, seq=1, prev_hash=batches.batch_hash(usual[0]), records=odd_records
    )
    after = batches.sign_batch(
        key=key,
        node=NODE,
        seq=2,
        prev_hash=batches.batch_hash(odd),
        records=meters.interval_records(2),
    )

    assert _statuses(_ship(client, usual)) == [(0, "accepted")]
    assert _statuses(_ship(client, [odd, after])) == [(1, "accepted"), (2, "accepted")]
    assert _statuses(_ship(client, [odd, after])) == [(1, "duplicate"), (2, "duplicate")]

    with Session(engine) as session:
        stored = session.exec(select(MeterBatch).order_by(col(MeterBatch.leaf_index))).all()
        utilization = session.exec(
            select(MeterRecordRow.utilization_gpu_pct).where(MeterRecordRow.seq == 1)
        ).all()
    assert [row.document for row in stored] == [
        canonical.canonical_json(document) for document in (*usual, odd, after)
    ]
    assert sorted(utilization, key=lambda value: value or 0) == [97, 97.5]
    assert meters.count(engine, MeterRecordRow) == 6
