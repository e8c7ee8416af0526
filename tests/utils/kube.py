"""The Kubernetes API server of the tests: kmock's KubernetesEmulator, run on a real port.

kmock stores objects and merges patches as plain JSON (lists replaced whole). The real API
server merges a strategic-merge patch of a list that has a merge key item by item:
`status.conditions` by `type`, so a node agent that patches its one condition leaves the
kubelet's `Ready` alone. `ClusterEmulator` adds that, as kmock's docs invite, by
subclassing; the components are then tested against the behaviour they rely on. Later
issues (the operator) grow it.

`running_cluster()` runs the emulator on its own event loop in a background thread, so
synchronous code (the official `kubernetes` client) talks HTTP to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp.web
import kmock
from kmock._internal import enums, rendering
from kubernetes import client

__all__ = [
    "STRATEGIC_MERGE",
    "ClusterEmulator",
    "core_api",
    "merge_by_key",
    "running_cluster",
    "write_kubeconfig",
]

STRATEGIC_MERGE = "application/strategic-merge-patch+json"
# The lists the real API server merges item by item under a strategic-merge patch, with
# their merge key (from the Kubernetes OpenAPI `x-kubernetes-patch-merge-key`).
_MERGE_KEYS = {("status", "conditions"): "type"}


def merge_by_key(current: list[Any], patch: list[Any], key: str) -> list[Any]:
    """A strategic merge of two lists of objects on `key`: patched items replace fields of
    the current item of the same key, new items are appended, the rest stay in order.
    An item `{"$patch": "delete", key: k}` removes item k."""
    merged = [dict(item) for item in current]
    for item in patch:
        at = next((i for i, old in enumerate(merged) if old.get(key) == item.get(key)), None)
        if item.get("$patch") == "delete":
            if at is not None:
                del merged[at]
        elif at is None:
            merged.append(dict(item))
        else:
            merged[at].update(item)
    return merged


class ClusterEmulator(kmock.KubernetesEmulator):
    """KubernetesEmulator with strategic-merge patches of merge-keyed lists."""

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if (
            request.action == enums.action.UPDATE
            and request.headers.get("Content-Type", "").startswith(STRATEGIC_MERGE)
            and isinstance(request.data, dict)
            and request.name is not None
        ):
            self._merge_lists(request, request.data)
        return await super()._handle(request)

    def _merge_lists(self, request: rendering.Request, patch: dict[str, Any]) -> None:
        """Turn the patch's merge-keyed lists into the merged whole lists, in place (the
        request is frozen, its parsed body is not), so kmock's plain merge stores them."""
        key = (request.resource, request.namespace, request.name)
        stored = self.objects[key].raw if key in self.objects else {}
        for (section, field), merge_key in _MERGE_KEYS.items():
            part = patch.get(section)
            if isinstance(part, dict) and isinstance(part.get(field), list):
                current = stored.get(section, {}).get(field) or []
                part[field] = merge_by_key(current, part[field], merge_key)


@contextlib.contextmanager
def running_cluster() -> Iterator[tuple[ClusterEmulator, str]]:
    """A `ClusterEmulator` serving HTTP on 127.0.0.1: (emulator, base URL)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="kmock", daemon=True)
    thread.start()
    stack = contextlib.AsyncExitStack()

    async def start() -> tuple[ClusterEmulator, str]:
        emulator = await stack.enter_async_context(ClusterEmulator())
        server = await stack.enter_async_context(kmock.Server(emulator))
        return emulator, str(server.url).rstrip("/")

    try:
        yield asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    finally:
        asyncio.run_coroutine_threadsafe(stack.aclose(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def write_kubeconfig(path: Path, url: str) -> Path:
    """A kubeconfig file for the emulator at `url` (no credentials: it asks for none)."""
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emulator", "cluster": {"server": url}}],
                "users": [{"name": "tests", "user": {}}],
                "contexts": [
                    {"name": "emulator", "context": {"cluster": "emulator", "user": "tests"}}
                ],
                "current-context": "emulator",
            }
        )
    )
    return path


def core_api(url: str) -> client.CoreV1Api:
    """The official client's CoreV1Api, talking HTTP to the emulator at `url`."""
    configuration = client.Configuration()
    configuration.host = url
    return client.CoreV1Api(client.ApiClient(configuration))
