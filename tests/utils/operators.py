"""The operator under test: the cluster emulator over HTTP with the official client's APIs
(`Cluster`), and the operator itself (kopf, embedded in a thread) running against it."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from kubernetes import client

from gpudelivery import terms
from gpudelivery.operator import nodes, resources, runner
from gpudelivery.operator.settings import (
    ApiSettings,
    OperatorSettings,
    PeeringSettings,
    TimingSettings,
    WebhookSettings,
)

from utils import kube
from utils.factories import EPOCH, terms_json
from utils.polling import poll

__all__ = [
    "NOW",
    "PRODUCT",
    "Clock",
    "Cluster",
    "add_contract",
    "add_gpu_nodes",
    "add_nodes",
    "add_pool",
    "cluster_at",
    "contract_status",
    "gpu_uuids",
    "running_operator",
]

# The operator's clock in these tests: an hour before the worked example's window.
NOW = EPOCH - 3_600
# The label GPU feature discovery gives the nodes of the worked example's instrument.
PRODUCT = {"nvidia.com/gpu.product": "H100-SXM-80GB"}


@dataclass
class Cluster:
    """The emulator and the official client's APIs talking HTTP to it."""

    emulator: kube.ClusterEmulator
    url: str
    kubeconfig: Path
    core: client.CoreV1Api
    custom: client.CustomObjectsApi


class Clock:
    """A clock the test moves: the operator's, and the emulator's once `attach`ed."""

    def __init__(self, now_s: int = NOW) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return float(self.now_s)

    def attach(self, cluster: Cluster) -> None:
        """Let the emulator tell the time by this clock (the times it stamps)."""
        cluster.emulator.clock = lambda: datetime.datetime.fromtimestamp(self.now_s, datetime.UTC)


@contextlib.contextmanager
def cluster_at(directory: Path) -> Iterator[Cluster]:
    """A running emulator, its clock at NOW, with a kubeconfig for it in `directory`."""
    with kube.running_cluster() as (emulator, url):
        emulator.clock = lambda: datetime.datetime.fromtimestamp(NOW, datetime.UTC)
        api = kube.api_client(url)
        kubeconfig = kube.write_kubeconfig(directory / "kubeconfig", url)
        yield Cluster(
            emulator, url, kubeconfig, client.CoreV1Api(api), client.CustomObjectsApi(api)
        )


@contextlib.contextmanager
def running_operator(
    cluster: Cluster,
    *,
    clock: Callable[[], float] = lambda: NOW,
    peering: str | None = None,
    webhook: WebhookSettings | None = None,
    api: tuple[httpx.Client, Path] | None = None,
    reconcile_interval_s: float = 1.0,
) -> Iterator[None]:
    """The operator against `cluster` until the block ends: standalone, or sharing the
    peering object `peering` (which must exist), as the chart runs it; with the admission
    webhook `webhook`, else without one (no port bound); reaching the gpudelivery API through
    the client `api` with the key in the file beside it (mirroring and reporting every
    second), else without an API; passing over each pool every `reconcile_interval_s`."""
    api_settings = ApiSettings()
    if api is not None:
        api_settings = ApiSettings(url=str(api[0].base_url), token_file=api[1], sync_interval_s=1.0)
    settings = OperatorSettings(
        kubeconfig=cluster.kubeconfig,
        peering=PeeringSettings(standalone=True)
        if peering is None
        else PeeringSettings(name=peering, standalone=False),
        timing=TimingSettings(reconcile_interval_s=reconcile_interval_s),
        webhook=WebhookSettings(enabled=False) if webhook is None else webhook,
        api=api_settings,
    )
    stop, ready = threading.Event(), threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            serving = runner.serve(
                settings,
                stop_flag=stop,
                ready_flag=ready,
                clock=clock,
                api=None if api is None else api[0],
            )
            asyncio.run(serving)
        except BaseException as exc:  # reported by the test thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="operator")
    thread.start()
    try:
        poll(lambda: ready.is_set() or bool(failure))
        if failure:
            raise failure[0]
        yield
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    if failure:
        raise failure[0]


def add_pool(
    cluster: Cluster, name: str = "h100", instrument: str = "H100-SXM-80GB", **spec: Any
) -> None:
    """The DeliveryPool `name` of `instrument` (by default the worked example's), with `spec`
    added; its nodes are those GPU feature discovery labels with the instrument's name."""
    body = {
        "apiVersion": f"{resources.GROUP}/{resources.VERSION}",
        "kind": "DeliveryPool",
        "metadata": {"name": name},
        "spec": {"instrument": instrument, **spec},
    }
    cluster.custom.create_cluster_custom_object(
        resources.GROUP, resources.VERSION, resources.POOLS, body
    )


def add_nodes(
    cluster: Cluster, count: int, labels: dict[str, str] = PRODUCT, prefix: str = "gpu"
) -> None:
    """`count` nodes `<prefix>-<n>` with `labels` (and no spec, as a bare Node may have)."""
    for number in range(count):
        cluster.core.create_node({"metadata": {"name": f"{prefix}-{number}", "labels": labels}})


def gpu_uuids(node: str, gpus: int = 8) -> list[str]:
    """The GPU UUIDs `add_gpu_nodes` gives node `node`."""
    return [f"GPU-{node}-{index}" for index in range(gpus)]


def add_gpu_nodes(
    cluster: Cluster,
    names: list[str],
    *,
    block: str | None = None,
    zone: str = "z1",
    labels: dict[str, str] = PRODUCT,
    gpus: int = 8,
) -> None:
    """Nodes `names` as a GPU node looks once its metering agent runs: Ready since an hour
    before NOW, GPUs reported healthy, their UUIDs published, in `block` and `zone`."""
    since = datetime.datetime.fromtimestamp(NOW - 3_600, datetime.UTC).isoformat()
    placement = {resources.LABEL_ZONE: zone} | (
        {} if block is None else {resources.LABEL_BLOCK: block}
    )
    for name in names:
        cluster.core.create_node(
            {
                "metadata": {
                    "name": name,
                    "labels": {**labels, **placement},
                    "annotations": {nodes.ANNOTATION_GPU_UUIDS: ",".join(gpu_uuids(name, gpus))},
                },
                "status": {
                    "conditions": [
                        {"type": "Ready", "status": "True", "lastTransitionTime": since},
                        {
                            "type": nodes.CONDITION_GPU_HEALTHY,
                            "status": "True",
                            "lastTransitionTime": since,
                        },
                    ]
                },
            }
        )


def add_contract(
    cluster: Cluster, contract_id: str | None = None, gpus: int | None = None, **fields: Any
) -> str:
    """A ComputeContract of the worked example's terms, changed by the arguments; its name."""
    if contract_id is not None:
        fields["contract_id"] = contract_id
    if gpus is not None:
        fields["gpu_count"] = gpus
    body = resources.contract_body(terms.parse_terms(terms_json(**fields)))
    cluster.custom.create_cluster_custom_object(
        resources.GROUP, resources.VERSION, resources.CONTRACTS, body
    )
    return str(body["metadata"]["name"])


def contract_status(cluster: Cluster, name: str) -> dict[str, Any]:
    """The status of the ComputeContract `name` (empty while it has none)."""
    body = cluster.custom.get_cluster_custom_object(
        resources.GROUP, resources.VERSION, resources.CONTRACTS, name
    )
    found: dict[str, Any] = body.get("status", {})
    return found
