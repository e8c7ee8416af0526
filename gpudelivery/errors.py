"""The exception hierarchy of the gpudelivery core.

Every error the core raises on bad input derives from `GpuDeliveryError`, so that the
command line and the API can turn them into one-line messages and 4xx answers in one
place. Errors carry *where* (a field path, a file and line) separately from *what*, so a
caller can prefix the location it knows about without parsing the message.
"""

from __future__ import annotations

__all__ = [
    "EvidenceError",
    "GpuDeliveryError",
    "InputError",
    "ProofError",
    "SignatureError",
    "TermsError",
]


class GpuDeliveryError(Exception):
    """Base of every error raised by the gpudelivery core."""


class InputError(GpuDeliveryError):
    """A value read from outside is malformed; `field` names it (dotted path)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        self.reason = message
        super().__init__(f"{field}: {message}" if field else message)


class TermsError(InputError):
    """Contract terms that are not a valid delivery contract."""


class EvidenceError(InputError):
    """An assignment interval or meter record that is malformed."""


class SignatureError(GpuDeliveryError):
    """A signature or key that does not check out, or a key that cannot be loaded."""


class ProofError(GpuDeliveryError):
    """A delivery proof that is malformed or does not match its evidence."""
