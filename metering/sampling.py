"""Sampling rounds: every GPU read once per interval, XIDs taken as the driver sends them.

The `Sampler` owns one `GpuRecorder` per GPU. `round(at_s)` reads every GPU through the
`GpuSource` and returns the interval records that round closes; `pump_xids` (run on its
own thread by the agent) waits on the driver's event set and hands each XID to its GPU's
recorder, so every XID is recorded in the interval it happened in, not only the last one.
Attribution of GPUs to pods is a pluggable `PodAttribution`; without one, records name no
pods.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from gpudelivery.metering import health, nvml
from gpudelivery.metering.records import GpuRecorder

__all__ = ["PodAttribution", "Sampler"]


class PodAttribution(Protocol):
    """Which pods use a GPU: `namespace/name` strings."""

    def pods_for(self, uuid: str, pids: Sequence[int]) -> Sequence[str]: ...


class Sampler:
    """One node's GPUs, sampled in rounds."""

    def __init__(
        self,
        source: nvml.GpuSource,
        *,
        interval_s: int,
        max_interval_s: int,
        pods: PodAttribution | None = None,
    ) -> None:
        self.source = source
        self.pods = pods
        self.uuids = tuple(source.uuids())
        self._recorders = {
            uuid: GpuRecorder(uuid, interval_s=interval_s, max_interval_s=max_interval_s)
            for uuid in self.uuids
        }
        self._in_order = tuple(self._recorders[uuid] for uuid in self.uuids)
        self._lock = threading.Lock()

    def round(self, at_s: int) -> list[dict[str, Any]]:
        """Read every GPU at `at_s`; the records of the interval this round closes."""
        readings = [self.source.read(index, at_s=at_s) for index in range(len(self.uuids))]
        attribution = self.pods
        pods = [
            attribution.pods_for(reading.uuid, reading.pids)
            if attribution is not None and reading.error is None
            else ()
            for reading in readings
        ]
        with self._lock:  # once a round: the XID thread waits at most that long
            records = [
                recorder.record(reading, pods=used_by)
                for recorder, reading, used_by in zip(self._in_order, readings, pods, strict=True)
            ]
        return [record for record in records if record is not None]

    @property
    def recorders(self) -> tuple[GpuRecorder, ...]:
        """Each GPU's recorder, in index order (their last readings feed the metrics)."""
        return self._in_order

    def verdicts(self) -> dict[str, health.Verdict]:
        """Each GPU's latest health verdict, for the GPUs read at least once."""
        latest = {recorder.uuid: recorder.last_verdict for recorder in self.recorders}
        return {uuid: verdict for uuid, verdict in latest.items() if verdict is not None}

    def observe_xid(self, event: nvml.XidEvent) -> None:
        recorder = self._recorders.get(event.uuid)
        if recorder is not None:
            with self._lock:
                recorder.observe_xid(event.code)

    def pump_xids(self, stop: threading.Event | Callable[[], bool]) -> None:
        """Wait for XIDs until `stop` is set, handing each to its GPU's recorder."""
        stopped = stop.is_set if isinstance(stop, threading.Event) else stop
        while not stopped():
            event = self.source.wait_xid(nvml.XID_WAIT_MS)
            if event is not None:
                self.observe_xid(event)
