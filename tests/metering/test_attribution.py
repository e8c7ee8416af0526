"""Pod attribution: cgroup paths to pod UIDs, the rule, and the kubelet's pod-resources API.

The API tests run a real gRPC server (`FakeKubelet`) on a unix socket, as the kubelet
serves it, and fake `/proc/<pid>/cgroup` files under a temporary folder. Time is a fake
clock: the cache's TTL is tested by moving it, never by waiting.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from gpudelivery.metering import attribution, sampling
from gpudelivery.metering.podresources import api_pb2
from gpudelivery.metering.readings import GpuReading

from utils.kubelet import FakeKubelet, pod, short_socket_path

ROOT = Path(__file__).parents[2]

GPU0 = "GPU-6c2b3c1a-1d2e-4f30-8a41-5b6c7d8e9f00"
GPU1 = "GPU-6c2b3c1a-1d2e-4f30-8a41-5b6c7d8e9f01"
GPU2 = "GPU-6c2b3c1a-1d2e-4f30-8a41-5b6c7d8e9f02"
GPU3 = "GPU-6c2b3c1a-1d2e-4f30-8a41-5b6c7d8e9f03"

UID_A = "0f6b3c52-8d1e-4a8f-9c43-7b1d2e3f4a5b"
UID_B = "a1b2c3d4-e5f6-4789-abcd-ef0123456789"
UID_C = "77e1a0c2-3b4d-4e5f-8a9b-0c1d2e3f4a5b"
STATIC_UID = "3b0b9c7c7c5b54a7d3c4bd3c5b1d2f3a"
CID = "5a3c9e1f" * 8  # a 64-hex container id


def systemd(uid: str) -> str:
    return uid.replace("-", "_")


# --- cgroup paths -> pod UIDs ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "uid"),
    [
        # cgroupfs driver (cgroup v1 or v2), each QoS class
        (f"/kubepods/burstable/pod{UID_A}/{CID}", UID_A),
        (f"/kubepods/besteffort/pod{UID_A}/{CID}", UID_A),
        (f"/kubepods/pod{UID_A}/{CID}", UID_A),
        (f"/kubepods/burstable/pod{UID_A}", UID_A),
        # a kubelet with --cgroup-root (kind), and one inside a docker container
        (f"/kubelet/kubepods/burstable/pod{UID_A}/{CID}", UID_A),
        (f"/docker/{CID}/kubepods/besteffort/pod{UID_A}/{CID}", UID_A),
        # systemd driver, each QoS class and container runtime
        (
            "/kubepods.slice/kubepods-burstable.slice/"
            f"kubepods-burstable-pod{systemd(UID_A)}.slice/cri-containerd-{CID}.scope",
            UID_A,
        ),
        (
            "/kubepods.slice/kubepods-besteffort.slice/"
            f"kubepods-besteffort-pod{systemd(UID_A)}.slice/crio-{CID}.scope",
            UID_A,
        ),
        (f"/kubepods.slice/kubepods-pod{systemd(UID_A)}.slice/docker-{CID}.scope", UID_A),
        (
            "/kubepods.slice/kubepods-burstable.slice/"
            f"kubepods-burstable-pod{systemd(UID_A)}.slice/crio-conmon-{CID}.scope",
            UID_A,
        ),
        (f"/kubepods.slice/kubepods-pod{systemd(UID_A)}.slice", UID_A),
        # systemd driver with --cgroup-root=/kubelet (kind)
        (
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
            f"kubelet-kubepods-besteffort-pod{systemd(UID_A)}.slice/cri-containerd-{CID}.scope",
            UID_A,
        ),
        # seen from a cgroup namespace rooted in another pod (a containerized reader)
        (
            f"/../../kubepods-besteffort-pod{systemd(UID_A)}.slice/cri-containerd-{CID}.scope",
            UID_A,
        ),
        (f"/../burstable/pod{UID_A}/{CID}", UID_A),
        (f"/../../pod{UID_A}/{CID}", UID_A),
        # static pods: the UID is the config hash
        (f"/kubepods/burstable/pod{STATIC_UID}/{CID}", STATIC_UID),
        (
            "/kubepods.slice/kubepods-burstable.slice/"
            f"kubepods-burstable-pod{STATIC_UID}.slice/cri-containerd-{CID}.scope",
            STATIC_UID,
        ),
        # UIDs come out lower case
        (f"/kubepods/burstable/pod{UID_B.upper()}/{CID}", UID_B),
    ],
)
def test_the_pod_uid_is_read_from_every_kubelet_cgroup_layout(path: str, uid: str) -> None:
    assert attribution.pod_uid_from_cgroup_path(path) == uid


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/",
        "/init.scope",
        "/system.slice/containerd.service",
        "/system.slice/kubelet.service",
        f"/system.slice/docker-{CID}.scope",
        "/user.slice/user-1000.slice/session-4.scope",
        "/user.slice/user-1000.slice/user@1000.service/app.slice/podman-1234.scope",
        f"/machine.slice/libpod-{CID}.scope/container",
        f"/machine.slice/machine-libpod_pod_{CID}.slice/libpod-{CID}.scope",
        f"/docker/{CID}",
        "/kubepods",
        "/kubepods/burstable",
        "/kubepods.slice/kubepods-besteffort.slice",
        f"/opt/pod{UID_A}/worker",
        f"/pod{UID_A}/{CID}",
        f"/kubepods/burstable/pod{UID_A[:-1]}/{CID}",
        f"/kubepods.slice/kubepods-burstable.slice/burstable-pod{systemd(UID_A)}.slice",
    ],
)
def test_processes_outside_pods_have_no_pod_uid(path: str) -> None:
    assert attribution.pod_uid_from_cgroup_path(path) is None


@pytest.mark.parametrize(
    ("text", "uid"),
    [
        # cgroup v1, cgroupfs driver
        (
            f"12:memory:/kubepods/burstable/pod{UID_A}/{CID}\n"
            f"11:cpu,cpuacct:/kubepods/burstable/pod{UID_A}/{CID}\n"
            f"1:name=systemd:/kubepods/burstable/pod{UID_A}/{CID}\n",
            UID_A,
        ),
        # cgroup v1 where one hierarchy does not show the pod
        (
            f"13:rdma:/\n5:devices:/kubepods/pod{UID_A}/{CID}\n",
            UID_A,
        ),
        # hybrid: v1 hierarchies and the unified one
        (
            f"10:pids:/kubepods.slice/kubepods-pod{systemd(UID_B)}.slice/docker-{CID}.scope\n"
            "0::/\n",
            UID_B,
        ),
        # cgroup v2, systemd driver
        (
            "0::/kubepods.slice/kubepods-burstable.slice/"
            f"kubepods-burstable-pod{systemd(UID_B)}.slice/cri-containerd-{CID}.scope\n",
            UID_B,
        ),
        ("0::/system.slice/containerd.service\n", None),
        ("0::/user.slice/user-0.slice/session-1.scope\n", None),
        ("", None),
        ("garbage without colons\n", None),
    ],
)
def test_a_cgroup_file_gives_the_pod_uid_of_its_first_pod_path(text: str, uid: str | None) -> None:
    assert attribution.pod_uid_from_cgroup_file(text) == uid


# --- device ids, resources and the rule -----------------------------------------------------


@pytest.mark.parametrize(
    ("device_id", "uuid"),
    [
        (GPU0, GPU0),
        (f"{GPU0}::0", GPU0),
        (f"{GPU0}::12", GPU0),
        (f"{GPU0}::", f"{GPU0}::"),
        (f"{GPU0}::a", f"{GPU0}::a"),
        ("MIG-4d7a2f3b-1c2d-5e6f-8a9b-0c1d2e3f4a5b", "MIG-4d7a2f3b-1c2d-5e6f-8a9b-0c1d2e3f4a5b"),
    ],
)
def test_a_replica_suffix_is_stripped_from_device_ids(device_id: str, uuid: str) -> None:
    assert attribution.gpu_uuid(device_id) == uuid


@pytest.mark.parametrize(
    ("resource_name", "gpu_resources", "is_gpu"),
    [
        ("nvidia.com/gpu", attribution.DEFAULT_GPU_RESOURCES, True),
        ("nvidia.com/gpu.shared", attribution.DEFAULT_GPU_RESOURCES, True),
        ("nvidia.com/mig-1g.10gb", attribution.DEFAULT_GPU_RESOURCES, True),
        ("cpu", attribution.DEFAULT_GPU_RESOURCES, False),
        ("example.com/nvidia.com/gpu", attribution.DEFAULT_GPU_RESOURCES, False),
        ("amd.com/gpu", attribution.DEFAULT_GPU_RESOURCES, False),
        ("nvidia.com/gpu", ("nvidia.com/gpu",), True),
        ("nvidia.com/gpu.shared", ("nvidia.com/gpu",), False),
        ("amd.com/gpu", ("nvidia.com/gpu", "amd.com/"), True),
        ("nvidia.com/gpu", (), False),
    ],
)
def test_gpu_resources_are_whole_domains_or_exact_names(
    resource_name: str, gpu_resources: tuple[str, ...], is_gpu: bool
) -> None:
    assert attribution.is_gpu_resource(resource_name, gpu_resources) is is_gpu


def test_holders_are_gathered_per_gpu_across_containers_and_replicas() -> None:
    allocations = [
        attribution.DeviceAllocation("ml/a", "nvidia.com/gpu", (GPU0,)),
        attribution.DeviceAllocation("ml/a", "nvidia.com/gpu", (GPU1,)),
        attribution.DeviceAllocation("ml/b", "nvidia.com/gpu.shared", (f"{GPU2}::0",)),
        attribution.DeviceAllocation("ml/c", "nvidia.com/gpu.shared", (f"{GPU2}::1", f"{GPU2}::2")),
        attribution.DeviceAllocation("ml/d", "example.com/fpga", (GPU3,)),
    ]
    assert attribution.gpu_holders(allocations, attribution.DEFAULT_GPU_RESOURCES) == {
        GPU0: frozenset({"ml/a"}),
        GPU1: frozenset({"ml/a"}),
        GPU2: frozenset({"ml/b", "ml/c"}),
    }


@pytest.mark.parametrize(
    ("holders", "running", "pods"),
    [
        # one holder: it, whatever runs
        ({"ml/a"}, None, ("ml/a",)),
        ({"ml/a"}, {"ml/b"}, ("ml/a",)),
        ({"ml/a"}, set(), ("ml/a",)),
        # several holders: those running on it, else all
        ({"ml/a", "ml/b", "ml/c"}, {"ml/b"}, ("ml/b",)),
        ({"ml/a", "ml/b", "ml/c"}, {"ml/c", "ml/a", "ml/x"}, ("ml/a", "ml/c")),
        ({"ml/b", "ml/a"}, {"ml/x"}, ("ml/a", "ml/b")),
        ({"ml/b", "ml/a"}, set(), ("ml/a", "ml/b")),
        ({"ml/b", "ml/a"}, None, ("ml/a", "ml/b")),
        # no holder: the pods running on it, if known
        (set(), {"ml/y", "ml/x"}, ("ml/x", "ml/y")),
        (set(), set(), ()),
        (set(), None, ()),
    ],
)
def test_the_rule_prefers_the_only_holder_then_running_holders_then_all(
    holders: set[str], running: set[str] | None, pods: tuple[str, ...]
) -> None:
    assert attribution.attribute(holders, running) == pods


# --- the kubelet's API over a real gRPC server ----------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def socket_path() -> Iterator[Path]:
    with short_socket_path() as path:
        yield path


@pytest.fixture
def stopped_kubelet(socket_path: Path) -> Iterator[FakeKubelet]:
    """A kubelet not serving yet: its socket is missing until `start()`."""
    kubelet = FakeKubelet(socket_path)
    yield kubelet
    kubelet.stop()


@pytest.fixture
def kubelet(stopped_kubelet: FakeKubelet) -> FakeKubelet:
    stopped_kubelet.start()
    return stopped_kubelet


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def proc_root(tmp_path: Path) -> Path:
    """A fake /proc: `<pid>/cgroup` for the processes of the tests below."""
    root = tmp_path / "proc"
    cgroups = {
        # pod A, cgroup v1 with the cgroupfs driver
        101: f"11:memory:/kubepods/burstable/pod{UID_A}/{CID}\n"
        f"1:name=systemd:/kubepods/burstable/pod{UID_A}/{CID}\n",
        # pod B, cgroup v2 with the systemd driver
        202: "0::/kubepods.slice/kubepods-besteffort.slice/"
        f"kubepods-besteffort-pod{systemd(UID_B)}.slice/cri-containerd-{CID}.scope\n",
        # pod C, guaranteed, cgroup v2 with the systemd driver
        303: f"0::/kubepods.slice/kubepods-pod{systemd(UID_C)}.slice/cri-containerd-{CID}.scope\n",
        # a host process
        404: "0::/system.slice/ollama.service\n",
        # pid 505 has ended: no folder
    }
    for pid, text in cgroups.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "cgroup").write_text(text)
    return root


PODS_BY_UID = {UID_A: "ml/a", UID_B: "ml/b", UID_C: "ml/c"}


def make_attribution(
    socket_path: Path, clock: FakeClock, **options: Any
) -> attribution.KubeletPodAttribution:
    return attribution.KubeletPodAttribution(socket_path=socket_path, clock=clock, **options)


def test_exclusive_gpus_are_attributed_to_the_pods_holding_them(
    kubelet: FakeKubelet, clock: FakeClock
) -> None:
    kubelet.pods = [
        pod("ml", "a", [("nvidia.com/gpu", [GPU0])], [("nvidia.com/gpu", [GPU1])]),
        pod("serving", "b", [("nvidia.com/gpu", [GPU2])]),
        pod("kube-system", "dns", []),
    ]
    pods = make_attribution(kubelet.socket_path, clock)
    assert [pods.pods_for(uuid, ()) for uuid in (GPU0, GPU1, GPU2, GPU3)] == [
        ("ml/a",),
        ("ml/a",),
        ("serving/b",),
        (),
    ]
    assert (pods.lists, pods.errors, pods.last_error) == (1, 0, None)


def test_resources_that_are_not_gpus_are_ignored(kubelet: FakeKubelet, clock: FakeClock) -> None:
    kubelet.pods = [
        pod("ml", "a", [("nvidia.com/gpu", [GPU0]), ("example.com/fpga", [GPU1])]),
        pod("ml", "b", [("nvidia.com/gpu.shared", [f"{GPU2}::0"])]),
    ]
    default = make_attribution(kubelet.socket_path, clock)
    only_whole_gpus = make_attribution(kubelet.socket_path, clock, gpu_resources=["nvidia.com/gpu"])
    assert [default.pods_for(uuid, ()) for uuid in (GPU0, GPU1, GPU2)] == [("ml/a",), (), ("ml/b",)]
    assert [only_whole_gpus.pods_for(uuid, ()) for uuid in (GPU0, GPU1, GPU2)] == [
        ("ml/a",),
        (),
        (),
    ]


def test_a_shared_gpu_goes_to_the_holders_whose_processes_run_on_it(
    kubelet: FakeKubelet, clock: FakeClock, proc_root: Path
) -> None:
    kubelet.pods = [
        pod("ml", "a", [("nvidia.com/gpu", [f"{GPU0}::0"])]),
        pod("ml", "b", [("nvidia.com/gpu", [f"{GPU0}::1"])]),
        pod("ml", "c", [("nvidia.com/gpu", [f"{GPU0}::2", GPU1])]),
    ]
    pods = make_attribution(
        kubelet.socket_path, clock, proc_root=proc_root, pod_of_uid=PODS_BY_UID.get
    )
    assert pods.pods_for(GPU0, [101]) == ("ml/a",)
    assert pods.pods_for(GPU0, [202]) == ("ml/b",)
    assert pods.pods_for(GPU0, [505, 404, 202, 101]) == ("ml/a", "ml/b")
    # no holder's process on it (a host process, an ended one) or idle: all holders
    assert pods.pods_for(GPU0, [404, 505]) == ("ml/a", "ml/b", "ml/c")
    assert pods.pods_for(GPU0, []) == ("ml/a", "ml/b", "ml/c")
    # an exclusive GPU stays its holder's, whatever runs on it
    assert pods.pods_for(GPU1, [101]) == ("ml/c",)
    assert (pods.lists, pods.errors) == (1, 0)


def test_without_a_uid_lookup_a_shared_gpu_goes_to_all_its_holders(
    kubelet: FakeKubelet, clock: FakeClock, proc_root: Path
) -> None:
    kubelet.pods = [
        pod("ml", "a", [("nvidia.com/gpu", [f"{GPU0}::0"])]),
        pod("ml", "b", [("nvidia.com/gpu", [f"{GPU0}::1"])]),
    ]
    pods = make_attribution(kubelet.socket_path, clock, proc_root=proc_root)
    assert pods.pods_for(GPU0, [101]) == ("ml/a", "ml/b")


def test_a_gpu_no_pod_holds_goes_to_the_pods_of_its_processes(
    kubelet: FakeKubelet, clock: FakeClock, proc_root: Path
) -> None:
    kubelet.pods = [pod("ml", "a", [("nvidia.com/gpu", [GPU0])])]
    with_lookup = make_attribution(
        kubelet.socket_path, clock, proc_root=proc_root, pod_of_uid=PODS_BY_UID.get
    )
    without_lookup = make_attribution(kubelet.socket_path, clock, proc_root=proc_root)
    assert with_lookup.pods_for(GPU3, [303, 202, 404, 505]) == ("ml/b", "ml/c")
    assert with_lookup.pods_for(GPU3, [404]) == ()
    assert without_lookup.pods_for(GPU3, [303, 202]) == ()


def test_a_failing_uid_lookup_is_counted_and_the_holders_stand(
    kubelet: FakeKubelet, clock: FakeClock, proc_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kubelet.pods = [
        pod("ml", "a", [("nvidia.com/gpu", [f"{GPU0}::0"])]),
        pod("ml", "b", [("nvidia.com/gpu", [f"{GPU0}::1"])]),
    ]

    def broken(uid: str) -> str | None:
        raise ConnectionError("API server unreachable")

    pods = make_attribution(kubelet.socket_path, clock, proc_root=proc_root, pod_of_uid=broken)
    with caplog.at_level(logging.WARNING, logger=attribution.__name__):
        assert pods.pods_for(GPU0, [101]) == ("ml/a", "ml/b")
        assert pods.pods_for(GPU0, [101]) == ("ml/a", "ml/b")
    assert pods.errors == 2
    why = f"pod lookup of UID {UID_A} failed: ConnectionError: API server unreachable"
    assert pods.last_error == why
    assert [record.getMessage() for record in caplog.records] == [
        f"{why}; attributing by the kubelet's allocations alone"
    ]


def test_one_list_serves_every_gpu_until_the_ttl_has_passed(
    kubelet: FakeKubelet, clock: FakeClock
) -> None:
    kubelet.pods = [pod("ml", "a", [("nvidia.com/gpu", [GPU0])])]
    pods = make_attribution(kubelet.socket_path, clock, ttl_s=10.0)
    answers = [pods.pods_for(uuid, ()) for uuid in (GPU0, GPU1, GPU0, GPU1)]
    assert answers == [("ml/a",), (), ("ml/a",), ()]
    kubelet.pods = [pod("ml", "b", [("nvidia.com/gpu", [GPU0])])]
    clock.now += 9.5
    assert pods.pods_for(GPU0, ()) == ("ml/a",)
    assert kubelet.calls == 1
    clock.now += 0.5
    assert pods.pods_for(GPU0, ()) == ("ml/b",)
    assert pods.pods_for(GPU1, ()) == ()
    assert (kubelet.calls, pods.lists) == (2, 2)


class FakeSource:
    """Four readable GPUs, each with one process (NVML's view, enough for the sampler)."""

    def __init__(self) -> None:
        self.gpus = {GPU0: (101,), GPU1: (202,), GPU2: (), GPU3: (404,)}

    def uuids(self) -> Sequence[str]:
        return list(self.gpus)

    def read(self, index: int, *, at_s: int) -> GpuReading:
        uuid = list(self.gpus)[index]
        return GpuReading(uuid=uuid, at_s=at_s, pids=self.gpus[uuid])

    def wait_xid(self, timeout_ms: int) -> None:
        return None

    def close(self) -> None:
        pass


def test_a_sampling_round_lists_once_for_all_its_gpus(
    kubelet: FakeKubelet, clock: FakeClock, proc_root: Path
) -> None:
    kubelet.pods = [
        pod("ml", "a", [("nvidia.com/gpu", [f"{GPU0}::0", f"{GPU1}::0"])]),
        pod("ml", "b", [("nvidia.com/gpu", [f"{GPU0}::1", f"{GPU1}::1"])]),
        pod("ml", "c", [("nvidia.com/gpu", [GPU2])]),
    ]
    pods = make_attribution(
        kubelet.socket_path, clock, proc_root=proc_root, pod_of_uid=PODS_BY_UID.get
    )
    sampler = sampling.Sampler(FakeSource(), interval_s=1, max_interval_s=3, pods=pods)
    assert sampler.round(2000) == []
    records = sampler.round(2001)
    assert [(record["gpu_uuid"], record["pods"]) for record in records] == [
        (GPU0, ["ml/a"]),
        (GPU1, ["ml/b"]),
        (GPU2, ["ml/c"]),
        (GPU3, []),
    ]
    assert kubelet.calls == 1


def test_a_missing_socket_gives_no_pods_counts_one_error_and_warns_once(
    socket_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    pods = make_attribution(socket_path, clock)
    with caplog.at_level(logging.WARNING, logger=attribution.__name__):
        assert [pods.pods_for(uuid, (101,)) for uuid in (GPU0, GPU1)] == [(), ()]
        clock.now += 10.0
        assert pods.pods_for(GPU0, ()) == ()
    assert (pods.lists, pods.errors) == (0, 2)
    assert pods.last_error is not None
    assert pods.last_error.startswith(f"pod-resources List on {socket_path} failed: UNAVAILABLE: ")
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage() == f"{pods.last_error}; trying again every 10 s"


def test_the_kubelet_coming_back_is_listed_again_after_the_ttl(
    stopped_kubelet: FakeKubelet, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=attribution.__name__)
    stopped_kubelet.pods = [pod("ml", "a", [("nvidia.com/gpu", [GPU0])])]
    pods = make_attribution(stopped_kubelet.socket_path, clock)
    assert pods.pods_for(GPU0, ()) == ()
    stopped_kubelet.start()
    clock.now += 5.0
    assert pods.pods_for(GPU0, ()) == ()
    assert stopped_kubelet.calls == 0
    clock.now += 5.0
    assert pods.pods_for(GPU0, ()) == ("ml/a",)
    assert (stopped_kubelet.calls, pods.lists, pods.errors, pods.last_error) == (1, 1, 1, None)
    assert [record.levelname for record in caplog.records] == ["WARNING", "INFO"]
    assert caplog.records[1].getMessage() == (
        f"pod-resources List on {stopped_kubelet.socket_path} works again"
    )


def test_a_kubelet_gone_away_leaves_no_pod_holding_a_gpu(
    kubelet: FakeKubelet, clock: FakeClock
) -> None:
    kubelet.pods = [pod("ml", "a", [("nvidia.com/gpu", [GPU0])])]
    pods = make_attribution(kubelet.socket_path, clock)
    assert pods.pods_for(GPU0, ()) == ("ml/a",)
    kubelet.stop()
    clock.now += 10.0
    assert pods.pods_for(GPU0, ()) == ()
    assert (pods.lists, pods.errors) == (1, 1)


def test_an_error_status_from_the_kubelet_is_counted(
    kubelet: FakeKubelet, clock: FakeClock
) -> None:
    kubelet.abort_with = grpc.StatusCode.INTERNAL
    pods = make_attribution(kubelet.socket_path, clock)
    assert pods.pods_for(GPU0, ()) == ()
    assert (kubelet.calls, pods.errors) == (1, 1)
    assert pods.last_error == (
        f"pod-resources List on {kubelet.socket_path} failed: INTERNAL: the kubelet is unwell"
    )


def test_a_kubelet_that_does_not_answer_is_given_up_after_the_timeout(
    kubelet: FakeKubelet, clock: FakeClock
) -> None:
    kubelet.hang.set()
    pods = make_attribution(kubelet.socket_path, clock, timeout_s=0.2)
    assert pods.pods_for(GPU0, ()) == ()
    assert pods.errors == 1
    assert pods.last_error == (
        f"pod-resources List on {kubelet.socket_path} failed: DEADLINE_EXCEEDED: Deadline Exceeded"
    )


@pytest.mark.parametrize("options", [{"ttl_s": 0.0}, {"timeout_s": -1.0}])
def test_a_ttl_or_timeout_that_is_not_positive_is_refused(options: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        attribution.KubeletPodAttribution(**options)


# --- the vendored API ------------------------------------------------------------------------


def test_the_vendored_api_keeps_the_kubelets_names_and_field_numbers() -> None:
    service = api_pb2.DESCRIPTOR.services_by_name["PodResourcesLister"]
    assert service.full_name == "v1.PodResourcesLister"
    assert [method.name for method in service.methods] == ["List", "GetAllocatableResources", "Get"]
    fields = {
        name: {field.name: field.number for field in message.fields}
        for name, message in api_pb2.DESCRIPTOR.message_types_by_name.items()
    }
    assert fields["ListPodResourcesResponse"] == {"pod_resources": 1}
    assert fields["PodResources"] == {"name": 1, "namespace": 2, "containers": 3}
    assert fields["ContainerResources"] == {
        "name": 1,
        "devices": 2,
        "cpu_ids": 3,
        "memory": 4,
        "dynamic_resources": 5,
    }
    assert fields["ContainerDevices"] == {"resource_name": 1, "device_ids": 2, "topology": 3}
    assert fields["GetPodResourcesRequest"] == {"pod_name": 1, "pod_namespace": 2}
    assert fields["AllocatableResourcesResponse"] == {"devices": 1, "cpu_ids": 2, "memory": 3}


def test_the_generated_modules_are_what_grpc_tools_makes_of_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            "gpudelivery/metering/podresources/api.proto",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    for name in ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py"):
        generated = tmp_path / "gpudelivery" / "metering" / "podresources" / name
        checked_in = ROOT / "metering" / "podresources" / name
        assert generated.read_bytes() == checked_in.read_bytes(), f"{name}: regenerate it"
