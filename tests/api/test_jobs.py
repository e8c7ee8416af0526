"""The periodic jobs: stale-meter incidents, leadership, counting runs; and /metrics."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from gpudelivery import signing
from gpudelivery.api import db, jobs
from gpudelivery.api.auth import Role
from gpudelivery.api.models import Assignment, Contract, Incident, MeterBatch, MeterKey

NODE = "gpu-node-7"
NOW = 1_800_000_000


def serving(session: Session, *, node: str = NODE) -> None:
    """A live contract with an open interval on `node`."""
    session.add(
        Contract(
            id="EX-1",
            exchange="cme",
            holder="acme-ai",
            instrument="H100-SXM-80GB",
            gpu_count=1,
            start_s=NOW - 600,
            end_s=NOW + 600,
            terms="{}",
            status="booked",
            idempotency_key="k",
            created_at=NOW - 3600,
        )
    )
    session.commit()  # the ledger row refers to it
    session.add(
        Assignment(
            contract_id="EX-1", node=node, gpu_uuid="GPU-a", start_s=NOW - 600, recorded_at=NOW
        )
    )
    session.commit()


def shipped(session: Session, *, at_s: int, seq: int) -> None:
    if session.get(MeterKey, "ed25519:k") is None:
        session.add(MeterKey(key_id="ed25519:k", node=NODE, public_key_pem="-", registered_at=0))
        session.commit()
    session.add(
        MeterBatch(
            key_id="ed25519:k",
            seq=seq,
            node=NODE,
            hash=f"{seq:064x}",
            leaf_index=seq,
            leaf_hash=f"{seq:064x}",
            document=b"{}",
            received_at=at_s,
        )
    )
    session.commit()


def incidents(session: Session) -> list[tuple[str, str, int]]:
    return [(i.kind, i.node, i.at_s) for i in session.exec(select(Incident)).all()]


def test_a_serving_node_that_never_shipped_raises_one_incident(session: Session) -> None:
    serving(session)
    assert jobs.detect_stale_meters(session, now_s=NOW) == [NODE]
    session.commit()
    assert jobs.detect_stale_meters(session, now_s=NOW + 15) == []  # once per silence
    assert incidents(session) == [("meter_silent", NODE, NOW)]


def test_a_node_silent_past_60_s_raises_one_and_again_after_shipping(session: Session) -> None:
    serving(session)
    shipped(session, at_s=NOW - 60, seq=0)
    assert jobs.detect_stale_meters(session, now_s=NOW) == []  # exactly 60 s: still fresh
    assert jobs.detect_stale_meters(session, now_s=NOW + 1) == [NODE]
    session.commit()
    shipped(session, at_s=NOW + 30, seq=1)
    assert jobs.detect_stale_meters(session, now_s=NOW + 60) == []
    assert jobs.detect_stale_meters(session, now_s=NOW + 91) == [NODE]
    session.commit()
    assert [at for _, _, at in incidents(session)] == [NOW + 1, NOW + 91]


def test_a_node_not_serving_is_not_watched(session: Session) -> None:
    serving(session, node="other-node")
    shipped(session, at_s=0, seq=0)
    assert jobs.detect_stale_meters(session, now_s=NOW) == ["other-node"]
    assert jobs.detect_stale_meters(session, now_s=NOW + 10_000) == []  # the window is over


def test_one_replica_leads_on_postgresql_every_process_on_sqlite(engine: Engine) -> None:
    first, second = jobs.Leadership(engine), jobs.Leadership(engine)
    try:
        if db.is_postgresql(engine):
            assert (first.is_leader(), second.is_leader()) == (True, False)
            assert first.is_leader() is True  # it keeps the lead
            first.release()
            assert second.is_leader() is True
        else:
            assert (first.is_leader(), second.is_leader()) == (True, True)
    finally:
        first.release()
        second.release()


def test_a_failing_job_is_counted_and_the_next_runs(engine: Engine) -> None:
    runner = jobs.JobRunner(engine, key=signing.generate(), clock=lambda: NOW)

    def broken(_session: Session, _now_s: int) -> None:
        raise RuntimeError("boom")

    runner._run("broken", broken)
    runner.stale_meters()
    runner.tree_head()
    assert runner.stats.failures == {"broken": 1}
    assert runner.stats.runs == {"stale_meters": 1, "tree_head": 1}
    runner.leadership.release()


def test_metrics_count_ingest_and_show_the_outbox(
    client: TestClient, token_for: Callable[[str, Role], dict[str, str]]
) -> None:
    answer = client.post("/v1/meter/batches", json={"batches": [{"format": "nope"}]})
    assert answer.status_code == 200
    text = client.get("/metrics/").text
    assert 'gpudelivery_api_ingest_batches_total{status="invalid"} 1.0' in text
    assert 'gpudelivery_api_verification_failures_total{status="invalid"} 1.0' in text
    assert "gpudelivery_api_outbox_depth_messages 0.0" in text
    assert "gpudelivery_api_outbox_oldest_age_seconds 0.0" in text
    assert "gpudelivery_api_rollup_lag_records 0.0" in text


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics/", "/v1/keys"])
def test_health_metrics_and_keys_need_no_key(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 200


def test_a_job_runner_starts_and_stops_with_the_app(engine: Engine, tmp_path: object) -> None:
    runner = jobs.JobRunner(engine, key=signing.generate(), clock=time.time)
    runner.start()
    try:
        assert {job.func.__name__ for job in runner.scheduler.get_jobs()} == {
            "tree_head",
            "rollups",
            "finalize",
            "dispatch_outbox",
            "stale_meters",
        }
    finally:  # a scheduler left running would take the jobs' lead from later tests
        runner.shutdown()
