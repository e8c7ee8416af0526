"""A kubelet's pod-resources API for the tests: a real gRPC server on a unix socket.

`FakeKubelet` serves `v1.PodResourcesLister/List` from the pods a test gives it, counts the
calls, and can fail (an error status) or hang on request.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from gpudelivery.metering.podresources import api_pb2, api_pb2_grpc

__all__ = ["FakeKubelet", "pod", "short_socket_path"]


@contextlib.contextmanager
def short_socket_path() -> Iterator[Path]:
    """A socket path in a fresh folder under /tmp (not pytest's tmp_path: a unix socket's
    path must stay under ~107 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="podres-", dir="/tmp"))
    try:
        yield folder / "kubelet.sock"
    finally:
        shutil.rmtree(folder)


class FakeKubelet(api_pb2_grpc.PodResourcesListerServicer):
    """The pod-resources API of a kubelet, served on a unix socket; counts the Lists."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.pods: list[Any] = []
        self.calls = 0
        self.abort_with: grpc.StatusCode | None = None
        self.hang = threading.Event()
        self.release = threading.Event()
        self._server: Any = None

    def List(self, request: Any, context: Any) -> Any:
        self.calls += 1
        if self.abort_with is not None:
            context.abort(self.abort_with, "the kubelet is unwell")
        if self.hang.is_set():
            self.release.wait()
        return api_pb2.ListPodResourcesResponse(pod_resources=self.pods)

    def start(self) -> None:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        api_pb2_grpc.add_PodResourcesListerServicer_to_server(self, self._server)
        self._server.add_insecure_port(f"unix://{self.socket_path}")
        self._server.start()

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None


def pod(namespace: str, name: str, *containers: Sequence[tuple[str, Sequence[str]]]) -> Any:
    """A `v1.PodResources`; each container a list of (resource name, device ids)."""
    return api_pb2.PodResources(
        name=name,
        namespace=namespace,
        containers=[
            api_pb2.ContainerResources(
                name=f"c{index}",
                devices=[
                    api_pb2.ContainerDevices(resource_name=resource, device_ids=ids)
                    for resource, ids in devices
                ],
                cpu_ids=[2, 3],
            )
            for index, devices in enumerate(containers)
        ],
    )
