"""The metering agent's main loop: sample, batch, sign, spool, ship, serve metrics.

One process per GPU node (the DaemonSet), one nvmlInit for its whole life. Rounds run on
whole wall-clock seconds, every `sampling.interval_s`; the records of each
`sampling.batch_interval_s` are signed into one batch and spooled durably; a shipping
thread sends the spool to the API; an event thread records every XID as it comes; an HTTP
thread serves /metrics and /healthz. A stop request (SIGTERM) spools the partial batch
before the process ends; a `kill -9` loses at most the unspooled part of the current batch,
and the chain continues from the spool on restart.

A condition thread publishes the GPUs' health on the Node as `GPUHealthy` and their UUIDs
as the annotation `gpudelivery.io/gpu-uuids` (metering.node_condition, fed the sampler's
latest verdicts: one per GPU NVML reports), and records name the pods using each GPU
(metering.attribution, with pods found by UID through metering.pods), when the agent can
reach the kubelet and the API server; without them, metering goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
from kubernetes import client
from prometheus_client import CollectorRegistry

from gpudelivery.metering import (
    attribution,
    errors,
    keys,
    kube,
    metrics,
    node_condition,
    nvml,
    pods,
    registration,
    sampling,
    shipping,
    spool,
)
from gpudelivery.metering.settings import MeterSettings

__all__ = ["Agent"]

logger = logging.getLogger(__name__)

SPOOL_NAME = "spool.sqlite3"


class Agent:
    """Runs the metering of one node until stopped."""

    def __init__(
        self,
        settings: MeterSettings,
        *,
        source_factory: Callable[[], nvml.GpuSource] = nvml.PynvmlSource,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.registry = registry if registry is not None else CollectorRegistry()
        self.clock = clock
        self.state = metrics.AgentState()
        self.key = keys.load_or_create(settings.spool.state_dir)
        self.spool = spool.Spool(
            settings.spool.state_dir / SPOOL_NAME,
            node=settings.node_name,
            key=self.key,
            max_bytes=settings.spool.max_bytes,
        )
        self.source = source_factory()
        kube_api = self._kube_api()
        self.pod_index: pods.NodePods | None = None
        self.attribution: attribution.KubeletPodAttribution | None = None
        found = settings.attribution
        if found.enabled:
            if kube_api is not None:
                self.pod_index = pods.NodePods(kube_api, settings.node_name)
            self.attribution = attribution.KubeletPodAttribution(
                socket_path=found.socket,
                proc_root=found.proc_root,
                pod_of_uid=self.pod_index,
                gpu_resources=found.gpu_resources,
                ttl_s=found.ttl_s,
                timeout_s=found.timeout_s,
            )
        interval_s = settings.sampling.interval_s
        self.sampler = sampling.Sampler(
            self.source,
            interval_s=interval_s,
            max_interval_s=interval_s * settings.sampling.max_gap_rounds,
            pods=self.attribution,
        )
        self.shipper: shipping.Shipper | None = None
        if settings.shipping.api_url is not None:
            client = httpx.Client(
                base_url=str(settings.shipping.api_url).rstrip("/"),
                timeout=settings.shipping.timeout_s,
            )
            registrar = None
            if settings.shipping.bootstrap_token_file is not None:
                registrar = registration.KeyRegistrar(
                    client,
                    node=settings.node_name,
                    key=self.key,
                    token=registration.read_token(settings.shipping.bootstrap_token_file),
                    state_dir=settings.spool.state_dir,
                )
            self.shipper = shipping.Shipper(
                self.spool,
                client=client,
                batch_limit=settings.shipping.batch_limit,
                registrar=registrar,
            )
        self.condition: node_condition.NodeConditionPublisher | None = None
        if settings.node_condition.enabled and kube_api is not None:
            self.condition = node_condition.NodeConditionPublisher(
                kube_api,
                settings.node_name,
                heartbeat_s=settings.node_condition.heartbeat_s,
                clock=clock,
            )
        self.registry.register(
            metrics.MeterCollector(
                node=settings.node_name,
                sampler=self.sampler,
                store=self.spool,
                state=self.state,
                shipper=self.shipper,
                condition=self.condition,
                attribution=self.attribution,
                pod_index=self.pod_index,
            )
        )
        self.server: Any = None

    def _kube_api(self) -> client.CoreV1Api | None:
        """The API server's client, when a part that needs it is on and one is configured."""
        settings = self.settings
        if not (settings.node_condition.enabled or settings.attribution.enabled):
            return None
        kubeconfig = None if settings.kubeconfig is None else str(settings.kubeconfig)
        api = kube.core_api(kubeconfig)
        if api is None:
            logger.warning(
                "no service account and no kubeconfig: no %s Node condition nor %s annotation, "
                "and processes are not traced to pods",
                node_condition.CONDITION_TYPE,
                node_condition.ANNOTATION_GPU_UUIDS,
            )
        return api

    def healthy(self) -> tuple[bool, str]:
        """Fresh samples, or why not (for /healthz)."""
        last = self.state.last_round_at_s
        limit = self.settings.server.stale_after_s
        if last is None:
            started = self.clock() - self.state.started_at_s
            return (started <= limit, "starting" if started <= limit else "no sampling round yet")
        age = self.clock() - last
        if age > limit:
            return False, f"last sampling round {age:.0f} s ago (limit {limit} s)"
        return True, "ok"

    def run(self, stop: threading.Event) -> None:
        """Meter until `stop` is set; then spool what was sampled and release everything."""
        server = self.settings.server
        self.server = metrics.serve(
            self.registry, host=server.host, port=server.port, healthy=self.healthy
        )
        threads = [threading.Thread(target=self.sampler.pump_xids, args=(stop,), name="meter-xids")]
        if self.shipper is not None:
            threads.append(
                threading.Thread(target=self.shipper.run, args=(stop,), name="meter-ship")
            )
        if self.condition is not None:
            threads.append(
                threading.Thread(
                    target=self.condition.run,
                    args=(self.sampler.verdicts, stop),
                    kwargs={"every_s": self.settings.node_condition.interval_s},
                    name="meter-condition",
                )
            )
        for thread in threads:
            thread.start()
        logger.info(
            "metering node %s: %d GPUs, key %s",
            self.settings.node_name,
            len(self.sampler.uuids),
            self.key.key_id,
        )
        try:
            self._loop(stop)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
            self.server.shutdown()
            self.server.server_close()
            self.source.close()
            self.spool.close()

    def _loop(self, stop: threading.Event) -> None:
        interval_s = self.settings.sampling.interval_s
        batch_s = self.settings.sampling.batch_interval_s
        pending: list[dict[str, Any]] = []
        batch_start: int | None = None
        at_s = (int(self.clock()) // interval_s + 1) * interval_s
        while True:
            if stop.wait(max(0.0, at_s - self.clock())):
                break
            started = self.clock()
            try:
                pending.extend(self.sampler.round(at_s))
            except errors.MeteringError:
                self.state.sample_errors += 1
                logger.exception("sampling round at %d failed", at_s)
            self.state.last_round_at_s = self.clock()
            self.state.last_round_duration_s = self.state.last_round_at_s - started
            if batch_start is None:
                batch_start = at_s
            if at_s - batch_start >= batch_s:
                self._spool(pending, (batch_start, at_s))
                pending, batch_start = [], at_s
            # The next whole round after now: a stalled loop skips rounds, never bunches them.
            at_s = max(at_s + interval_s, (int(self.clock()) // interval_s + 1) * interval_s)
        if pending and batch_start is not None:
            self._spool(pending, (batch_start, at_s - interval_s))

    def _spool(self, records: list[dict[str, Any]], span: tuple[int, int]) -> None:
        if self.spool.append(records, span=span) is None:
            self.state.lost_spans += 1
            logger.error("spool full: records of %d..%d lost (a gap marker will say so)", *span)
