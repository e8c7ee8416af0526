"""The node's GPUs, published on its own Node: their health as the condition `GPUHealthy`,
their UUIDs as the annotation `gpudelivery.io/gpu-uuids` (gpudelivery/node_signals.py).

As node-problem-detector does for kernel and hardware problems, the agent writes one
condition on the Node it runs on: `True` when every GPU is healthy, `False` with the
unhealthy GPUs' UUIDs and reasons (metering.health) in its message. The delivery operator
watches Nodes and substitutes a failed node at once, without waiting for the API to ingest
meter batches; the batches stay the evidence, the condition is only the signal.

The condition is patched into `status.conditions` with a strategic-merge patch (merge key
`type`), so the kubelet's own conditions are never touched. It is written when its status or
message changes and otherwise every `heartbeat_s` (its `lastHeartbeatTime`), so a stale
condition shows. `lastTransitionTime` moves only when the status flips, also across an
agent restart (the Node's current condition is read once at start). Nothing is written
before the first sampling round: a condition claims only what was measured.

The annotation lists every GPU NVML reports, healthy or not (one fallen off the bus stays
listed, and the condition says it is lost): it says which GPUs the node has, for the
operator's ledger. It is a merge patch of the Node's metadata (`nodes`, not `nodes/status`),
written only when it differs from what the Node holds, read with the condition at start: an
unchanged set is never rewritten, a changed one (a GPU gone from NVML's list after a
restart, or back) is. A failed write of either is counted in `errors`, logged by `run`, and
written again on the next round; nothing is written before the first round.

The Kubernetes client comes from metering.kube: the pod's service account, or a kubeconfig.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import NamedTuple

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from gpudelivery import node_signals, timefmt
from gpudelivery.metering import errors, health

__all__ = [
    "ANNOTATION_GPU_UUIDS",
    "CONDITION_TYPE",
    "Condition",
    "NodeConditionPublisher",
    "gpu_condition",
]

logger = logging.getLogger(__name__)

# The condition type the operator watches (operator issue: substitution).
CONDITION_TYPE = node_signals.CONDITION_GPU_HEALTHY
# The annotation listing the GPUs the agent samples (the operator's ledger names them).
ANNOTATION_GPU_UUIDS = node_signals.ANNOTATION_GPU_UUIDS
# Condition reasons: CamelCase, as Kubernetes condition reasons are.
REASON_HEALTHY = "GPUsHealthy"
REASON_UNHEALTHY = "GPUsUnhealthy"
# The patch type under which the API server merges `status.conditions` by `type`.
STRATEGIC_MERGE = "application/strategic-merge-patch+json"
# The patch type that sets one annotation and leaves the Node's others alone.
MERGE_PATCH = "application/merge-patch+json"
# A condition message is for people and `kubectl describe`; a node with every GPU failing
# in every way stays well under this.
MAX_MESSAGE_CHARS = 4096
# Seconds one call to the API server may take: the heartbeat is a minute, so a hung call
# must give up well before the next one is due.
REQUEST_TIMEOUT_S = 10


class Condition(NamedTuple):
    """The GPUHealthy condition, as far as it is ours to decide."""

    status: str
    reason: str
    message: str


def gpu_condition(verdicts: Mapping[str, health.Verdict]) -> Condition:
    """The condition for the GPUs' latest verdicts (UUID -> verdict)."""
    unhealthy = sorted((uuid, v.reasons) for uuid, v in verdicts.items() if not v.healthy)
    if not unhealthy:
        count = len(verdicts)
        return Condition("True", REASON_HEALTHY, f"{count} GPU{'s' * (count != 1)} healthy")
    message = "; ".join(f"{uuid}: {', '.join(reasons)}" for uuid, reasons in unhealthy)
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 1] + "…"
    return Condition("False", REASON_UNHEALTHY, message)


class NodeConditionPublisher:
    """Writes the GPUHealthy condition of one Node when it changes, and as a heartbeat, and
    keeps the Node's GPU UUIDs annotation equal to the GPUs sampled."""

    def __init__(
        self,
        api: client.CoreV1Api,
        node_name: str,
        *,
        heartbeat_s: int = 60,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.api = api
        self.node_name = node_name
        self.heartbeat_s = heartbeat_s
        self.clock = clock
        self.errors = 0
        self._written: Condition | None = None
        self._written_at_s = 0.0
        self._transition: tuple[str, str] | None = None  # (status, lastTransitionTime)
        # The annotation as the Node holds it; None: none there, or not known (not read yet,
        # or a write failed), so it is written.
        self._gpu_uuids_on_node: str | None = None

    def publish(self, verdicts: Mapping[str, health.Verdict]) -> bool:
        """Write the condition if it changed or its heartbeat is due, then the annotation if
        the GPUs of `verdicts` (UUID -> verdict) are not the ones the Node lists; True if
        either was written.

        Raises MeteringError when the API server refuses or cannot be reached; the next call
        tries again. A failed condition write leaves the annotation for the next call too.
        """
        condition_written = self._publish_condition(verdicts)
        uuids_written = self._publish_gpu_uuids(node_signals.format_gpu_uuids(verdicts))
        return condition_written or uuids_written

    def _publish_condition(self, verdicts: Mapping[str, health.Verdict]) -> bool:
        wanted = gpu_condition(verdicts)
        now_s = self.clock()
        if wanted == self._written and now_s - self._written_at_s < self.heartbeat_s:
            return False
        now = timefmt.format_utc(int(now_s))
        try:
            if self._transition is None:
                self._transition, self._gpu_uuids_on_node = self._read_node()
            if self._transition is None or self._transition[0] != wanted.status:
                self._transition = (wanted.status, now)
            body = {
                "status": {
                    "conditions": [
                        {
                            "type": CONDITION_TYPE,
                            "status": wanted.status,
                            "reason": wanted.reason,
                            "message": wanted.message,
                            "lastHeartbeatTime": now,
                            "lastTransitionTime": self._transition[1],
                        }
                    ]
                }
            }
            self.api.patch_node_status(
                self.node_name,
                body,
                _content_type=STRATEGIC_MERGE,
                _request_timeout=REQUEST_TIMEOUT_S,
            )
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            self.errors += 1
            self._transition = None  # read it again: another writer may have moved it
            raise errors.MeteringError(
                f"cannot write the {CONDITION_TYPE} condition of node {self.node_name}: "
                f"{_describe(exc)}"
            ) from exc
        if wanted != self._written:
            logger.info(
                "node %s: %s=%s (%s)", self.node_name, CONDITION_TYPE, wanted.status, wanted.message
            )
        self._written, self._written_at_s = wanted, now_s
        return True

    def _publish_gpu_uuids(self, gpu_uuids: str) -> bool:
        if gpu_uuids == self._gpu_uuids_on_node:
            return False
        body = {"metadata": {"annotations": {ANNOTATION_GPU_UUIDS: gpu_uuids}}}
        try:
            self.api.patch_node(
                self.node_name,
                body,
                _content_type=MERGE_PATCH,
                _request_timeout=REQUEST_TIMEOUT_S,
            )
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            self.errors += 1
            self._gpu_uuids_on_node = None  # the write may have landed or not: write it again
            raise errors.MeteringError(
                f"cannot write the {ANNOTATION_GPU_UUIDS} annotation of node {self.node_name}: "
                f"{_describe(exc)}"
            ) from exc
        logger.info("node %s: %s=%s", self.node_name, ANNOTATION_GPU_UUIDS, gpu_uuids)
        self._gpu_uuids_on_node = gpu_uuids
        return True

    def _read_node(self) -> tuple[tuple[str, str] | None, str | None]:
        """The status and transition time of the condition as the Node holds it now, and the
        annotation's text (None: the Node has none)."""
        node = self.api.read_node_status(self.node_name, _request_timeout=REQUEST_TIMEOUT_S)
        annotations = (node.metadata and node.metadata.annotations) or {}
        gpu_uuids = annotations.get(ANNOTATION_GPU_UUIDS)
        for condition in (node.status and node.status.conditions) or ():
            if condition.type == CONDITION_TYPE and condition.last_transition_time is not None:
                at = int(condition.last_transition_time.timestamp())
                return (condition.status, timefmt.format_utc(at)), gpu_uuids
        return None, gpu_uuids

    def run(
        self,
        verdicts: Callable[[], Mapping[str, health.Verdict]],
        stop: threading.Event,
        *,
        every_s: float,
    ) -> None:
        """Publish `verdicts()` every `every_s` until `stop` is set (the agent's thread)."""
        while not stop.wait(every_s):
            latest = verdicts()
            if not latest:
                continue  # no round yet: nothing measured to claim
            try:
                self.publish(latest)
            except errors.MeteringError as exc:
                logger.warning("%s", exc)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return str(exc) or type(exc).__name__
