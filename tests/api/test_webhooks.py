"""Webhook registration: the SSRF rules, who may allow a private URL, and ownership.

The URL rules are checked as a pure function (`check_url`) with an injected resolver, so
names resolving to private addresses need no DNS; numeric shorthands of 127.0.0.1 go
through the real `getaddrinfo`, which parses them without a network. The service and the
routes run on SQLite and on PostgreSQL (tests/api/conftest.py)."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, func, select

from gpudelivery.api import errors, webhooks
from gpudelivery.api.app import create_app
from gpudelivery.api.auth import Principal, Role
from gpudelivery.api.models import Webhook
from gpudelivery.api.routes import webhooks as webhook_routes
from gpudelivery.api.settings import ApiSettings

Tokens = Callable[[str, Role], dict[str, str]]
NOW_S = 1_800_000_000
WEBHOOK_ID = re.compile(r"wh_[0-9A-HJKMNP-TV-Z]{26}")
PRIVATE = "webhooks may not point into private networks"

# What the injected resolver knows; any other name does not resolve.
NAMES: dict[str, list[str]] = {
    "hooks.cme.example": ["8.8.8.8", "2001:4860:4860::8888"],
    "internal.cme.example": ["10.0.0.7"],
    "rebind.example": ["8.8.4.4", "127.0.0.1"],
    "metadata.example": ["169.254.169.254"],
    "mapped.example": ["::ffff:192.168.0.1"],
    "v6-local.example": ["fd12:3456::1"],
}


def fake_resolve(host: str, _port: int) -> Iterable[str]:
    try:
        return NAMES[host]
    except KeyError as exc:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from exc


def no_resolve(host: str, _port: int) -> Iterable[str]:
    raise AssertionError(f"{host} was resolved")


def refused(
    url: str, *, allow_private: bool = False, resolve: webhooks.Resolver = fake_resolve
) -> str:
    with pytest.raises(errors.UnprocessableError) as caught:
        webhooks.check_url(url, allow_private=allow_private, resolve=resolve)
    return caught.value.detail


# -- the URL rules ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "detail"),
    [
        ("https://127.0.0.1/hooks", "127.0.0.1 is a loopback address"),
        ("https://127.8.9.10:8443/", "127.8.9.10 is a loopback address"),
        ("https://10.1.2.3/", "10.1.2.3 is a private address"),
        ("https://172.16.0.1/", "172.16.0.1 is a private address"),
        ("https://192.168.1.1/", "192.168.1.1 is a private address"),
        ("https://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
        ("https://0.0.0.0/", "0.0.0.0 is an unspecified address"),
        ("https://224.0.0.1/", "224.0.0.1 is a multicast address"),
        ("https://240.0.0.1/", "240.0.0.1 is a reserved address"),
        ("https://100.64.0.1/", "100.64.0.1 is a non-global address"),
        ("https://[::1]/", "::1 is a loopback address"),
        ("https://[::]/", ":: is an unspecified address"),
        ("https://[fe80::1]/", "fe80::1 is a link-local address"),
        ("https://[fc00::1]/", "fc00::1 is a private address"),
        ("https://[ff02::1]/", "ff02::1 is a multicast address"),
        (
            "https://[::ffff:127.0.0.1]/",
            "::ffff:127.0.0.1 is a loopback address (127.0.0.1 in IPv6 form)",
        ),
        (
            "https://[::ffff:a00:1]/",
            "::ffff:a00:1 is a private address (10.0.0.1 in IPv6 form)",
        ),
        (
            "https://[2002:7f00:1::]/",
            "2002:7f00:1:: is a loopback address (127.0.0.1 in IPv6 form)",
        ),
        (
            "https://[64:ff9b::a9fe:a9fe]/",
            "64:ff9b::a9fe:a9fe is a link-local address (169.254.169.254 in IPv6 form)",
        ),
    ],
)
def test_an_address_literal_into_a_private_network_is_refused(url: str, detail: str) -> None:
    assert refused(url, resolve=no_resolve) == f"url: {detail}; {PRIVATE}"


@pytest.mark.parametrize(
    ("url", "detail"),
    [
        ("https://internal.cme.example/hooks", "resolves to 10.0.0.7, a private address"),
        ("https://metadata.example/", "resolves to 169.254.169.254, a link-local address"),
        ("https://rebind.example/", "resolves to 127.0.0.1, a loopback address"),
        (
            "https://mapped.example/",
            "resolves to ::ffff:c0a8:1, a private address (192.168.0.1 in IPv6 form)",
        ),
        ("https://v6-local.example/", "resolves to fd12:3456::1, a private address"),
    ],
)
def test_a_name_resolving_to_a_private_address_is_refused(url: str, detail: str) -> None:
    host = url.split("/")[2]
    assert refused(url) == f"url: {host} {detail}; {PRIVATE}"


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "127.1", "017700000001"])
def test_a_numeric_shorthand_of_loopback_is_refused(host: str) -> None:
    detail = refused(f"https://{host}/hooks", resolve=webhooks.resolve_host)
    assert detail == f"url: {host} resolves to 127.0.0.1, a loopback address; {PRIVATE}"


def test_localhost_is_refused() -> None:
    detail = refused("https://localhost/hooks", resolve=webhooks.resolve_host)
    assert detail in {
        f"url: localhost resolves to 127.0.0.1, a loopback address; {PRIVATE}",
        f"url: localhost resolves to ::1, a loopback address; {PRIVATE}",
    }


@pytest.mark.parametrize(
    ("url", "allow_private", "detail"),
    [
        ("http://8.8.8.8/hooks", False, "url: the scheme must be https"),
        ("ftp://8.8.8.8/hooks", True, "url: the scheme must be https or http"),
        ("8.8.8.8/hooks", False, "url: the scheme must be https"),
        ("https:///hooks", False, "url: names no host"),
        (
            "https://user:secret@8.8.8.8/hooks",
            False,
            "url: must not hold credentials (receivers authenticate the signature)",
        ),
        ("https://8.8.8.8/hooks#part", False, "url: must not have a fragment"),
        ("https://8.8.8.8:99999/", False, "url: not a valid URL: Port out of range 0-65535"),
        ("https://8.8.8.8/" + "a" * 2040, False, "url: must be at most 2048 characters"),
        ("https://nowhere.example/hooks", False, "url: cannot resolve nowhere.example"),
    ],
)
def test_a_malformed_or_unresolvable_url_is_refused(
    url: str, allow_private: bool, detail: str
) -> None:
    assert refused(url, allow_private=allow_private) == detail


@pytest.mark.parametrize(
    "url",
    [
        "https://8.8.8.8/hooks",
        "https://[2001:4860:4860::8888]:8443/hooks",
        "https://hooks.cme.example/gpu?tenant=cme",
        "HTTPS://hooks.cme.example/",
    ],
)
def test_a_public_https_url_is_accepted(url: str) -> None:
    webhooks.check_url(url, allow_private=False, resolve=fake_resolve)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080/hooks", "https://10.0.0.1/", "http://clearing.internal/"]
)
def test_allow_private_accepts_http_and_private_hosts_without_resolving(url: str) -> None:
    webhooks.check_url(url, allow_private=True, resolve=no_resolve)


# -- the service ------------------------------------------------------------------------------

CME = Principal(key_id="k1", name="cme", role=Role.EXCHANGE)
ICE = Principal(key_id="k2", name="ice", role=Role.EXCHANGE)
ADMIN = Principal(key_id="k3", name="provider-staff", role=Role.ADMIN)
BUYER = Principal(key_id="k4", name="acme-ai", role=Role.BUYER)


def register(
    session: Session,
    principal: Principal = CME,
    url: str = "https://8.8.8.8/hooks",
    *,
    allow_private: bool = False,
    on_behalf_of: str | None = None,
) -> Webhook:
    return webhooks.register_webhook(
        session,
        exchange=principal,
        url=url,
        allow_private=allow_private,
        now_s=NOW_S,
        resolve=fake_resolve,
        on_behalf_of=on_behalf_of,
    )


def stored(engine: Engine) -> int:
    with Session(engine) as other:
        return int(other.exec(select(func.count()).select_from(Webhook)).one())


def test_registering_writes_a_webhook_only_when_the_caller_commits(
    engine: Engine, session: Session
) -> None:
    webhook = register(session, url=" https://hooks.cme.example/gpu ")
    assert WEBHOOK_ID.fullmatch(webhook.id)
    assert (webhook.exchange, webhook.url, webhook.created_at, webhook.disabled_at) == (
        "cme",
        "https://hooks.cme.example/gpu",
        NOW_S,
        None,
    )
    assert stored(engine) == 0
    session.commit()
    assert stored(engine) == 1


def test_only_an_admin_may_allow_a_private_url(session: Session) -> None:
    with pytest.raises(errors.ForbiddenError) as caught:
        register(session, url="http://127.0.0.1:9000/", allow_private=True)
    assert caught.value.detail == (
        "allow_private: only an admin may allow a webhook into a private network"
    )
    webhook = register(
        session, ADMIN, "http://127.0.0.1:9000/", allow_private=True, on_behalf_of="cme"
    )
    assert (webhook.exchange, webhook.url) == ("cme", "http://127.0.0.1:9000/")


def test_an_admin_names_the_exchange_and_an_exchange_only_itself(session: Session) -> None:
    with pytest.raises(errors.UnprocessableError) as missing:
        register(session, ADMIN)
    assert missing.value.detail == (
        "exchange: an admin registers a webhook for an exchange; name it"
    )
    with pytest.raises(errors.ForbiddenError) as other:
        register(session, CME, on_behalf_of="ice")
    assert other.value.detail == "exchange: an exchange registers webhooks only for itself"
    assert register(session, CME, on_behalf_of="cme").exchange == "cme"
    with pytest.raises(errors.ForbiddenError) as buyer:
        register(session, BUYER)
    assert buyer.value.detail == "this needs the role exchange; the key is buyer"


def test_a_url_is_registered_once_per_exchange_and_ten_at_most(session: Session) -> None:
    first = register(session)
    with pytest.raises(errors.ConflictError) as again:
        register(session)
    assert again.value.detail == f"url: already registered as webhook {first.id}"
    assert register(session, ICE).exchange == "ice"  # another exchange may use it
    for n in range(1, webhooks.MAX_WEBHOOKS_PER_EXCHANGE):
        register(session, url=f"https://8.8.8.8/hooks/{n}")
    with pytest.raises(errors.ConflictError) as full:
        register(session, url="https://8.8.8.8/hooks/last")
    assert full.value.detail == "cme has 10 webhooks, the most allowed; delete one first"


def test_webhooks_are_listed_and_deleted_only_by_their_exchange(session: Session) -> None:
    cme, ice = register(session), register(session, ICE, "https://1.1.1.1/ice")
    assert [w.id for w in webhooks.list_webhooks(session, principal=CME)] == [cme.id]
    assert {w.id for w in webhooks.list_webhooks(session, principal=ADMIN)} == {cme.id, ice.id}
    with pytest.raises(errors.NotFoundError) as hidden:
        webhooks.delete_webhook(session, principal=ICE, webhook_id=cme.id, now_s=NOW_S + 5)
    assert hidden.value.detail == f"no webhook {cme.id}"
    deleted = webhooks.delete_webhook(session, principal=CME, webhook_id=cme.id, now_s=NOW_S + 5)
    assert deleted.disabled_at == NOW_S + 5
    again = webhooks.delete_webhook(session, principal=CME, webhook_id=cme.id, now_s=NOW_S + 9)
    assert again.disabled_at == NOW_S + 5
    assert webhooks.list_webhooks(session, principal=CME) == []
    assert register(session).id != cme.id  # the URL may be registered again


# -- the routes -------------------------------------------------------------------------------


@pytest.fixture
def client(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    """The API with the webhook routes (included here while app.py does not yet), resolving
    names with `fake_resolve`."""
    app = create_app(
        ApiSettings(database_url=database_url, provider_key_file=tmp_path / "provider.key")
    )
    if not any(getattr(route, "path", None) == "/v1/webhooks" for route in app.routes):
        app.include_router(webhook_routes.router)
    app.dependency_overrides[webhook_routes.get_resolver] = lambda: fake_resolve
    with TestClient(app) as test_client:
        yield test_client
    app.state.gpudelivery.engine.dispose()


@pytest.fixture
def headers(client: TestClient, token_for: Tokens) -> dict[str, dict[str, str]]:
    return {
        "admin": token_for("provider-staff", Role.ADMIN),
        "cme": token_for("cme", Role.EXCHANGE),
        "ice": token_for("ice", Role.EXCHANGE),
        "buyer": token_for("acme-ai", Role.BUYER),
    }


def test_an_exchange_registers_lists_and_deletes_its_webhook(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    answer = client.post(
        "/v1/webhooks", json={"url": "https://hooks.cme.example/gpu"}, headers=headers["cme"]
    )
    assert answer.status_code == 201, answer.text
    created = answer.json()
    assert WEBHOOK_ID.fullmatch(created.pop("id"))
    assert created.pop("created_at").endswith("Z")
    assert created == {
        "exchange": "cme",
        "url": "https://hooks.cme.example/gpu",
        "disabled_at": None,
    }
    listed = client.get("/v1/webhooks", headers=headers["cme"]).json()
    assert (listed["count"], [w["url"] for w in listed["data"]]) == (
        1,
        ["https://hooks.cme.example/gpu"],
    )
    webhook_id = listed["data"][0]["id"]
    deleted = client.delete(f"/v1/webhooks/{webhook_id}", headers=headers["cme"])
    assert deleted.status_code == 200, deleted.text
    assert (deleted.json()["id"], deleted.json()["disabled_at"] is not None) == (webhook_id, True)
    assert client.get("/v1/webhooks", headers=headers["cme"]).json() == {"data": [], "count": 0}


def test_a_url_into_a_private_network_answers_422(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    for url, detail in (
        ("https://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
        (
            "https://internal.cme.example/",
            "internal.cme.example resolves to 10.0.0.7, a private address",
        ),
    ):
        answer = client.post("/v1/webhooks", json={"url": url}, headers=headers["cme"])
        assert (answer.status_code, answer.json()) == (422, {"detail": f"url: {detail}; {PRIVATE}"})
    answer = client.post("/v1/webhooks", json={"url": "http://8.8.8.8/"}, headers=headers["cme"])
    assert (answer.status_code, answer.json()) == (422, {"detail": "url: the scheme must be https"})
    assert client.get("/v1/webhooks", headers=headers["admin"]).json()["count"] == 0


def test_allow_private_answers_403_to_an_exchange_and_is_an_admins_to_give(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    body = {"url": "http://127.0.0.1:9000/hooks", "allow_private": True}
    answer = client.post("/v1/webhooks", json=body, headers=headers["cme"])
    assert (answer.status_code, answer.json()) == (
        403,
        {"detail": "allow_private: only an admin may allow a webhook into a private network"},
    )
    answer = client.post("/v1/webhooks", json={**body, "exchange": "cme"}, headers=headers["admin"])
    assert answer.status_code == 201, answer.text
    assert (answer.json()["exchange"], answer.json()["url"]) == ("cme", body["url"])
    listed = client.get("/v1/webhooks", headers=headers["cme"]).json()
    assert [w["url"] for w in listed["data"]] == [body["url"]]


def ids(client: TestClient, headers: dict[str, str]) -> list[str]:
    return [webhook["id"] for webhook in client.get("/v1/webhooks", headers=headers).json()["data"]]


def test_another_exchanges_webhook_is_invisible_and_answers_404(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    cme = client.post("/v1/webhooks", json={"url": "https://8.8.8.8/cme"}, headers=headers["cme"])
    ice = client.post("/v1/webhooks", json={"url": "https://1.1.1.1/ice"}, headers=headers["ice"])
    cme_id, ice_id = cme.json()["id"], ice.json()["id"]
    assert ids(client, headers["ice"]) == [ice_id]
    every = client.get("/v1/webhooks", headers=headers["admin"]).json()
    assert (every["count"], {w["id"] for w in every["data"]}) == (2, {cme_id, ice_id})
    answer = client.delete(f"/v1/webhooks/{cme_id}", headers=headers["ice"])
    assert (answer.status_code, answer.json()) == (404, {"detail": f"no webhook {cme_id}"})
    answer = client.delete("/v1/webhooks/wh_NOSUCH", headers=headers["ice"])
    assert (answer.status_code, answer.json()) == (404, {"detail": "no webhook wh_NOSUCH"})
    assert client.delete(f"/v1/webhooks/{cme_id}", headers=headers["admin"]).status_code == 200
    assert ids(client, headers["admin"]) == [ice_id]


def test_webhooks_need_an_exchange_key(
    client: TestClient, headers: dict[str, dict[str, str]]
) -> None:
    body = {"url": "https://8.8.8.8/hooks"}
    assert client.post("/v1/webhooks", json=body).status_code == 401
    answer = client.post("/v1/webhooks", json=body, headers=headers["buyer"])
    assert (answer.status_code, answer.json()) == (
        403,
        {"detail": "this needs the role exchange; the key is buyer"},
    )
    assert client.get("/v1/webhooks", headers=headers["buyer"]).status_code == 403
