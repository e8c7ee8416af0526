"""Meter records: one per GPU per sampling interval, from consecutive readings.

A record covers the half-open interval [t0, t1) between two sampling rounds and carries what
was measured at t1: utilization, memory, power, temperature; the deltas of the driver's
counters over the interval (energy, ECC errors); the XIDs seen during it; the pods using the
GPU; and `healthy` with the reasons when it is not (metering.health).

Stale data is never repeated as fresh: a GPU that cannot be read yields an unhealthy record
with no measurements, and when sampling stalled (the gap since the last round exceeds
`max_interval_s`) the record claims only the last `interval_s` seconds, leaving the rest
unmetered, which the settlement counts as not delivered. An energy counter that goes
backwards means the GPU was reset: the delta restarts from zero and critical XIDs clear.

The record format is the meter record of docs/meter-batch.md (without `node`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gpudelivery import timefmt
from gpudelivery.metering import health
from gpudelivery.metering.readings import GpuReading

__all__ = ["GpuRecorder"]


class GpuRecorder:
    """Turns one GPU's readings (and XIDs) into interval records."""

    def __init__(self, uuid: str, *, interval_s: int, max_interval_s: int) -> None:
        if not 0 < interval_s <= max_interval_s:
            raise ValueError("need 0 < interval_s <= max_interval_s")
        self.uuid = uuid
        self.interval_s = interval_s
        self.max_interval_s = max_interval_s
        self.tracker = health.HealthTracker()
        self._previous: GpuReading | None = None
        self._xids: list[int] = []
        self.last_reading: GpuReading | None = None
        self.last_verdict: health.Verdict | None = None
        self.last_pods: tuple[str, ...] = ()
        self.xid_counts: dict[int, int] = {}

    def observe_xid(self, code: int) -> None:
        """An XID arrived from the driver (event thread); it belongs to the current interval."""
        self._xids.append(code)
        self.xid_counts[code] = self.xid_counts.get(code, 0) + 1
        self.tracker.observe_xid(code)

    def record(self, reading: GpuReading, *, pods: Sequence[str] = ()) -> dict[str, Any] | None:
        """The record for the interval ending at `reading`, or None for the first reading."""
        # Written for speed (it runs for every GPU every second): the reading is unpacked
        # once, and the healthy case, by far the commonest, skips the health rules' call.
        previous = self._previous
        self._previous = self.last_reading = reading
        (_, t1, error, lost, gpu_pct, memory_pct, memory_used, power_mw, energy, temperature,
         ecc_corrected, ecc_uncorrected, remapped_correctable, remapped_uncorrectable,
         remap_pending, remap_failed, _) = reading  # fmt: skip
        energy_before = None if previous is None else previous.energy_mj
        reset = energy is not None and energy_before is not None and energy < energy_before
        tracker = self.tracker
        if reset:
            tracker.observe_reset()
        if error is None and not (lost or remap_pending or remap_failed or tracker.alarmed):
            verdict = health.HEALTHY
        else:
            verdict = tracker.judge(
                error=error, lost=lost, remap_pending=remap_pending, remap_failed=remap_failed
            )
        self.last_verdict = verdict
        if previous is None or t1 <= previous.at_s:
            return None
        stalled = t1 - previous.at_s > self.max_interval_s
        t0 = t1 - self.interval_s if stalled else previous.at_s
        xids, self._xids = self._xids, []
        record: dict[str, Any] = {
            "gpu_uuid": self.uuid,
            "t0": timefmt.format_utc(t0),
            "t1": timefmt.format_utc(t1),
            "healthy": verdict.healthy,
            "xids": xids,
        }
        if verdict.reasons:
            record["reasons"] = list(verdict.reasons)
        if error is not None:
            self.last_pods = ()
            return record
        # Only what was measured: a field the driver does not support is left out, and
        # counter deltas need two readings of a counter that did not stall.
        if gpu_pct is not None:
            record["utilization_gpu_pct"] = gpu_pct
        if memory_pct is not None:
            record["utilization_memory_pct"] = memory_pct
        if memory_used is not None:
            record["memory_used_bytes"] = memory_used
        if power_mw is not None:
            record["power_mw"] = power_mw
        if temperature is not None:
            record["temperature_c"] = temperature
        if not stalled:
            if energy is not None and energy_before is not None:
                record["energy_mj"] = energy if reset else energy - energy_before
            corrected_before = previous.ecc_corrected
            if (
                ecc_corrected is not None
                and corrected_before is not None
                and ecc_corrected >= corrected_before
            ):
                record["ecc_corrected"] = ecc_corrected - corrected_before
            uncorrected_before = previous.ecc_uncorrected
            if (
                ecc_uncorrected is not None
                and uncorrected_before is not None
                and ecc_uncorrected >= uncorrected_before
            ):
                record["ecc_uncorrected"] = ecc_uncorrected - uncorrected_before
        if remapped_correctable is not None and remapped_uncorrectable is not None:
            record["remapped_rows"] = remapped_correctable + remapped_uncorrectable
        self.last_pods = tuple(sorted(pods)) if pods else ()
        record["pods"] = list(self.last_pods)
        return record
