"""The Helm chart as a provider installs it: it lints, renders, runs every container
unprivileged, names every permission it grants, and ships the CRDs the operator reads."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).parents[2]
CHART = ROOT / "charts" / "gpudelivery"
HELM = ROOT / ".tools" / "bin" / "helm"


def render(*values: str) -> list[dict[str, Any]]:
    """The chart's manifests for release `t` in namespace `gpud`, with `--set` values."""
    command = [str(HELM), "template", "t", str(CHART), "--namespace", "gpud"]
    for value in values:
        command += ["--set", value]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return [document for document in yaml.safe_load_all(output) if document]


def kinds(manifests: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((m["kind"], m["metadata"]["name"]) for m in manifests)


def test_the_chart_lints_clean() -> None:
    result = subprocess.run(
        [str(HELM), "lint", "--strict", str(CHART)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_the_chart_installs_the_operator_with_its_account_role_and_peering() -> None:
    assert kinds(render()) == [
        ("ClusterKopfPeering", "gpudelivery"),
        ("ClusterRole", "t-gpudelivery-operator"),
        ("ClusterRoleBinding", "t-gpudelivery-operator"),
        ("Deployment", "t-gpudelivery-operator"),
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
    (deployment,) = [m for m in manifests if m["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["gpudelivery", "operator", "run"]
    environment = {item["name"]: item["value"] for item in container["env"]}
    assert environment == {
        "GPUDELIVERY_OPERATOR_PEERING__NAME": "gpudelivery",
        "GPUDELIVERY_OPERATOR_TIMING__RECONCILE_INTERVAL_S": "10",
        "GPUDELIVERY_OPERATOR_TIMING__NOT_READY_AFTER_S": "60",
        "GPUDELIVERY_OPERATOR_API__URL": "https://api.example",
        "GPUDELIVERY_OPERATOR_API__TOKEN_FILE": "/var/run/secrets/gpudelivery/api/token",
    }
    assert {"name": "api-token", "secret": {"secretName": "gpud-key"}} in pod["volumes"]
    assert deployment["spec"]["replicas"] == 2


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
