"""Running the operator: kopf's reactor with the operator's handlers and runtime.

`gpudelivery operator run` calls `run`; tests call `serve` on an event loop of their own,
with flags to know when it is ready and to stop it. Replicas share a kopf peering object so
that one of them is active (high availability); `peering.standalone` runs one alone.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import threading
import time
from collections.abc import Callable

import kopf
import kubernetes

from gpudelivery.operator import cluster, handlers
from gpudelivery.operator.settings import OperatorSettings

__all__ = ["USER_AGENT", "run", "serve"]

# How the operator's own calls name themselves to the API server (kopf's say kopf/<version>).
USER_AGENT = f"gpudelivery-operator/{importlib.metadata.version('gpudelivery')}"


async def serve(
    settings: OperatorSettings,
    *,
    stop_flag: threading.Event | None = None,
    ready_flag: threading.Event | None = None,
    clock: Callable[[], float] = time.time,
) -> None:
    """Run the operator until `stop_flag` is set (or forever)."""
    config = cluster.configuration(settings.kubeconfig)
    api_client = kubernetes.client.ApiClient(config)
    api_client.user_agent = USER_AGENT
    runtime = handlers.Runtime(
        cluster=cluster.Cluster(api_client),
        settings=settings,
        connection=cluster.connection_info(config),
        clock=clock,
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


def run(settings: OperatorSettings) -> None:
    """Run the operator in this process until it is stopped (SIGINT, SIGTERM)."""
    asyncio.run(serve(settings))
