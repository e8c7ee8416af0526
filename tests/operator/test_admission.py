"""The admission webhook that pins buyers' pods to their contract's nodes: what a pod gets
(operator/pinning.py), and the operator serving it over HTTPS and keeping the cluster's
MutatingWebhookConfiguration pointing at it (operator/admission.py), against the emulator."""

from __future__ import annotations

import base64
import ipaddress
import json
import ssl
from collections.abc import Mapping
from typing import Any

import httpx
import jsonpatch
import kmock
import kopf
import pydantic
import pytest
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st
from kubernetes import client
from kubernetes.client import ApiException

from gpudelivery import errors
from gpudelivery.operator import admission, pinning, resources, runner
from gpudelivery.operator.settings import OperatorSettings, PeeringSettings, WebhookSettings

from utils.operators import Cluster, running_operator
from utils.patches import merge_patch
from utils.polling import poll

CONTRACT = resources.resource_name("EX-1")
NAMESPACE = f"gpud-{CONTRACT}"
OUR_TOLERATION = {
    "key": "gpudelivery.io/contract",
    "operator": "Equal",
    "value": CONTRACT,
    "effect": "NoSchedule",
}
ADMISSION_GROUP = "admissionregistration.k8s.io"


def pod(namespace: str = NAMESPACE, **spec: Any) -> dict[str, Any]:
    """A buyer's training pod asking for 8 GPUs, with `spec` added."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "train", "namespace": namespace},
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "image": "trainer:1",
                    "resources": {"limits": {"nvidia.com/gpu": "8"}},
                }
            ],
            **spec,
        },
    }


# -- what a pod gets ---------------------------------------------------------------------


def test_a_bare_pod_gets_the_contracts_node_selector_and_toleration() -> None:
    assert pinning.spec_patch(pod(), CONTRACT) == {
        "nodeSelector": {"gpudelivery.io/contract": CONTRACT},
        "tolerations": [OUR_TOLERATION],
    }


def test_the_buyers_own_selectors_and_tolerations_stay() -> None:
    theirs = {"key": "dedicated", "operator": "Exists", "effect": "NoExecute"}
    bare = pod(nodeSelector={"disktype": "ssd"}, tolerations=[theirs])

    patch = pinning.spec_patch(bare, CONTRACT)

    assert patch == {
        "nodeSelector": {"gpudelivery.io/contract": CONTRACT},
        "tolerations": [theirs, OUR_TOLERATION],
    }
    assert merge_patch(bare["spec"], patch) == {
        **bare["spec"],
        "nodeSelector": {"disktype": "ssd", "gpudelivery.io/contract": CONTRACT},
        "tolerations": [theirs, OUR_TOLERATION],
    }


def test_a_pinned_pod_is_unchanged() -> None:
    pinned = pod(nodeSelector={"gpudelivery.io/contract": CONTRACT}, tolerations=[OUR_TOLERATION])
    assert pinning.spec_patch(pinned, CONTRACT) == {}


@pytest.mark.parametrize(
    "toleration",
    [
        {"key": "gpudelivery.io/contract", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "gpudelivery.io/contract", "operator": "Exists"},
        {"operator": "Exists"},
        {"key": "gpudelivery.io/contract", "value": CONTRACT},  # Equal is the default
    ],
)
def test_a_toleration_of_the_buyers_that_covers_the_taint_is_not_doubled(
    toleration: dict[str, str],
) -> None:
    assert pinning.spec_patch(pod(tolerations=[toleration]), CONTRACT) == {
        "nodeSelector": {"gpudelivery.io/contract": CONTRACT}
    }


@pytest.mark.parametrize(
    "toleration",
    [
        {**OUR_TOLERATION, "value": "other-contract-0a1b2c3d"},
        {**OUR_TOLERATION, "effect": "NoExecute"},
        {"key": "gpudelivery.io/quarantine", "operator": "Exists"},
        {"operator": "Exists", "effect": "PreferNoSchedule"},
    ],
)
def test_a_toleration_that_misses_the_taint_gets_ours_added(toleration: dict[str, str]) -> None:
    assert pinning.spec_patch(pod(tolerations=[toleration]), CONTRACT) == {
        "nodeSelector": {"gpudelivery.io/contract": CONTRACT},
        "tolerations": [toleration, OUR_TOLERATION],
    }


def test_a_pod_aiming_at_another_contracts_nodes_is_refused_naming_the_field() -> None:
    other = resources.resource_name("EX-2")
    aiming = pod(nodeSelector={"gpudelivery.io/contract": other})

    with pytest.raises(errors.InputError) as refused:
        pinning.spec_patch(aiming, CONTRACT)

    assert refused.value.field == "spec.nodeSelector[gpudelivery.io/contract]"
    assert str(refused.value) == (
        f"spec.nodeSelector[gpudelivery.io/contract]: selects the nodes of contract "
        f"{other!r}; pods of namespace {NAMESPACE} run on the nodes of contract {CONTRACT!r}"
    )


LABELS = st.sampled_from(["disktype", "zone", "gpudelivery.io/contract"])
TOLERATIONS = st.fixed_dictionaries(
    {},
    optional={
        "key": st.sampled_from(["", "dedicated", "gpudelivery.io/contract"]),
        "operator": st.sampled_from(["Equal", "Exists"]),
        "value": st.sampled_from(["", CONTRACT, "other"]),
        "effect": st.sampled_from(["", "NoSchedule", "NoExecute"]),
    },
)


@given(
    selector=st.dictionaries(LABELS, st.just(CONTRACT), max_size=3),
    tolerations=st.lists(TOLERATIONS, max_size=3),
)
def test_pinning_keeps_what_the_buyer_wrote_and_twice_changes_nothing(
    selector: dict[str, str], tolerations: list[dict[str, str]]
) -> None:
    before = pod(nodeSelector=selector, tolerations=tolerations)

    after = merge_patch(before["spec"], pinning.spec_patch(before, CONTRACT))

    assert after["nodeSelector"] == {**selector, "gpudelivery.io/contract": CONTRACT}
    assert after["tolerations"][: len(tolerations)] == tolerations
    assert len(after["tolerations"]) - len(tolerations) in (0, 1)
    assert pinning.spec_patch({"spec": after}, CONTRACT) == {}


@pytest.mark.parametrize(
    ("namespace", "contract"),
    [
        (resources.namespace_name(CONTRACT), CONTRACT),
        ("gpud-", None),
        ("team-a", None),
        ("kube-system", None),
        (None, None),
    ],
)
def test_the_contract_is_read_from_the_buyers_namespace_name(
    namespace: str | None, contract: str | None
) -> None:
    assert pinning.contract_of_namespace(namespace) == contract


# -- how the API server reaches it -------------------------------------------------------


def test_a_service_host_makes_the_configuration_name_the_service() -> None:
    served = {"url": "https://gpud-webhook.gpudelivery.svc:9443", "caBundle": "Q0E="}
    assert admission.client_config(served, "gpud-webhook.gpudelivery.svc") == {
        "service": {
            "namespace": "gpudelivery",
            "name": "gpud-webhook",
            "port": 9443,
            "path": "/pin-pods",
        },
        "caBundle": "Q0E=",
    }


def test_any_other_host_is_called_by_url() -> None:
    served = {"url": "https://host.docker.internal:9443", "caBundle": "Q0E="}
    assert admission.client_config(served, "host.docker.internal") == {
        "url": "https://host.docker.internal:9443/pin-pods",
        "caBundle": "Q0E=",
    }
    assert admission.client_config({"url": "https://127.0.0.1:9443/"}, None) == {
        "url": "https://127.0.0.1:9443/pin-pods"
    }


def test_the_self_signed_certificate_names_the_service_and_the_address() -> None:
    pem, key = admission.PinningServer.build_certificate(
        ["gpud-webhook.gpudelivery.svc", "127.0.0.1", "0.0.0.0"]
    )

    certificate = x509.load_pem_x509_certificate(pem)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["gpud-webhook.gpudelivery.svc"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert certificate.subject.rfc4514_string() == "CN=gpud-webhook.gpudelivery.svc"
    assert certificate.issuer == certificate.subject
    assert key.startswith(b"-----BEGIN PRIVATE KEY-----")


def test_a_self_signed_certificate_needs_the_operator_to_run_alone() -> None:
    settings = OperatorSettings(peering=PeeringSettings(standalone=False))

    with pytest.raises(kopf.PermanentError, match="GPUDELIVERY_OPERATOR_WEBHOOK__CERT_FILE"):
        admission.configure(kopf.OperatorSettings(), settings)


def test_a_disabled_webhook_configures_no_server() -> None:
    kopf_settings = kopf.OperatorSettings()
    admission.configure(kopf_settings, OperatorSettings(webhook=WebhookSettings(enabled=False)))
    assert kopf_settings.admission.server is None


def test_a_certificate_without_its_key_is_refused() -> None:
    with pytest.raises(pydantic.ValidationError, match="set together"):
        WebhookSettings(cert_file="/etc/webhook/tls.crt")


def test_the_webhooks_requests_carry_the_operators_user_agent() -> None:
    assert admission.USER_AGENT == runner.USER_AGENT


# -- the running operator ----------------------------------------------------------------


def webhook_configuration(cluster: Cluster) -> dict[str, Any] | None:
    """The MutatingWebhookConfiguration the operator keeps, as the API server serves it."""
    api = client.AdmissionregistrationV1Api(cluster.core.api_client)
    try:
        found = api.read_mutating_webhook_configuration(admission.CONFIGURATION)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    served: dict[str, Any] = cluster.core.api_client.sanitize_for_serialization(found)
    return served


def review(request_pod: Mapping[str, Any], uid: str) -> dict[str, Any]:
    """The AdmissionReview the API server sends for the creation of `request_pod`."""
    namespace = request_pod["metadata"]["namespace"]
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": request_pod["metadata"]["name"],
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": f"system:serviceaccount:{namespace}:buyer"},
            "object": request_pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def admitted(webhook: Mapping[str, Any], request_pod: Mapping[str, Any], uid: str) -> Any:
    """The response of the webhook `webhook` (as configured) to the creation of
    `request_pod`, over HTTPS trusting only the configuration's caBundle."""
    config = webhook["clientConfig"]
    trust = ssl.create_default_context(cadata=base64.b64decode(config["caBundle"]).decode())
    with httpx.Client(verify=trust, timeout=10) as http:
        answer = http.post(config["url"], json=review(request_pod, uid))
    answer.raise_for_status()
    assert answer.json()["response"]["uid"] == uid
    return answer.json()["response"]


def test_the_operator_pins_pods_through_the_webhook_it_configures(cluster: Cluster) -> None:
    settings = WebhookSettings(host="127.0.0.1", port=0)
    buyers = pod(nodeSelector={"disktype": "ssd"})
    elsewhere = pod("team-a")
    aiming = pod(nodeSelector={"gpudelivery.io/contract": resources.resource_name("EX-2")})

    with running_operator(cluster, webhook=settings):
        poll(lambda: webhook_configuration(cluster) is not None)
        configuration = webhook_configuration(cluster)
        assert configuration is not None
        (webhook,) = configuration["webhooks"]
        pinned = admitted(webhook, buyers, "1")
        left = admitted(webhook, elsewhere, "2")
        refused = admitted(webhook, aiming, "3")

    url = webhook["clientConfig"]["url"]
    assert url.startswith("https://127.0.0.1:")
    assert url.endswith("/pin-pods")
    assert {key: value for key, value in webhook.items() if key != "clientConfig"} == {
        "name": "pin-pods.gpudelivery.io",
        "admissionReviewVersions": ["v1"],
        "rules": [
            {
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "resources": ["pods"],
                "operations": ["CREATE"],
                "scope": "Namespaced",
            }
        ],
        "namespaceSelector": {
            "matchExpressions": [{"key": "gpudelivery.io/contract", "operator": "Exists"}]
        },
        "failurePolicy": "Fail",
        "matchPolicy": "Equivalent",
        "sideEffects": "None",
        "reinvocationPolicy": "IfNeeded",
        "timeoutSeconds": 10,
    }
    assert set(webhook["clientConfig"]) == {"url", "caBundle"}

    assert (pinned["allowed"], pinned["patchType"]) == (True, "JSONPatch")
    operations = json.loads(base64.b64decode(pinned["patch"]))
    assert jsonpatch.apply_patch(buyers, operations)["spec"] == {
        **buyers["spec"],
        "nodeSelector": {"disktype": "ssd", "gpudelivery.io/contract": CONTRACT},
        "tolerations": [OUR_TOLERATION],
    }
    assert left == {"uid": "2", "allowed": True}
    assert (refused["allowed"], refused["status"]["code"]) == (False, 403)
    assert refused["status"]["message"].startswith(
        "spec.nodeSelector[gpudelivery.io/contract]: selects the nodes of contract"
    )

    # It stays once the operator is gone (failurePolicy Fail: buyers' pods wait for it).
    assert webhook_configuration(cluster) == configuration
    used = cluster.emulator.accesses_by("kopf/", runner.USER_AGENT)
    assert sorted(access for access in used if access.group == ADMISSION_GROUP) == [
        ("create", ADMISSION_GROUP, "mutatingwebhookconfigurations")
    ]
    assert not [access for access in used if access.resource == "pods"]


def test_a_restarted_operator_points_the_configuration_at_its_new_certificate(
    cluster: Cluster,
) -> None:
    settings = WebhookSettings(host="127.0.0.1", port=0)
    served = []
    for _ in range(2):
        with running_operator(cluster, webhook=settings):
            poll(
                lambda: (
                    (found := webhook_configuration(cluster)) is not None
                    and found["webhooks"][0]["clientConfig"] not in served
                )
            )
            configuration = webhook_configuration(cluster)
            assert configuration is not None
            (webhook,) = configuration["webhooks"]
            served.append(webhook["clientConfig"])
            assert admitted(webhook, pod(), "1")["allowed"] is True

    first, second = served
    assert first["caBundle"] != second["caBundle"]
    used = cluster.emulator.accesses_by(runner.USER_AGENT)
    assert sorted(access for access in used if access.group == ADMISSION_GROUP) == [
        ("create", ADMISSION_GROUP, "mutatingwebhookconfigurations"),
        ("patch", ADMISSION_GROUP, "mutatingwebhookconfigurations"),
    ]


def test_a_configuration_write_whose_answer_was_lost_is_retried(cluster: Cluster) -> None:
    path = f"/apis/{ADMISSION_GROUP}/v1/mutatingwebhookconfigurations"
    cluster.emulator[kmock.method.POST][kmock.path(path)][:1] << 503
    create = ("create", ADMISSION_GROUP, "mutatingwebhookconfigurations")
    patch = ("patch", ADMISSION_GROUP, "mutatingwebhookconfigurations")

    def admission_accesses() -> list[tuple[str, str, str]]:
        used = cluster.emulator.accesses_by(runner.USER_AGENT)
        return sorted(access for access in used if access.group == ADMISSION_GROUP)

    with running_operator(cluster, webhook=WebhookSettings(host="127.0.0.1", port=0)):
        poll(lambda: admission_accesses() == [create, patch])
        configuration = webhook_configuration(cluster)
        assert configuration is not None
        (webhook,) = configuration["webhooks"]
        assert admitted(webhook, pod(), "1")["allowed"] is True

    # Created, answered 503; created again, 409; written over with a merge patch.
    assert len(cluster.emulator[kmock.method.POST][kmock.path(path)]) == 2
    (written,) = cluster.emulator[kmock.method.PATCH][kmock.path(f"{path}/gpudelivery.io")]
    # A merge patch writes the webhooks whole (the real server merges a strategic one by name).
    assert written.headers["Content-Type"] == "application/merge-patch+json"
    assert written.data == {"webhooks": configuration["webhooks"]}


def wait_until_the_webhook_is_gone(cluster: Cluster) -> None:
    """Wait for the configuration to be written (kmock answers after writing) and for the
    server it names to stop answering."""

    def serving(webhook: Mapping[str, Any]) -> bool:
        try:
            admitted(webhook, pod(), "1")
        except httpx.TransportError:  # refused, or cut off by the server shutting down
            return False
        return True

    poll(lambda: webhook_configuration(cluster) is not None)
    configuration = webhook_configuration(cluster)
    assert configuration is not None
    poll(lambda: not serving(configuration["webhooks"][0]))


def test_a_refused_configuration_write_stops_the_operator_without_retrying(
    cluster: Cluster,
) -> None:
    path = f"/apis/{ADMISSION_GROUP}/v1/mutatingwebhookconfigurations"
    cluster.emulator[kmock.method.POST][kmock.path(path)] << 403  # as without RBAC

    with (
        pytest.raises(ApiException) as refused,
        running_operator(cluster, webhook=WebhookSettings(host="127.0.0.1", port=0)),
    ):
        wait_until_the_webhook_is_gone(cluster)

    assert refused.value.status == 403
    assert len(cluster.emulator[kmock.method.POST][kmock.path(path)]) == 1


def test_without_the_webhook_the_operator_configures_no_admission(cluster: Cluster) -> None:
    with running_operator(cluster):  # as every other test runs it
        poll(lambda: bool(cluster.emulator.accesses_by("kopf/")))

    assert webhook_configuration(cluster) is None
    used = cluster.emulator.accesses_by("kopf/", runner.USER_AGENT)
    assert not [access for access in used if access.group == ADMISSION_GROUP]
