"""One contract end to end, every part real: the API served by uvicorn on a port, the real
metering agent on the NVML simulator registering its key and shipping batches to it, the
ledger posted, the window closed and finalized, the proof fetched and checked by
`gpudelivery verify`, and the webhooks received by a local server that checks their
signatures. The delivered GPU-seconds are checked against an independent recount of the
raw batches the API stored."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select

from gpudelivery import accounting, batches, evidence, settlement, signing, terms, timefmt
from gpudelivery import errors as core_errors
from gpudelivery.api import auth, finalization, outbox
from gpudelivery.api.app import create_app
from gpudelivery.api.models import MeterBatch, MeterRecordRow
from gpudelivery.api.settings import ApiSettings

from utils.factories import BOOTSTRAP_TOKEN
from utils.nvml import SCENARIOS
from utils.polling import poll
from utils.receiver import free_port

NODE = "gpu-node-7"
GPUS = ["GPU-6c2b3c1a-1d2e-4f30-8a41-5b6c7d8e9f00", "GPU-6c2b3c1a-1d2e-4f30-8a41-5b6c7d8e9f01"]
WINDOW_S = 8


class Receiver:
    """The exchange's webhook endpoint: verifies every message, keeps them by id."""

    def __init__(self, public_key: Any) -> None:
        self.public_key = public_key
        self.messages: dict[str, dict[str, Any]] = {}
        self.refused: list[str] = []
        self.port = free_port()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                try:
                    outbox.verify_signature(
                        receiver.public_key, dict(self.headers), body, now_s=int(time.time())
                    )
                except core_errors.SignatureError as exc:  # refuse, and say so
                    receiver.refused.append(str(exc))
                    self.send_response(400)
                else:
                    receiver.messages[self.headers["webhook-id"]] = json.loads(body)
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def served(database_url: str, tmp_path: Path) -> Iterator[tuple[str, Any]]:
    (tmp_path / "bootstrap.token").write_text(BOOTSTRAP_TOKEN)
    settings = ApiSettings(
        database_url=database_url,
        provider_key_file=tmp_path / "provider.key",
        bootstrap_token_file=tmp_path / "bootstrap.token",
        jobs_enabled=False,  # the test runs finalization and dispatch at the right moments
    )
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    poll(lambda: server.started)
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(timeout=30)
    app.state.gpudelivery.engine.dispose()


def recount(engine: Engine, contract: terms.ContractTerms) -> int:
    """Delivered GPU-seconds recomputed by the core from the raw batches the API stored."""
    with Session(engine) as session:
        documents = [json.loads(row.document) for row in session.exec(select(MeterBatch)).all()]
    records = [record for document in documents for record in batches.parse_batch(document).records]
    ledger = [
        evidence.Assignment(contract.contract_id, NODE, gpu, contract.start, contract.end)
        for gpu in GPUS
    ]
    result = accounting.account(
        gpu_count=contract.gpu_count,
        contract_id=contract.contract_id,
        window=(contract.start, contract.end),
        assignments=ledger,
        records=records,
    )
    return result.delivered_gpu_seconds


def test_a_contract_is_metered_proved_verified_settled_and_reported(
    served: tuple[str, Any],
    engine: Engine,
    nvml_sim_dir: Path,
    tmp_path: Path,
    token_for: Any,
) -> None:
    base, app = served
    state = app.state.gpudelivery
    operator = token_for("operator", auth.Role.OPERATOR)
    exchange = token_for("cme", auth.Role.EXCHANGE)
    admin = token_for("staff", auth.Role.ADMIN)
    provider_pem = httpx.get(base + "/v1/keys").json()["data"][0]["public_key_pem"]
    (tmp_path / "provider.pub").write_text(provider_pem)
    receiver = Receiver(signing.load_public_pem(provider_pem.encode()))
    # Only an admin may allow a loopback URL: it registers the exchange's webhook.
    hook = httpx.post(
        base + "/v1/webhooks",
        json={
            "url": f"http://127.0.0.1:{receiver.port}/hooks",
            "allow_private": True,
            "exchange": "cme",
        },
        headers=admin,
    )
    assert hook.status_code == 201, hook.text
    assert httpx.put(
        base + "/v1/capacity/H100-SXM-80GB", json={"gpus": 8}, headers=operator
    ).is_success

    (tmp_path / "token").write_text(BOOTSTRAP_TOKEN)
    agent = subprocess.Popen(
        [sys.executable, "-m", "gpudelivery", "meter"],
        env={
            **os.environ,
            "LD_LIBRARY_PATH": str(nvml_sim_dir),
            "GPUDELIVERY_NVML_SCENARIO": str(SCENARIOS / "h100x8.yaml"),
            "GPUDELIVERY_METER_NODE_NAME": NODE,
            "GPUDELIVERY_METER_SPOOL__STATE_DIR": str(tmp_path / "meter"),
            "GPUDELIVERY_METER_SAMPLING__BATCH_INTERVAL_S": "1",
            "GPUDELIVERY_METER_SHIPPING__API_URL": base,
            "GPUDELIVERY_METER_SHIPPING__BOOTSTRAP_TOKEN_FILE": str(tmp_path / "token"),
            "GPUDELIVERY_METER_SERVER__HOST": "127.0.0.1",
            "GPUDELIVERY_METER_SERVER__PORT": "0",
            "GPUDELIVERY_METER_ATTRIBUTION__ENABLED": "false",
            "GPUDELIVERY_METER_NODE_CONDITION__ENABLED": "false",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def stored_batches() -> int:
            with Session(engine) as session:
                return int(session.exec(select(func.count()).select_from(MeterBatch)).one())

        poll(lambda: stored_batches() >= 2, deadline_s=60)  # registered, shipping
        start = int(time.time()) + 2
        document = {
            "contract_id": "EX-E2E",
            "buyer": "acme-ai",
            "instrument": "H100-SXM-80GB",
            "gpu_count": 2,
            "start": timefmt.format_utc(start),
            "end": timefmt.format_utc(start + WINDOW_S),
            "price_per_gpu_hour": "3600.00",
            "currency": "USD",
            "penalty_tiers": [{"below": "0.5", "rate": "0.5"}],
        }
        created = httpx.post(
            base + "/v1/contracts", json=document, headers={**exchange, "Idempotency-Key": "e2e"}
        )
        assert created.status_code == 201, created.text
        ledger = [
            {"node": NODE, "gpu_uuid": gpu, "start": document["start"], "end": document["end"]}
            for gpu in GPUS
        ]
        posted = httpx.post(
            base + "/v1/contracts/EX-E2E/assignments",
            json={"assignments": ledger},
            headers=operator,
        )
        assert posted.status_code == 200, posted.text

        def metered_past_the_end() -> bool:
            with Session(engine) as session:
                last = session.exec(select(func.max(col(MeterRecordRow.t1_s)))).one()
            return last is not None and last >= start + WINDOW_S

        poll(metered_past_the_end, deadline_s=60)
    finally:
        agent.send_signal(signal.SIGTERM)
        out, err = agent.communicate(timeout=30)
    assert agent.returncode == 0, err
    assert BOOTSTRAP_TOKEN not in out + err

    with Session(engine) as session:
        done = finalization.finalize_due(
            session, key=state.provider_key, now_s=int(time.time()), grace_s=0
        )
        session.commit()
    assert done == ["EX-E2E"]

    proof_document = httpx.get(base + "/v1/contracts/EX-E2E/proof", headers=exchange).json()
    assert proof_document["status"] == "final"
    (tmp_path / "proof.json").write_text(json.dumps(proof_document))
    verified = subprocess.run(
        [sys.executable, "-m", "gpudelivery", "verify", str(tmp_path / "proof.json"),
         "--pubkey", str(tmp_path / "provider.pub")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr

    contract = terms.parse_terms(document)
    delivered = proof_document["settlement"]["delivered_gpu_seconds"]
    assert delivered == recount(engine, contract)
    assert 2 * (WINDOW_S - 3) <= delivered <= 2 * WINDOW_S  # a stalled round or two at most
    expected = settlement.settle(contract, delivered_gpu_seconds=delivered).to_json()
    settled = httpx.get(base + "/v1/contracts/EX-E2E/settlement", headers=exchange).json()
    assert settled["status"] == "final"
    assert {name: settled["figures"][name] for name in expected} == expected

    with Session(engine) as session, httpx.Client(timeout=10) as client:
        stats = outbox.dispatch_due(
            session, client=client, key=state.provider_key, now_s=int(time.time())
        )
        session.commit()
    receiver.stop()
    assert receiver.refused == []
    events = sorted(message["type"] for message in receiver.messages.values())
    assert events == ["proof.final", "settlement.final"], stats
