"""The gpudelivery API app for the operator's tests: migrated on a fresh SQLite database,
served in process (FastAPI's TestClient, an httpx client), with API keys made for them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

from fastapi.testclient import TestClient
from sqlmodel import Session

from gpudelivery.api import auth, migrations
from gpudelivery.api.app import create_app
from gpudelivery.api.settings import ApiSettings

__all__ = ["running_api"]


@contextlib.contextmanager
def running_api(
    directory: Path,
    keys: Mapping[str, auth.Role],
    *,
    capacity: Mapping[str, int] | None = None,
    declared_by: str = "operator",
) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """The API app on a database in `directory`: its client, and a key for each of `keys`
    (principal name -> role), by name. `declared_by` (a key of role operator) declares
    `capacity` (instrument -> GPUs) first."""
    database_url = f"sqlite:///{directory / 'api.sqlite3'}"
    migrations.upgrade(database_url)
    settings = ApiSettings(
        database_url=database_url,
        provider_key_file=directory / "provider.key",
        jobs_enabled=False,
    )
    app = create_app(settings)
    try:
        with TestClient(app) as client:
            with Session(app.state.gpudelivery.engine) as session:
                tokens = {
                    name: auth.create_key(session, name=name, role=role)[1]
                    for name, role in keys.items()
                }
                session.commit()
            for instrument, gpus in (capacity or {}).items():
                answer = client.put(
                    f"/v1/capacity/{instrument}",
                    json={"gpus": gpus},
                    headers={"Authorization": f"Bearer {tokens[declared_by]}"},
                )
                assert answer.status_code == 200, answer.text
            yield client, tokens
    finally:
        app.state.gpudelivery.engine.dispose()
