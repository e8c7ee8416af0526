"""The errors the emulated API server (kube.py) answers with, worded as the real one words them.

Clients tell failures apart by the `Status` object's code and reason (kopf relies on 409
Conflict and 422 Invalid; the official client raises `ApiException` with them), and the tests
assert on the messages. kmock renders a `KubernetesError` raised while serving a request as
that `Status`; this module only builds them.
"""

from __future__ import annotations

from typing import Any

import kmock

__all__ = ["conflict", "error", "not_found"]


def error(code: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    """The Status error the real API server answers with."""
    return kmock.KubernetesError(status=code, reason=reason, message=message, details=details)


def not_found(plural: str, name: str | None = None) -> kmock.KubernetesError:
    """404 for an object of `plural` named `name`, or for an unknown resource (no name)."""
    if name is None:
        return error(404, "NotFound", "the server could not find the requested resource")
    return error(404, "NotFound", f'{plural} "{name}" not found', name=name, kind=plural)


def conflict(plural: str, name: str) -> kmock.KubernetesError:
    """409 for a write naming another resourceVersion (or uid) than the stored one."""
    message = (
        f'Operation cannot be fulfilled on {plural} "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again"
    )
    return error(409, "Conflict", message, name=name, kind=plural)
