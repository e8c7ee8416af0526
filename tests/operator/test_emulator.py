"""The emulated API server the operator is tested against (tests/utils/kube.py): each
behaviour it adds to kmock, exercised through the official `kubernetes` client over HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import itertools
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol, cast

import kmock
import kopf
import pytest
import urllib3
from hypothesis import given
from hypothesis import strategies as st
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from utils import kube
from utils.polling import poll

NOW = datetime.datetime(2026, 3, 3, 12, 0, tzinfo=datetime.UTC)
NS = "team-a"
GROUP, VERSION, CONTRACTS = "gpudelivery.io", "v1alpha1", "computecontracts"


class Model(Protocol):
    def to_dict(self, serialize: bool = False) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class Cluster:
    emulator: kube.ClusterEmulator
    url: str
    core: client.CoreV1Api
    custom: client.CustomObjectsApi
    policy: client.PolicyV1Api


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with kube.running_cluster() as (emulator, url):
        emulator.clock = lambda: NOW
        api = kube.api_client(url)
        yield Cluster(
            emulator,
            url,
            client.CoreV1Api(api),
            client.CustomObjectsApi(api),
            client.PolicyV1Api(api),
        )


def wire(model: Model) -> dict[str, Any]:
    """A client's model as the server sent it (camelCase, no unset fields)."""
    return cast(dict[str, Any], _pruned(model.to_dict(serialize=True)))


def _pruned(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _pruned(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_pruned(item) for item in value]
    return value


def names(listing: Model) -> list[str]:
    return [item["metadata"]["name"] for item in wire(listing)["items"]]


def version(model: Model) -> int:
    return int(wire(model)["metadata"]["resourceVersion"])


def refusal(call: Callable[[], object]) -> tuple[int, dict[str, Any]]:
    """The HTTP status and Status body of a request the server refuses."""
    with pytest.raises(ApiException) as caught:
        call()
    assert caught.value.body is not None
    return caught.value.status, json.loads(caught.value.body)


def pod(
    name: str,
    namespace: str = NS,
    *,
    labels: dict[str, str] | None = None,
    phase: str = "Running",
    node: str | None = None,
    finalizers: list[str] | None = None,
) -> client.V1Pod:
    return client.V1Pod(
        api_version="v1",
        kind="Pod",
        metadata=client.V1ObjectMeta(
            name=name, namespace=namespace, labels=labels, finalizers=finalizers
        ),
        spec=client.V1PodSpec(
            node_name=node, containers=[client.V1Container(name="main", image="train:1")]
        ),
        status=client.V1PodStatus(phase=phase),
    )


def contract(name: str = "c1", **status: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ComputeContract",
        "metadata": {"name": name},
        "spec": {"contractId": "EX-1", "instrument": "H100-SXM-80GB", "gpuCount": 8},
    }
    if status:
        body["status"] = status
    return body


def read_contract(cluster: Cluster, name: str = "c1") -> dict[str, Any]:
    return cast(
        dict[str, Any], cluster.custom.get_cluster_custom_object(GROUP, VERSION, CONTRACTS, name)
    )


# -- routes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/api/v1/namespaces", kube.Route("", "v1", "namespaces")),
        ("/api/v1/namespaces/a", kube.Route("", "v1", "namespaces", name="a")),
        ("/api/v1/namespaces/a/status", kube.Route("", "v1", "namespaces", None, "a", "status")),
        ("/api/v1/namespaces/a/pods", kube.Route("", "v1", "pods", "a")),
        (
            "/api/v1/namespaces/a/pods/p/eviction",
            kube.Route("", "v1", "pods", "a", "p", "eviction"),
        ),
        ("/apis/gpudelivery.io/v1alpha1", kube.Route("gpudelivery.io", "v1alpha1", None)),
        (
            "/apis/gpudelivery.io/v1alpha1/computecontracts/c/status",
            kube.Route("gpudelivery.io", "v1alpha1", "computecontracts", None, "c", "status"),
        ),
        ("/version", None),
    ],
)
def test_a_path_routes_to_its_resource_namespace_name_and_subresource(
    path: str, route: kube.Route | None
) -> None:
    assert kube.parse_route(path) == route


def test_namespaces_are_created_listed_and_read_like_any_resource(cluster: Cluster) -> None:
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NS)))
    assert names(cluster.core.list_namespace()) == [NS]
    assert wire(cluster.core.read_namespace(NS))["status"] == {"phase": "Active"}
    assert wire(cluster.core.read_namespace_status(NS))["metadata"]["name"] == NS


# -- label and field selectors --------------------------------------------------------------

POPULATION = {
    "a": {"app": "web", "tier": "front"},
    "b": {"app": "web", "tier": "back"},
    "c": {"app": "db", "tier": "back", "gpudelivery.io/contract": "c1"},
    "d": {},
    "e": {"app": "batch", "tier": ""},
}


@pytest.mark.parametrize(
    ("selector", "selected"),
    [
        ("", ["a", "b", "c", "d", "e"]),
        ("app=web", ["a", "b"]),
        ("app==web", ["a", "b"]),
        ("app!=web", ["c", "d", "e"]),
        ("app in (web, db)", ["a", "b", "c"]),
        ("app notin (web)", ["c", "d", "e"]),
        ("tier", ["a", "b", "c", "e"]),
        ("!tier", ["d"]),
        ("tier=", ["e"]),
        ("gpudelivery.io/contract", ["c"]),
        ("app = web , tier=back", ["b"]),
        ("app in (web,db),!gpudelivery.io/contract,tier notin (front)", ["b"]),
    ],
)
def test_a_label_selector_lists_exactly_the_pods_it_selects(
    cluster: Cluster, selector: str, selected: list[str]
) -> None:
    for name, labels in POPULATION.items():
        cluster.core.create_namespaced_pod(NS, pod(name, labels=labels))
    assert names(cluster.core.list_namespaced_pod(NS, label_selector=selector)) == selected


@pytest.mark.parametrize(
    "selector",
    [
        "app in ()",
        "app in (web",
        "app=web)",
        "app=we b",
        "app,,tier",
        "app,",
        "!",
        "-app=web",
        "app=web=1",
        "a/b/c=web",
        "app=" + "x" * 64,
        "app in ((web))",
    ],
)
def test_a_malformed_label_selector_is_a_bad_request(cluster: Cluster, selector: str) -> None:
    status, body = refusal(lambda: cluster.core.list_namespaced_pod(NS, label_selector=selector))
    assert (status, body["reason"]) == (400, "BadRequest")


@pytest.mark.parametrize(
    ("selector", "selected"),
    [
        ("spec.nodeName=n1", ["team-a/a", "team-b/c"]),
        ("spec.nodeName==n1,status.phase=Running", ["team-a/a"]),
        ("spec.nodeName!=n1", ["team-a/b", "team-b/d"]),
        ("spec.nodeName=", ["team-b/d"]),
        ("status.phase!=Running", ["team-b/c", "team-b/d"]),
        ("metadata.namespace=team-b", ["team-b/c", "team-b/d"]),
        ("metadata.name=b,metadata.namespace=team-a", ["team-a/b"]),
        ("metadata.name=a,,", ["team-a/a"]),
    ],
)
def test_a_field_selector_lists_exactly_the_pods_it_selects(
    cluster: Cluster, selector: str, selected: list[str]
) -> None:
    cluster.core.create_namespaced_pod("team-a", pod("a", "team-a", node="n1"))
    cluster.core.create_namespaced_pod("team-a", pod("b", "team-a", node="n2"))
    cluster.core.create_namespaced_pod("team-b", pod("c", "team-b", node="n1", phase="Pending"))
    cluster.core.create_namespaced_pod("team-b", pod("d", "team-b", phase="Pending"))
    listing = wire(cluster.core.list_pod_for_all_namespaces(field_selector=selector))
    found = [
        f"{item['metadata']['namespace']}/{item['metadata']['name']}" for item in listing["items"]
    ]
    assert found == selected


def test_nodes_are_selected_by_whether_they_are_cordoned(cluster: Cluster) -> None:
    for name, unschedulable in (("n1", True), ("n2", False), ("n3", None)):
        spec = client.V1NodeSpec(unschedulable=unschedulable)
        cluster.core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=name), spec=spec))
    assert names(cluster.core.list_node(field_selector="spec.unschedulable=true")) == ["n1"]
    assert names(cluster.core.list_node(field_selector="spec.unschedulable=false")) == ["n2", "n3"]


@pytest.mark.parametrize(
    "selector",
    ["spec.nodeName", "spec.hostname=n1", "spec.nodeName=n\\1", "spec.nodeName=a=b", "x\\"],
)
def test_a_malformed_or_unsupported_field_selector_is_a_bad_request(
    cluster: Cluster, selector: str
) -> None:
    status, body = refusal(
        lambda: cluster.core.list_pod_for_all_namespaces(field_selector=selector)
    )
    assert (status, body["reason"]) == (400, "BadRequest")


LABEL_KEYS = ("app", "tier", "gpudelivery.io/contract")
LABEL_VALUES = ("", "web", "db", "x-1")
Requirement = tuple[str, str, tuple[str, ...]]
requirements = st.one_of(
    st.tuples(
        st.sampled_from(LABEL_KEYS),
        st.sampled_from(["=", "==", "!="]),
        st.sampled_from(LABEL_VALUES).map(lambda value: (value,)),
    ),
    st.tuples(
        st.sampled_from(LABEL_KEYS),
        st.sampled_from(["in", "notin"]),
        st.lists(st.sampled_from(LABEL_VALUES[1:]), min_size=1, max_size=3).map(tuple),
    ),
    st.tuples(st.sampled_from(LABEL_KEYS), st.sampled_from(["", "!"]), st.just(())),
)


def spelled(requirement: Requirement, space: str) -> str:
    key, operator, values = requirement
    if operator in ("", "!"):
        return f"{operator}{space}{key}"
    if operator in ("in", "notin"):
        return f"{key} {operator}{space}({f',{space}'.join(values)})"
    return f"{key}{space}{operator}{space}{values[0]}"


def holds(requirement: Requirement, labels: dict[str, str]) -> bool:
    """The oracle: what a requirement means, straight from the Kubernetes docs."""
    key, operator, values = requirement
    if operator == "":
        return key in labels
    if operator == "!":
        return key not in labels
    if operator in ("=", "==", "in"):
        return key in labels and labels[key] in values
    return key not in labels or labels[key] not in values


def test_label_selectors_select_what_the_oracle_says(cluster: Cluster) -> None:
    namespaces = (f"prop-{index}" for index in itertools.count())

    @given(
        label_sets=st.lists(
            st.dictionaries(st.sampled_from(LABEL_KEYS), st.sampled_from(LABEL_VALUES)),
            max_size=5,
        ),
        selector=st.lists(requirements, max_size=3),
        space=st.sampled_from(["", " "]),
    )
    def check(label_sets: list[dict[str, str]], selector: list[Requirement], space: str) -> None:
        namespace = next(namespaces)
        for index, labels in enumerate(label_sets):
            cluster.core.create_namespaced_pod(
                namespace, pod(f"p{index}", namespace, labels=labels)
            )
        text = ",".join(spelled(requirement, space) for requirement in selector)
        expected = [
            f"p{index}"
            for index, labels in enumerate(label_sets)
            if all(holds(requirement, labels) for requirement in selector)
        ]
        assert names(cluster.core.list_namespaced_pod(namespace, label_selector=text)) == expected

    check()


def test_deletecollection_deletes_only_the_selected_pods(cluster: Cluster) -> None:
    for name, labels in POPULATION.items():
        cluster.core.create_namespaced_pod(NS, pod(name, labels=labels))
    cluster.core.delete_collection_namespaced_pod(NS, label_selector="tier=back")
    assert names(cluster.core.list_namespaced_pod(NS)) == ["a", "d", "e"]


# -- watches --------------------------------------------------------------------------------


def watch(
    cluster: Cluster, *, until: str, selector: str, since: str | None = None
) -> Iterator[tuple[str, str]]:
    """(event type, pod name) of a watch of the namespace, up to the event naming `until`.
    The server ends the stream after 30 s if that never comes (a deadline, not a timing)."""
    stream = cast(
        urllib3.BaseHTTPResponse,  # what the client answers without preloading the content
        cluster.core.list_namespaced_pod(
            NS,
            watch=True,
            label_selector=selector,
            resource_version=since,
            timeout_seconds=30,
            _preload_content=False,
        ),
    )
    try:
        for line in stream:
            event = json.loads(line)
            name = event["object"]["metadata"]["name"]
            yield event["type"], name
            if name == until:
                return
    finally:
        stream.release_conn()


def test_a_watch_replays_changes_as_the_selection_sees_them(cluster: Cluster) -> None:
    core = cluster.core
    core.create_namespaced_pod(NS, pod("before", labels={"app": "web"}))
    since = wire(core.list_namespaced_pod(NS))["metadata"]["resourceVersion"]
    core.create_namespaced_pod(NS, pod("a", labels={"app": "web"}))
    core.create_namespaced_pod(NS, pod("b", labels={"app": "db"}))
    core.patch_namespaced_pod("a", NS, {"metadata": {"labels": {"app": "db"}}})
    core.patch_namespaced_pod("b", NS, {"metadata": {"labels": {"app": "web"}}})
    core.patch_namespaced_pod("b", NS, {"metadata": {"annotations": {"seen": "yes"}}})
    core.delete_namespaced_pod("a", NS)
    core.delete_namespaced_pod("b", NS)
    core.create_namespaced_pod(NS, pod("last", labels={"app": "web"}))
    assert list(watch(cluster, selector="app=web", since=since, until="last")) == [
        ("ADDED", "a"),
        ("DELETED", "a"),
        ("ADDED", "b"),
        ("MODIFIED", "b"),
        ("DELETED", "b"),
        ("ADDED", "last"),
    ]


def test_a_watch_without_a_version_starts_with_the_selected_pods_then_follows(
    cluster: Cluster,
) -> None:
    core = cluster.core
    core.create_namespaced_pod(NS, pod("a", labels={"app": "web"}))
    core.create_namespaced_pod(NS, pod("b", labels={"app": "db"}))
    seen = []
    for event in watch(cluster, selector="app=web", until="c"):
        seen.append(event)
        if event == ("ADDED", "a"):
            core.create_namespaced_pod(NS, pod("skipped", labels={"app": "db"}))
            core.create_namespaced_pod(NS, pod("c", labels={"app": "web"}))
    assert seen == [("ADDED", "a"), ("ADDED", "c")]


# -- resourceVersion ------------------------------------------------------------------------


def test_every_write_gives_a_newer_resource_version_and_a_list_the_latest(
    cluster: Cluster,
) -> None:
    core = cluster.core
    created = version(core.create_namespaced_pod(NS, pod("a")))
    patched = version(core.patch_namespaced_pod("a", NS, {"metadata": {"labels": {"k": "v"}}}))
    replaced = version(core.replace_namespaced_pod("a", NS, pod("a", labels={"k": "w"})))
    status = version(core.patch_namespaced_pod_status("a", NS, {"status": {"phase": "Failed"}}))
    assert created < patched < replaced < status
    assert version(core.list_namespaced_pod(NS)) == status
    assert version(core.read_namespaced_pod("a", NS)) == status


def test_a_write_that_changes_nothing_keeps_the_version(cluster: Cluster) -> None:
    core = cluster.core
    created = version(core.create_namespaced_pod(NS, pod("a", labels={"k": "v"})))
    assert version(core.patch_namespaced_pod("a", NS, {"metadata": {"labels": {"k": "v"}}})) == (
        created
    )
    assert version(core.list_namespaced_pod(NS)) == created


def test_a_replace_with_a_stale_resource_version_is_a_conflict(cluster: Cluster) -> None:
    core = cluster.core
    stale = wire(core.create_namespaced_pod(NS, pod("a")))["metadata"]["resourceVersion"]
    core.patch_namespaced_pod("a", NS, {"metadata": {"labels": {"k": "v"}}})
    body = pod("a", labels={"k": "w"})
    assert body.metadata is not None
    body.metadata.resource_version = stale
    status, refused = refusal(lambda: core.replace_namespaced_pod("a", NS, body))
    assert (status, refused["reason"], refused["details"]) == (
        409,
        "Conflict",
        {"name": "a", "kind": "pods"},
    )
    assert wire(core.read_namespaced_pod("a", NS))["metadata"]["labels"] == {"k": "v"}


@pytest.mark.parametrize(
    "content_type", [kube.STRATEGIC_MERGE, kube.MERGE_PATCH], ids=["strategic", "merge"]
)
def test_a_patch_carrying_a_stale_resource_version_is_a_conflict(
    cluster: Cluster, content_type: str
) -> None:
    core = cluster.core
    stale = wire(core.create_namespaced_pod(NS, pod("a")))["metadata"]["resourceVersion"]
    core.patch_namespaced_pod("a", NS, {"metadata": {"labels": {"k": "v"}}})
    patch = {"metadata": {"resourceVersion": stale, "labels": {"k": "w"}}}
    status, refused = refusal(
        lambda: core.patch_namespaced_pod("a", NS, patch, _content_type=content_type)
    )
    assert (status, refused["reason"]) == (409, "Conflict")
    current = wire(core.read_namespaced_pod("a", NS))["metadata"]["resourceVersion"]
    patch["metadata"]["resourceVersion"] = current
    patched = core.patch_namespaced_pod("a", NS, patch, _content_type=content_type)
    assert wire(patched)["metadata"]["labels"] == {"k": "w"}


def test_a_json_patch_is_a_conflict_on_a_stale_version_and_invalid_on_a_failed_test(
    cluster: Cluster,
) -> None:
    core = cluster.core
    stale = wire(core.create_namespaced_pod(NS, pod("a")))["metadata"]["resourceVersion"]
    core.patch_namespaced_pod("a", NS, {"metadata": {"labels": {"k": "v"}}})
    replace = [{"op": "replace", "path": "/metadata/resourceVersion", "value": stale}]
    assert refusal(lambda: core.patch_namespaced_pod("a", NS, replace))[0] == 409
    test = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": stale},
        {"op": "add", "path": "/metadata/labels/k", "value": "w"},
    ]
    assert refusal(lambda: core.patch_namespaced_pod("a", NS, test))[0] == 422
    assert wire(core.read_namespaced_pod("a", NS))["metadata"]["labels"] == {"k": "v"}


def test_writes_without_a_resource_version_are_unconditional(cluster: Cluster) -> None:
    core = cluster.core
    core.create_namespaced_pod(NS, pod("a"))
    core.patch_namespaced_pod("a", NS, {"metadata": {"labels": {"k": "v"}}})
    replaced = core.replace_namespaced_pod("a", NS, pod("a", labels={"k": "w"}))
    patched = core.patch_namespaced_pod("a", NS, {"metadata": {"labels": {"x": "y"}}})
    assert wire(replaced)["metadata"]["labels"] == {"k": "w"}
    assert wire(patched)["metadata"]["labels"] == {"k": "w", "x": "y"}


def test_a_delete_precondition_on_a_stale_version_is_a_conflict(cluster: Cluster) -> None:
    core = cluster.core
    stale = wire(core.create_namespaced_pod(NS, pod("a")))["metadata"]["resourceVersion"]
    core.patch_namespaced_pod("a", NS, {"metadata": {"labels": {"k": "v"}}})
    options = client.V1DeleteOptions(preconditions=client.V1Preconditions(resource_version=stale))
    assert refusal(lambda: core.delete_namespaced_pod("a", NS, body=options))[0] == 409
    assert names(core.list_namespaced_pod(NS)) == ["a"]


# -- the status subresource -----------------------------------------------------------------


def test_a_custom_resource_status_is_written_only_through_its_subresource(
    cluster: Cluster,
) -> None:
    custom = cluster.custom
    custom.create_cluster_custom_object(GROUP, VERSION, CONTRACTS, contract(phase="Forged"))
    assert "status" not in read_contract(cluster)

    both = {"spec": {"gpuCount": 16}, "status": {"phase": "Forged"}}
    custom.patch_cluster_custom_object(GROUP, VERSION, CONTRACTS, "c1", both)
    assert (read_contract(cluster)["spec"]["gpuCount"], "status" in read_contract(cluster)) == (
        16,
        False,
    )

    both = {"spec": {"gpuCount": 24}, "status": {"phase": "Booked"}}
    custom.patch_cluster_custom_object_status(GROUP, VERSION, CONTRACTS, "c1", both)
    stored = read_contract(cluster)
    assert (stored["spec"]["gpuCount"], stored["status"]) == (16, {"phase": "Booked"})

    replacement = contract(phase="Forged")
    replacement["spec"]["gpuCount"] = 32
    custom.replace_cluster_custom_object(GROUP, VERSION, CONTRACTS, "c1", replacement)
    stored = read_contract(cluster)
    assert (stored["spec"]["gpuCount"], stored["status"]) == (32, {"phase": "Booked"})

    replacement = contract(phase="Delivering")
    custom.replace_cluster_custom_object_status(GROUP, VERSION, CONTRACTS, "c1", replacement)
    stored = read_contract(cluster)
    assert (stored["spec"]["gpuCount"], stored["status"]) == (32, {"phase": "Delivering"})


def test_a_node_patch_keeps_its_status_and_a_status_patch_its_labels(cluster: Cluster) -> None:
    core = cluster.core
    ready = client.V1NodeCondition(type="Ready", status="True")
    node = client.V1Node(
        metadata=client.V1ObjectMeta(name="n1", labels={"zone": "a"}),
        status=client.V1NodeStatus(conditions=[ready]),
    )
    core.create_node(node)
    core.patch_node("n1", {"metadata": {"labels": {"zone": "b"}}, "status": {"phase": "Gone"}})
    core.patch_node_status("n1", {"metadata": {"labels": {"zone": "c"}}, "status": {"phase": "Up"}})
    stored = wire(core.read_node("n1"))
    assert (stored["metadata"]["labels"], stored["status"]) == (
        {"zone": "b"},
        {"conditions": [{"status": "True", "type": "Ready"}], "phase": "Up"},
    )


def test_a_strategic_merge_patch_of_a_custom_resource_is_unsupported(cluster: Cluster) -> None:
    cluster.custom.create_cluster_custom_object(GROUP, VERSION, CONTRACTS, contract())
    status, refused = refusal(
        lambda: cluster.custom.patch_cluster_custom_object(
            GROUP,
            VERSION,
            CONTRACTS,
            "c1",
            {"spec": {"gpuCount": 16}},
            _content_type=kube.STRATEGIC_MERGE,
        )
    )
    assert (status, refused["reason"]) == (415, "UnsupportedMediaType")


def test_a_crd_created_through_the_api_is_served_from_then_on(cluster: Cluster) -> None:
    widgets = ("example.io", "v1", "widgets")
    assert refusal(lambda: cluster.custom.list_cluster_custom_object(*widgets))[0] == 404
    crd = client.V1CustomResourceDefinition(
        metadata=client.V1ObjectMeta(name="widgets.example.io"),
        spec=client.V1CustomResourceDefinitionSpec(
            group="example.io",
            scope="Namespaced",
            names=client.V1CustomResourceDefinitionNames(
                kind="Widget", plural="widgets", singular="widget"
            ),
            versions=[
                client.V1CustomResourceDefinitionVersion(
                    name="v1",
                    served=True,
                    storage=True,
                    subresources=client.V1CustomResourceSubresources(status={}),
                )
            ],
        ),
    )
    client.ApiextensionsV1Api(cluster.core.api_client).create_custom_resource_definition(crd)
    widget = {"apiVersion": "example.io/v1", "kind": "Widget", "metadata": {"name": "w"}}
    cluster.custom.create_namespaced_custom_object("example.io", "v1", NS, "widgets", widget)
    listing = cast(dict[str, Any], cluster.custom.list_cluster_custom_object(*widgets))
    assert [
        (item["metadata"]["namespace"], item["metadata"]["name"]) for item in listing["items"]
    ] == [(NS, "w")]


# -- evictions ------------------------------------------------------------------------------


def budget(name: str, **spec: Any) -> client.V1PodDisruptionBudget:
    return client.V1PodDisruptionBudget(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1PodDisruptionBudgetSpec(
            selector=client.V1LabelSelector(match_labels={"app": "web"}), **spec
        ),
    )


def evict(cluster: Cluster, name: str) -> tuple[int, dict[str, Any]]:
    """Evict a pod: the HTTP status and Status body of the answer, refused or not."""
    eviction = client.V1Eviction(metadata=client.V1ObjectMeta(name=name, namespace=NS))
    try:
        _, status, _ = cluster.core.create_namespaced_pod_eviction_with_http_info(
            name, NS, eviction
        )
    except ApiException as exc:
        refused = exc
    else:
        return status, {}
    return refused.status, json.loads(refused.body or "{}")


def test_an_eviction_the_budget_forbids_is_refused_until_the_budget_allows_it(
    cluster: Cluster,
) -> None:
    for name in ("web-0", "web-1"):
        cluster.core.create_namespaced_pod(NS, pod(name, labels={"app": "web"}))
    cluster.core.create_namespaced_pod(NS, pod("other", labels={"app": "db"}))
    cluster.policy.create_namespaced_pod_disruption_budget(NS, budget("web", min_available=2))

    status, refused = evict(cluster, "web-0")
    assert (status, refused["reason"], refused["message"], refused["details"]) == (
        429,
        "TooManyRequests",
        "Cannot evict pod as it would violate the pod's disruption budget.",
        {
            "causes": [
                {
                    "reason": "DisruptionBudget",
                    "message": "The disruption budget web needs 2 healthy pods and has 2 currently",
                }
            ]
        },
    )
    assert names(cluster.core.list_namespaced_pod(NS)) == ["other", "web-0", "web-1"]

    cluster.core.create_namespaced_pod(NS, pod("web-2", labels={"app": "web"}))
    assert evict(cluster, "web-0") == (201, {})
    assert names(cluster.core.list_namespaced_pod(NS)) == ["other", "web-1", "web-2"]
    assert evict(cluster, "web-1")[0] == 429
    assert evict(cluster, "other") == (201, {})


@pytest.mark.parametrize(
    ("spec", "evictions"),
    [
        ({"min_available": 1}, 2),
        ({"min_available": "50%"}, 2),
        ({"min_available": "100%"}, 0),
        ({"max_unavailable": 0}, 0),
        ({"max_unavailable": 1}, 3),
        ({"max_unavailable": "25%"}, 3),
    ],
)
def test_a_budget_allows_as_many_evictions_as_its_spec_says(
    cluster: Cluster, spec: dict[str, Any], evictions: int
) -> None:
    for index in range(3):
        cluster.core.create_namespaced_pod(NS, pod(f"web-{index}", labels={"app": "web"}))
    cluster.policy.create_namespaced_pod_disruption_budget(NS, budget("web", **spec))
    statuses = [evict(cluster, f"web-{index}")[0] for index in range(3)]
    assert statuses == [201] * evictions + [429] * (3 - evictions)


def test_an_evicted_pod_with_a_finalizer_terminates_and_no_longer_counts_as_healthy(
    cluster: Cluster,
) -> None:
    for index in range(3):
        held = pod(f"web-{index}", labels={"app": "web"}, finalizers=["example.io/hold"])
        cluster.core.create_namespaced_pod(NS, held)
    cluster.policy.create_namespaced_pod_disruption_budget(NS, budget("web", min_available=2))
    assert evict(cluster, "web-0") == (201, {})
    terminating = wire(cluster.core.read_namespaced_pod("web-0", NS))["metadata"]
    assert terminating["deletionTimestamp"] == NOW
    assert evict(cluster, "web-1")[0] == 429


def test_a_pod_two_budgets_select_cannot_be_evicted(cluster: Cluster) -> None:
    cluster.core.create_namespaced_pod(NS, pod("web-0", labels={"app": "web"}))
    cluster.policy.create_namespaced_pod_disruption_budget(NS, budget("one", max_unavailable=1))
    cluster.policy.create_namespaced_pod_disruption_budget(NS, budget("two", max_unavailable=1))
    status, refused = evict(cluster, "web-0")
    assert (status, refused["message"]) == (
        500,
        "This pod has more than one PodDisruptionBudget, "
        "which the eviction subresource does not support.",
    )
    assert names(cluster.core.list_namespaced_pod(NS)) == ["web-0"]


def test_a_pending_pod_is_evicted_whatever_its_budget_and_a_missing_one_is_not_found(
    cluster: Cluster,
) -> None:
    cluster.core.create_namespaced_pod(NS, pod("web-0", labels={"app": "web"}, phase="Pending"))
    cluster.policy.create_namespaced_pod_disruption_budget(NS, budget("web", min_available=5))
    assert evict(cluster, "web-0") == (201, {})
    status, refused = evict(cluster, "web-0")
    assert (status, refused["reason"], refused["message"]) == (
        404,
        "NotFound",
        'pods "web-0" not found',
    )


# -- token requests -------------------------------------------------------------------------


def token_request(seconds: int | None, audiences: list[str]) -> client.AuthenticationV1TokenRequest:
    return client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=audiences, expiration_seconds=seconds)
    )


def test_a_token_request_answers_a_fresh_token_expiring_after_the_requested_time(
    cluster: Cluster,
) -> None:
    account = client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="buyer"))
    cluster.core.create_namespaced_service_account(NS, account)
    first = wire(
        cluster.core.create_namespaced_service_account_token(
            "buyer", NS, token_request(7200, ["gpudelivery"])
        )
    )
    second = wire(
        cluster.core.create_namespaced_service_account_token("buyer", NS, token_request(None, []))
    )
    expires = NOW + datetime.timedelta(hours=2)
    assert first["status"]["expirationTimestamp"] == expires
    assert second["status"]["expirationTimestamp"] == NOW + datetime.timedelta(hours=1)
    assert cluster.emulator.issued_tokens == {
        first["status"]["token"]: kube.IssuedToken(NS, "buyer", ("gpudelivery",), expires),
        second["status"]["token"]: kube.IssuedToken(
            NS,
            "buyer",
            ("https://kubernetes.default.svc.cluster.local",),
            NOW + datetime.timedelta(hours=1),
        ),
    }


def test_a_token_for_a_missing_account_is_not_found_and_a_short_one_invalid(
    cluster: Cluster,
) -> None:
    core = cluster.core
    missing = refusal(
        lambda: core.create_namespaced_service_account_token("nobody", NS, token_request(600, []))
    )
    assert missing[0] == 404
    core.create_namespaced_service_account(
        NS, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="buyer"))
    )
    short = refusal(
        lambda: core.create_namespaced_service_account_token("buyer", NS, token_request(599, []))
    )
    assert (short[0], short[1]["reason"]) == (422, "Invalid")
    assert cluster.emulator.issued_tokens == {}


# -- namespace deletion ---------------------------------------------------------------------


def fill_namespace(cluster: Cluster, namespace: str) -> None:
    api = cluster.core.api_client
    meta = client.V1ObjectMeta(name="buyer", namespace=namespace)
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    cluster.core.create_namespaced_pod(namespace, pod("train-0", namespace))
    cluster.core.create_namespaced_resource_quota(namespace, client.V1ResourceQuota(metadata=meta))
    cluster.core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=meta)
    )
    cluster.core.create_namespaced_secret(namespace, client.V1Secret(metadata=meta))
    client.RbacAuthorizationV1Api(api).create_namespaced_role_binding(
        namespace,
        client.V1RoleBinding(
            metadata=meta,
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io", kind="ClusterRole", name="edit"
            ),
        ),
    )
    client.NetworkingV1Api(api).create_namespaced_network_policy(
        namespace, client.V1NetworkPolicy(metadata=meta)
    )


def namespaced_objects(cluster: Cluster) -> list[tuple[str, str | None, str]]:
    return sorted(
        (key[0].plural or "", key[1], key[2])
        for key, obj in cluster.emulator.objects.items()
        if key[1] is not None and not obj.deleted
    )


def test_deleting_a_namespace_deletes_everything_in_it(cluster: Cluster) -> None:
    fill_namespace(cluster, "gpud-c1")
    fill_namespace(cluster, "gpud-c2")
    cluster.core.delete_namespace("gpud-c1")
    assert names(cluster.core.list_namespace()) == ["gpud-c2"]
    assert namespaced_objects(cluster) == [
        ("networkpolicies", "gpud-c2", "buyer"),
        ("pods", "gpud-c2", "train-0"),
        ("resourcequotas", "gpud-c2", "buyer"),
        ("rolebindings", "gpud-c2", "buyer"),
        ("secrets", "gpud-c2", "buyer"),
        ("serviceaccounts", "gpud-c2", "buyer"),
    ]
    assert names(cluster.core.list_namespaced_pod("gpud-c1")) == []


def test_a_namespace_terminates_until_its_last_object_goes_and_takes_nothing_new(
    cluster: Cluster,
) -> None:
    core = cluster.core
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NS)))
    core.create_namespaced_pod(NS, pod("held", finalizers=["example.io/hold"]))
    core.create_namespaced_pod(NS, pod("free"))
    core.delete_namespace(NS)
    assert wire(core.read_namespace(NS))["status"] == {"phase": "Terminating"}
    assert names(core.list_namespaced_pod(NS)) == ["held"]
    status, refused = refusal(lambda: core.create_namespaced_pod(NS, pod("late")))
    assert (status, refused["reason"]) == (403, "Forbidden")
    core.patch_namespaced_pod("held", NS, {"metadata": {"finalizers": None}})
    assert names(core.list_namespaced_pod(NS)) == []
    assert names(core.list_namespace()) == []


def test_a_list_sees_what_was_stored_by_any_way_and_nothing_deleted_or_removed(
    cluster: Cluster,
) -> None:
    pods = kmock.resource("", "v1", "pods")
    core = cluster.core
    core.create_namespaced_pod(NS, pod("created"))
    core.create_namespaced_pod("other", pod("elsewhere", "other"))
    cluster.emulator.objects[(pods, NS, "stored")] = wire(pod("stored"))  # bypasses the store
    core.create_namespaced_pod(NS, pod("deleted"))
    core.delete_namespaced_pod("deleted", NS)
    assert names(core.list_namespaced_pod(NS)) == ["created", "stored"]
    core.create_namespaced_pod(NS, pod("deleted"))  # the same name again
    del cluster.emulator.objects[(pods, NS, "created")]  # as a test may remove one
    assert names(core.list_namespaced_pod(NS)) == ["deleted", "stored"]
    assert names(core.list_pod_for_all_namespaces()) == ["elsewhere", "deleted", "stored"]


# -- the access log -------------------------------------------------------------------------


def test_the_access_log_names_each_request_as_rbac_does(cluster: Cluster) -> None:
    core = cluster.core
    client.CoreApi(core.api_client).get_api_versions()  # discovery: no resource request
    core.create_namespaced_pod(NS, pod("a", labels={"app": "web"}))
    core.read_namespaced_pod("a", NS)
    core.list_pod_for_all_namespaces()
    assert list(watch(cluster, selector="", until="a")) == [("ADDED", "a")]
    core.patch_namespaced_pod("a", NS, {"metadata": {"labels": {"k": "v"}}})
    core.patch_namespaced_pod_status("a", NS, {"status": {"phase": "Running"}})
    core.replace_namespaced_pod("a", NS, pod("a", labels={"app": "web"}))
    assert evict(cluster, "a") == (201, {})
    assert refusal(lambda: core.delete_namespaced_pod("a", NS))[0] == 404  # still a request
    core.delete_collection_namespaced_pod(NS)
    no_account = refusal(
        lambda: core.create_namespaced_service_account_token("a", NS, token_request(600, []))
    )
    assert no_account[0] == 404
    cluster.custom.create_cluster_custom_object(GROUP, VERSION, CONTRACTS, contract())
    cluster.custom.patch_cluster_custom_object_status(
        GROUP, VERSION, CONTRACTS, "c1", {"status": {"phase": "Booked"}}
    )
    assert refusal(lambda: cluster.core.read_node("n1"))[0] == 404
    assert cluster.emulator.access_log == {
        ("create", "", "pods"),
        ("get", "", "pods"),
        ("list", "", "pods"),
        ("watch", "", "pods"),
        ("patch", "", "pods"),
        ("patch", "", "pods/status"),
        ("update", "", "pods"),
        ("create", "", "pods/eviction"),
        ("delete", "", "pods"),
        ("deletecollection", "", "pods"),
        ("create", "", "serviceaccounts/token"),
        ("create", "gpudelivery.io", "computecontracts"),
        ("patch", "gpudelivery.io", "computecontracts/status"),
        ("get", "", "nodes"),
    }


# -- kmock's reactions ----------------------------------------------------------------------


def test_a_reaction_a_test_adds_answers_for_the_server_after_the_write(cluster: Cluster) -> None:
    core = cluster.core
    core.create_namespaced_pod(NS, pod("a"))
    cluster.emulator[kmock.method.PATCH] << 503
    with pytest.raises(ApiException) as caught:
        core.patch_namespaced_pod("a", NS, {"metadata": {"labels": {"k": "v"}}})
    assert caught.value.status == 503
    # As in kmock, the write happened: to the client, a lost answer.
    assert wire(core.read_namespaced_pod("a", NS))["metadata"]["labels"] == {"k": "v"}
    assert names(core.list_namespaced_pod(NS, label_selector="k=v")) == ["a"]


# -- kopf -----------------------------------------------------------------------------------


def test_kopf_handles_a_contract_and_writes_its_status_through_the_subresource(
    cluster: Cluster,
) -> None:
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=cluster.url)

    @kopf.on.create(GROUP, VERSION, CONTRACTS, registry=registry)
    def book(patch: kopf.Patch, **_: Any) -> None:
        patch.status["phase"] = "Booked"

    stop, ready = threading.Event(), threading.Event()

    def run() -> None:
        asyncio.run(
            kopf.operator(
                registry=registry,
                clusterwide=True,
                standalone=True,
                stop_flag=stop,
                ready_flag=ready,
            )
        )

    operator = threading.Thread(target=run, name="kopf")
    operator.start()
    try:
        poll(ready.is_set)
        cluster.custom.create_cluster_custom_object(GROUP, VERSION, CONTRACTS, contract())
        poll(lambda: read_contract(cluster).get("status", {}).get("phase") == "Booked")
    finally:
        stop.set()
        operator.join(timeout=60)
    assert not operator.is_alive()
    assert {
        ("list", GROUP, CONTRACTS),
        ("watch", GROUP, CONTRACTS),
        ("patch", GROUP, CONTRACTS),
        ("patch", GROUP, f"{CONTRACTS}/status"),
    } <= cluster.emulator.access_log
