"""The operator's resources: DeliveryPool and ComputeContract bodies to the core's values
and back, the names a contract takes on the cluster, and the CRDs that hold them."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from gpudelivery import errors, terms
from gpudelivery.operator import resources

from utils import factories

CRDS = Path(__file__).parents[2] / "charts" / "gpudelivery" / "crds"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def crd_schema(name: str) -> dict[str, Any]:
    """The openAPIV3Schema of a CRD of the chart (its one version)."""
    document = yaml.safe_load((CRDS / f"{name}.yaml").read_text())
    (version,) = document["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def pool_body(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "gpudelivery.io/v1alpha1",
        "kind": "DeliveryPool",
        "metadata": {"name": "h100"},
        "spec": {"instrument": "H100-SXM-80GB", **spec},
    }


WORKED_TERMS = terms.parse_terms(factories.terms_json())


# -- names --------------------------------------------------------------------------------


def sha8(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def test_a_resource_name_keeps_the_id_readable_and_adds_a_hash_of_it() -> None:
    contract_id = "EX-2026-03-03-H100-0001"
    assert resources.resource_name(contract_id) == f"ex-2026-03-03-h100-0001-{sha8(contract_id)}"
    assert resources.resource_name("EX:2026/Q1") == f"ex-2026-q1-{sha8('EX:2026/Q1')}"
    assert resources.resource_name(":::") == f"c-{sha8(':::')}"
    assert resources.resource_name("A" * 128) == f"{'a' * 40}-{sha8('A' * 128)}"
    assert resources.namespace_name("ex-1-0a1b2c3d") == "gpud-ex-1-0a1b2c3d"


def test_ids_that_read_alike_get_different_names() -> None:
    names = {resources.resource_name(contract_id) for contract_id in ("EX-1", "ex-1", "ex:1")}
    assert len(names) == 3


@given(st.text(min_size=1, max_size=128))
def test_every_contract_id_gives_a_dns_label_with_room_for_the_namespace_prefix(
    contract_id: str,
) -> None:
    name = resources.resource_name(contract_id)
    assert DNS_LABEL.fullmatch(name)
    assert DNS_LABEL.fullmatch(resources.namespace_name(name))
    assert name == resources.resource_name(contract_id)


# -- pools --------------------------------------------------------------------------------


def test_a_pool_takes_the_crds_defaults() -> None:
    assert resources.pool_from_body(pool_body()) == resources.Pool(
        name="h100",
        instrument="H100-SXM-80GB",
        node_selector={"nvidia.com/gpu.product": "H100-SXM-80GB"},
        gpus_per_node=8,
        spares=0,
        lead_time_s=600,
        drain_timeout_s=300,
        grace_s=300,
    )


def test_a_pools_selector_defaults_to_its_gpu_product_and_may_be_set_whole() -> None:
    by_product = resources.pool_from_body(pool_body(gpuProduct="NVIDIA-H100-80GB-HBM3"))
    assert by_product.node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    chosen = resources.pool_from_body(pool_body(nodeSelector={"pool": "a"}, spares=2))
    assert (chosen.node_selector, chosen.spares) == ({"pool": "a"}, 2)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"instrument": ""}, "spec.instrument: must be a non-empty string"),
        ({"gpusPerNode": 0}, "spec.gpusPerNode: must be a whole number >= 1"),
        ({"spares": -1}, "spec.spares: must be a whole number >= 0"),
        ({"leadTimeSeconds": True}, "spec.leadTimeSeconds: must be a whole number >= 0"),
        ({"drainTimeoutSeconds": 0}, "spec.drainTimeoutSeconds: must be a whole number >= 1"),
        ({"gracePeriodSeconds": "5m"}, "spec.gracePeriodSeconds: must be a whole number >= 0"),
        ({"nodeSelector": {}}, "spec.nodeSelector: must map label keys to values"),
        ({"nodeSelector": {"a": 1}}, "spec.nodeSelector: must map label keys to values"),
    ],
)
def test_a_bad_pool_spec_is_refused_naming_the_field(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(errors.InputError) as caught:
        resources.pool_from_body(pool_body(**spec))
    assert str(caught.value) == message


def test_a_pool_without_a_spec_is_refused() -> None:
    with pytest.raises(errors.InputError, match=r"^spec: missing$"):
        resources.pool_from_body({"metadata": {"name": "p"}})


# -- contracts ------------------------------------------------------------------------------


def test_a_contract_resource_carries_the_terms_camel_cased_and_reads_back_the_same() -> None:
    body = resources.contract_body(WORKED_TERMS)
    assert body == {
        "apiVersion": "gpudelivery.io/v1alpha1",
        "kind": "ComputeContract",
        "metadata": {"name": resources.resource_name(factories.CONTRACT_ID)},
        "spec": {
            "contractId": factories.CONTRACT_ID,
            "buyer": "acme-ai",
            "instrument": "H100-SXM-80GB",
            "gpuCount": 2,
            "start": "2026-03-03T00:00:00Z",
            "end": "2026-03-03T01:00:00Z",
            "pricePerGpuHour": "2.00",
            "currency": "USD",
            "penaltyTiers": [{"below": "0.99", "rate": "0.10"}, {"below": "0.95", "rate": "0.25"}],
            "ldMultiplier": "1.5",
        },
    }
    assert resources.terms_from_body(body) == WORKED_TERMS


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gpuCount": 0}, "spec.gpuCount: Input should be greater than 0"),
        ({"end": "2026-03-02T00:00:00Z"}, "spec: end (2026-03-02T00:00:00Z) must be after start"),
        ({"penaltyTiers": [{"below": "0.9", "rate": 2}]}, "spec.penaltyTiers[0].rate: must be"),
        ({"pricePerGpuHour": 2.5}, "spec.pricePerGpuHour: must be a decimal string"),
        ({"gpus": 2}, "spec.gpus: unknown field"),
        ({"contractId": None}, "spec.contractId: Input should be a valid string"),
    ],
)
def test_bad_contract_terms_are_refused_naming_the_spec_field(
    change: dict[str, Any], message: str
) -> None:
    body = resources.contract_body(WORKED_TERMS)
    body["spec"].update(change)
    with pytest.raises(errors.TermsError) as caught:
        resources.terms_from_body(body)
    assert str(caught.value).startswith(message)


def test_a_contract_without_a_spec_is_refused() -> None:
    with pytest.raises(errors.TermsError, match=r"^spec: missing$"):
        resources.terms_from_body({"metadata": {"name": "c"}})


# -- the CRDs -------------------------------------------------------------------------------


def test_the_resources_the_operator_writes_fit_the_charts_crds() -> None:
    jsonschema.validate(resources.contract_body(WORKED_TERMS), crd_schema("computecontracts"))
    jsonschema.validate(pool_body(spares=1), crd_schema("deliverypools"))


@pytest.mark.parametrize(
    ("crd", "body"),
    [
        ("deliverypools", pool_body(gpusPerNode=0)),
        ("deliverypools", {"spec": {}}),
        (
            "computecontracts",
            {"spec": {**resources.contract_body(WORKED_TERMS)["spec"], "gpuCount": 0}},
        ),
        (
            "computecontracts",
            {"spec": {**resources.contract_body(WORKED_TERMS)["spec"], "currency": "usd"}},
        ),
    ],
)
def test_the_crds_refuse_what_the_operator_would_refuse(crd: str, body: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(body, crd_schema(crd))


def test_the_crds_defaults_are_the_operators() -> None:
    spec = crd_schema("deliverypools")["properties"]["spec"]["properties"]
    defaults = {name: spec[name]["default"] for name in spec if "default" in spec[name]}
    pool = resources.pool_from_body(pool_body())
    assert defaults == {
        "gpusPerNode": pool.gpus_per_node,
        "spares": pool.spares,
        "leadTimeSeconds": pool.lead_time_s,
        "drainTimeoutSeconds": pool.drain_timeout_s,
        "gracePeriodSeconds": pool.grace_s,
    }


def test_the_contract_crd_lists_every_phase() -> None:
    phases = crd_schema("computecontracts")["properties"]["status"]["properties"]["phase"]
    assert phases["enum"] == [phase.value for phase in resources.Phase]
