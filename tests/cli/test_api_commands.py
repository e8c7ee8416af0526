"""`gpudelivery api migrate | serve | keys`: a provider sets the API up from the command line."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from typer.testing import CliRunner

from gpudelivery import signing
from gpudelivery.api import migrations
from gpudelivery.cli import app

from utils import meters
from utils.factories import BOOTSTRAP_TOKEN
from utils.polling import poll
from utils.receiver import free_port


@pytest.fixture
def environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    variables = {
        "GPUDELIVERY_DATABASE_URL": f"sqlite:///{tmp_path / 'api.sqlite3'}",
        "GPUDELIVERY_API_PROVIDER_KEY_FILE": str(tmp_path / "provider.key"),
    }
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    return variables


def _ready(base: str) -> bool:
    """Whether the API served at `base` answers /readyz."""
    try:
        return httpx.get(base + "/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_migrate_reports_the_revision(runner: CliRunner, environment: dict[str, str]) -> None:
    result = runner.invoke(app, ["api", "migrate"])
    assert result.exit_code == 0, result.output
    assert "database at revision 0002" in result.output


def test_an_unreachable_database_is_named(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUDELIVERY_DATABASE_URL", f"postgresql://nobody@127.0.0.1:{free_port()}/x")
    result = runner.invoke(app, ["api", "migrate"])
    assert result.exit_code == 2
    assert result.output.startswith("gpudelivery: error: database: OperationalError: ")


def test_a_key_is_printed_once_and_a_bad_role_is_named(
    runner: CliRunner, environment: dict[str, str]
) -> None:
    runner.invoke(app, ["api", "migrate"])
    made = runner.invoke(app, ["api", "keys", "create", "--role", "exchange", "--name", "cme"])
    assert made.exit_code == 0, made.output
    token = made.stdout.strip()
    prefix, key_id, secret = token.split("_", 2)
    assert (prefix, len(key_id), len(secret) >= 43) == ("gpd", 12, True)
    bad = runner.invoke(app, ["api", "keys", "create", "--role", "king", "--name", "x"])
    assert bad.exit_code == 2
    assert "--role: must be one of admin, exchange, buyer, operator, meter" in bad.output
    unknown = runner.invoke(app, ["api", "keys", "revoke", "nope"])
    assert (unknown.exit_code, "no API key nope" in unknown.output) == (2, True)


def test_serve_refuses_an_unmigrated_database(environment: dict[str, str]) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "gpudelivery", "api", "serve", "--port", str(free_port())],
        env={**os.environ, **environment},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 2
    assert "the database is not migrated: run `gpudelivery api migrate` first" in completed.stderr


def test_a_created_key_works_against_the_served_api_until_revoked(
    runner: CliRunner, environment: dict[str, str], tmp_path: Path
) -> None:
    assert runner.invoke(app, ["api", "migrate"]).exit_code == 0
    made = runner.invoke(app, ["api", "keys", "create", "--role", "admin", "--name", "staff"])
    token = made.stdout.strip()
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gpudelivery", "api", "serve", "--port", str(port)],
        env={**os.environ, **environment},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        poll(lambda: _ready(base))
        headers = {"Authorization": f"Bearer {token}"}
        assert httpx.get(base + "/v1/contracts", headers=headers).json() == {"data": [], "count": 0}
        key_id = token.split("_")[1]
        assert runner.invoke(app, ["api", "keys", "revoke", key_id]).exit_code == 0
        refused = httpx.get(base + "/v1/contracts", headers=headers)
        assert (refused.status_code, refused.json()) == (
            401,
            {"detail": "this API key was revoked"},
        )
        keys = httpx.get(base + "/v1/keys").json()
        assert keys["count"] == 1
        assert keys["data"][0]["key_id"].startswith("ed25519:")
    finally:
        process.terminate()
        process.communicate(timeout=30)
    assert (tmp_path / "provider.key").exists()


def test_serve_refuses_several_workers_on_sqlite(
    runner: CliRunner, environment: dict[str, str]
) -> None:
    assert runner.invoke(app, ["api", "migrate"]).exit_code == 0

    result = runner.invoke(app, ["api", "serve", "--workers", "2", "--port", str(free_port())])

    assert result.exit_code == 2
    assert result.output == (
        "gpudelivery: error: --workers 2: SQLite takes one writer at a time, so it is served "
        "by one worker; use PostgreSQL (GPUDELIVERY_DATABASE_URL) for more\n"
    )


@pytest.fixture
def postgres_environment(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A migrated PostgreSQL database of its own (dropped at the end), a bootstrap token."""
    name = f"gpudelivery_cli_{uuid.uuid4().hex[:12]}"
    admin_url = "postgresql://postgres@127.0.0.1:5432/postgres"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    (tmp_path / "bootstrap.token").write_text(BOOTSTRAP_TOKEN)
    try:
        migrations.upgrade(url)
        yield {
            "GPUDELIVERY_DATABASE_URL": url,
            "GPUDELIVERY_API_PROVIDER_KEY_FILE": str(tmp_path / "provider.key"),
            "GPUDELIVERY_API_BOOTSTRAP_TOKEN_FILE": str(tmp_path / "bootstrap.token"),
            "GPUDELIVERY_API_JOBS_ENABLED": "false",
        }
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_several_workers_serve_ingest_on_postgresql(
    postgres_environment: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    command = ["api", "serve", "--port", str(port), "--workers", "2"]
    process = subprocess.Popen(
        [sys.executable, "-m", "gpudelivery", *command],
        env={**os.environ, **postgres_environment},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    key = signing.generate()
    documents = meters.chain(key, "gpu-node-07", 3)
    try:
        poll(lambda: _ready(base))
        registered = httpx.post(
            base + "/v1/meter/keys",
            headers={"Authorization": f"Bearer {BOOTSTRAP_TOKEN}"},
            json={
                "node": "gpu-node-07",
                "public_key_pem": signing.public_pem(key.public_key).decode("ascii"),
            },
        )
        assert registered.status_code == 201, registered.text
        answers = []
        for shipped in ([documents[0]], documents[:2], documents[1:]):
            # A connection each: any worker may answer, and each sees what the others stored.
            answer = httpx.post(base + "/v1/meter/batches", json={"batches": shipped})
            answers.append([(r["seq"], r["status"]) for r in answer.json()["results"]])
    finally:
        process.terminate()
        process.communicate(timeout=30)
    assert answers == [
        [(0, "accepted")],
        [(0, "duplicate"), (1, "accepted")],
        [(1, "duplicate"), (2, "accepted")],
    ]
    assert (tmp_path / "provider.key").exists()
