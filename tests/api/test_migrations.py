"""The Alembic migrations are the schema: they build exactly what the models declare."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel

from gpudelivery.api import migrations, models


def test_the_migrated_schema_is_what_the_models_declare(engine: Engine) -> None:
    assert models.__all__  # the tables are registered on SQLModel.metadata
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, SQLModel.metadata)
    assert differences == []


def test_migrating_twice_changes_nothing(database_url: str) -> None:
    migrations.upgrade(database_url)
    assert migrations.revision_of(database_url) == "0001"


def test_an_unmigrated_database_has_no_revision(tmp_path: object) -> None:
    assert migrations.revision_of(f"sqlite:///{tmp_path}/empty.sqlite3") is None
