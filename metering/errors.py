"""The metering agent's exception hierarchy."""

from __future__ import annotations

from gpudelivery.errors import GpuDeliveryError

__all__ = ["MeteringError", "NvmlUnavailableError"]


class MeteringError(GpuDeliveryError):
    """Base of the metering agent's errors."""


class NvmlUnavailableError(MeteringError):
    """NVML cannot be loaded or initialised: no driver, or a broken one."""
