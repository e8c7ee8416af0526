"""The buyer's namespace of a contract: the exact bodies of its objects, its kubeconfig, and
when its token is renewed."""

from __future__ import annotations

import base64

import pytest
import yaml

from gpudelivery import timefmt
from gpudelivery.operator import tenancy

CONTRACT = "ex-1-0a1b2c3d"
NAMESPACE = "gpud-ex-1-0a1b2c3d"
LABELS = {"gpudelivery.io/contract": CONTRACT, "app.kubernetes.io/managed-by": "gpudelivery"}
END = timefmt.parse_utc("2026-03-03T01:00:00Z", field="end")


def metadata(name: str) -> dict[str, object]:
    return {"name": name, "namespace": NAMESPACE, "labels": LABELS}


def test_the_namespace_is_labelled_with_its_contract_and_names_the_buyer() -> None:
    assert tenancy.namespace(CONTRACT, "acme-ai") == {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": NAMESPACE,
            "labels": {**LABELS, "pod-security.kubernetes.io/enforce": "baseline"},
            "annotations": {"gpudelivery.io/buyer": "acme-ai"},
        },
    }


def test_the_quota_caps_requested_gpus_the_only_way_an_extended_resource_can_be() -> None:
    assert tenancy.resource_quota(CONTRACT, 9) == {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": metadata("gpudelivery-gpus"),
        "spec": {"hard": {"requests.nvidia.com/gpu": "9"}},
    }


def test_the_service_account_is_bound_to_edit_in_its_namespace_only() -> None:
    assert tenancy.service_account(CONTRACT) == {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata("buyer"),
    }
    assert tenancy.role_binding(CONTRACT) == {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": metadata("buyer-edit"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
        "subjects": [{"kind": "ServiceAccount", "name": "buyer", "namespace": NAMESPACE}],
    }


def test_the_network_policy_admits_the_namespace_and_lets_out_dns_and_the_internet() -> None:
    assert tenancy.network_policy(CONTRACT) == {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata("gpudelivery-isolation"),
        "spec": {
            "podSelector": {},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {}}]}],
            "egress": [
                {"to": [{"podSelector": {}}]},
                {
                    "to": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": "kube-system"}
                            }
                        }
                    ],
                    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
                },
                {
                    "to": [
                        {
                            "ipBlock": {
                                "cidr": "0.0.0.0/0",
                                "except": [
                                    "10.0.0.0/8",
                                    "172.16.0.0/12",
                                    "192.168.0.0/16",
                                    "169.254.0.0/16",
                                ],
                            }
                        }
                    ]
                },
            ],
        },
    }


def test_bodies_are_fresh_each_time_so_a_caller_may_change_its_copy() -> None:
    first = tenancy.network_policy(CONTRACT)
    first["spec"]["egress"][1]["ports"][0]["port"] = 5353
    first["spec"]["egress"][2]["to"][0]["ipBlock"]["except"].clear()
    assert tenancy.network_policy(CONTRACT) != first
    assert tenancy.network_policy(CONTRACT)["spec"]["egress"][2]["to"][0]["ipBlock"]["except"]


@pytest.mark.parametrize(("expiration_s", "asked_s"), [(7200, 7200), (600, 600), (1, 600)])
def test_a_token_is_asked_for_the_rest_of_the_window_and_never_under_ten_minutes(
    expiration_s: int, asked_s: int
) -> None:
    assert tenancy.token_request(expiration_s) == {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"expirationSeconds": asked_s},
    }


def test_the_kubeconfig_reaches_the_server_with_the_token_in_the_namespace() -> None:
    text = tenancy.kubeconfig("https://k8s.gpu.example:6443", "Q0E=", NAMESPACE, "t0k", CONTRACT)
    assert text == (
        "apiVersion: v1\n"
        "kind: Config\n"
        "clusters:\n"
        '- name: "ex-1-0a1b2c3d"\n'
        "  cluster:\n"
        '    server: "https://k8s.gpu.example:6443"\n'
        '    certificate-authority-data: "Q0E="\n'
        "users:\n"
        '- name: "ex-1-0a1b2c3d"\n'
        "  user:\n"
        '    token: "t0k"\n'
        "contexts:\n"
        '- name: "ex-1-0a1b2c3d"\n'
        "  context:\n"
        '    cluster: "ex-1-0a1b2c3d"\n'
        '    user: "ex-1-0a1b2c3d"\n'
        '    namespace: "gpud-ex-1-0a1b2c3d"\n'
        'current-context: "ex-1-0a1b2c3d"\n'
    )


def test_the_kubeconfig_is_yaml_whatever_its_values_hold() -> None:
    token = 'a: "b"\n# c\\ é'
    text = tenancy.kubeconfig("https://k8s:6443", None, NAMESPACE, token, CONTRACT)
    assert yaml.safe_load(text) == {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CONTRACT, "cluster": {"server": "https://k8s:6443"}}],
        "users": [{"name": CONTRACT, "user": {"token": token}}],
        "contexts": [
            {
                "name": CONTRACT,
                "context": {"cluster": CONTRACT, "user": CONTRACT, "namespace": NAMESPACE},
            }
        ],
        "current-context": CONTRACT,
    }


def test_the_kubeconfig_secret_says_when_its_token_expires_and_for_which_window() -> None:
    assert tenancy.kubeconfig_secret(CONTRACT, "kind: Config\n", END + 60, window_end_s=END) == {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            **metadata("gpudelivery-buyer"),
            "annotations": {
                "gpudelivery.io/token-expires": "2026-03-03T01:01:00Z",
                "gpudelivery.io/window-end": "2026-03-03T01:00:00Z",
            },
        },
        "type": "Opaque",
        "data": {"kubeconfig": base64.b64encode(b"kind: Config\n").decode()},
    }


def annotations(expires_s: int, window_end_s: int = END) -> dict[str, str]:
    secret = tenancy.kubeconfig_secret(CONTRACT, "", expires_s, window_end_s=window_end_s)
    found: dict[str, str] = secret["metadata"]["annotations"]
    return found


@pytest.mark.parametrize(
    ("found", "end_s", "now_s", "current"),
    [
        pytest.param(annotations(END), END, END - 3600, True, id="issued-for-the-window"),
        pytest.param(annotations(END + 300), END, END - 300, True, id="ten-minutes-at-least"),
        pytest.param(annotations(END), END - 600, END - 3600, True, id="window-shortened"),
        pytest.param(annotations(END), END + 3600, END - 3600, False, id="window-extended"),
        pytest.param(annotations(END - 1800), END, END - 7200, True, id="cut-short-hours-left"),
        pytest.param(annotations(END - 1800), END, END - 2399, False, id="cut-short-expiring"),
        pytest.param(annotations(END - 1800), END, END - 2400, True, id="cut-short-not-yet"),
        pytest.param(annotations(END - 1800), END, END - 60, False, id="expired"),
        pytest.param({}, END, END - 3600, False, id="no-annotations"),
        pytest.param(
            {**annotations(END), "gpudelivery.io/token-expires": "soon"}, END, 0, False, id="bad"
        ),
    ],
)
def test_a_token_is_renewed_only_when_it_does_not_serve_the_window_or_is_about_to_expire(
    found: dict[str, str], end_s: int, now_s: int, current: bool
) -> None:
    assert tenancy.token_is_current(found, end_s, now_s) is current
