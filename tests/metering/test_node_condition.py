"""The GPUHealthy Node condition: what it says, when it is written, and that it leaves the
kubelet's conditions alone; the GPU UUIDs annotation: the GPUs NVML reports, written when they
change. Against kmock's emulator over HTTP, with the official client (and the NVML simulator
in a process of its own where the GPUs come from the driver)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import kmock
import pytest
from kubernetes import client

from gpudelivery import errors as core_errors
from gpudelivery import node_signals
from gpudelivery.metering import errors, health, kube, node_condition

from utils.factories import EPOCH
from utils.kube import ClusterEmulator, core_api, merge_by_key, running_cluster, write_kubeconfig
from utils.nvml import PynvmlRunner
from utils.receiver import free_port

NODE = "gpu-node-7"
GPU_A, GPU_B = (
    "GPU-aaaaaaaa-0000-4000-8000-000000000000",
    "GPU-bbbbbbbb-0000-4000-8000-000000000000",
)
HEALTHY = health.Verdict(healthy=True, reasons=())
XID_79 = health.Verdict(healthy=False, reasons=("critical XID 79 since the last reset",))


class Clock:
    def __init__(self) -> None:
        self.now_s = float(EPOCH)

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def emulated() -> Iterator[tuple[ClusterEmulator, str]]:
    """The emulator holding the Node, and its URL."""
    with running_cluster() as (emulator, url):
        core_api(url).create_node(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": NODE},
                "status": {"conditions": [{"type": "Ready", "status": "True"}]},
            }
        )
        yield emulator, url


@pytest.fixture
def cluster(emulated: tuple[ClusterEmulator, str]) -> tuple[client.CoreV1Api, str]:
    _, url = emulated
    return core_api(url), url


def conditions(api: client.CoreV1Api) -> dict[str, dict[str, Any]]:
    node = api.read_node(NODE)
    return {
        condition.type: {
            "status": condition.status,
            "reason": condition.reason,
            "message": condition.message,
            "heartbeat": condition.last_heartbeat_time
            and int(condition.last_heartbeat_time.timestamp()),
            "transition": condition.last_transition_time
            and int(condition.last_transition_time.timestamp()),
        }
        for condition in node.status.conditions
    }


# -- what the condition says ----------------------------------------------------------------


def test_all_healthy_gpus_make_a_true_condition() -> None:
    assert node_condition.gpu_condition({GPU_A: HEALTHY, GPU_B: HEALTHY}) == (
        "True",
        "GPUsHealthy",
        "2 GPUs healthy",
    )
    assert node_condition.gpu_condition({GPU_A: HEALTHY}).message == "1 GPU healthy"


def test_an_unhealthy_gpu_makes_it_false_naming_the_uuid_and_every_reason() -> None:
    lost = health.Verdict(
        healthy=False,
        reasons=("GPU fallen off the bus (GPU_IS_LOST)", "row remap failed: no spare rows left"),
    )
    condition = node_condition.gpu_condition({GPU_B: lost, GPU_A: XID_79, "GPU-c": HEALTHY})
    assert condition == (
        "False",
        "GPUsUnhealthy",
        f"{GPU_A}: critical XID 79 since the last reset; "
        f"{GPU_B}: GPU fallen off the bus (GPU_IS_LOST), row remap failed: no spare rows left",
    )


def test_a_very_long_message_is_cut_to_the_limit() -> None:
    verdicts = {f"GPU-{index:04d}": XID_79 for index in range(500)}
    message = node_condition.gpu_condition(verdicts).message
    assert len(message) == node_condition.MAX_MESSAGE_CHARS
    assert message.startswith("GPU-0000: critical XID 79")
    assert message.endswith("…")


# -- the emulator extension the tests rely on ------------------------------------------------


def test_merge_by_key_replaces_fields_appends_new_items_and_deletes_on_request() -> None:
    current = [{"type": "Ready", "status": "True"}, {"type": "GPUHealthy", "status": "True"}]
    patch = [
        {"type": "GPUHealthy", "status": "False", "message": "m"},
        {"type": "DiskPressure", "status": "False"},
        {"type": "Ready", "$patch": "delete"},
    ]
    assert merge_by_key(current, patch, "type") == [
        {"type": "GPUHealthy", "status": "False", "message": "m"},
        {"type": "DiskPressure", "status": "False"},
    ]


# -- when it is written ---------------------------------------------------------------------


def test_publishing_adds_the_condition_and_keeps_the_kubelets(
    cluster: tuple[client.CoreV1Api, str],
) -> None:
    api, _ = cluster
    clock = Clock()
    publisher = node_condition.NodeConditionPublisher(api, NODE, heartbeat_s=60, clock=clock)
    assert publisher.publish({GPU_A: HEALTHY, GPU_B: HEALTHY}) is True
    assert conditions(api) == {
        "Ready": {
            "status": "True",
            "reason": None,
            "message": None,
            "heartbeat": None,
            "transition": None,
        },
        "GPUHealthy": {
            "status": "True",
            "reason": "GPUsHealthy",
            "message": "2 GPUs healthy",
            "heartbeat": EPOCH,
            "transition": EPOCH,
        },
    }


def test_an_unchanged_condition_is_rewritten_only_at_the_heartbeat(
    cluster: tuple[client.CoreV1Api, str],
) -> None:
    api, _ = cluster
    clock = Clock()
    publisher = node_condition.NodeConditionPublisher(api, NODE, heartbeat_s=60, clock=clock)
    publisher.publish({GPU_A: HEALTHY})
    clock.now_s += 59
    assert publisher.publish({GPU_A: HEALTHY}) is False
    assert conditions(api)["GPUHealthy"]["heartbeat"] == EPOCH
    clock.now_s += 1
    assert publisher.publish({GPU_A: HEALTHY}) is True
    written = conditions(api)["GPUHealthy"]
    assert (written["heartbeat"], written["transition"]) == (EPOCH + 60, EPOCH)


def test_a_failing_gpu_flips_it_at_once_and_moves_the_transition_time(
    cluster: tuple[client.CoreV1Api, str],
) -> None:
    api, _ = cluster
    clock = Clock()
    publisher = node_condition.NodeConditionPublisher(api, NODE, heartbeat_s=60, clock=clock)
    publisher.publish({GPU_A: HEALTHY, GPU_B: HEALTHY})
    clock.now_s += 7
    assert publisher.publish({GPU_A: XID_79, GPU_B: HEALTHY}) is True
    assert conditions(api)["GPUHealthy"] == {
        "status": "False",
        "reason": "GPUsUnhealthy",
        "message": f"{GPU_A}: critical XID 79 since the last reset",
        "heartbeat": EPOCH + 7,
        "transition": EPOCH + 7,
    }
    clock.now_s += 3  # another GPU fails: the message changes, the status does not
    lost = health.Verdict(healthy=False, reasons=("GPU fallen off the bus (GPU_IS_LOST)",))
    assert publisher.publish({GPU_A: XID_79, GPU_B: lost}) is True
    written = conditions(api)["GPUHealthy"]
    assert (written["status"], written["heartbeat"], written["transition"]) == (
        "False",
        EPOCH + 10,
        EPOCH + 7,
    )


def test_a_restarted_agent_keeps_the_transition_time_of_an_unchanged_status(
    cluster: tuple[client.CoreV1Api, str],
) -> None:
    api, _ = cluster
    clock = Clock()
    node_condition.NodeConditionPublisher(api, NODE, clock=clock).publish({GPU_A: XID_79})
    clock.now_s += 120
    restarted = node_condition.NodeConditionPublisher(api, NODE, clock=clock)
    restarted.publish({GPU_A: XID_79})
    written = conditions(api)["GPUHealthy"]
    assert (written["status"], written["heartbeat"], written["transition"]) == (
        "False",
        EPOCH + 120,
        EPOCH,
    )
    clock.now_s += 5  # repaired and reset: healthy again, a new transition
    restarted.publish({GPU_A: HEALTHY})
    assert conditions(api)["GPUHealthy"]["transition"] == EPOCH + 125


def test_an_unreachable_api_server_raises_a_metering_error_and_counts_it() -> None:
    api = core_api(f"http://127.0.0.1:{free_port()}")
    publisher = node_condition.NodeConditionPublisher(api, NODE, clock=Clock())
    with pytest.raises(errors.MeteringError) as caught:
        publisher.publish({GPU_A: HEALTHY})
    assert str(caught.value).startswith(f"cannot write the GPUHealthy condition of node {NODE}: ")
    assert publisher.errors == 1


def test_an_unknown_node_is_a_metering_error_naming_the_status(
    cluster: tuple[client.CoreV1Api, str],
) -> None:
    api, _ = cluster
    publisher = node_condition.NodeConditionPublisher(api, "no-such-node", clock=Clock())
    with pytest.raises(errors.MeteringError) as caught:
        publisher.publish({GPU_A: HEALTHY})
    assert str(caught.value) == (
        "cannot write the GPUHealthy condition of node no-such-node: HTTP 404 Not Found"
    )


# -- the GPU UUIDs annotation ---------------------------------------------------------------

# One life of the agent on the simulated driver, publishing to the emulator at `url`: the
# verdicts before the first round, then the first round's, published.
FIRST_ROUND = """
from kubernetes import client
from gpudelivery.metering import node_condition, nvml, sampling
configuration = client.Configuration()
configuration.host = {url!r}
api = client.CoreV1Api(client.ApiClient(configuration))
source = nvml.PynvmlSource()
sampler = sampling.Sampler(source, interval_s=1, max_interval_s=2)
publisher = node_condition.NodeConditionPublisher(api, {node!r})
unsampled = sampler.verdicts()
sampler.round(int(time.time()))
written = publisher.publish(sampler.verdicts())
source.close()
result = {{"unsampled": len(unsampled), "written": written, "errors": publisher.errors}}
"""


def scenario(path: Path, uuids: Sequence[str], *, lost: int | None = None) -> Path:
    """A simulator scenario of idle GPUs in this NVML index order, GPU `lost` off the bus."""
    timeline = [] if lost is None else [{"at": 1, "gpu": lost, "lost": True}]
    path.write_text(json.dumps({"gpus": [{"uuid": uuid} for uuid in uuids], "timeline": timeline}))
    return path


def gpu_uuids(api: client.CoreV1Api) -> str | None:
    """The annotation as the Node holds it."""
    annotations = api.read_node(NODE).metadata.annotations or {}
    return annotations.get(node_signals.ANNOTATION_GPU_UUIDS)


def patches_of(emulator: ClusterEmulator, path: str) -> kmock.View:
    """The PATCH requests on `path`, as a kmock view (to count them, or to react to them)."""
    return emulator[kmock.method.PATCH][kmock.path(path)]


def node_patches(emulator: ClusterEmulator) -> int:
    """How many PATCH requests the Node itself (its metadata) had, not its status."""
    return len(patches_of(emulator, f"/api/v1/nodes/{NODE}"))


def run_rounds(
    publisher: node_condition.NodeConditionPublisher,
    rounds: Sequence[Mapping[str, health.Verdict]],
) -> None:
    """`publisher.run` over the sampler's verdicts of these rounds, one per check, then stop."""
    stop = threading.Event()
    left = list(rounds)

    def verdicts() -> Mapping[str, health.Verdict]:
        latest = left.pop(0)
        if not left:
            stop.set()
        return latest

    publisher.run(verdicts, stop, every_s=0)


def test_the_first_round_lists_every_gpu_nvml_reports_sorted_lost_ones_too(
    emulated: tuple[ClusterEmulator, str], run_pynvml: PynvmlRunner, tmp_path: Path
) -> None:
    emulator, url = emulated
    api = core_api(url)
    gpu_c = "GPU-cccccccc-0000-4000-8000-000000000000"
    # NVML's index order is not the annotation's; GPU 2 (B) is off the bus.
    gpus = scenario(tmp_path / "gpus.json", [gpu_c, GPU_A, GPU_B], lost=2)
    result = run_pynvml(FIRST_ROUND.format(url=url, node=NODE), scenario=gpus, seconds_in=5)
    assert result == {"unsampled": 0, "written": True, "errors": 0}
    assert gpu_uuids(api) == f"{GPU_A},{GPU_B},{gpu_c}"
    assert node_patches(emulator) == 1
    assert (
        conditions(api)["GPUHealthy"]["message"] == f"{GPU_B}: GPU fallen off the bus (GPU_IS_LOST)"
    )


def test_a_restart_with_a_gpu_gone_from_nvml_rewrites_the_annotation(
    emulated: tuple[ClusterEmulator, str], run_pynvml: PynvmlRunner, tmp_path: Path
) -> None:
    emulator, url = emulated
    api = core_api(url)
    code = FIRST_ROUND.format(url=url, node=NODE)
    run_pynvml(code, scenario=scenario(tmp_path / "two.json", [GPU_B, GPU_A]), seconds_in=5)
    assert (gpu_uuids(api), node_patches(emulator)) == (f"{GPU_A},{GPU_B}", 1)
    run_pynvml(code, scenario=scenario(tmp_path / "one.json", [GPU_B]), seconds_in=5)
    assert (gpu_uuids(api), node_patches(emulator)) == (GPU_B, 2)


def test_nothing_is_written_before_the_first_round(
    emulated: tuple[ClusterEmulator, str],
) -> None:
    emulator, url = emulated
    api = core_api(url)
    publisher = node_condition.NodeConditionPublisher(api, NODE, clock=Clock())
    run_rounds(publisher, [{}, {}, {}])
    assert gpu_uuids(api) is None
    assert list(conditions(api)) == ["Ready"]
    assert len(emulator[kmock.method.PATCH]) == 0


def test_an_unchanged_set_of_gpus_is_not_rewritten_not_even_after_a_restart(
    emulated: tuple[ClusterEmulator, str],
) -> None:
    emulator, url = emulated
    api = core_api(url)
    clock = Clock()
    publisher = node_condition.NodeConditionPublisher(api, NODE, heartbeat_s=60, clock=clock)
    assert publisher.publish({GPU_B: HEALTHY, GPU_A: HEALTHY}) is True
    assert publisher.publish({GPU_A: HEALTHY, GPU_B: HEALTHY}) is False
    assert publisher.publish({GPU_A: XID_79, GPU_B: HEALTHY}) is True  # the condition only
    clock.now_s += 60
    assert publisher.publish({GPU_A: XID_79, GPU_B: HEALTHY}) is True  # its heartbeat only
    restarted = node_condition.NodeConditionPublisher(api, NODE, clock=clock)
    restarted.publish({GPU_A: XID_79, GPU_B: HEALTHY})
    assert (gpu_uuids(api), node_patches(emulator)) == (f"{GPU_A},{GPU_B}", 1)
    assert conditions(api)["GPUHealthy"]["heartbeat"] == EPOCH + 60


def test_a_changed_set_of_gpus_is_rewritten_each_time(
    emulated: tuple[ClusterEmulator, str],
) -> None:
    emulator, url = emulated
    api = core_api(url)
    publisher = node_condition.NodeConditionPublisher(api, NODE, clock=Clock())
    written = []
    for verdicts in ({GPU_A: HEALTHY, GPU_B: HEALTHY}, {GPU_A: HEALTHY}, {GPU_B: XID_79}):
        publisher.publish(verdicts)
        written.append(gpu_uuids(api))
    publisher.publish({GPU_B: XID_79})
    assert written == [f"{GPU_A},{GPU_B}", GPU_A, GPU_B]
    assert node_patches(emulator) == 3


def test_annotations_of_other_writers_are_left_alone(cluster: tuple[client.CoreV1Api, str]) -> None:
    api, _ = cluster
    api.patch_node(NODE, {"metadata": {"annotations": {"example.com/owner": "team-a"}}})
    node_condition.NodeConditionPublisher(api, NODE, clock=Clock()).publish({GPU_A: HEALTHY})
    assert api.read_node(NODE).metadata.annotations == {
        "example.com/owner": "team-a",
        node_signals.ANNOTATION_GPU_UUIDS: GPU_A,
    }


def test_a_failed_annotation_write_is_counted_logged_and_made_again_next_round(
    emulated: tuple[ClusterEmulator, str], caplog: pytest.LogCaptureFixture
) -> None:
    emulator, url = emulated
    api = core_api(url)
    patches_of(emulator, f"/api/v1/nodes/{NODE}")[:1] << 503
    publisher = node_condition.NodeConditionPublisher(api, NODE, clock=Clock())
    verdicts = {GPU_A: HEALTHY, GPU_B: HEALTHY}
    with caplog.at_level(logging.WARNING, logger=node_condition.__name__):
        run_rounds(publisher, [verdicts, verdicts, verdicts])
    assert [record.getMessage() for record in caplog.records] == [
        f"cannot write the gpudelivery.io/gpu-uuids annotation of node {NODE}: "
        "HTTP 503 Service Unavailable"
    ]
    assert (publisher.errors, node_patches(emulator)) == (1, 2)
    assert gpu_uuids(api) == f"{GPU_A},{GPU_B}"
    assert conditions(api)["GPUHealthy"]["status"] == "True"


def test_after_a_lost_answer_the_set_the_node_may_hold_is_not_trusted(
    emulated: tuple[ClusterEmulator, str],
) -> None:
    emulator, url = emulated
    api = core_api(url)
    publisher = node_condition.NodeConditionPublisher(api, NODE, clock=Clock())
    publisher.publish({GPU_A: HEALTHY, GPU_B: HEALTHY})
    patches_of(emulator, f"/api/v1/nodes/{NODE}")[1:2] << 503
    with pytest.raises(errors.MeteringError):
        publisher.publish({GPU_A: HEALTHY})  # written, but the answer says it was not
    assert gpu_uuids(api) == GPU_A
    publisher.publish({GPU_A: HEALTHY, GPU_B: HEALTHY})
    assert (gpu_uuids(api), node_patches(emulator)) == (f"{GPU_A},{GPU_B}", 3)


def test_a_failed_condition_write_leaves_the_annotation_to_the_next_round(
    emulated: tuple[ClusterEmulator, str],
) -> None:
    emulator, url = emulated
    api = core_api(url)
    patches_of(emulator, f"/api/v1/nodes/{NODE}/status")[:1] << 503
    publisher = node_condition.NodeConditionPublisher(api, NODE, clock=Clock())
    with pytest.raises(errors.MeteringError):
        publisher.publish({GPU_A: HEALTHY})
    assert (gpu_uuids(api), publisher.errors) == (None, 1)
    assert publisher.publish({GPU_A: HEALTHY}) is True
    assert (gpu_uuids(api), node_patches(emulator)) == (GPU_A, 1)


# -- where the client comes from ------------------------------------------------------------


def test_a_kubeconfig_file_gives_a_client_of_that_server(
    cluster: tuple[client.CoreV1Api, str], tmp_path: Path
) -> None:
    _, url = cluster
    api = kube.core_api(str(write_kubeconfig(tmp_path / "kubeconfig", url)))
    assert api is not None
    assert api.read_node(NODE).metadata.name == NODE


def test_outside_a_cluster_without_a_kubeconfig_there_is_no_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert kube.core_api(None) is None


def test_a_broken_kubeconfig_is_an_error_naming_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "kubeconfig"
    broken.write_text("apiVersion: v1\nkind: Config\nclusters: []\n")
    with pytest.raises(errors.MeteringError) as caught:
        kube.core_api(str(broken))
    assert str(caught.value).startswith(f"{broken}: not a usable kubeconfig: ")
    assert not isinstance(caught.value, core_errors.InputError)
