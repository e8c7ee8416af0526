"""The GPUHealthy Node condition: what it says, when it is written, and that it leaves the
kubelet's conditions alone. Against kmock's emulator over HTTP, with the official client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from gpudelivery import errors as core_errors
from gpudelivery.metering import errors, health, kube, node_condition

from utils.factories import EPOCH
from utils.kube import core_api, merge_by_key, running_cluster, write_kubeconfig
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
def cluster() -> Iterator[tuple[client.CoreV1Api, str]]:
    with running_cluster() as (_, url):
        api = core_api(url)
        api.create_node(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": NODE},
                "status": {"conditions": [{"type": "Ready", "status": "True"}]},
            }
        )
        yield api, url


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
