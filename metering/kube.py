"""The agent's client of the Kubernetes API server, when it has one.

In its DaemonSet pod the agent uses the pod's service account; elsewhere (a test, a node
checked by hand) a kubeconfig file. With neither, the parts that need the API server (the
GPUHealthy Node condition, pods found by UID) are off, and metering goes on without them.
"""

from __future__ import annotations

from kubernetes import client, config
from kubernetes.config.config_exception import ConfigException

from gpudelivery.metering import errors

__all__ = ["core_api"]


def core_api(kubeconfig: str | None) -> client.CoreV1Api | None:
    """A CoreV1Api from `kubeconfig`, else from the pod's service account, else None."""
    try:
        if kubeconfig is not None:
            api_client = config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
            return client.CoreV1Api(api_client)
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        return client.CoreV1Api(client.ApiClient(configuration))
    except ConfigException as exc:
        if kubeconfig is not None:
            raise errors.MeteringError(f"{kubeconfig}: not a usable kubeconfig: {exc}") from exc
        return None
