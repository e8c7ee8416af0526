"""Schema migrations (Alembic): the only way the API's tables change.

`upgrade(url)` brings a database to the newest revision; `gpudelivery api migrate` calls it
before the app starts (the chart runs it as a Job). Revisions live in `versions/`; a new
one is written with `alembic revision --autogenerate` against a migrated database (see
README), and `tests/api/test_migrations.py` fails while the models and the migrations
disagree.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from gpudelivery.api import db

__all__ = ["alembic_config", "upgrade"]

HERE = Path(__file__).resolve().parent


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(HERE))
    config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at `url` to `revision` (the newest by default)."""
    command.upgrade(alembic_config(url), revision)


def revision_of(url: str) -> str | None:
    """The database's current revision, or None when it was never migrated."""
    from alembic.runtime.migration import MigrationContext

    engine = db.engine_for(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
