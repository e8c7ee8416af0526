"""The database engine and sessions: PostgreSQL in production, SQLite embedded.

`engine_for(url)` makes the SQLAlchemy engine: `postgresql://` URLs use psycopg 3, SQLite
files get WAL and foreign keys. Schema changes happen only through Alembic
(`gpudelivery api migrate`, api/migrations); the app never creates tables itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlmodel import Session, create_engine

__all__ = ["engine_for", "is_postgresql", "session_scope"]


def _driver_url(url: str) -> str:
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def is_postgresql(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def engine_for(url: str) -> Engine:
    """The engine for a database URL (see ApiSettings.database_url)."""
    driver_url = _driver_url(url)
    if make_url(driver_url).get_backend_name() == "sqlite":
        engine = create_engine(driver_url, connect_args={"check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection: Any, _record: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=5000")
            cursor.close()

        return engine
    return create_engine(driver_url, pool_pre_ping=True)


def session_scope(engine: Engine) -> Iterator[Session]:
    """One session per request; the route (the caller) owns the transaction."""
    with Session(engine) as session:
        yield session
