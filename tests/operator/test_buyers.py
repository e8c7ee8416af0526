"""The buyers' namespaces on the cluster emulator over HTTP, through the official client:
created whole and exactly once, completed after a crash, their token renewed only when the
window needs it, removed with everything in them, and listed by their labels."""

from __future__ import annotations

import base64
import datetime
from collections.abc import Callable
from typing import Any

import kmock
import pytest
import yaml
from kubernetes import client

from gpudelivery.operator import buyers, errors, resources, tenancy

from utils import kube
from utils.operators import NOW, Cluster

CONTRACT = "ex-1-0a1b2c3d"
NAMESPACE = resources.namespace_name(CONTRACT)
BUYER = "acme-ai"
GPUS = 9
END = NOW + 7_200
SERVER = "https://k8s.gpu.example:6443"
CA_DATA = base64.b64encode(b"-----BEGIN CERTIFICATE-----\n").decode()
# The adapter's calls name themselves so, apart from the tests' own setup calls.
AGENT = "buyers-under-test"
# The audience of a token asked without one: the API server's own.
API_AUDIENCES = ("https://kubernetes.default.svc.cluster.local",)
# What the server writes into every object, and the tests leave out of exact comparisons.
SERVER_FIELDS = ("uid", "creationTimestamp", "generation", "resourceVersion")
ALL_WRITTEN = [
    f"namespaces/{NAMESPACE}",
    "resourcequotas/gpudelivery-gpus",
    "networkpolicies/gpudelivery-isolation",
    "serviceaccounts/buyer",
    "rolebindings/buyer-edit",
    "secrets/gpudelivery-buyer",
]


@pytest.fixture
def namespaces(cluster: Cluster) -> buyers.BuyerNamespaces:
    api = kube.api_client(cluster.url)
    api.user_agent = AGENT
    return buyers.BuyerNamespaces(api, server=SERVER, ca_data=CA_DATA)


def ensure(namespaces: buyers.BuyerNamespaces, end_s: int = END, now_s: int = NOW) -> list[str]:
    return namespaces.ensure(CONTRACT, BUYER, GPUS, end_s, now_s)


def stored(cluster: Cluster) -> dict[tuple[str, str | None, str], dict[str, Any]]:
    """Every object on the cluster but the chart's CRDs, (plural, namespace, name) -> the
    object without the fields the server writes."""
    found = {}
    for (resource, namespace, name), obj in cluster.emulator.objects.items():
        if not obj.deleted and resource.plural != "customresourcedefinitions":
            body = dict(obj.raw)
            body["metadata"] = {
                key: value for key, value in body["metadata"].items() if key not in SERVER_FIELDS
            }
            found[(resource.plural or "", namespace, name)] = body
    return found


def revision(cluster: Cluster) -> str:
    """The cluster's resourceVersion: it moves with every write."""
    return str(cluster.core.list_namespace().metadata.resource_version)


def issued(end_s: int = END) -> kube.IssuedToken:
    """A token of the buyer's ServiceAccount expiring at `end_s`."""
    expires = datetime.datetime.fromtimestamp(end_s, datetime.UTC)
    return kube.IssuedToken(NAMESPACE, "buyer", API_AUDIENCES, expires)


def secret_of(token: str, end_s: int = END, expires_s: int = END) -> dict[str, Any]:
    text = tenancy.kubeconfig(SERVER, CA_DATA, NAMESPACE, token, CONTRACT)
    return tenancy.kubeconfig_secret(CONTRACT, text, expires_s, window_end_s=end_s)


def expected(token: str) -> dict[tuple[str, str | None, str], dict[str, Any]]:
    """The whole namespace, its kubeconfig holding `token`."""
    return {
        ("namespaces", None, NAMESPACE): {
            **tenancy.namespace(CONTRACT, BUYER),
            "status": {"phase": "Active"},
        },
        ("resourcequotas", NAMESPACE, "gpudelivery-gpus"): tenancy.resource_quota(CONTRACT, GPUS),
        ("networkpolicies", NAMESPACE, "gpudelivery-isolation"): tenancy.network_policy(CONTRACT),
        ("serviceaccounts", NAMESPACE, "buyer"): tenancy.service_account(CONTRACT),
        ("rolebindings", NAMESPACE, "buyer-edit"): tenancy.role_binding(CONTRACT),
        ("secrets", NAMESPACE, "gpudelivery-buyer"): secret_of(token),
    }


def kubeconfig_token(cluster: Cluster) -> str:
    secret = cluster.core.read_namespaced_secret("gpudelivery-buyer", NAMESPACE)
    document = yaml.safe_load(base64.b64decode(secret.data["kubeconfig"]))
    token: str = document["users"][0]["user"]["token"]
    return token


def test_ensure_creates_the_whole_namespace_with_a_token_until_the_window_ends(
    cluster: Cluster, namespaces: buyers.BuyerNamespaces
) -> None:
    assert ensure(namespaces) == ALL_WRITTEN
    (token,) = cluster.emulator.issued_tokens
    assert cluster.emulator.issued_tokens == {token: issued()}
    assert kubeconfig_token(cluster) == token
    assert stored(cluster) == expected(token)


def test_ensure_again_writes_nothing_and_issues_no_token(
    cluster: Cluster, namespaces: buyers.BuyerNamespaces
) -> None:
    ensure(namespaces)
    before, tokens = revision(cluster), cluster.emulator.issued_tokens
    assert ensure(namespaces, now_s=NOW + 600) == []
    assert (revision(cluster), cluster.emulator.issued_tokens) == (before, tokens)


def create_steps(cluster: Cluster) -> list[Callable[[], object]]:
    """Creating the objects but the Secret, in the order ensure does, by the tests' calls."""
    api = cluster.core.api_client
    rbac, networking = client.RbacAuthorizationV1Api(api), client.NetworkingV1Api(api)
    return [
        lambda: cluster.core.create_namespace(tenancy.namespace(CONTRACT, BUYER)),
        lambda: cluster.core.create_namespaced_resource_quota(
            NAMESPACE, tenancy.resource_quota(CONTRACT, GPUS)
        ),
        lambda: networking.create_namespaced_network_policy(
            NAMESPACE, tenancy.network_policy(CONTRACT)
        ),
        lambda: cluster.core.create_namespaced_service_account(
            NAMESPACE, tenancy.service_account(CONTRACT)
        ),
        lambda: rbac.create_namespaced_role_binding(NAMESPACE, tenancy.role_binding(CONTRACT)),
    ]


@pytest.mark.parametrize("done", range(6))
def test_ensure_after_a_crash_creates_the_rest(
    cluster: Cluster, namespaces: buyers.BuyerNamespaces, done: int
) -> None:
    for step in create_steps(cluster)[:done]:
        step()
    assert ensure(namespaces) == ALL_WRITTEN[done:]
    (token,) = cluster.emulator.issued_tokens
    assert stored(cluster) == expected(token)


def test_a_crash_between_token_and_secret_costs_only_a_token(
    cluster: Cluster, namespaces: buyers.BuyerNamespaces
) -> None:
    for step in create_steps(cluster):
        step()
    request = client.AuthenticationV1TokenRequest.model_validate(tenancy.token_request(7_200))
    lost = cluster.core.create_namespaced_service_account_token("buyer", NAMESPACE, request)
    assert ensure(namespaces) == ["secrets/gpudelivery-buyer"]
    token = kubeconfig_token(cluster)
    assert set(cluster.emulator.issued_tokens) == {lost.status.token, token}
    assert stored(cluster) == expected(token)


def test_a_service_account_created_again_gets_a_new_kubeconfig(
    cluster: Cluster, namespaces: buyers.BuyerNamespaces
) -> None:
    ensure(namespaces)
    old = kubeconfig_token(cluster)
    cluster.core.delete_namespaced_service_account("buyer", NAMESPACE)
    assert ensure(namespaces) == ["serviceaccounts/buyer", "secrets/gpudelivery-buyer"]
    token = kubeconfig_token(cluster)
    assert set(cluster.emulator.issued_tokens) == {old, token}
    assert stored(cluster) == expected(token)


def test_an_extended_window_gets_a_kubeconfig_until_its_new_end(
    cluster: Cluster, namespaces: buyers.BuyerNamespaces
) -> None:
    ensure(namespaces)
    first = kubeconfig_token(cluster)
    assert ensure(namespaces, end_s=END + 3_600) == ["secrets/gpudelivery-buyer"]
    token = kubeconfig_token(cluster)
    assert cluster.emulator.issued_tokens == {
        first: issued(),
        token: issued(END + 3_600),
    }
    assert stored(cluster)[("secrets", NAMESPACE, "gpudelivery-buyer")] == secret_of(
        token, END + 3_600, END + 3_600
    )
    assert ensure(namespaces, end_s=END + 3_600) == []


def test_a_window_closer_than_ten_minutes_gets_a_ten_minute_token(
    cluster: Cluster, namespaces: buyers.BuyerNamespaces
) -> None:
    now = END - 60
    cluster.emulator.clock = lambda: datetime.datetime.fromtimestamp(now, datetime.UTC)
    ensure(namespaces, now_s=now)
    (token,) = cluster.emulator.issued_tokens
    assert cluster.emulator.issued_tokens == {token: issued(now + 600)}
    secret = stored(cluster)[("secrets", NAMESPACE, "gpudelivery-buyer")]
    assert secret == secret_of(token, END, now + 600)
    assert ensure(namespaces, now_s=now + 30) == []


def test_ensure_refuses_a_window_that_has_ended(
    cluster: Cluster, namespaces: buyers.BuyerNamespaces
) -> None:
    with pytest.raises(ValueError, match=f"the window of {CONTRACT} has ended"):
        ensure(namespaces, now_s=END)
    assert stored(cluster) == {}


def hold(cluster: Cluster) -> None:
    """A pod whose finalizer keeps the namespace Terminating once it is deleted."""
    pod = {"metadata": {"name": "train-0", "finalizers": ["example.io/hold"]}}
    cluster.core.create_namespaced_pod(NAMESPACE, pod)


def release(cluster: Cluster) -> None:
    cluster.core.patch_namespaced_pod("train-0", NAMESPACE, {"metadata": {"finalizers": None}})


def test_remove_deletes_the_namespace_and_everything_in_it(
    cluster: Cluster, namespaces: buyers.BuyerNamespaces
) -> None:
    ensure(namespaces)
    cluster.core.create_namespaced_pod(NAMESPACE, {"metadata": {"name": "train-0"}})
    namespaces.remove(CONTRACT)
    assert stored(cluster) == {}
    namespaces.remove(CONTRACT)  # gone: 404, done
    assert stored(cluster) == {}


def test_a_terminating_namespace_is_removed_again_without_error(
    cluster: Cluster, namespaces: buyers.BuyerNamespaces
) -> None:
    ensure(namespaces)
    hold(cluster)
    namespaces.remove(CONTRACT)
    assert namespaces.listed() == {NAMESPACE: CONTRACT}  # Terminating: still listed
    # The real API server answers a second deletion of a Terminating namespace with 409.
    cluster.emulator[kmock.method.DELETE] << 409
    namespaces.remove(CONTRACT)
    release(cluster)
    assert stored(cluster) == {}


def test_a_terminating_namespace_is_not_prepared_again_until_it_is_gone(
    cluster: Cluster, namespaces: buyers.BuyerNamespaces
) -> None:
    ensure(namespaces)
    hold(cluster)
    namespaces.remove(CONTRACT)
    before, tokens = revision(cluster), cluster.emulator.issued_tokens
    with pytest.raises(errors.NamespaceTerminatingError, match=f"namespace {NAMESPACE} is being"):
        ensure(namespaces)
    assert (revision(cluster), cluster.emulator.issued_tokens) == (before, tokens)
    release(cluster)
    assert ensure(namespaces) == ALL_WRITTEN


def test_listed_finds_exactly_the_namespaces_the_operator_made(
    cluster: Cluster, namespaces: buyers.BuyerNamespaces
) -> None:
    assert namespaces.listed() == {}
    ensure(namespaces)
    namespaces.ensure("ex-2-4e5f6a7b", "other", 8, END, NOW)
    cluster.core.create_namespace({"metadata": {"name": "team-a"}})
    labelled = {resources.LABEL_CONTRACT: "ex-3-00000000"}
    cluster.core.create_namespace({"metadata": {"name": "gpud-ex-3", "labels": labelled}})
    assert namespaces.listed() == {NAMESPACE: CONTRACT, "gpud-ex-2-4e5f6a7b": "ex-2-4e5f6a7b"}


def test_the_adapter_uses_exactly_these_permissions(
    cluster: Cluster, namespaces: buyers.BuyerNamespaces
) -> None:
    ensure(namespaces)
    ensure(namespaces, end_s=END + 3_600)
    namespaces.listed()
    namespaces.remove(CONTRACT)
    assert cluster.emulator.accesses_by(AGENT) == {
        ("get", "", "namespaces"),
        ("create", "", "namespaces"),
        ("list", "", "namespaces"),
        ("delete", "", "namespaces"),
        ("get", "", "resourcequotas"),
        ("create", "", "resourcequotas"),
        ("get", "networking.k8s.io", "networkpolicies"),
        ("create", "networking.k8s.io", "networkpolicies"),
        ("get", "", "serviceaccounts"),
        ("create", "", "serviceaccounts"),
        ("create", "", "serviceaccounts/token"),
        ("get", "rbac.authorization.k8s.io", "rolebindings"),
        ("create", "rbac.authorization.k8s.io", "rolebindings"),
        ("get", "", "secrets"),
        ("create", "", "secrets"),
        ("update", "", "secrets"),
    }
