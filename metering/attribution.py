"""Which pods use a GPU: the kubelet's pod-resources API, refined by the processes' cgroups.

The records name the pods a GPU served, so a GPU's time can be billed to the contract of
the pod that held it. The kubelet knows which pod holds which device: its pod-resources API
(gRPC `v1.PodResourcesLister/List` on a unix socket) lists every pod's containers and the
device ids the device plugins handed them. For NVIDIA's device plugin (its default
`deviceIDStrategy=uuid`) those ids are GPU UUIDs, suffixed `::N` for the replicas of a
time-sliced or MPS-shared GPU (`GPU-1234...::0`); the suffix is stripped, so all replicas of
a GPU count as that GPU.

The rule, per GPU and per sampling round (`attribute` is the pure form):

1. Exactly one pod holds the GPU (pod-resources): that pod, whatever runs on the GPU.
2. Several pods hold it (a shared GPU): those of them whose processes NVML reports on the
   GPU, found by PID -> `/proc/<pid>/cgroup` -> pod UID -> pod; when that finds none of
   them (no UID lookup was given, the GPU is idle, or its processes belong to no holder):
   all the holders.
3. No pod holds it but processes run on it (a privileged pod that sees every GPU, say):
   the pods found by PID -> cgroup -> UID -> pod; without a UID lookup, none.

The pod-resources v1 response carries no pod UIDs, so the UID -> `namespace/name` step
needs another source (the API server's pods on this node, the kubelet's /pods): it is
injected as `pod_of_uid` and must be cheap, since it runs per process per round. The
PIDs are those NVML reports, which are the host's: `proc_root` must be the host's /proc
(a DaemonSet with hostPID, or the host's /proc mounted elsewhere).

One List per `ttl_s` at most, whatever the number of GPUs: the sampler asks for every GPU
every second. A List that fails (socket missing, kubelet restarting, timeout) never
raises: it is counted in `errors`, `last_error` says why, one warning is logged per run of
failures, and until the next attempt (one TTL later) no pod holds any GPU, because a stale
answer could bill a GPU to a pod that has gone; rule 3 still applies.

Not here: MIG (the plugin then reports MIG device UUIDs, which are not the UUIDs of the
GPUs NVML samples), Dynamic Resource Allocation (`dynamic_resources`, whose devices are not
named by UUID), and the UID lookup itself.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# grpcio ships no type information; `unused-ignore` for the day types-grpcio comes in.
import grpc  # type: ignore[import-untyped, unused-ignore]

from gpudelivery.metering.podresources import api_pb2, api_pb2_grpc

__all__ = [
    "DEFAULT_GPU_RESOURCES",
    "DEFAULT_PROC_ROOT",
    "DEFAULT_SOCKET",
    "DeviceAllocation",
    "KubeletPodAttribution",
    "attribute",
    "gpu_holders",
    "gpu_uuid",
    "is_gpu_resource",
    "pod_uid_from_cgroup_file",
    "pod_uid_from_cgroup_path",
]

logger = logging.getLogger(__name__)

# Where the kubelet serves the pod-resources API (its --pod-resources-directory default).
DEFAULT_SOCKET = Path("/var/lib/kubelet/pod-resources/kubelet.sock")
DEFAULT_PROC_ROOT = Path("/proc")
# Every resource of NVIDIA's device plugin: nvidia.com/gpu, nvidia.com/gpu.shared (renamed
# replicas), nvidia.com/mig-1g.10gb. Other nvidia.com/ resources (the network operator's
# NICs) are harmless: their device ids are PCI addresses, which match no GPU UUID.
DEFAULT_GPU_RESOURCES: tuple[str, ...] = ("nvidia.com/",)
DEFAULT_TTL_S = 10.0
DEFAULT_TIMEOUT_S = 2.0
# Kubernetes' node tests and the usual pod-resources clients allow 16 MiB responses; gRPC's
# default, 4 MiB, can be short of a node packed with pods.
_MAX_RESPONSE_BYTES = 16 * 1024 * 1024
_CHANNEL_OPTIONS = (("grpc.max_receive_message_length", _MAX_RESPONSE_BYTES),)

# The device plugin's replica suffix: `<uuid>::<replica>`.
_REPLICA = re.compile(r"::\d+$")
# A pod UID: dashed (cgroupfs), underscored (systemd escapes `-`), or the 32 hex digits of
# a static pod's config hash.
_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}|[0-9a-f]{32}"
# cgroupfs driver: `.../kubepods/burstable/pod<uid>/<container>`.
_CGROUPFS_POD = re.compile(rf"pod({_UID})", re.IGNORECASE)
# The folders a cgroupfs pod folder sits in: its QoS class (guaranteed pods sit in kubepods
# itself), or `..` when seen from a cgroup namespace rooted below them.
_POD_PARENTS = frozenset({"kubepods", "burstable", "besteffort", ".."})
# systemd driver: `kubepods-burstable-pod<uid>.slice`, `kubepods-pod<uid>.slice` (guaranteed
# QoS), `kubelet-kubepods-besteffort-pod<uid>.slice` (a kubelet under --cgroup-root=/kubelet).
_SYSTEMD_POD = re.compile(rf"(?:[a-z]+-)*kubepods(?:-[a-z]+)*-pod({_UID})\.slice", re.IGNORECASE)

# Pod UID -> `namespace/name`, or None when unknown.
PodOfUid = Callable[[str], str | None]


@dataclass(frozen=True, slots=True)
class DeviceAllocation:
    """Devices of one resource that the kubelet gave one container of pod `pod`."""

    pod: str  # namespace/name
    resource_name: str
    device_ids: tuple[str, ...]


def gpu_uuid(device_id: str) -> str:
    """The GPU a device id names: the id without the plugin's `::N` replica suffix."""
    return _REPLICA.sub("", device_id)


def is_gpu_resource(resource_name: str, gpu_resources: Collection[str]) -> bool:
    """Whether `resource_name` is a GPU resource: an entry ending in `/` is a whole domain
    (`nvidia.com/`), any other must match exactly (`nvidia.com/gpu`)."""
    return any(
        resource_name.startswith(entry) if entry.endswith("/") else resource_name == entry
        for entry in gpu_resources
    )


def gpu_holders(
    allocations: Iterable[DeviceAllocation], gpu_resources: Collection[str]
) -> dict[str, frozenset[str]]:
    """GPU UUID -> the pods holding it, from the kubelet's allocations of GPU resources."""
    holders: dict[str, set[str]] = {}
    for allocation in allocations:
        if is_gpu_resource(allocation.resource_name, gpu_resources):
            for device_id in allocation.device_ids:
                holders.setdefault(gpu_uuid(device_id), set()).add(allocation.pod)
    return {uuid: frozenset(pods) for uuid, pods in holders.items()}


def attribute(holders: Collection[str], running: Collection[str] | None) -> tuple[str, ...]:
    """The pods a GPU is attributed to (the module's rule), sorted.

    `holders` are the pods the kubelet gave the GPU; `running` the pods whose processes run
    on it, or None when that is unknown (no UID lookup, or not looked up).
    """
    if len(holders) == 1:
        return tuple(holders)
    if holders:
        both = set(holders).intersection(running or ())
        return tuple(sorted(both or holders))
    return tuple(sorted(set(running or ())))


def pod_uid_from_cgroup_path(path: str) -> str | None:
    """The UID of the pod whose cgroup `path` lies in (dashed, lower case), or None.

    Takes the cgroupfs and systemd layouts, cgroup v1 and v2, paths seen through a cgroup
    namespace (`/../../kubepods-...`); anything outside a pod (`/system.slice/...`,
    `/user.slice/...`, `/kubepods/burstable` itself) is None.
    """
    segments = path.split("/")
    for index, segment in enumerate(segments):
        systemd = _SYSTEMD_POD.fullmatch(segment)
        # A bare `pod<uid>` only counts beneath a QoS or kubepods folder, or seen from a
        # cgroup namespace (`..`): that keeps other software's `pod...` folders out.
        cgroupfs = _CGROUPFS_POD.fullmatch(segment)
        if cgroupfs is not None and (index == 0 or segments[index - 1] not in _POD_PARENTS):
            cgroupfs = None
        match = systemd or cgroupfs
        if match is not None:
            return match.group(1).lower().replace("_", "-")
    return None


def pod_uid_from_cgroup_file(text: str) -> str | None:
    """The pod UID in the text of a `/proc/<pid>/cgroup` file, or None.

    Lines are `hierarchy:controllers:path` (v1: one per hierarchy; v2: the one `0::path`);
    the first path that lies in a pod gives the UID.
    """
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            uid = pod_uid_from_cgroup_path(parts[2])
            if uid is not None:
                return uid
    return None


def _decode(response: api_pb2.ListPodResourcesResponse) -> tuple[DeviceAllocation, ...]:
    """The device allocations in a `v1.ListPodResourcesResponse`."""
    return tuple(
        DeviceAllocation(
            pod=f"{pod.namespace}/{pod.name}",
            resource_name=devices.resource_name,
            device_ids=tuple(str(device_id) for device_id in devices.device_ids),
        )
        for pod in response.pod_resources
        for container in pod.containers
        for devices in container.devices
    )


def _describe(exc: Exception) -> str:
    if isinstance(exc, grpc.Call):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


class KubeletPodAttribution:
    """`sampling.PodAttribution` through the kubelet's pod-resources API (module docstring).

    `errors` counts the failures (Lists, and calls of `pod_of_uid` that raised), `last_error`
    says why the latest one failed and is None again once a List succeeds; `lists` counts
    the Lists that succeeded.
    """

    def __init__(
        self,
        *,
        socket_path: Path | str = DEFAULT_SOCKET,
        proc_root: Path | str = DEFAULT_PROC_ROOT,
        pod_of_uid: PodOfUid | None = None,
        gpu_resources: Collection[str] = DEFAULT_GPU_RESOURCES,
        ttl_s: float = DEFAULT_TTL_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s <= 0 or timeout_s <= 0:
            raise ValueError("ttl_s and timeout_s must be positive")
        self.socket_path = Path(socket_path)
        self.proc_root = Path(proc_root)
        self.pod_of_uid = pod_of_uid
        self.gpu_resources = tuple(gpu_resources)
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.clock = clock
        self.lists = 0
        self.errors = 0
        self.last_error: str | None = None
        self._holders: Mapping[str, frozenset[str]] = {}
        self._listed_at: float | None = None
        # One warning per run of failures, not one per round.
        self._list_failing = False
        self._lookup_failing = False
        self._lock = threading.Lock()

    def pods_for(self, uuid: str, pids: Sequence[int]) -> Sequence[str]:
        """The `namespace/name` of the pods GPU `uuid` is attributed to, sorted; never raises
        for the kubelet's or a process's trouble."""
        holders = self.holders().get(uuid, frozenset())
        running: frozenset[str] | None = None
        if len(holders) != 1 and pids and self.pod_of_uid is not None:
            running = self._running_pods(pids, self.pod_of_uid)
        return attribute(holders, running)

    def holders(self) -> Mapping[str, frozenset[str]]:
        """GPU UUID -> pods holding it, as of the latest List (listing again after `ttl_s`)."""
        with self._lock:
            now = self.clock()
            if self._listed_at is None or not 0 <= now - self._listed_at < self.ttl_s:
                self._listed_at = now
                self._holders = self._list()
            return self._holders

    def _list(self) -> Mapping[str, frozenset[str]]:
        # A channel per List, as dcgm-exporter does: a kubelet restart makes a new socket, and a
        # kept channel could still be in gRPC's reconnect backoff when the next List is due.
        try:
            with grpc.insecure_channel(self._target, options=_CHANNEL_OPTIONS) as channel:
                # protoc writes no annotations into the gRPC module.
                stub = api_pb2_grpc.PodResourcesListerStub(channel)  # type: ignore[no-untyped-call, unused-ignore]
                response = stub.List(api_pb2.ListPodResourcesRequest(), timeout=self.timeout_s)
        except grpc.RpcError as exc:
            why = f"pod-resources List on {self.socket_path} failed: {_describe(exc)}"
            if not self._list_failing:
                logger.warning("%s; trying again every %g s", why, self.ttl_s)
            self._list_failing = True
            self._failed(why)
            return {}
        if self._list_failing:
            logger.info("pod-resources List on %s works again", self.socket_path)
        self._list_failing = False
        self.lists += 1
        self.last_error = None
        return gpu_holders(_decode(response), self.gpu_resources)

    @property
    def _target(self) -> str:
        return f"unix://{self.socket_path.absolute()}"

    def _running_pods(self, pids: Iterable[int], pod_of_uid: PodOfUid) -> frozenset[str]:
        uids = {uid for pid in pids if (uid := self._pod_uid_of_pid(pid)) is not None}
        pods = set()
        for uid in sorted(uids):
            try:
                pod = pod_of_uid(uid)
            # An injected lookup's failure (API server away, say) must not stop the metering:
            # it is counted like a failed List and the GPU falls back to its holders.
            except Exception as exc:
                why = f"pod lookup of UID {uid} failed: {_describe(exc)}"
                if not self._lookup_failing:
                    logger.warning("%s; attributing by the kubelet's allocations alone", why)
                self._lookup_failing = True
                self._failed(why)
                continue
            self._lookup_failing = False
            if pod is not None:
                pods.add(pod)
        return frozenset(pods)

    def _pod_uid_of_pid(self, pid: int) -> str | None:
        if pid <= 0:
            return None
        try:
            text = (self.proc_root / str(pid) / "cgroup").read_text(errors="replace")
        # Processes end between NVML's report and this read all the time: not an error.
        except OSError as exc:
            logger.debug("no cgroup for PID %d: %s", pid, exc)
            return None
        return pod_uid_from_cgroup_file(text)

    def _failed(self, why: str) -> None:
        self.errors += 1
        self.last_error = why
