"""The delivery operator's exception hierarchy."""

from __future__ import annotations

from gpudelivery.errors import GpuDeliveryError

__all__ = ["LedgerRefusedError", "LedgerUnavailableError", "OperatorError"]


class OperatorError(GpuDeliveryError):
    """Base of the operator's errors."""


class LedgerUnavailableError(OperatorError):
    """The API cannot take the ledger now (unreachable, busy, or it does not know the
    contract yet): report again later; delivery goes on meanwhile."""


class LedgerRefusedError(OperatorError):
    """The API refused the ledger as written (a 4xx naming what is wrong): reporting it
    again will not help."""
