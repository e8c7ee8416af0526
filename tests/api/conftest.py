"""Databases for the API tests: a fresh PostgreSQL database per test session (at
127.0.0.1:5432, as on every machine here; its absence fails the tests), and SQLite files.

`engine` is parametrized over both: every API test runs against each. The schema comes from
the Alembic migrations, the only way it changes (api/migrations)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session

from gpudelivery.api import auth, db, migrations
from gpudelivery.api.app import create_app
from gpudelivery.api.settings import ApiSettings

from utils.factories import BOOTSTRAP_TOKEN

POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database of its own for this test session, dropped at the end."""
    name = f"gpudelivery_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _reset_postgres(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("DROP SCHEMA public CASCADE")
        connection.execute("CREATE SCHEMA public")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An empty, migrated database of each kind (PostgreSQL's is emptied for each test)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'api.sqlite3'}"
    else:
        url = request.getfixturevalue("postgres_url")
        _reset_postgres(url)
    migrations.upgrade(url)
    return url


@pytest.fixture
def postgres_engine(postgres_url: str) -> Iterator[Engine]:
    """An empty, migrated PostgreSQL database alone, for what only PostgreSQL does (its
    advisory locks between transactions that SQLite's single writer never has open)."""
    _reset_postgres(postgres_url)
    migrations.upgrade(postgres_url)
    engine = db.engine_for(postgres_url)
    yield engine
    engine.dispose()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = db.engine_for(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with Session(engine) as session:
        yield session


@pytest.fixture
def client(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    """The API over the test database, with a provider key and a bootstrap token."""
    (tmp_path / "bootstrap.token").write_text(BOOTSTRAP_TOKEN + "\n")
    settings = ApiSettings(
        database_url=database_url,
        provider_key_file=tmp_path / "provider.key",
        bootstrap_token_file=tmp_path / "bootstrap.token",
        jobs_enabled=False,  # the tests run each job themselves
    )
    app = create_app(settings)
    with TestClient(app) as test_client:
        yield test_client
    app.state.gpudelivery.engine.dispose()


@pytest.fixture
def token_for(engine: Engine) -> Callable[[str, auth.Role], dict[str, str]]:
    """`token_for(name, role)`: Authorization headers of a new API key."""

    def make(name: str, role: auth.Role) -> dict[str, str]:
        with Session(engine) as session:
            _, token = auth.create_key(session, name=name, role=role)
            session.commit()
        return {"Authorization": f"Bearer {token}"}

    return make
