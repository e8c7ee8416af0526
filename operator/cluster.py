"""The Kubernetes API as the operator's decisions need it, through the official client.

kopf watches the resources and calls the handlers; what a handler reads or writes beyond
the body it was handed goes through here: the pools and contracts to book against, the
nodes a pool's selector matches, and the status the operator writes. One `Cluster` holds
one configured client, and kopf logs in with the same configuration (`connection_info`),
so the operator talks to one API server with one identity.

Not here: decisions (operator/booking.py, operator/placement.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import kopf
import kubernetes
from kubernetes.client.exceptions import ApiException

from gpudelivery.operator import errors, resources

__all__ = ["Cluster", "configuration", "connection_info"]

# Nodes and pods are read as the API server serves them (JSON, which operator/nodes.py
# reads), not as the client's models: building a model of every node of a pool, to turn it
# back into JSON, took most of the operator's time in bench/bench_operator.py.
_RAW: dict[str, Any] = {"_preload_content": False}
# The API server's answers the operator tells apart.
_NOT_FOUND, _CONFLICT, _TOO_MANY_REQUESTS = 404, 409, 429


def configuration(kubeconfig: Path | None) -> kubernetes.client.Configuration:
    """The client configuration: from `kubeconfig` when given, else in-cluster (the pod's
    service account), else the user's kubeconfig."""
    config = kubernetes.client.Configuration()
    if kubeconfig is not None:
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig), client_configuration=config
        )
        return config
    try:
        kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=config
        )
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            client_configuration=config
        )
    return config


def connection_info(config: kubernetes.client.Configuration) -> kopf.ConnectionInfo:
    """kopf's credentials for the API server `config` reaches, as kopf's own
    `login_via_client` derives them from the client's default configuration."""
    header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix(
        "authorization"
    )
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=config.host,
        ca_path=config.ssl_ca_cert,
        insecure=not config.verify_ssl,
        username=config.username or None,
        password=config.password or None,
        scheme=scheme or None,
        token=token or None,
        certificate_path=config.cert_file,
        private_key_path=config.key_file,
    )


class Cluster:
    """Reads and writes of the operator's resources and of nodes."""

    def __init__(self, api_client: kubernetes.client.ApiClient) -> None:
        self._api_client = api_client
        self._custom = kubernetes.client.CustomObjectsApi(api_client)
        self._core = kubernetes.client.CoreV1Api(api_client)

    def pools(self) -> list[dict[str, Any]]:
        return self._list(resources.POOLS)

    def contracts(self) -> list[dict[str, Any]]:
        return self._list(resources.CONTRACTS)

    def _list(self, plural: str) -> list[dict[str, Any]]:
        answer = self._custom.list_cluster_custom_object(resources.GROUP, resources.VERSION, plural)
        return list(cast(Mapping[str, Any], answer).get("items", []))

    def nodes(self, selector: Mapping[str, str]) -> list[dict[str, Any]]:
        """The nodes carrying every label of `selector`, as the API serves them (JSON, which
        operator/nodes.py reads)."""
        label_selector = ",".join(f"{key}={value}" for key, value in sorted(selector.items()))
        return _items(self._core.list_node(label_selector=label_selector, **_RAW))

    def node(self, name: str) -> dict[str, Any] | None:
        """Node `name` as the API serves it; None when there is none."""
        try:
            return _object(self._core.read_node(name, **_RAW))
        except ApiException as exc:
            if exc.status == _NOT_FOUND:
                return None
            raise

    def patch_node(self, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """Merge `patch` (which names the resourceVersion read) into node `name`; the node
        as written. `errors.StaleObjectError` when it changed since it was read."""
        try:
            written = _object(self._core.patch_node(name, dict(patch), **_RAW))
        except ApiException as exc:
            if exc.status == _CONFLICT:
                raise errors.StaleObjectError(f"node {name} changed since it was read") from exc
            raise
        return written

    def pods_on(self, node: str) -> list[dict[str, Any]]:
        """The pods bound to `node`, in every namespace."""
        return _items(
            self._core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}", **_RAW)
        )

    def pods_in(self, namespace: str) -> list[dict[str, Any]]:
        """The pods of `namespace`."""
        return _items(self._core.list_namespaced_pod(namespace, **_RAW))

    def annotate_pod(self, namespace: str, name: str, annotations: Mapping[str, str]) -> None:
        """Add `annotations` to a pod; a pod gone meanwhile needs none."""
        patch = {"metadata": {"annotations": dict(annotations)}}
        try:
            self._core.patch_namespaced_pod(name, namespace, patch)
        except ApiException as exc:
            if exc.status != _NOT_FOUND:
                raise

    def evict(self, namespace: str, name: str) -> bool:
        """Ask the Eviction API to evict a pod: True when it is gone or going, False when a
        PodDisruptionBudget refuses it for now (429; ask again later)."""
        body = kubernetes.client.V1Eviction(
            metadata=kubernetes.client.V1ObjectMeta(name=name, namespace=namespace)
        )
        try:
            self._core.create_namespaced_pod_eviction(name, namespace, body)
        except ApiException as exc:
            if exc.status == _TOO_MANY_REQUESTS:
                return False
            if exc.status != _NOT_FOUND:
                raise
        return True

    def create_contract(self, body: Mapping[str, Any]) -> bool:
        """Create a ComputeContract; False when one of its name exists already."""
        try:
            self._custom.create_cluster_custom_object(
                resources.GROUP, resources.VERSION, resources.CONTRACTS, dict(body)
            )
        except ApiException as exc:
            if exc.status == _CONFLICT:
                return False
            raise
        return True

    def patch_contract(self, name: str, patch: Mapping[str, Any]) -> None:
        """Merge `patch` into the ComputeContract `name` (its spec or metadata)."""
        self._custom.patch_cluster_custom_object(
            resources.GROUP, resources.VERSION, resources.CONTRACTS, name, dict(patch)
        )

    def patch_contract_status(self, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
        """Merge `status` into the ComputeContract's status (its status subresource); the
        contract as written."""
        written = self._custom.patch_cluster_custom_object_status(
            resources.GROUP, resources.VERSION, resources.CONTRACTS, name, {"status": status}
        )
        return dict(cast(Mapping[str, Any], written))

    def patch_pool_status(self, name: str, status: Mapping[str, Any]) -> None:
        self._custom.patch_cluster_custom_object_status(
            resources.GROUP, resources.VERSION, resources.POOLS, name, {"status": status}
        )


def _object(response: Any) -> dict[str, Any]:
    """The object a raw (`_RAW`) answer carries."""
    return cast(dict[str, Any], json.loads(response.data))


def _items(response: Any) -> list[dict[str, Any]]:
    """The items of a raw (`_RAW`) list answer."""
    return list(_object(response).get("items") or [])
