"""What one sampling round saw of one GPU: the documented shape the NVML adapter returns.

Counters (`energy_mj`, ECC, remapped rows) are the driver's running totals; the record
builder turns them into per-interval deltas. Any field can be None when the driver does not
support it; when the GPU could not be read at all, `error` says why and every measurement
is None, because a value from an earlier round must never pass for a fresh one. Every
integer is below 2^53 (the adapter reads a driver value past that as None), so the records
built from readings are plain JSON (gpudelivery.canonical) by construction.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["GpuReading"]


class GpuReading(NamedTuple):
    """One GPU at the whole second `at_s` (epoch seconds).

    A named tuple: immutable, and cheap to build once per GPU per second.
    """

    uuid: str
    at_s: int
    error: str | None = None
    lost: bool = False
    utilization_gpu_pct: int | None = None
    utilization_memory_pct: int | None = None
    memory_used_bytes: int | None = None
    power_mw: int | None = None
    energy_mj: int | None = None
    temperature_c: int | None = None
    ecc_corrected: int | None = None
    ecc_uncorrected: int | None = None
    remapped_correctable: int | None = None
    remapped_uncorrectable: int | None = None
    remap_pending: bool = False
    remap_failed: bool = False
    pids: tuple[int, ...] = ()

    @property
    def readable(self) -> bool:
        return self.error is None
