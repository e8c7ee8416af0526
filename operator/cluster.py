"""The Kubernetes API as the operator's decisions need it, through the official client.

kopf watches the resources and calls the handlers; what a handler reads or writes beyond
the body it was handed goes through here: the pools and contracts to book against, the
nodes a pool's selector matches, and the status the operator writes. One `Cluster` holds
one configured client, and kopf logs in with the same configuration (`connection_info`),
so the operator talks to one API server with one identity.

Not here: decisions (operator/booking.py, operator/placement.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import kopf
import kubernetes

from gpudelivery.operator import resources

__all__ = ["Cluster", "configuration", "connection_info"]


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
        found = self._core.list_node(label_selector=label_selector).items
        serialize = self._api_client.sanitize_for_serialization
        return [cast(dict[str, Any], serialize(node)) for node in found]  # type: ignore[no-untyped-call]

    def patch_contract_status(self, name: str, status: Mapping[str, Any]) -> None:
        """Merge `status` into the ComputeContract's status (its status subresource)."""
        self._custom.patch_cluster_custom_object_status(
            resources.GROUP, resources.VERSION, resources.CONTRACTS, name, {"status": status}
        )

    def patch_pool_status(self, name: str, status: Mapping[str, Any]) -> None:
        self._custom.patch_cluster_custom_object_status(
            resources.GROUP, resources.VERSION, resources.POOLS, name, {"status": status}
        )
