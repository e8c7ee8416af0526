"""NVML behind one small interface: the only module that talks to pynvml.

`GpuSource` is what the sampler needs from a node's GPUs: their UUIDs, one reading per GPU
per round, and the XIDs the driver reports. `PynvmlSource` implements it with the real
nvidia-ml-py; the tests run it against metering/nvml-sim, never against a mock of pynvml.

A reading never raises for one GPU's trouble: an NVML error on a GPU becomes a reading with
`error` set (and `lost` for GPU_IS_LOST), because one broken GPU must not stop the node's
metering. A field the driver does not support (NOT_SUPPORTED) is simply None.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import pynvml

from gpudelivery.metering import errors
from gpudelivery.metering.readings import GpuReading

__all__ = ["GpuSource", "PynvmlSource", "XidEvent"]

# How long one wait for an XID may block: short, so the event thread notices a shutdown.
XID_WAIT_MS = 500
# A 64-bit driver counter at or past 2^53 is not a measurement: no real GPU gets there, and
# a meter record holds only integers a JSON number (an IEEE double) holds exactly. Such a
# value reads as None.
_JSON_INTEGER_LIMIT = 2**53
_field = object.__getattribute__
_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
_CORRECTED = pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED
_UNCORRECTED = pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
_VOLATILE = pynvml.NVML_VOLATILE_ECC


@dataclass(frozen=True, slots=True)
class XidEvent:
    """The driver reported XID `code` on GPU `uuid`."""

    uuid: str
    code: int


class GpuSource(Protocol):
    """A node's GPUs, as the sampler sees them."""

    def uuids(self) -> Sequence[str]:
        """The GPUs' UUIDs, in NVML index order."""

    def read(self, index: int, *, at_s: int) -> GpuReading:
        """One reading of GPU `index`, stamped with the whole second `at_s`."""

    def wait_xid(self, timeout_ms: int) -> XidEvent | None:
        """The next XID, or None when none arrives within the timeout."""

    def close(self) -> None:
        """Release the driver."""


class PynvmlSource:
    """`GpuSource` over nvidia-ml-py: one nvmlInit for the life of the process."""

    def __init__(self) -> None:
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            self._uuids = [pynvml.nvmlDeviceGetUUID(handle) for handle in self._handles]
            self._events = pynvml.nvmlEventSetCreate()
        except pynvml.NVMLError as exc:
            raise errors.NvmlUnavailableError(f"NVML is not available: {exc}") from exc
        for handle in self._handles:
            try:
                pynvml.nvmlDeviceRegisterEvents(
                    handle, pynvml.nvmlEventTypeXidCriticalError, self._events
                )
            except pynvml.NVMLError:
                continue  # a lost GPU registers nothing; its readings will say why

    def uuids(self) -> Sequence[str]:
        return tuple(self._uuids)

    def read(self, index: int, *, at_s: int) -> GpuReading:
        handle = self._handles[index]
        uuid = self._uuids[index]
        # Fields the driver may not support (NOT_SUPPORTED) are None; any other error makes
        # the whole reading an error. try costs nothing in Python 3.11 until it raises.
        try:
            rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            power_mw = pynvml.nvmlDeviceGetPowerUsage(handle)
            try:
                energy = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            except pynvml.NVMLError_NotSupported:
                energy = None
            try:
                temperature = pynvml.nvmlDeviceGetTemperature(handle, _TEMPERATURE_GPU)
            except pynvml.NVMLError_NotSupported:
                temperature = None
            try:
                corrected = pynvml.nvmlDeviceGetTotalEccErrors(handle, _CORRECTED, _VOLATILE)
                uncorrected = pynvml.nvmlDeviceGetTotalEccErrors(handle, _UNCORRECTED, _VOLATILE)
            except pynvml.NVMLError_NotSupported:  # ECC off: neither count exists
                corrected = uncorrected = None
            try:
                remapped = pynvml.nvmlDeviceGetRemappedRows(handle)
            except pynvml.NVMLError_NotSupported:
                remapped = None
            processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except pynvml.NVMLError as exc:
            return GpuReading(
                uuid, at_s, error=str(exc), lost=isinstance(exc, pynvml.NVMLError_GpuIsLost)
            )
        correctable, uncorrectable, pending, failed = remapped or (None, None, 0, 0)
        # Counters past _JSON_INTEGER_LIMIT are not measurements; inline, as the rest of this
        # tail, because it runs for every GPU every second.
        used = _field(memory, "used")
        if used >= _JSON_INTEGER_LIMIT:
            used = None
        if energy is not None and energy >= _JSON_INTEGER_LIMIT:
            energy = None
        if corrected is not None and corrected >= _JSON_INTEGER_LIMIT:
            corrected = None
        if uncorrected is not None and uncorrected >= _JSON_INTEGER_LIMIT:
            uncorrected = None
        # Positional, in GpuReading's field order: this runs for every GPU every second.
        # The structures' fields are read with object.__getattribute__: pynvml's own
        # __getattribute__ (a Python frame per read) only decodes bytes, and these are ints.
        return GpuReading(
            uuid,
            at_s,
            None,  # error
            False,  # lost
            _field(rates, "gpu"),
            _field(rates, "memory"),
            used,
            power_mw,
            energy,
            temperature,
            corrected,
            uncorrected,
            correctable,
            uncorrectable,
            bool(pending),
            bool(failed),
            tuple(sorted([process.pid for process in processes])),
        )

    def wait_xid(self, timeout_ms: int) -> XidEvent | None:
        try:
            data = pynvml.nvmlEventSetWait_v2(self._events, timeout_ms)
        except pynvml.NVMLError_Timeout:
            return None
        except pynvml.NVMLError as exc:
            raise errors.MeteringError(f"waiting for NVML events failed: {exc}") from exc
        # A driver value past 2^53 is not a measurement a record can hold (JSON numbers are
        # doubles): clamped, it stays a critical XID.
        code = min(int(data.eventData), _JSON_INTEGER_LIMIT - 1)
        return XidEvent(uuid=pynvml.nvmlDeviceGetUUID(data.device), code=code)

    def close(self) -> None:
        try:
            pynvml.nvmlEventSetFree(self._events)
        finally:
            pynvml.nvmlShutdown()
