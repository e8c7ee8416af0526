"""The API's errors: one hierarchy, turned into HTTP answers in one place (api.app).

Every error answers a 4xx with a JSON body `{"detail": "..."}` naming what is wrong; a
request that fails stores nothing (the route's transaction is rolled back).
"""

from __future__ import annotations

__all__ = [
    "ApiError",
    "AuthenticationError",
    "ConflictError",
    "ForbiddenError",
    "NotFoundError",
    "PayloadTooLargeError",
    "UnprocessableError",
]


class ApiError(Exception):
    """A request the API refuses; `status` is its HTTP status."""

    status = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class AuthenticationError(ApiError):
    status = 401


class ForbiddenError(ApiError):
    status = 403


class NotFoundError(ApiError):
    """Missing, or another tenant's: the two answer alike."""

    status = 404


class ConflictError(ApiError):
    status = 409


class PayloadTooLargeError(ApiError):
    status = 413


class UnprocessableError(ApiError):
    status = 422
