"""Prometheus metrics of the API, on `/metrics` (no key: it holds no tenant's data).

Counters are counted where things happen (ingest answers, verification failures); the
outbox's depth and the age of its oldest undelivered message, the roll-ups' lag, and the
jobs' runs are read fresh on each scrape by a custom collector (client_python's documented
pattern). Each app
has its own registry, so several apps (tests, or replicas in one process) never collide.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select

from gpudelivery.api import rollups
from gpudelivery.api.models import OutboxMessage

__all__ = ["ApiMetrics"]

PREFIX = "gpudelivery_api_"
# Ingest answers that mean a batch did not verify (docs/ingest.md).
VERIFICATION_FAILURES = frozenset({"invalid", "unknown_key", "fork"})


class _DatabaseCollector(Collector):
    def __init__(
        self, engine: Engine, jobs: Callable[[], tuple[dict[str, int], dict[str, int]]] | None
    ) -> None:
        self.engine = engine
        self.jobs = jobs

    def collect(self) -> Iterator[Metric]:
        with Session(self.engine) as session:
            depth, oldest = session.exec(
                select(func.count(), func.min(OutboxMessage.created_at)).where(
                    col(OutboxMessage.delivered_at).is_(None),
                    col(OutboxMessage.given_up_at).is_(None),
                )
            ).one()
            lag = rollups.lag(session)
        yield GaugeMetricFamily(
            PREFIX + "rollup_lag_records",
            "Meter records stored but not yet folded into the roll-ups proofs read.",
            value=lag,
        )
        yield GaugeMetricFamily(
            PREFIX + "outbox_depth_messages", "Outbox messages not yet delivered.", value=depth
        )
        yield GaugeMetricFamily(
            PREFIX + "outbox_oldest_age_seconds",
            "Age of the oldest undelivered outbox message (0 when none).",
            value=0 if oldest is None else max(0.0, time.time() - oldest),
        )
        if self.jobs is not None:
            runs, failures = self.jobs()
            family = CounterMetricFamily(
                PREFIX + "job_runs",
                "Periodic job runs, by job and outcome.",
                labels=("job", "outcome"),
            )
            for job, count in sorted(runs.items()):
                family.add_metric([job, "ok"], count)
            for job, count in sorted(failures.items()):
                family.add_metric([job, "failed"], count)
            yield family


class ApiMetrics:
    """The API's registry and the counters its routes increment."""

    def __init__(
        self,
        engine: Engine,
        *,
        jobs: Callable[[], tuple[dict[str, int], dict[str, int]]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.ingested = Counter(
            PREFIX + "ingest_batches",
            "Meter batches answered by the ingest endpoint, by status.",
            ["status"],
            registry=self.registry,
        )
        self.ingested_records = Counter(
            PREFIX + "ingest_records", "Meter records stored.", registry=self.registry
        )
        self.verification_failures = Counter(
            PREFIX + "verification_failures",
            "Meter batches refused: bad signature or shape, unknown key, or a fork.",
            ["status"],
            registry=self.registry,
        )
        self.registry.register(_DatabaseCollector(engine, jobs))

    def count_ingest(self, statuses: list[str], stored_records: int) -> None:
        for status in statuses:
            self.ingested.labels(status).inc()
            if status in VERIFICATION_FAILURES:
                self.verification_failures.labels(status).inc()
        self.ingested_records.inc(stored_records)
