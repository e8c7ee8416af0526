"""The Helm chart as a provider installs it: it lints, renders, runs every container
unprivileged, names every permission it grants, serves the admission webhook over TLS behind
a Service, and ships the CRDs the operator reads."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gpudelivery.operator import admission
from gpudelivery.operator.settings import BuyerSettings, OperatorSettings, WebhookSettings

from utils import kube

ROOT = Path(__file__).parents[2]
CHART = ROOT / "charts" / "gpudelivery"
HELM = ROOT / ".tools" / "bin" / "helm"
# Where the operator's pod mounts the webhook's TLS Secret.
WEBHOOK_TLS = "/etc/gpudelivery/webhook"
# The webhook's Service for release `t` in namespace `gpud`, as the API server calls it.
SERVICE_HOST = "t-gpudelivery-webhook.gpud.svc"


def helm(
    subcommand: str, *values: str, flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """`helm template` or `helm lint` of the chart for release `t` in namespace `gpud`, with
    `--set` values and other flags."""
    command = [str(HELM), subcommand, *flags]
    if subcommand == "template":
        command += ["t", str(CHART), "--namespace", "gpud"]
    else:
        command += ["--strict", str(CHART)]
    for value in values:
        command += ["--set", value]
    return subprocess.run(command, capture_output=True, text=True)


def render(*values: str) -> list[dict[str, Any]]:
    """The chart's manifests for release `t` in namespace `gpud`, with `--set` values."""
    result = helm("template", *values)
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def kinds(manifests: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((m["kind"], m["metadata"]["name"]) for m in manifests)


def one(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (manifest,) = [m for m in manifests if m["kind"] == kind]
    return manifest


def operator_pod(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    pod: dict[str, Any] = one(manifests, "Deployment")["spec"]["template"]["spec"]
    return pod


def environment(manifests: list[dict[str, Any]]) -> dict[str, str]:
    (container,) = operator_pod(manifests)["containers"]
    return {item["name"]: item["value"] for item in container["env"]}


@pytest.mark.parametrize(
    "values",
    [
        (),
        ("operator.webhook.enabled=false",),
        ("operator.webhook.certSecret=gpud-webhook-cert", "operator.buyers.caSecret=gpud-ca"),
    ],
    ids=["defaults", "webhook-disabled", "given-secrets"],
)
def test_the_chart_lints_clean(values: tuple[str, ...]) -> None:
    result = helm("lint", *values)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def test_the_chart_installs_the_operator_with_its_account_role_and_peering() -> None:
    assert kinds(render()) == [
        ("ClusterKopfPeering", "gpudelivery"),
        ("ClusterRole", "t-gpudelivery-operator"),
        ("ClusterRoleBinding", "t-gpudelivery-operator"),
        ("Deployment", "t-gpudelivery-operator"),
        ("PodDisruptionBudget", "t-gpudelivery-operator"),
        ("Secret", "t-gpudelivery-webhook-tls"),
        ("Service", "t-gpudelivery-webhook"),
        ("ServiceAccount", "t-gpudelivery-operator"),
    ]
    assert render("operator.enabled=false") == []


def test_every_container_runs_as_a_non_root_user_without_capabilities() -> None:
    deployments = [m for m in render() if m["kind"] == "Deployment"]
    assert deployments
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"] == {"drop": ["ALL"]}


def test_the_operators_role_names_every_group_resource_and_verb() -> None:
    (role,) = [m for m in render() if m["kind"] == "ClusterRole"]
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert not {entry for entry in granted if "*" in entry}
    assert ("gpudelivery.io", "computecontracts/status", "patch") in granted
    # It deletes nothing but the buyers' namespaces it made.
    deletes = {entry for entry in granted if entry[2] in ("delete", "deletecollection")}
    assert deletes == {("", "namespaces", "delete")}
    # It reads no Secret but the buyers' kubeconfigs, and binds no role but `edit`.
    named = {
        (rule["resources"][0], verb): rule.get("resourceNames")
        for rule in role["rules"]
        for verb in rule["verbs"]
        if rule["resources"] in (["secrets"], ["clusterroles"])
    }
    assert named == {
        ("secrets", "create"): None,
        ("secrets", "get"): ["gpudelivery-buyer"],
        ("secrets", "update"): ["gpudelivery-buyer"],
        ("clusterroles", "bind"): ["edit"],
    }


def test_the_operator_runs_with_its_settings_and_reads_the_api_key_from_a_secret() -> None:
    manifests = render("operator.apiUrl=https://api.example", "operator.apiTokenSecret=gpud-key")
    deployment = one(manifests, "Deployment")
    pod = operator_pod(manifests)
    (container,) = pod["containers"]
    assert container["command"] == ["gpudelivery", "operator", "run"]
    assert environment(manifests) == {
        "GPUDELIVERY_OPERATOR_PEERING__NAME": "gpudelivery",
        "GPUDELIVERY_OPERATOR_TIMING__RECONCILE_INTERVAL_S": "10",
        "GPUDELIVERY_OPERATOR_TIMING__NOT_READY_AFTER_S": "60",
        "GPUDELIVERY_OPERATOR_API__URL": "https://api.example",
        "GPUDELIVERY_OPERATOR_API__TOKEN_FILE": "/var/run/secrets/gpudelivery/api/token",
        "GPUDELIVERY_OPERATOR_WEBHOOK__ENABLED": "true",
        "GPUDELIVERY_OPERATOR_WEBHOOK__PORT": "9443",
        "GPUDELIVERY_OPERATOR_WEBHOOK__SERVICE_HOST": SERVICE_HOST,
        "GPUDELIVERY_OPERATOR_WEBHOOK__CERT_FILE": f"{WEBHOOK_TLS}/tls.crt",
        "GPUDELIVERY_OPERATOR_WEBHOOK__KEY_FILE": f"{WEBHOOK_TLS}/tls.key",
        "GPUDELIVERY_OPERATOR_WEBHOOK__CA_FILE": f"{WEBHOOK_TLS}/ca.crt",
    }
    assert {"name": "api-token", "secret": {"secretName": "gpud-key"}} in pod["volumes"]
    assert deployment["spec"]["replicas"] == 2


def test_the_operator_accepts_the_charts_environment_and_names_the_charts_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manifests = render("operator.buyers.server=https://k8s.example:6443")
    for name in list(os.environ):
        if name.startswith("GPUDELIVERY_OPERATOR_"):
            monkeypatch.delenv(name)
    for name, value in environment(manifests).items():
        monkeypatch.setenv(name, value)
    settings = OperatorSettings()
    assert settings.webhook == WebhookSettings(
        enabled=True,
        port=9443,
        service_host=SERVICE_HOST,
        cert_file=Path(WEBHOOK_TLS, "tls.crt"),
        key_file=Path(WEBHOOK_TLS, "tls.key"),
        ca_file=Path(WEBHOOK_TLS, "ca.crt"),
    )
    assert settings.buyers == BuyerSettings(server="https://k8s.example:6443")
    assert settings.peering.standalone is False
    # The replicas share the chart's certificate, so peering does not stop the webhook.
    kopf_settings = kopf.OperatorSettings()
    admission.configure(kopf_settings, settings)
    assert isinstance(kopf_settings.admission.server, admission.PinningServer)
    served = {"url": f"https://{settings.webhook.host}:{settings.webhook.port}"}
    service = one(manifests, "Service")
    assert admission.client_config(served, settings.webhook.service_host) == {
        "service": {
            "namespace": service["metadata"]["namespace"],
            "name": service["metadata"]["name"],
            "port": service["spec"]["ports"][0]["port"],
            "path": f"/{admission.HANDLER_ID}",
        }
    }


def test_the_webhook_service_sends_to_the_operators_pods_on_the_webhook_port() -> None:
    manifests = render("operator.webhook.port=8443")
    service = one(manifests, "Service")
    deployment = one(manifests, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["metadata"]["namespace"] == "gpud"
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"] == {
        "app.kubernetes.io/instance": "t",
        "app.kubernetes.io/component": "operator",
    }
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [
        {"name": "webhook", "port": 8443, "targetPort": "webhook", "protocol": "TCP"}
    ]
    (container,) = operator_pod(manifests)["containers"]
    assert container["ports"] == [{"name": "webhook", "containerPort": 8443, "protocol": "TCP"}]
    assert container["readinessProbe"] == {"tcpSocket": {"port": "webhook"}, "periodSeconds": 5}
    assert environment(manifests)["GPUDELIVERY_OPERATOR_WEBHOOK__PORT"] == "8443"


def test_the_chart_makes_a_ca_and_a_certificate_that_names_the_webhook_service() -> None:
    manifests = render()
    secret = one(manifests, "Secret")
    assert secret["metadata"]["name"] == "t-gpudelivery-webhook-tls"
    assert secret["type"] == "kubernetes.io/tls"
    assert sorted(secret["data"]) == ["ca.crt", "tls.crt", "tls.key"]
    pem = {key: base64.b64decode(value) for key, value in secret["data"].items()}
    certificate = x509.load_pem_x509_certificate(pem["tls.crt"])
    ca = x509.load_pem_x509_certificate(pem["ca.crt"])
    key = serialization.load_pem_private_key(pem["tls.key"], password=None)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [
        "t-gpudelivery-webhook",
        "t-gpudelivery-webhook.gpud",
        SERVICE_HOST,
    ]
    certificate.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert key.public_key() == certificate.public_key()
    pod = operator_pod(manifests)
    assert {
        "name": "webhook-tls",
        "secret": {"secretName": "t-gpudelivery-webhook-tls", "defaultMode": 0o440},
    } in pod["volumes"]
    (container,) = pod["containers"]
    assert {"name": "webhook-tls", "mountPath": WEBHOOK_TLS, "readOnly": True} in container[
        "volumeMounts"
    ]


def test_a_given_certificate_secret_is_mounted_instead_of_a_generated_one() -> None:
    manifests = render("operator.webhook.certSecret=gpud-webhook-cert")
    assert [m for m in manifests if m["kind"] == "Secret"] == []
    pod = operator_pod(manifests)
    webhook_volumes = [v for v in pod["volumes"] if v["name"] == "webhook-tls"]
    assert webhook_volumes == [
        {"name": "webhook-tls", "secret": {"secretName": "gpud-webhook-cert", "defaultMode": 0o440}}
    ]
    assert environment(manifests)["GPUDELIVERY_OPERATOR_WEBHOOK__CA_FILE"] == (
        f"{WEBHOOK_TLS}/ca.crt"
    )


def test_a_disabled_webhook_gets_no_service_certificate_budget_port_or_mount() -> None:
    manifests = render("operator.webhook.enabled=false")
    assert kinds(manifests) == [
        ("ClusterKopfPeering", "gpudelivery"),
        ("ClusterRole", "t-gpudelivery-operator"),
        ("ClusterRoleBinding", "t-gpudelivery-operator"),
        ("Deployment", "t-gpudelivery-operator"),
        ("ServiceAccount", "t-gpudelivery-operator"),
    ]
    assert environment(manifests) == {
        "GPUDELIVERY_OPERATOR_PEERING__NAME": "gpudelivery",
        "GPUDELIVERY_OPERATOR_TIMING__RECONCILE_INTERVAL_S": "10",
        "GPUDELIVERY_OPERATOR_TIMING__NOT_READY_AFTER_S": "60",
        "GPUDELIVERY_OPERATOR_WEBHOOK__ENABLED": "false",
    }
    pod = operator_pod(manifests)
    (container,) = pod["containers"]
    assert "ports" not in container
    assert "readinessProbe" not in container
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {}}]


def test_a_budget_keeps_one_operator_replica_answering_the_webhook_through_drains() -> None:
    manifests = render()
    budget = one(manifests, "PodDisruptionBudget")
    assert budget["metadata"]["namespace"] == "gpud"
    assert budget["spec"] == {
        "minAvailable": 1,
        "selector": {
            "matchLabels": one(manifests, "Deployment")["spec"]["selector"]["matchLabels"]
        },
    }
    # One replica under a budget of one could never be evicted: its node would never drain.
    assert [m for m in render("operator.replicas=1") if m["kind"] == "PodDisruptionBudget"] == []


def test_buyers_get_the_api_servers_address_and_the_ca_they_trust_it_by() -> None:
    manifests = render(
        "operator.buyers.server=https://k8s.example:6443",
        "operator.buyers.caSecret=gpud-cluster-ca",
        "operator.buyers.caKey=root.pem",
    )
    buyers = {
        name: value
        for name, value in environment(manifests).items()
        if name.startswith("GPUDELIVERY_OPERATOR_BUYERS__")
    }
    assert buyers == {
        "GPUDELIVERY_OPERATOR_BUYERS__SERVER": "https://k8s.example:6443",
        "GPUDELIVERY_OPERATOR_BUYERS__CA_FILE": "/etc/gpudelivery/buyers/ca.crt",
    }
    pod = operator_pod(manifests)
    assert {
        "name": "buyers-ca",
        "secret": {
            "secretName": "gpud-cluster-ca",
            "items": [{"key": "root.pem", "path": "ca.crt"}],
        },
    } in pod["volumes"]
    (container,) = pod["containers"]
    assert {
        "name": "buyers-ca",
        "mountPath": "/etc/gpudelivery/buyers",
        "readOnly": True,
    } in container["volumeMounts"]


@pytest.mark.parametrize(
    ("values", "fix"),
    [
        (
            ("operator.webhook.port=0",),
            "operator.webhook.port is the webhook Service's port too: set a port from 1 to "
            "65535, not 0",
        ),
        (
            ("operator.webhook.port=65536",),
            "operator.webhook.port is the webhook Service's port too: set a port from 1 to "
            "65535, not 65536",
        ),
        (
            ("operator.buyers.caSecret=gpud-ca", "operator.buyers.caKey="),
            "operator.buyers.caSecret needs operator.buyers.caKey: the key of the CA "
            "certificate in it (e.g. ca.crt)",
        ),
    ],
    ids=["port-0", "port-65536", "ca-without-key"],
)
def test_contradicting_values_stop_the_install_saying_what_to_set(
    values: tuple[str, ...], fix: str
) -> None:
    result = helm("template", *values)
    assert result.returncode == 1
    assert result.stdout == ""
    error = result.stderr.splitlines()[0]
    assert error.startswith("Error: execution error at (gpudelivery/templates/validation.yaml:")
    assert error.endswith(f"): {fix}")


def test_the_chart_ships_the_operators_crds_and_kopfs_peering_crd() -> None:
    names = sorted(
        yaml.safe_load(path.read_text())["metadata"]["name"]
        for path in (CHART / "crds").glob("*.yaml")
    )
    assert names == [
        "clusterkopfpeerings.kopf.dev",
        "computecontracts.gpudelivery.io",
        "deliverypools.gpudelivery.io",
    ]


def test_an_upgrade_keeps_the_certificate_the_release_already_has(tmp_path: Path) -> None:
    existing = {
        key: base64.b64encode(f"{key} of the release".encode()).decode()
        for key in ("tls.crt", "tls.key", "ca.crt")
    }
    with kube.running_cluster() as (emulator, url):
        # helm refuses the emulator's Kubernetes 1.26 (the chart needs 1.27), and its core
        # discovery, which kmock serves as group version "/v1" rather than "v1".
        emulator["get /version"] << {"major": "1", "minor": "31", "gitVersion": "v1.31.0"}
        with urllib.request.urlopen(f"{url}/api/v1") as response:
            core = json.load(response)
        emulator["get /api/v1"] << {**core, "groupVersion": "v1"}
        kube.core_api(url).create_namespaced_secret(
            "gpud",
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": "t-gpudelivery-webhook-tls",
                    "namespace": "gpud",
                    "labels": {"app.kubernetes.io/managed-by": "Helm"},
                    "annotations": {
                        "meta.helm.sh/release-name": "t",
                        "meta.helm.sh/release-namespace": "gpud",
                    },
                },
                "type": "kubernetes.io/tls",
                "data": existing,
            },
        )
        kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig", url)
        # Only a chart rendered against a cluster looks the Secret up (the emulator serves no
        # OpenAPI schema to validate with).
        flags = (
            "--dry-run=server",
            "--disable-openapi-validation",
            "--kubeconfig",
            str(kubeconfig),
        )
        result = helm("template", flags=flags)
    assert result.returncode == 0, result.stderr
    manifests = [document for document in yaml.safe_load_all(result.stdout) if document]
    assert one(manifests, "Secret")["data"] == existing
