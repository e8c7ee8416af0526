"""Schemathesis against the API's own OpenAPI schema, with its default checks: no 5xx, every
answer documented and matching its schema. It runs with an admin key (the role that may call
every operation) over a database holding a contract, a meter key and an evidence log, on
SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.config import SchemathesisConfig
from sqlmodel import Session

from gpudelivery import batches, signing, timefmt
from gpudelivery.api import auth, ingest
from gpudelivery.api.app import create_app
from gpudelivery.api.models import Capacity, Contract
from gpudelivery.api.settings import ApiSettings

from utils.factories import BOOTSTRAP_TOKEN

NOW = 1_800_000_000


@pytest.fixture
def api_schema(database_url: str, tmp_path: Path) -> Iterator[Any]:
    (tmp_path / "bootstrap.token").write_text(BOOTSTRAP_TOKEN)
    app = create_app(
        ApiSettings(
            database_url=database_url,
            provider_key_file=tmp_path / "provider.key",
            bootstrap_token_file=tmp_path / "bootstrap.token",
            jobs_enabled=False,
        )
    )
    engine = app.state.gpudelivery.engine
    with Session(engine) as session:
        _, token = auth.create_key(session, name="staff", role=auth.Role.ADMIN)
        session.add(Capacity(instrument="H100-SXM-80GB", gpus=64, updated_at=NOW))
        session.add(
            Contract(
                id="EX-1",
                exchange="cme",
                holder="acme-ai",
                instrument="H100-SXM-80GB",
                gpu_count=8,
                start_s=NOW,
                end_s=NOW + 3600,
                terms='{"contract_id":"EX-1"}',
                status="booked",
                idempotency_key="k",
                created_at=NOW,
            )
        )
        key = signing.generate()
        ingest.register_key(
            session,
            node="gpu-node-7",
            public_key_pem=signing.public_pem(key.public_key).decode(),
            now_s=NOW,
        )
        record = {
            "gpu_uuid": "GPU-a",
            "t0": timefmt.format_utc(NOW),
            "t1": timefmt.format_utc(NOW + 10),
            "healthy": True,
        }
        document = batches.sign_batch(
            key=key, node="gpu-node-7", seq=0, prev_hash=None, records=[record]
        )
        ingest.ingest(session, documents=[document], now_s=NOW)
        session.commit()
    config = SchemathesisConfig.from_dict(
        {
            "headers": {"Authorization": f"Bearer {token}"},
            # What JSON Schema cannot say (a window's end after its start, penalty tiers in
            # order, a known instrument's capacity) answers 422 naming the field, as the
            # schema documents: a schema-valid request may still be refused that way.
            "checks": {
                "positive_data_acceptance": {
                    "expected-statuses": ["2xx", "401", "403", "404", "409", "422"]
                }
            },
        }
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    yield schema
    engine.dispose()


def test_every_operation_answers_as_documented(api_schema: Any) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 20  # every route is in the schema
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=40,
            derandomize=True,  # the same examples on every run: CI never flips on luck
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def check(case: Any) -> None:
            case.call_and_validate()

        check()
