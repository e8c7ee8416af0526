"""The buyers' namespaces on the cluster, through the official client.

`BuyerNamespaces.ensure` makes a contract's namespace what operator/tenancy.py describes,
creating whatever of it is missing: it reads each object and creates it only if it is not
there, so a second call writes nothing and a call after a crash completes what the first
left. The order hands the buyer access last: the namespace, its quota and isolation, the
ServiceAccount and its binding, and only then the kubeconfig Secret. Objects that exist are
left as they are, even if someone changed them.

The kubeconfig Secret is issued again, with a new token, when it is missing, when its
ServiceAccount was just created (an older token belonged to one that is gone), or when
`tenancy.token_is_current` says it no longer serves the window (extended since, or cut
short by the API server and about to expire). A token it replaces stays valid until it
expires or the namespace is deleted.

`remove` deletes the namespace and everything in it; `listed` finds the namespaces the
operator made, so the caller can remove those no contract wants any more, level-triggered.

API errors other than those each method documents propagate as the client's `ApiException`.

Not here: deciding when a contract has a namespace (the caller), the bodies (tenancy.py).
"""

from __future__ import annotations

import contextlib
import datetime
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from gpudelivery.operator import errors, resources, tenancy

__all__ = ["BuyerNamespaces"]

_Found = TypeVar("_Found")


class BuyerNamespaces:
    """The buyers' namespaces of contracts on one cluster. `server` and `ca_data` go into
    the buyers' kubeconfigs: the API server's address as buyers reach it (not the in-cluster
    one), and its CA certificate (base64 PEM; None when it is publicly trusted)."""

    def __init__(self, api_client: client.ApiClient, *, server: str, ca_data: str | None) -> None:
        self._core = client.CoreV1Api(api_client)
        self._rbac = client.RbacAuthorizationV1Api(api_client)
        self._networking = client.NetworkingV1Api(api_client)
        self._server = server
        self._ca_data = ca_data

    def ensure(
        self, contract_name: str, buyer: str, gpus: int, end_s: int, now_s: int
    ) -> list[str]:
        """Create what is missing of the namespace of the ComputeContract `contract_name`:
        for `buyer`, a quota of `gpus` GPUs, a token valid until `end_s`. Returns the objects
        written, as `<resource>/<name>` in order (empty: nothing was missing).

        Raises `errors.NamespaceTerminatingError` while the namespace is being deleted,
        `errors.StaleObjectError` if the kubeconfig Secret changed while it was renewed, and
        ValueError once the window has ended (remove the namespace instead)."""
        if now_s >= end_s:
            raise ValueError(f"the window of {contract_name} has ended: remove its namespace")
        namespace = resources.namespace_name(contract_name)
        written: list[str] = []
        found = _read(lambda: self._core.read_namespace(namespace))
        if found is None:
            body = tenancy.namespace(contract_name, buyer)
            model = client.V1Namespace.model_validate(body)
            if self._create(namespace, lambda: self._core.create_namespace(model)):
                written.append(f"namespaces/{namespace}")
        elif found.metadata is not None and found.metadata.deletion_timestamp is not None:
            raise _terminating(namespace)
        core, rbac, networking = self._core, self._rbac, self._networking
        # (resource, read, create, the object as the client's model)
        parts: list[tuple[str, Callable[..., object], Callable[..., object], Any]] = [
            (
                "resourcequotas",
                core.read_namespaced_resource_quota,
                core.create_namespaced_resource_quota,
                client.V1ResourceQuota.model_validate(tenancy.resource_quota(contract_name, gpus)),
            ),
            (
                "networkpolicies",
                networking.read_namespaced_network_policy,
                networking.create_namespaced_network_policy,
                client.V1NetworkPolicy.model_validate(tenancy.network_policy(contract_name)),
            ),
            (
                "serviceaccounts",
                core.read_namespaced_service_account,
                core.create_namespaced_service_account,
                client.V1ServiceAccount.model_validate(tenancy.service_account(contract_name)),
            ),
            (
                "rolebindings",
                rbac.read_namespaced_role_binding,
                rbac.create_namespaced_role_binding,
                client.V1RoleBinding.model_validate(tenancy.role_binding(contract_name)),
            ),
        ]
        for resource, read, create, model in parts:
            name = model.metadata.name
            if self._ensure_object(namespace, name, read, create, model):
                written.append(f"{resource}/{name}")
        renew = f"serviceaccounts/{tenancy.SERVICE_ACCOUNT}" in written
        if self._ensure_kubeconfig(contract_name, end_s, now_s, renew=renew):
            written.append(f"secrets/{tenancy.KUBECONFIG_SECRET}")
        return written

    def remove(self, contract_name: str) -> None:
        """Delete the namespace of the ComputeContract `contract_name` and everything in it.
        Done when it is gone (404) or already being deleted (the API server answers a second
        deletion with 409): it disappears once its objects are gone."""
        try:
            self._core.delete_namespace(resources.namespace_name(contract_name))
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    def listed(self) -> dict[str, str]:
        """The buyers' namespaces the operator made, those being deleted too: namespace name
        -> ComputeContract name, in one list call."""
        selector = f"{resources.LABEL_CONTRACT},{tenancy.LABEL_MANAGED_BY}={tenancy.MANAGED_BY}"
        found: dict[str, str] = {}
        for item in self._core.list_namespace(label_selector=selector).items:
            metadata = item.metadata
            if metadata is not None and metadata.name is not None:
                found[metadata.name] = (metadata.labels or {})[resources.LABEL_CONTRACT]
        return found

    # -- the parts ------------------------------------------------------------------------

    def _ensure_object(
        self,
        namespace: str,
        name: str,
        read: Callable[..., object],
        create: Callable[..., object],
        model: object,
    ) -> bool:
        """Create `model`, the object `name`, in `namespace` unless it is there: whether it
        was written."""
        if _read(lambda: read(name, namespace)) is not None:
            return False
        return self._create(namespace, lambda: create(namespace, model))

    def _ensure_kubeconfig(
        self, contract_name: str, end_s: int, now_s: int, *, renew: bool
    ) -> bool:
        """Issue the kubeconfig Secret when it is missing, no longer serves the window, or
        `renew` says its token belongs to a ServiceAccount that is gone: whether it was."""
        namespace = resources.namespace_name(contract_name)
        secret = _read(
            lambda: self._core.read_namespaced_secret(tenancy.KUBECONFIG_SECRET, namespace)
        )
        metadata = secret.metadata if secret is not None else None
        if metadata is not None and not renew:
            annotations: Mapping[str, str] = metadata.annotations or {}
            if tenancy.token_is_current(annotations, end_s, now_s):
                return False
        token, expires_at_s = self._issue_token(namespace, end_s - now_s)
        text = tenancy.kubeconfig(self._server, self._ca_data, namespace, token, contract_name)
        body = tenancy.kubeconfig_secret(contract_name, text, expires_at_s, window_end_s=end_s)
        if metadata is None:
            model = client.V1Secret.model_validate(body)
            return self._create(
                namespace, lambda: self._core.create_namespaced_secret(namespace, model)
            )
        # Replaced as it was read: a Secret changed meanwhile is not overwritten blindly.
        body["metadata"]["resourceVersion"] = metadata.resource_version
        model = client.V1Secret.model_validate(body)
        with self._refused_if_terminating(namespace):
            try:
                self._core.replace_namespaced_secret(tenancy.KUBECONFIG_SECRET, namespace, model)
            except ApiException as exc:
                if exc.status == 409:
                    message = f"secret {namespace}/{tenancy.KUBECONFIG_SECRET} changed meanwhile"
                    raise errors.StaleObjectError(message) from exc
                raise
        return True

    def _issue_token(self, namespace: str, expiration_s: int) -> tuple[str, int]:
        """A new token of the buyer's ServiceAccount: (token, when it expires, as the API
        server says: it may cut a long request short)."""
        body = tenancy.token_request(expiration_s)
        request = client.AuthenticationV1TokenRequest.model_validate(body)
        with self._refused_if_terminating(namespace):
            answer = self._core.create_namespaced_service_account_token(
                tenancy.SERVICE_ACCOUNT, namespace, request
            )
        status = answer.status
        if status is None or status.token is None or status.expiration_timestamp is None:
            raise errors.OperatorError(f"the TokenRequest in {namespace} answered no token")
        expires = status.expiration_timestamp
        if expires.tzinfo is None:  # the API server writes UTC
            expires = expires.replace(tzinfo=datetime.UTC)
        return status.token, int(expires.timestamp())

    # -- writes ---------------------------------------------------------------------------

    def _create(self, namespace: str, create: Callable[[], object]) -> bool:
        """Create an object in `namespace` (or the namespace): whether it was created
        (False: one of its name already exists, created meanwhile)."""
        with self._refused_if_terminating(namespace):
            try:
                create()
            except ApiException as exc:
                if exc.status == 409 and _status_reason(exc) == "AlreadyExists":
                    return False
                raise
        return True

    @contextlib.contextmanager
    def _refused_if_terminating(self, namespace: str) -> Iterator[None]:
        """Turn a write refused because `namespace` is being deleted (403) into
        `errors.NamespaceTerminatingError`."""
        try:
            yield
        except ApiException as exc:
            if exc.status == 403 and self._terminating(namespace):
                raise _terminating(namespace) from exc
            raise

    def _terminating(self, namespace: str) -> bool:
        found = _read(lambda: self._core.read_namespace(namespace))
        metadata = found.metadata if found is not None else None
        return metadata is not None and metadata.deletion_timestamp is not None


def _read(read: Callable[[], _Found]) -> _Found | None:
    """What `read` answers, or None if there is no such object (404)."""
    try:
        return read()
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _status_reason(exc: ApiException) -> str | None:
    """The reason of the Status an error answered (`AlreadyExists`, `Conflict`, ...)."""
    try:
        status = json.loads(exc.body or "")
    except (TypeError, ValueError):
        return None
    reason = status.get("reason") if isinstance(status, dict) else None
    return reason if isinstance(reason, str) else None


def _terminating(namespace: str) -> errors.NamespaceTerminatingError:
    return errors.NamespaceTerminatingError(
        f"namespace {namespace} is being deleted: it can be prepared again once it is gone"
    )
