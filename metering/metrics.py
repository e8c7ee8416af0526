"""Prometheus metrics and the health endpoint of the metering agent.

GPU metrics come from a custom `Collector` that builds fresh metric families from the
sampler's latest readings on every scrape (client_python's documented pattern), so a value
is never older than the last sampling round, and a GPU that could not be read has no
utilization, power or temperature at all rather than its last good ones. Every XID is
counted by code, not only the last. The agent's own figures (spool depth, shipping,
sampling latency and errors) come from the same collector.

`serve` exposes `/metrics` and `/healthz` (503 when the last round is older than allowed).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpudelivery.metering import attribution, node_condition, pods, sampling, shipping, spool

__all__ = ["AgentState", "MeterCollector", "serve"]

PREFIX = "gpudelivery_meter_"
_GPU_LABELS = ("node", "gpu", "uuid")


@dataclass
class AgentState:
    """What the agent loop reports about itself."""

    last_round_at_s: float | None = None
    last_round_duration_s: float | None = None
    sample_errors: int = 0
    lost_spans: int = 0
    started_at_s: float = field(default_factory=time.time)


class MeterCollector(Collector):
    """Fresh metric families from the sampler, the spool and the shipper on each scrape."""

    def __init__(
        self,
        *,
        node: str,
        sampler: sampling.Sampler,
        store: spool.Spool,
        state: AgentState,
        shipper: shipping.Shipper | None,
        condition: node_condition.NodeConditionPublisher | None = None,
        attribution: attribution.KubeletPodAttribution | None = None,
        pod_index: pods.NodePods | None = None,
    ) -> None:
        self.node = node
        self.sampler = sampler
        self.store = store
        self.state = state
        self.shipper = shipper
        self.condition = condition
        self.attribution = attribution
        self.pod_index = pod_index

    def collect(self) -> Iterator[Metric]:
        gauges = {
            "utilization": GaugeMetricFamily(
                PREFIX + "gpu_utilization_ratio",
                "GPU busy share over the last interval.",
                labels=_GPU_LABELS,
            ),
            "memory_utilization": GaugeMetricFamily(
                PREFIX + "gpu_memory_utilization_ratio",
                "Memory-bandwidth busy share.",
                labels=_GPU_LABELS,
            ),
            "memory": GaugeMetricFamily(
                PREFIX + "gpu_memory_used_bytes", "GPU memory in use.", labels=_GPU_LABELS
            ),
            "power": GaugeMetricFamily(
                PREFIX + "gpu_power_watts", "Power draw.", labels=_GPU_LABELS
            ),
            "temperature": GaugeMetricFamily(
                PREFIX + "gpu_temperature_celsius", "GPU temperature.", labels=_GPU_LABELS
            ),
            "healthy": GaugeMetricFamily(
                PREFIX + "gpu_healthy",
                "1 when the GPU counts as healthy (metering.health).",
                labels=_GPU_LABELS,
            ),
            "pods": GaugeMetricFamily(
                PREFIX + "gpu_pod_info",
                "1 for each pod using the GPU.",
                labels=(*_GPU_LABELS, "pod"),
            ),
        }
        energy = CounterMetricFamily(
            PREFIX + "gpu_energy_joules", "Driver energy counter.", labels=_GPU_LABELS
        )
        xids = CounterMetricFamily(
            PREFIX + "gpu_xids",
            "XIDs reported by the driver, by code.",
            labels=(*_GPU_LABELS, "code"),
        )
        for index, recorder in enumerate(self.sampler.recorders):
            labels = [self.node, str(index), recorder.uuid]
            reading, verdict = recorder.last_reading, recorder.last_verdict
            for code, count in sorted(recorder.xid_counts.items()):
                xids.add_metric([*labels, str(code)], count)
            if verdict is not None:
                gauges["healthy"].add_metric(labels, 1.0 if verdict.healthy else 0.0)
            if reading is None or not reading.readable:
                continue
            pairs: Iterable[tuple[str, Any]] = (
                (
                    "utilization",
                    None
                    if reading.utilization_gpu_pct is None
                    else reading.utilization_gpu_pct / 100,
                ),
                (
                    "memory_utilization",
                    None
                    if reading.utilization_memory_pct is None
                    else reading.utilization_memory_pct / 100,
                ),
                ("memory", reading.memory_used_bytes),
                ("power", None if reading.power_mw is None else reading.power_mw / 1000),
                ("temperature", reading.temperature_c),
            )
            for name, value in pairs:
                if value is not None:
                    gauges[name].add_metric(labels, float(value))
            if reading.energy_mj is not None:
                energy.add_metric(labels, reading.energy_mj / 1000)
            for pod in recorder.last_pods:
                gauges["pods"].add_metric([*labels, pod], 1.0)
        yield from gauges.values()
        yield energy
        yield xids
        yield from self._agent_metrics()

    def _agent_metrics(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            PREFIX + "spool_depth_batches",
            "Signed batches waiting to be shipped.",
            value=self.store.depth(),
        )
        yield GaugeMetricFamily(
            PREFIX + "spool_rejected_batches",
            "Batches the API refused, kept as evidence.",
            value=self.store.count(spool.REJECTED),
        )
        yield CounterMetricFamily(
            PREFIX + "sample_errors", "Sampling rounds that failed.", value=self.state.sample_errors
        )
        yield CounterMetricFamily(
            PREFIX + "lost_spans",
            "Spans of records lost to a full spool (gap markers).",
            value=self.state.lost_spans,
        )
        if self.state.last_round_at_s is not None:
            yield GaugeMetricFamily(
                PREFIX + "last_sample_timestamp_seconds",
                "When the last sampling round ran.",
                value=self.state.last_round_at_s,
            )
        if self.state.last_round_duration_s is not None:
            yield GaugeMetricFamily(
                PREFIX + "sample_duration_seconds",
                "How long the last round took.",
                value=self.state.last_round_duration_s,
            )
        if self.condition is not None:
            yield CounterMetricFamily(
                PREFIX + "node_condition_errors",
                "Writes of the GPUHealthy Node condition or the GPU UUIDs annotation that failed.",
                value=self.condition.errors,
            )
        if self.attribution is not None:
            yield CounterMetricFamily(
                PREFIX + "attribution_errors",
                "Calls to the kubelet's pod-resources API that failed.",
                value=self.attribution.errors,
            )
        if self.pod_index is not None:
            yield CounterMetricFamily(
                PREFIX + "pod_list_errors",
                "Lists of this node's pods from the API server that failed.",
                value=self.pod_index.errors,
            )
        if self.shipper is not None:
            stats = self.shipper.stats
            yield CounterMetricFamily(
                PREFIX + "shipped_batches", "Batches the API acknowledged.", value=stats.shipped
            )
            yield CounterMetricFamily(
                PREFIX + "ship_failures",
                "Requests to the API that failed and were retried.",
                value=stats.failures,
            )
            rejected = CounterMetricFamily(
                PREFIX + "ship_rejected", "Batches the API refused, by status.", labels=("status",)
            )
            for status, count in sorted(stats.rejected.items()):
                rejected.add_metric([status], count)
            yield rejected
            if stats.last_success_at_s is not None:
                yield GaugeMetricFamily(
                    PREFIX + "last_ship_timestamp_seconds",
                    "When the API last acknowledged a request.",
                    value=stats.last_success_at_s,
                )


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return


def serve(
    registry: CollectorRegistry,
    *,
    host: str,
    port: int,
    healthy: Callable[[], tuple[bool, str]],
) -> WSGIServer:
    """Serve /metrics and /healthz on a daemon thread; call `shutdown()` to stop."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            ok, reason = healthy()
            start_response(
                "200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")]
            )
            return [reason.encode() + b"\n"]
        return metrics_app(environ, start_response)  # type: ignore[no-any-return]

    server = make_server(host, port, app, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="meter-http", daemon=True).start()
    return server
