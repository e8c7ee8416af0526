"""Builders of terms, ledgers and meter records for tests, starting from the worked example.

The worked example of shared/SETTLEMENT.md is built here once, as core objects and as the
files the command line reads, so that every test of it states the same scenario.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpudelivery import evidence, terms, timefmt
from gpudelivery.evidence import Assignment, MeterRecord

EPOCH = timefmt.parse_utc("2026-03-03T00:00:00Z", field="start")
CONTRACT_ID = "EX-2026-03-03-H100-0001"
G1 = ("n1", "GPU-11111111-1111-1111-1111-111111111111")
G2 = ("n1", "GPU-22222222-2222-2222-2222-222222222222")
G3 = ("n2", "GPU-33333333-3333-3333-3333-333333333333")


# The figures SETTLEMENT.md states for its worked example, as `gpudelivery settle` prints them.
WORKED_SETTLEMENT = {
    "contract_id": CONTRACT_ID,
    "contracted_gpu_seconds": 7200,
    "delivered_gpu_seconds": 6480,
    "availability": "0.900000",
    "shortfall_gpu_hours": "0.200000",
    "charge": "3.60",
    "penalty": "1.60",
    "net": "2.00",
}


def terms_json(**overrides: Any) -> dict[str, Any]:
    """The worked example's TERMS.json, with fields replaced or (value None) removed."""
    document: dict[str, Any] = {
        "contract_id": CONTRACT_ID,
        "buyer": "acme-ai",
        "instrument": "H100-SXM-80GB",
        "gpu_count": 2,
        "start": timefmt.format_utc(EPOCH),
        "end": timefmt.format_utc(EPOCH + 3600),
        "price_per_gpu_hour": "2.00",
        "currency": "USD",
        "penalty_tiers": [{"below": "0.99", "rate": "0.10"}, {"below": "0.95", "rate": "0.25"}],
        "ld_multiplier": "1.5",
    }
    for name, value in overrides.items():
        if value is None:
            document.pop(name, None)
        else:
            document[name] = value
    return document


def worked_terms(**overrides: Any) -> terms.ContractTerms:
    return terms.parse_terms(terms_json(**overrides))


def assignment(
    gpu: tuple[str, str], start: int, end: int, contract_id: str = CONTRACT_ID
) -> Assignment:
    """An assignment of `gpu` over [EPOCH + start, EPOCH + end)."""
    return Assignment(contract_id, gpu[0], gpu[1], EPOCH + start, EPOCH + end)


def record(
    gpu: tuple[str, str], start: int, end: int, *, healthy: bool = True, **extra: Any
) -> MeterRecord:
    """A meter record of `gpu` over [EPOCH + start, EPOCH + end)."""
    return MeterRecord(gpu[0], gpu[1], EPOCH + start, EPOCH + end, healthy, **extra)


def worked_assignments() -> list[Assignment]:
    return [assignment(G1, 0, 3600), assignment(G2, 0, 3600), assignment(G3, 2400, 3600)]


def worked_records() -> list[MeterRecord]:
    """One record per GPU per minute; g1 silent 00:10-00:12, g2 unhealthy from 00:30."""
    records = []
    for minute in range(60):
        start = minute * 60
        for gpu in (G1, G2, G3):
            if gpu == G1 and 600 <= start < 720:
                continue
            healthy = not (gpu == G2 and start >= 1800)
            records.append(
                record(
                    gpu,
                    start,
                    start + 60,
                    healthy=healthy,
                    utilization_gpu_pct=(88 if gpu == G3 else 97) if healthy else 0,
                    energy_mj=42_000_000 if healthy else 6_000_000,
                )
            )
    return records


def record_json(item: MeterRecord) -> dict[str, Any]:
    """METER.jsonl line of a record."""
    line: dict[str, Any] = {
        "node": item.node,
        "gpu_uuid": item.gpu_uuid,
        "t0": timefmt.format_utc(item.t0_s),
        "t1": timefmt.format_utc(item.t1_s),
        "healthy": item.healthy,
    }
    if item.utilization_gpu_pct is not None:
        line["utilization_gpu_pct"] = item.utilization_gpu_pct
    if item.energy_mj is not None:
        line["energy_mj"] = item.energy_mj
    return line


def write_jsonl(path: Path, lines: Iterable[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


@dataclass(frozen=True)
class InputFiles:
    terms: Path
    assignments: Path
    meter: Path


def write_worked_example(folder: Path) -> InputFiles:
    """The worked example as TERMS.json, ASSIGN.jsonl and METER.jsonl in `folder`."""
    terms_path = folder / "terms.json"
    terms_path.write_text(json.dumps(terms_json()), encoding="utf-8")
    return InputFiles(
        terms=terms_path,
        assignments=write_jsonl(
            folder / "assign.jsonl",
            (evidence.assignment_to_json(item) for item in worked_assignments()),
        ),
        meter=write_jsonl(folder / "meter.jsonl", (record_json(item) for item in worked_records())),
    )


# The bootstrap token the API tests install (tests/api/conftest.py).
BOOTSTRAP_TOKEN = "bootstrap-token-for-tests"
