"""The FastAPI application: routes, errors as JSON, body limits, health.

`create_app(settings)` builds it; `gpudelivery api serve` runs it under uvicorn. Errors
are answered in one place: an `ApiError` with its status and `{"detail": ...}`, a request
that does not validate with 422, a body over `max_body_bytes` with 413, and anything
unforeseen with a JSON 500 that logs the traceback instead of sending it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import make_asgi_app
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.engine import Engine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpudelivery import errors as core_errors
from gpudelivery import signing
from gpudelivery.api import db, errors, jobs, metrics, outbox
from gpudelivery.api.deps import AppState
from gpudelivery.api.routes import contracts, delivery, meter, public, webhooks
from gpudelivery.api.settings import ApiSettings

__all__ = ["create_app", "load_or_create_provider_key"]

logger = logging.getLogger(__name__)


def load_or_create_provider_key(path: Path) -> signing.SigningKey:
    """The provider's signing key at `path`, created (mode 0600) when missing."""
    try:
        if path.exists():
            return signing.load_private_pem(path.read_bytes())
        key = signing.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(key.private_pem())
        logger.info("created the provider key %s at %s", key.key_id, path)
        return key
    except OSError as exc:
        raise core_errors.InputError(f"{path}: cannot keep the provider key: {exc}") from exc


def _read_token(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise core_errors.InputError(f"{path}: cannot read the bootstrap token: {exc}") from exc
    if not token:
        raise core_errors.InputError(f"{path}: the bootstrap token file is empty")
    return token


class BodyLimit:
    """Answers 413 to a body larger than `limit` bytes, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise errors.PayloadTooLargeError(self._detail())
            return message

        await self.app(scope, limited, send)

    def _detail(self) -> str:
        return f"the request body is larger than {self.limit} bytes"

    async def _refuse(self, send: Send) -> None:
        response = JSONResponse({"detail": self._detail()}, status_code=413)
        await response({"type": "http"}, _nothing, send)


async def _nothing() -> Message:
    return {"type": "http.disconnect"}


class Error(BaseModel):
    """Every error answer: what is wrong, in one line."""

    detail: str


# Documented on every operation: the answers any request may get.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": Error, "description": description}
    for status, description in (
        (400, "The request is malformed."),
        (401, "No API key, or an unknown or revoked one."),
        (403, "The key's role may not do this."),
        (404, "No such object, or not yours."),
        (409, "The request conflicts with what is stored."),
        (413, "The body is too large."),
        (422, "A field is invalid; the detail names it."),
    )
}


def _first_problem(exc: RequestValidationError) -> str:
    """`where: what` of the first validation error, e.g. `body.url: Field required`."""
    problems = exc.errors()
    if not problems:
        return "the request is invalid"
    first = problems[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    return f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg"))


def create_app(settings: ApiSettings, *, engine: Engine | None = None) -> FastAPI:
    """The API over `settings` (its database, provider key and bootstrap token)."""
    engine = engine if engine is not None else db.engine_for(settings.database_url)
    provider_key = load_or_create_provider_key(settings.provider_key_file)
    runner: jobs.JobRunner | None = None
    if settings.jobs_enabled:
        webhook_client = httpx.Client(timeout=settings.webhook_timeout_s)
        runner = jobs.JobRunner(
            engine,
            key=provider_key,
            grace_s=settings.finalize_grace_s,
            # A small batch per run: on PostgreSQL its rows stay locked while it sends.
            dispatch=lambda session, now_s: outbox.dispatch_due(
                session, client=webhook_client, key=provider_key, now_s=now_s, limit=20
            ),
        )
    app_metrics = metrics.ApiMetrics(
        engine,
        jobs=None if runner is None else lambda: (runner.stats.runs, runner.stats.failures),
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if runner is not None:
            runner.start()
        try:
            yield
        finally:
            if runner is not None:
                runner.shutdown()
                webhook_client.close()

    app = FastAPI(
        title="gpudelivery",
        summary="Physical delivery of GPU-compute futures: contracts, meter evidence, "
        "delivery proofs and settlement.",
        version="0.1.0",
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
    )
    app.state.gpudelivery = AppState(
        settings=settings,
        engine=engine,
        provider_key=provider_key,
        bootstrap_token=_read_token(settings.bootstrap_token_file),
        metrics=app_metrics,
    )

    @app.exception_handler(errors.ApiError)
    async def _api_error(_request: Request, exc: errors.ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _first_problem(exc)}, status_code=422)

    @app.exception_handler(Exception)
    async def _unforeseen(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    @app.get("/healthz", tags=["health"], summary="The process answers.")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        summary="The database answers.",
        responses={503: {"description": "The database does not answer."}},
    )
    def readyz() -> Any:
        try:
            with app.state.gpudelivery.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except Exception:  # any database failure means not ready
            return JSONResponse({"detail": "the database does not answer"}, status_code=503)
        return {"status": "ready"}

    app.include_router(public.router)
    app.include_router(contracts.router)
    app.include_router(delivery.router)
    app.include_router(meter.router)
    app.include_router(webhooks.router)
    app.mount("/metrics", make_asgi_app(app_metrics.registry))
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app
