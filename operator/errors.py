"""The delivery operator's exception hierarchy."""

from __future__ import annotations

from gpudelivery.errors import GpuDeliveryError

__all__ = [
    "LedgerRefusedError",
    "LedgerUnavailableError",
    "NamespaceTerminatingError",
    "OperatorError",
    "StaleObjectError",
]


class OperatorError(GpuDeliveryError):
    """Base of the operator's errors."""


class StaleObjectError(OperatorError):
    """An object changed since it was read (409 Conflict on a write naming its
    resourceVersion): read it again and decide again."""


class NamespaceTerminatingError(OperatorError):
    """A contract's buyer namespace is still being deleted (removed moments ago, or held by
    an object's finalizer): nothing can be created in it until it is gone, so preparing it
    must wait; try again later."""


class ApiUnavailableError(OperatorError):
    """The API cannot answer now (unreachable, busy, restarting): mirroring tries again on
    its next round."""


class ApiRefusedError(OperatorError):
    """The API refused a request as written (a 4xx naming what is wrong, such as other terms
    under a held contract id), or answered what the operator cannot read: trying again will
    not help."""


class LedgerUnavailableError(ApiUnavailableError):
    """The API cannot take the ledger now (unreachable, busy, or it does not know the
    contract yet): report again later; delivery goes on meanwhile."""


class LedgerRefusedError(ApiRefusedError):
    """The API refused the ledger as written (a 4xx naming what is wrong): reporting it
    again will not help."""
