"""Pod UID -> namespace/name for the pods of this node, from the emulated API server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from gpudelivery.metering import pods

from utils.kube import core_api, running_cluster
from utils.receiver import free_port

NODE = "gpu-node-7"
UID_A = "6f1c2a3b-1111-4aaa-8bbb-000000000001"
UID_B = "6f1c2a3b-2222-4aaa-8bbb-000000000002"
UID_ELSEWHERE = "6f1c2a3b-3333-4aaa-8bbb-000000000003"
CONFIG_HASH = "0123456789abcdef0123456789abcdef"


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def pod(namespace: str, name: str, uid: str, node: str, **annotations: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": namespace, "name": name, "uid": uid, "annotations": annotations},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "train:1"}]},
    }


@pytest.fixture
def api() -> Iterator[client.CoreV1Api]:
    with running_cluster() as (_, url):
        api = core_api(url)
        api.create_namespaced_pod("team-a", pod("team-a", "train-0", UID_A, NODE))
        api.create_namespaced_pod("team-b", pod("team-b", "serve-0", UID_ELSEWHERE, "other"))
        mirror = pod(
            "kube-system",
            f"dcgm-{NODE}",
            UID_B,
            NODE,
            **{pods.CONFIG_HASH_ANNOTATION: CONFIG_HASH},
        )
        api.create_namespaced_pod("kube-system", mirror)
        yield api


def test_the_pods_of_this_node_are_found_by_uid_in_either_spelling(
    api: client.CoreV1Api,
) -> None:
    index = pods.NodePods(api, NODE, clock=Clock())
    assert index(UID_A) == "team-a/train-0"
    assert index(UID_A.replace("-", "_")) == "team-a/train-0"  # systemd cgroup driver
    assert index(UID_A.upper()) == "team-a/train-0"
    assert index(UID_B) == f"kube-system/dcgm-{NODE}"


def test_a_static_pod_is_found_by_its_config_hash(api: client.CoreV1Api) -> None:
    assert pods.NodePods(api, NODE, clock=Clock())(CONFIG_HASH) == f"kube-system/dcgm-{NODE}"


def test_a_pod_of_another_node_is_not_this_nodes(api: client.CoreV1Api) -> None:
    assert pods.NodePods(api, NODE, clock=Clock())(UID_ELSEWHERE) is None


def test_one_list_serves_every_lookup_until_the_ttl(api: client.CoreV1Api) -> None:
    clock = Clock()
    index = pods.NodePods(api, NODE, ttl_s=30, min_refresh_s=5, clock=clock)
    for _ in range(10):
        assert index(UID_A) == "team-a/train-0"
    assert index.lists == 1
    clock.now_s += 30
    assert index(UID_A) == "team-a/train-0"
    assert index.lists == 2


def test_an_unknown_uid_lists_again_but_not_more_often_than_the_minimum(
    api: client.CoreV1Api,
) -> None:
    clock = Clock()
    index = pods.NodePods(api, NODE, ttl_s=30, min_refresh_s=5, clock=clock)
    new_uid = "6f1c2a3b-4444-4aaa-8bbb-000000000004"
    assert index(new_uid) is None
    api.create_namespaced_pod("team-a", pod("team-a", "train-1", new_uid, NODE))
    clock.now_s += 4
    assert index(new_uid) is None  # too soon to list again
    assert index.lists == 1
    clock.now_s += 1
    assert index(new_uid) == "team-a/train-1"
    assert index.lists == 2


def test_an_unreachable_api_server_names_no_pod_and_is_counted() -> None:
    index = pods.NodePods(core_api(f"http://127.0.0.1:{free_port()}"), NODE, clock=Clock())
    assert index(UID_A) is None
    assert index.errors == 1
    assert index.last_error is not None
    assert index.last_error.startswith(f"cannot list the pods of node {NODE}: ")


def test_a_failed_relist_keeps_the_index_only_until_its_ttl(api: client.CoreV1Api) -> None:
    clock = Clock()
    index = pods.NodePods(api, NODE, ttl_s=30, min_refresh_s=5, clock=clock)
    assert index(UID_A) == "team-a/train-0"
    index.api = core_api(f"http://127.0.0.1:{free_port()}")  # the API server goes away
    clock.now_s += 10
    assert index("6f1c2a3b-9999-4aaa-8bbb-000000000009") is None  # tries, fails
    assert index.errors == 1
    assert index(UID_A) == "team-a/train-0"  # the last answer is still fresh
    clock.now_s += 20
    assert index(UID_A) is None  # now it is not
