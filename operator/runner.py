"""Running the operator: kopf's reactor with the operator's handlers and runtime.

`gpudelivery operator run` calls `run`; tests call `serve` on an event loop of their own,
with flags to know when it is ready and to stop it. Replicas share a kopf peering object so
that one of them is active (high availability); `peering.standalone` runs one alone.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.metadata
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import kopf
import kubernetes

from gpudelivery.operator import buyers, cluster, errors, handlers, ledger, mirror
from gpudelivery.operator.settings import OperatorSettings

__all__ = ["USER_AGENT", "run", "serve"]

# The setting holding the API key, as the user sets it (named in errors).
_TOKEN_FILE = "GPUDELIVERY_OPERATOR_API__TOKEN_FILE"
_BUYERS_CA_FILE = "GPUDELIVERY_OPERATOR_BUYERS__CA_FILE"

# How the operator's own calls name themselves to the API server (kopf's say kopf/<version>).
USER_AGENT = f"gpudelivery-operator/{importlib.metadata.version('gpudelivery')}"


async def serve(
    settings: OperatorSettings,
    *,
    stop_flag: threading.Event | None = None,
    ready_flag: threading.Event | None = None,
    clock: Callable[[], float] = time.time,
    api: httpx.Client | None = None,
) -> None:
    """Run the operator until `stop_flag` is set (or forever). It reaches the gpudelivery API
    through `api` when given (tests), else at `settings.api.url` when that is set."""
    token = _api_token(settings)
    owned = api is None  # a client made here is closed here
    if api is None and settings.api.url is not None:
        api = httpx.Client(
            base_url=str(settings.api.url),
            timeout=settings.api.timeout_s,
            headers={"User-Agent": USER_AGENT},
        )
    ledger_client = contracts_client = None
    if api is not None and token is not None:
        ledger_client = ledger.LedgerClient(api, token=token)
        contracts_client = mirror.ContractsClient(api, token=token)
    config = cluster.configuration(settings.kubeconfig)
    api_client = kubernetes.client.ApiClient(config)
    api_client.user_agent = USER_AGENT
    runtime = handlers.Runtime(
        cluster=cluster.Cluster(api_client),
        settings=settings,
        connection=cluster.connection_info(config),
        clock=clock,
        tenancy=buyers.BuyerNamespaces(
            api_client,
            server=settings.buyers.server or config.host,
            ca_data=_buyer_ca(settings, config),
        ),
        ledger=ledger_client,
        contracts=contracts_client,
    )
    registry = kopf.OperatorRegistry()
    handlers.register(registry, settings)
    try:
        await kopf.operator(
            registry=registry,
            clusterwide=True,
            standalone=settings.peering.standalone,
            peering_name=None if settings.peering.standalone else settings.peering.name,
            memo=runtime,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    finally:
        api_client.close()  # type: ignore[no-untyped-call]
        if owned and api is not None:
            api.close()


def _buyer_ca(settings: OperatorSettings, config: kubernetes.client.Configuration) -> str | None:
    """The CA certificate buyers' kubeconfigs carry (base64 PEM), or None: the API server's
    certificate is then publicly trusted."""
    path = settings.buyers.ca_file or (Path(config.ssl_ca_cert) if config.ssl_ca_cert else None)
    if path is None:
        return None
    try:
        return base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError as exc:
        raise errors.OperatorError(f"{_BUYERS_CA_FILE} {path}: {exc.strerror}") from exc


def _api_token(settings: OperatorSettings) -> str | None:
    """The API key in `api.token_file`; `errors.OperatorError` naming the file when it cannot
    be read or is empty."""
    path = settings.api.token_file
    if path is None:
        return None
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise errors.OperatorError(f"{_TOKEN_FILE} {path}: {exc.strerror}") from exc
    if not token:
        raise errors.OperatorError(f"{_TOKEN_FILE} {path}: empty")
    return token


def run(settings: OperatorSettings) -> None:
    """Run the operator in this process until it is stopped (SIGINT, SIGTERM)."""
    asyncio.run(serve(settings))
