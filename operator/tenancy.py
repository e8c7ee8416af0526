"""The buyer's namespace of a contract: the bodies of the objects that make it up.

For its window a buyer gets one namespace, `gpud-<contract>` (resources.namespace_name),
holding:

- a ResourceQuota of the contract's GPUs (`requests.nvidia.com/gpu`: the API server takes
  only the `requests.` form for an extended resource, which cannot be overcommitted);
- a ServiceAccount, bound to the ClusterRole `edit` in that namespace only;
- a NetworkPolicy isolating it (`network_policy` says what it lets through, and why);
- a Secret holding a kubeconfig for that ServiceAccount, with a token (TokenRequest) that
  expires at the window's end; the Secret says when, so it is renewed only when the window
  was extended or the API server issued a shorter token than asked (`token_is_current`).

The namespace also enforces the Pod Security Standard `baseline`: a privileged or
host-network pod would step around the NetworkPolicy and reach the node it runs on (its
metering agent and signing key among them).

Deleting the namespace at the window's end deletes all of it and revokes the token (a bound
ServiceAccount token dies with its ServiceAccount).

Not here: talking to the cluster (operator/buyers.py), and pinning the buyer's pods to the
contract's nodes (the admission webhook).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from gpudelivery import errors, timefmt
from gpudelivery.operator import resources

__all__ = [
    "ANNOTATION_BUYER",
    "ANNOTATION_TOKEN_EXPIRES",
    "ANNOTATION_WINDOW_END",
    "BUYER_ROLE",
    "GPU_QUOTA",
    "KUBECONFIG_KEY",
    "KUBECONFIG_SECRET",
    "LABEL_MANAGED_BY",
    "LABEL_POD_SECURITY",
    "MANAGED_BY",
    "NETWORK_POLICY",
    "POD_SECURITY_LEVEL",
    "PRIVATE_RANGES",
    "RENEW_BEFORE_S",
    "RESOURCE_QUOTA",
    "ROLE_BINDING",
    "SERVICE_ACCOUNT",
    "TOKEN_MIN_S",
    "kubeconfig",
    "kubeconfig_secret",
    "namespace",
    "network_policy",
    "resource_quota",
    "role_binding",
    "service_account",
    "token_is_current",
    "token_request",
]

# The standard label naming the tool that manages an object, and its value on ours.
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "gpudelivery"
# The namespace annotation naming the buyer (the contract's `buyer`), for people reading it.
ANNOTATION_BUYER = "gpudelivery.io/buyer"
# Pod Security Admission's enforcing label, and the level: `baseline` refuses privileged,
# host-network, host-PID and hostPath pods (escapes from the namespace) and still runs GPU
# images as root, which `restricted` would refuse.
LABEL_POD_SECURITY = "pod-security.kubernetes.io/enforce"
POD_SECURITY_LEVEL = "baseline"

# The ResourceQuota's name, and the quota item of GPUs (the only form the API server takes for
# an extended resource: `limits.` is refused, and a GPU's request equals its limit).
RESOURCE_QUOTA = "gpudelivery-gpus"
GPU_QUOTA = "requests.nvidia.com/gpu"
# The buyer's ServiceAccount, and the binding that gives it the ClusterRole `edit` in the
# namespace (every workload object, but not quotas, RBAC or the namespace itself).
SERVICE_ACCOUNT = "buyer"
ROLE_BINDING = "buyer-edit"
BUYER_ROLE = "edit"
# The NetworkPolicy isolating the namespace.
NETWORK_POLICY = "gpudelivery-isolation"
# The Secret holding the buyer's kubeconfig, and its key.
KUBECONFIG_SECRET = "gpudelivery-buyer"
KUBECONFIG_KEY = "kubeconfig"
# The Secret's annotations: when its token expires (the API server's word), and the window
# end it was issued for (RFC 3339 UTC).
ANNOTATION_TOKEN_EXPIRES = "gpudelivery.io/token-expires"
ANNOTATION_WINDOW_END = "gpudelivery.io/window-end"
# The shortest token the API server issues (seconds): a window closer to its end than this
# gets a token that outlives it, until the namespace is deleted.
TOKEN_MIN_S = 600
# A token the API server cut short of the window (its --service-account-max-token-expiration)
# is renewed this many seconds before it expires.
RENEW_BEFORE_S = 600
# Egress to these is refused (RFC 1918 private networks, and link-local, which holds the
# clouds' metadata endpoint 169.254.169.254): other tenants, nodes and cloud credentials.
PRIVATE_RANGES = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16")
# Where the cluster's DNS runs; the API server labels every namespace with its own name.
_DNS_NAMESPACE = {"kubernetes.io/metadata.name": "kube-system"}
_DNS_PORTS = [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]


def _labels(contract: str) -> dict[str, str]:
    return {resources.LABEL_CONTRACT: contract, LABEL_MANAGED_BY: MANAGED_BY}


def _metadata(contract: str, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": resources.namespace_name(contract),
        "labels": _labels(contract),
    }


def namespace(contract: str, buyer: str) -> dict[str, Any]:
    """The buyer's namespace of the ComputeContract `contract`: labelled with the contract
    (how the operator lists its namespaces) and Pod Security `baseline`."""
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": resources.namespace_name(contract),
            "labels": {**_labels(contract), LABEL_POD_SECURITY: POD_SECURITY_LEVEL},
            "annotations": {ANNOTATION_BUYER: buyer},
        },
    }


def resource_quota(contract: str, gpus: int) -> dict[str, Any]:
    """At most `gpus` GPUs requested by the namespace's pods at once."""
    return {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": _metadata(contract, RESOURCE_QUOTA),
        "spec": {"hard": {GPU_QUOTA: str(gpus)}},
    }


def service_account(contract: str) -> dict[str, Any]:
    """The buyer's identity in the namespace (its token is in the kubeconfig)."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(contract, SERVICE_ACCOUNT),
    }


def role_binding(contract: str) -> dict[str, Any]:
    """The ClusterRole `edit`, granted to the buyer's ServiceAccount in its namespace."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(contract, ROLE_BINDING),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": BUYER_ROLE,
        },
        "subjects": [
            {
                "kind": "ServiceAccount",
                "name": SERVICE_ACCOUNT,
                "namespace": resources.namespace_name(contract),
            }
        ],
    }


def network_policy(contract: str) -> dict[str, Any]:
    """The policy isolating the namespace's pods. In: only from pods of the same namespace
    (no other tenant, no ingress controller). Out: to pods of the same namespace, to DNS
    (port 53 in kube-system), and to IPv4 addresses outside the private and link-local
    ranges, so a workload can fetch models and data from the internet but reach neither
    other tenants, nor the nodes, nor the cloud's metadata endpoint. IPv6 is not let out.

    A policy can only allow: where the CNI plugin enforces none, this isolates nothing."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(contract, NETWORK_POLICY),
        "spec": {
            "podSelector": {},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {}}]}],
            "egress": [
                {"to": [{"podSelector": {}}]},
                {
                    "to": [{"namespaceSelector": {"matchLabels": dict(_DNS_NAMESPACE)}}],
                    "ports": [dict(port) for port in _DNS_PORTS],
                },
                {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": list(PRIVATE_RANGES)}}]},
            ],
        },
    }


def token_request(expiration_s: int) -> dict[str, Any]:
    """A TokenRequest for a token valid `expiration_s` seconds (the window's end less now),
    or TOKEN_MIN_S if that is shorter, since the API server refuses less. Its audience is
    the API server's own (none given)."""
    return {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"expirationSeconds": max(expiration_s, TOKEN_MIN_S)},
    }


def kubeconfig(server: str, ca_data: str | None, namespace: str, token: str, contract: str) -> str:
    """The buyer's kubeconfig (YAML): the API server at `server` (its CA certificate,
    base64 PEM, when it is not publicly trusted), the `token`, and a context in `namespace`.
    Cluster, user and context are named after the contract, so a buyer can merge the
    kubeconfigs of several contracts."""
    quoted = json.dumps  # a JSON string is a YAML double-quoted scalar: any text stays intact
    cluster = [f"    server: {quoted(server)}"]
    if ca_data is not None:
        cluster.append(f"    certificate-authority-data: {quoted(ca_data)}")
    lines = [
        "apiVersion: v1",
        "kind: Config",
        "clusters:",
        f"- name: {quoted(contract)}",
        "  cluster:",
        *cluster,
        "users:",
        f"- name: {quoted(contract)}",
        "  user:",
        f"    token: {quoted(token)}",
        "contexts:",
        f"- name: {quoted(contract)}",
        "  context:",
        f"    cluster: {quoted(contract)}",
        f"    user: {quoted(contract)}",
        f"    namespace: {quoted(namespace)}",
        f"current-context: {quoted(contract)}",
    ]
    return "\n".join(lines) + "\n"


def kubeconfig_secret(
    contract: str, text: str, expires_at_s: int, *, window_end_s: int
) -> dict[str, Any]:
    """The Secret holding the kubeconfig `text` under KUBECONFIG_KEY, annotated with when its
    token expires and the window end it was issued for."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            **_metadata(contract, KUBECONFIG_SECRET),
            "annotations": {
                ANNOTATION_TOKEN_EXPIRES: timefmt.format_utc(expires_at_s),
                ANNOTATION_WINDOW_END: timefmt.format_utc(window_end_s),
            },
        },
        "type": "Opaque",
        "data": {KUBECONFIG_KEY: base64.b64encode(text.encode("utf-8")).decode("ascii")},
    }


def token_is_current(annotations: Mapping[str, str], end_s: int, now_s: int) -> bool:
    """Whether the kubeconfig Secret with these annotations still serves a window ending at
    `end_s`: it was issued for that end or a later one (not before the window was extended),
    and its token lasts until the end or at least RENEW_BEFORE_S more (an API server that
    caps token lifetimes issues shorter tokens than asked: those are renewed shortly before
    they expire, not on every call). A Secret without readable annotations is not current."""
    try:
        window_end_s = timefmt.parse_utc(
            annotations.get(ANNOTATION_WINDOW_END), field=ANNOTATION_WINDOW_END
        )
        expires_s = timefmt.parse_utc(
            annotations.get(ANNOTATION_TOKEN_EXPIRES), field=ANNOTATION_TOKEN_EXPIRES
        )
    except errors.InputError:
        return False
    return window_end_s >= end_s and expires_s >= min(end_s, now_s + RENEW_BEFORE_S)
