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

from kubernetes import client

from gpudelivery.operator import runner
from gpudelivery.operator.settings import OperatorSettings, PeeringSettings, TimingSettings

from utils import kube
from utils.factories import EPOCH
from utils.polling import poll

__all__ = ["NOW", "Cluster", "cluster_at", "running_operator"]

# The operator's clock in these tests: an hour before the worked example's window.
NOW = EPOCH - 3_600


@dataclass
class Cluster:
    """The emulator and the official client's APIs talking HTTP to it."""

    emulator: kube.ClusterEmulator
    url: str
    kubeconfig: Path
    core: client.CoreV1Api
    custom: client.CustomObjectsApi


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
    cluster: Cluster, *, clock: Callable[[], float] = lambda: NOW, peering: str | None = None
) -> Iterator[None]:
    """The operator against `cluster` until the block ends: standalone, or sharing the
    peering object `peering` (which must exist), as the chart runs it."""
    settings = OperatorSettings(
        kubeconfig=cluster.kubeconfig,
        peering=PeeringSettings(standalone=True)
        if peering is None
        else PeeringSettings(name=peering, standalone=False),
        timing=TimingSettings(reconcile_interval_s=1.0),
    )
    stop, ready = threading.Event(), threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(runner.serve(settings, stop_flag=stop, ready_flag=ready, clock=clock))
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
