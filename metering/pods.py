"""Pod UID -> `namespace/name` for the pods on this node, from the API server.

Attribution by process (metering.attribution) finds a process's pod UID in its cgroup; the
kubelet's pod-resources API names pods but not their UIDs, so this index, built from the
API server's list of the pods scheduled on this node, closes the loop. It lists with the
field selector `spec.nodeName=<node>` (and checks the node name itself as well), keeps the
answer for `ttl_s`, and lists again early, at most every `min_refresh_s`, when asked for a
UID it does not know: a pod that just started is found within seconds.

Static pods run under their config hash, not the UID of their mirror pod in the API server;
the mirror pod carries that hash as the annotation `kubernetes.io/config.hash`, so both are
indexed. The UID is looked up in its dashed form (the systemd cgroup driver writes it with
underscores).

A failed list never raises to the sampler: it is counted in `errors`, `last_error` says
why, and the previous index is kept until its TTL runs out (an unknown UID then names no
pod, rather than a pod that may have left).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

__all__ = ["CONFIG_HASH_ANNOTATION", "NodePods"]

logger = logging.getLogger(__name__)

# The annotation of a mirror pod holding the static pod's UID (its config hash).
CONFIG_HASH_ANNOTATION = "kubernetes.io/config.hash"
# Seconds one list may take; the sampler waits for it.
REQUEST_TIMEOUT_S = 5


class NodePods:
    """A callable `uid -> "namespace/name" | None` over the pods of one node."""

    def __init__(
        self,
        api: client.CoreV1Api,
        node_name: str,
        *,
        ttl_s: float = 30.0,
        min_refresh_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.node_name = node_name
        self.ttl_s = ttl_s
        self.min_refresh_s = min_refresh_s
        self.clock = clock
        self.errors = 0
        self.lists = 0
        self.last_error: str | None = None
        self._index: dict[str, str] = {}
        self._listed_at: float | None = None
        self._tried_at: float | None = None
        self._lock = threading.Lock()

    def __call__(self, uid: str) -> str | None:
        uid = uid.replace("_", "-").lower()
        with self._lock:
            now = self.clock()
            stale = self._listed_at is None or now - self._listed_at >= self.ttl_s
            unknown = uid not in self._index
            may_retry = self._tried_at is None or now - self._tried_at >= self.min_refresh_s
            if (stale or unknown) and may_retry:
                self._refresh(now)
            if self._listed_at is None or now - self._listed_at >= self.ttl_s:
                return None  # no fresh answer: name no pod rather than a stale one
            return self._index.get(uid)

    def _refresh(self, now: float) -> None:
        self._tried_at = now
        try:
            pods = self.api.list_pod_for_all_namespaces(
                field_selector=f"spec.nodeName={self.node_name}",
                _request_timeout=REQUEST_TIMEOUT_S,
            )
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            self.errors += 1
            reason = f"HTTP {exc.status} {exc.reason}" if isinstance(exc, ApiException) else exc
            self.last_error = f"cannot list the pods of node {self.node_name}: {reason}"
            logger.warning("%s", self.last_error)
            return
        index: dict[str, str] = {}
        for pod in pods.items:
            meta = pod.metadata
            if meta is None or pod.spec is None or pod.spec.node_name != self.node_name:
                continue
            name = f"{meta.namespace}/{meta.name}"
            index[str(meta.uid).lower()] = name
            config_hash = (meta.annotations or {}).get(CONFIG_HASH_ANNOTATION)
            if config_hash:
                index[config_hash.lower()] = name
        self._index, self._listed_at = index, now
        self.lists += 1
        self.last_error = None
