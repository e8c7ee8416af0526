"""The node key: generated into the state directory on first start, loaded afterwards.

The private key never leaves the node: it is written once, mode 0600, atomically (a crash
leaves either no key or a whole one), beside its public half, which is what gets registered
with the API.
"""

from __future__ import annotations

import os
from pathlib import Path

from gpudelivery import errors as core_errors
from gpudelivery import signing
from gpudelivery.metering import errors

__all__ = ["load_or_create"]

PRIVATE_NAME = "node.key"
PUBLIC_NAME = "node.pub"


def load_or_create(state_dir: Path) -> signing.SigningKey:
    """The node key in `state_dir`, created there if there is none."""
    private_path = state_dir / PRIVATE_NAME
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if private_path.exists():
            key = signing.load_private_pem(private_path.read_bytes())
        else:
            key = signing.generate()
            temporary = private_path.with_suffix(".tmp")
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "wb") as stream:
                stream.write(key.private_pem())
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, private_path)
        (state_dir / PUBLIC_NAME).write_bytes(signing.public_pem(key.public_key))
    except OSError as exc:
        raise errors.MeteringError(
            f"{state_dir}: cannot keep the node key: {exc.strerror}"
        ) from exc
    except core_errors.SignatureError as exc:
        raise errors.MeteringError(f"{private_path}: {exc}") from exc
    return key
