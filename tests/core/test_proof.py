"""Delivery proofs: built from the worked example, verified, and refused once tampered with."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpudelivery import canonical, errors, proof, signing, timefmt
from gpudelivery.evidence import Assignment, MeterRecord

from utils import factories
from utils.factories import EPOCH
from utils.strategies import SMALL, scenarios

KEY = signing.generate()
OTHER_KEY = signing.generate()


def raw_pairs(records: list[MeterRecord]) -> Iterator[tuple[dict[str, Any], MeterRecord]]:
    return ((factories.record_json(item), item) for item in records)


def build(as_of_s: int | None = None, records: list[MeterRecord] | None = None) -> dict[str, Any]:
    stream = proof.MeterRecordStream(raw_pairs(records or factories.worked_records()))
    return proof.build_proof(
        terms=factories.worked_terms(),
        assignments=factories.worked_assignments(),
        records=stream,
        meter_evidence=stream.evidence,
        key=KEY,
        issued_at_s=EPOCH + 3700,
        as_of_s=as_of_s,
    )


WORKED = build()


def resign(document: dict[str, Any], key: signing.SigningKey = KEY) -> dict[str, Any]:
    unsigned = {name: value for name, value in document.items() if name != "signature"}
    payload = canonical.canonical_json(unsigned)
    return {
        **unsigned,
        "signature": {"algorithm": "Ed25519", "key_id": key.key_id, "value": key.sign(payload)},
    }


def fails(document: dict[str, Any]) -> bool:
    """True when `verify` refuses the document, by a listed problem or a ProofError."""
    try:
        return not proof.verify(document, KEY.public_key).ok
    except errors.ProofError:
        return True


def test_worked_example_proof_verifies_with_its_settlement() -> None:
    outcome = proof.verify(WORKED, KEY.public_key)
    assert outcome.problems == []
    assert outcome.key_id == KEY.key_id
    assert WORKED["settlement"] == {**factories.WORKED_SETTLEMENT, "currency": "USD"}


def test_worked_example_proof_carries_spans_summaries_and_commitments() -> None:
    g1, g2, g3 = WORKED["gpus"]
    assert g1["healthy_spans"] == [
        ["2026-03-03T00:00:00Z", "2026-03-03T00:10:00Z"],
        ["2026-03-03T00:12:00Z", "2026-03-03T01:00:00Z"],
    ]
    assert g2["healthy_spans"] == [["2026-03-03T00:00:00Z", "2026-03-03T00:30:00Z"]]
    # g3 is assigned from 00:40: its summary covers only those 20 minutes.
    assert g3["summary"] == {
        "utilization_gpu_pct_mean": "88.00",
        "utilization_sampled_seconds": 1200,
        "energy_mj": 20 * 42_000_000,
    }
    # g2: 30 healthy minutes at 97 %, 30 unhealthy ones at 0 %.
    assert g2["summary"]["utilization_gpu_pct_mean"] == "48.50"
    assert WORKED["evidence_root"]["tree_size"] == 8  # terms, meter evidence, 3 lines, 3 GPUs
    assert WORKED["meter_evidence"]["tree_size"] == 178
    assert (WORKED["status"], WORKED["as_of"]) == ("final", "2026-03-03T01:00:00Z")


def test_proof_checks_against_the_raw_meter_records() -> None:
    outcome = proof.verify(
        WORKED, KEY.public_key, meter_records=raw_pairs(factories.worked_records())
    )
    assert outcome.problems == []


def test_altered_meter_records_do_not_match_the_proof() -> None:
    records = factories.worked_records()
    records[4] = MeterRecord(*records[4].gpu, records[4].t0_s, records[4].t1_s, False)  # g2, 00:01
    outcome = proof.verify(WORKED, KEY.public_key, meter_records=raw_pairs(records))
    assert outcome.problems[0].startswith("meter_evidence.root_hash: proof says")
    assert "gpus[1].healthy_spans: does not match the meter records" in outcome.problems


def test_proof_signed_by_another_key_is_refused_naming_both_keys() -> None:
    outcome = proof.verify(resign(WORKED, OTHER_KEY), KEY.public_key)
    assert outcome.problems == [
        f"signature: made with key {OTHER_KEY.key_id}, but the given public key is {KEY.key_id}"
    ]


def test_provisional_proof_counts_delivery_up_to_as_of() -> None:
    document = build(as_of_s=EPOCH + 900)
    assert (document["status"], document["as_of"]) == ("provisional", "2026-03-03T00:15:00Z")
    assert document["settlement"]["delivered_gpu_seconds"] == 1680
    assert proof.verify(document, KEY.public_key).problems == []


def test_settlement_edited_and_resigned_is_caught_by_recomputation() -> None:
    document = copy.deepcopy(WORKED)
    document["settlement"]["net"] = "4.00"
    assert proof.verify(resign(document), KEY.public_key).problems == [
        "settlement.net: proof says '4.00', evidence gives '2.00'"
    ]


def test_a_document_that_is_not_a_proof_is_refused() -> None:
    with pytest.raises(
        errors.ProofError, match=re.escape("format: must be 'gpudelivery.delivery-proof/v1'")
    ):
        proof.verify({"format": "something-else"}, KEY.public_key)


# -- tampering -------------------------------------------------------------------------------

Path = tuple[str | int, ...]


def leaf_paths(value: Any, path: Path = ()) -> Iterator[Path]:
    if isinstance(value, dict):
        for name, item in value.items():
            yield from leaf_paths(item, (*path, name))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from leaf_paths(item, (*path, index))
    else:
        yield path


def container_paths(value: Any, path: Path = ()) -> Iterator[Path]:
    if isinstance(value, dict | list):
        if isinstance(value, list) and len(value) > 1:
            yield path
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for name, item in items:
            yield from container_paths(item, (*path, name))


EVIDENCE = (
    "terms",
    "assignments",
    "gpus",
    "evidence_root",
    "meter_evidence",
    "settlement",
    "as_of",
    "status",
)
EDITABLE = [path for path in leaf_paths(WORKED) if path[0] in EVIDENCE]
DELETABLE = [path for path in leaf_paths(WORKED) if path[0] in EVIDENCE and len(path) > 1]
REORDERABLE = [path for path in container_paths(WORKED) if path and path[0] in EVIDENCE]


def resolve(document: Any, path: Path) -> Any:
    for step in path:
        document = document[step]
    return document


def parent(document: Any, path: Path) -> Any:
    return resolve(document, path[:-1])


def edited(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        try:
            return timefmt.format_utc(timefmt.parse_utc(value, field="") + 1)
        except errors.InputError:
            return value + "0" if value[-1:].isdigit() else value + "x"
    raise AssertionError(f"unexpected leaf {value!r}")


def edit(path: Path) -> dict[str, Any]:
    document = copy.deepcopy(WORKED)
    holder = parent(document, path)
    holder[path[-1]] = edited(holder[path[-1]])
    return document


def delete(path: Path) -> dict[str, Any]:
    document = copy.deepcopy(WORKED)
    del parent(document, path)[path[-1]]
    return document


def reorder(path: Path, first: int, second: int) -> dict[str, Any]:
    document = copy.deepcopy(WORKED)
    items = resolve(document, path)
    items[first], items[second] = items[second], items[first]
    return document


def test_every_tamper_kind_has_candidates() -> None:
    assert (len(EDITABLE), len(DELETABLE), len(REORDERABLE)) == (67, 65, 8)


@pytest.mark.parametrize("path", EDITABLE, ids=str)
def test_every_single_field_edit_fails_verification(path: Path) -> None:
    assert fails(edit(path))
    assert fails(resign(edit(path)))


@pytest.mark.parametrize("path", DELETABLE, ids=str)
def test_every_deletion_fails_verification(path: Path) -> None:
    assert fails(delete(path))
    assert fails(resign(delete(path)))


@pytest.mark.parametrize(
    ("path", "first", "second"),
    [
        (path, first, second)
        for path in REORDERABLE
        for first in range(len(resolve(WORKED, path)))
        for second in range(first + 1, len(resolve(WORKED, path)))
    ],
    ids=str,
)
def test_every_reordering_fails_verification(path: Path, first: int, second: int) -> None:
    assert fails(reorder(path, first, second))
    assert fails(resign(reorder(path, first, second)))


def test_an_edit_of_the_evidence_is_named_by_the_root_when_resigned() -> None:
    problems = proof.verify(
        resign(edit(("gpus", 0, "healthy_spans", 1, 0))), KEY.public_key
    ).problems
    assert problems[0].startswith("evidence_root.root_hash: proof says")


@given(scenarios(), st.data())
def test_random_proofs_verify_and_any_tampering_fails(
    scenario: tuple[int, list[Assignment], list[MeterRecord]], data: st.DataObject
) -> None:
    gpu_count, assignments, records = scenario
    stream = proof.MeterRecordStream(raw_pairs(records))
    document = proof.build_proof(
        terms=factories.worked_terms(gpu_count=gpu_count, end=timefmt.format_utc(SMALL[1])),
        assignments=assignments,
        records=stream,
        meter_evidence=stream.evidence,
        key=KEY,
        issued_at_s=SMALL[1],
    )
    assert proof.verify(document, KEY.public_key).problems == []
    assert proof.verify(document, KEY.public_key, meter_records=raw_pairs(records)).problems == []
    evidence = [path for path in leaf_paths(document) if path[0] in EVIDENCE]
    path = data.draw(st.sampled_from(evidence))
    tampered = copy.deepcopy(document)
    holder = parent(tampered, path)
    if data.draw(st.booleans()) and len(path) > 1:
        del holder[path[-1]]
    else:
        holder[path[-1]] = edited(holder[path[-1]])
    assert fails(tampered)
    assert fails(resign(tampered))
