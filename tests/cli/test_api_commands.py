"""`gpudelivery api migrate | serve | keys`: a provider sets the API up from the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from gpudelivery.cli import app

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

        def ready() -> bool:
            try:
                return httpx.get(base + "/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        poll(ready)
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
