"""The Alembic migrations are the schema: they build exactly what the models declare."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
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
    assert migrations.revision_of(database_url) == "0002"


def test_the_revisions_form_one_line_ending_at_the_newest() -> None:
    scripts = ScriptDirectory.from_config(migrations.alembic_config("sqlite://"))
    assert scripts.get_heads() == ["0002"]
    assert [script.revision for script in scripts.walk_revisions()] == ["0002", "0001"]


def test_a_database_at_0001_upgrades_and_downgrades_keeping_its_rows(tmp_path: object) -> None:
    url = f"sqlite:///{tmp_path}/old.sqlite3"
    migrations.upgrade(url, "0001")
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO capacity (instrument, gpus, updated_at) VALUES ('H100', 8, 1)")
        )
    migrations.upgrade(url)
    assert migrations.revision_of(url) == "0002"
    command.downgrade(migrations.alembic_config(url), "0001")
    assert migrations.revision_of(url) == "0001"
    with engine.connect() as connection:
        assert connection.execute(text("SELECT instrument, gpus FROM capacity")).all() == [
            ("H100", 8)
        ]
        tables = set(inspect(connection).get_table_names())
    engine.dispose()
    assert "meter_rollups" not in tables
    assert "merkle_nodes" not in tables


def test_an_unmigrated_database_has_no_revision(tmp_path: object) -> None:
    assert migrations.revision_of(f"sqlite:///{tmp_path}/empty.sqlite3") is None
