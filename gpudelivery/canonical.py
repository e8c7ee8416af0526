"""Canonical JSON (RFC 8785, JCS) and the digests taken over it.

Whatever is signed or hashed is first serialised with `rfc8785`, so that two parties that
agree on a JSON value agree on its bytes, whatever their JSON library. The core never
signs floats it did not have to: money and rates travel as decimal strings, times as
RFC 3339 strings, counts as integers.
"""

from __future__ import annotations

import hashlib
from typing import Any

import rfc8785

from gpudelivery import errors

__all__ = ["canonical_json", "sha256_hex"]


def canonical_json(value: Any) -> bytes:
    """The RFC 8785 canonical bytes of a JSON value."""
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise errors.InputError(f"cannot be canonicalised as JSON: {exc}") from exc


def sha256_hex(data: bytes) -> str:
    """Lower-case hex SHA-256 of `data`."""
    return hashlib.sha256(data).hexdigest()
