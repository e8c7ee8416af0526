"""Signed delivery proofs: build one from the evidence, and verify one without trusting us.

A proof (docs/proof-format.md) carries the contract's terms, its assignment ledger, each
assigned GPU's coalesced metered-healthy spans with a utilization and energy summary, the
Merkle root and size of the raw meter evidence it was built from, a Merkle root over its own
evidence items, and the settlement figures; the provider signs all of it with Ed25519.

`verify` checks the signature, checks that the evidence is in canonical order and matches
its root, recomputes the settlement from the ledger and spans with the same accounting code
the API runs, and, given the raw meter records, recomputes the spans, the summaries and the
meter evidence root too. It lists every mismatch it finds rather than stopping at the first.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from gpudelivery import (
    accounting,
    canonical,
    errors,
    evidence,
    merkle,
    settlement,
    signing,
    timefmt,
)
from gpudelivery import terms as terms_module
from gpudelivery.accounting import Span
from gpudelivery.evidence import Assignment, GpuKey, MeterRecord
from gpudelivery.rollup import MeterRollup
from gpudelivery.terms import ContractTerms

__all__ = [
    "PROOF_FORMAT",
    "MeterEvidence",
    "MeterRecordStream",
    "Verification",
    "build_proof",
    "evidence_leaves",
    "meter_record_leaf",
    "verify",
]

# The format tag of version 1 of the proof document.
PROOF_FORMAT = "gpudelivery.delivery-proof/v1"
# What the leaves of the meter evidence tree are: one canonical meter record each (the
# offline tools), or one signed meter batch each (the API's evidence log).
LEAVES_METER_RECORDS = "meter-records"
LEAVES_METER_BATCHES = "meter-batches"
STATUS_FINAL = "final"
STATUS_PROVISIONAL = "provisional"
_FIELDS = frozenset(
    {
        "format",
        "status",
        "as_of",
        "issued_at",
        "terms",
        "assignments",
        "gpus",
        "evidence_root",
        "meter_evidence",
        "settlement",
        "signature",
    }
)
_UTILIZATION_PLACES = 2
# What a proof is built from: meter records, or roll-ups standing for some of them.
Evidence = MeterRecord | MeterRollup


@dataclass(frozen=True, slots=True)
class MeterEvidence:
    """The Merkle commitment to the raw meter evidence a proof was built from."""

    leaves: str
    tree_size: int
    root_hash: str

    def to_json(self) -> dict[str, Any]:
        return {"leaves": self.leaves, "tree_size": self.tree_size, "root_hash": self.root_hash}


def meter_record_leaf(raw_record: Mapping[str, Any]) -> bytes:
    """The meter evidence leaf of one raw meter record: its canonical JSON."""
    return canonical.canonical_json(dict(raw_record))


class MeterRecordStream:
    """Raw meter records streamed once: yields the parsed records, commits to the raw ones.

    Iterate it (once) to get the parsed records; afterwards `evidence()` is the Merkle
    commitment to the raw records, in the order they came.
    """

    def __init__(self, raw_records: Iterable[tuple[Mapping[str, Any], MeterRecord]]) -> None:
        self._raw_records = raw_records
        self._accumulator = merkle.RootAccumulator()

    def __iter__(self) -> Iterator[MeterRecord]:
        for raw, record in self._raw_records:
            self._accumulator.add_leaf(meter_record_leaf(raw))
            yield record

    def evidence(self) -> MeterEvidence:
        return MeterEvidence(
            LEAVES_METER_RECORDS, self._accumulator.size, self._accumulator.root().hex()
        )


class _Summaries:
    """Per assigned GPU, utilization and energy over the seconds it was assigned.

    Utilization is the mean over assigned metered seconds weighted by overlap; a record's
    energy counts pro rata to the share of it that is assigned. Both are exact fractions
    rounded once: utilization half-even to 2 places, energy half-even to a whole mJ.
    """

    def __init__(self, assigned: Mapping[GpuKey, list[Span]]) -> None:
        self._assigned = assigned
        self._starts = {gpu: [span[0] for span in spans] for gpu, spans in assigned.items()}
        self._utilization: dict[GpuKey, Fraction] = {}
        self._utilization_s: dict[GpuKey, int] = {}
        self._energy: dict[GpuKey, Fraction] = {}

    def _overlap_s(self, gpu: GpuKey, start: int, end: int) -> int:
        spans = self._assigned[gpu]
        index = max(bisect.bisect_right(self._starts[gpu], start) - 1, 0)
        overlap = 0
        while index < len(spans) and spans[index][0] < end:
            overlap += max(0, min(end, spans[index][1]) - max(start, spans[index][0]))
            index += 1
        return overlap

    def observe(self, records: Iterable[Evidence]) -> Iterator[Evidence]:
        """Pass records through, folding those of assigned GPUs into the summaries."""
        for record in records:
            gpu = record.gpu
            if type(record) is MeterRollup:
                self._observe_rollup(record)
                yield record
                continue
            assert isinstance(record, MeterRecord)
            if gpu in self._assigned and (
                record.utilization_gpu_pct is not None or record.energy_mj is not None
            ):
                overlap = self._overlap_s(gpu, record.t0_s, record.t1_s)
                if overlap:
                    if record.utilization_gpu_pct is not None:
                        weighted = Fraction(record.utilization_gpu_pct) * overlap
                        self._utilization[gpu] = self._utilization.get(gpu, Fraction(0)) + weighted
                        self._utilization_s[gpu] = self._utilization_s.get(gpu, 0) + overlap
                    if record.energy_mj is not None:
                        share = Fraction(record.energy_mj * overlap, record.t1_s - record.t0_s)
                        self._energy[gpu] = self._energy.get(gpu, Fraction(0)) + share
            yield record

    def _observe_rollup(self, rollup: MeterRollup) -> None:
        """A roll-up counts whole or not at all: each of its records lies wholly inside the
        assigned spans, or wholly outside them."""
        gpu = rollup.gpu
        if gpu not in self._assigned:
            return
        overlap = self._overlap_s(gpu, rollup.t0_s, rollup.t1_s)
        if not overlap:
            return
        if overlap != rollup.t1_s - rollup.t0_s:
            raise ValueError(
                f"a roll-up of {gpu} over [{rollup.t0_s}, {rollup.t1_s}) crosses the edge of "
                "an assigned span: its records are needed there instead"
            )
        if rollup.utilization_sum is not None:
            self._utilization[gpu] = (
                self._utilization.get(gpu, Fraction(0)) + rollup.utilization_sum
            )
            self._utilization_s[gpu] = self._utilization_s.get(gpu, 0) + rollup.utilization_s
        if rollup.energy_mj is not None:
            self._energy[gpu] = self._energy.get(gpu, Fraction(0)) + rollup.energy_mj

    def summary(self, gpu: GpuKey) -> dict[str, Any]:
        result: dict[str, Any] = {}
        if gpu in self._utilization_s:
            mean = self._utilization[gpu] / self._utilization_s[gpu]
            scaled = round(mean * 10**_UTILIZATION_PLACES)
            result["utilization_gpu_pct_mean"] = str(Decimal(scaled).scaleb(-_UTILIZATION_PLACES))
            result["utilization_sampled_seconds"] = self._utilization_s[gpu]
        if gpu in self._energy:
            result["energy_mj"] = round(self._energy[gpu])
        return result


def _gpu_entry(gpu: GpuKey, spans: list[Span], summary: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "node": gpu[0],
        "gpu_uuid": gpu[1],
        "healthy_spans": [[timefmt.format_utc(s), timefmt.format_utc(e)] for s, e in spans],
    }
    if summary:
        entry["summary"] = summary
    return entry


def evidence_leaves(document: Mapping[str, Any]) -> list[bytes]:
    """The leaves of a proof's own evidence tree, in this order: the terms, the meter
    evidence commitment, each ledger line, each GPU entry (canonical JSON each)."""
    items = [
        document.get("terms"),
        document.get("meter_evidence"),
        *document.get("assignments", []),
        *document.get("gpus", []),
    ]
    return [canonical.canonical_json(item) for item in items]


def _root_json(leaves: Sequence[bytes]) -> dict[str, Any]:
    size, root = merkle.root_of(leaves)
    return {"tree_size": size, "root_hash": root.hex()}


def _counted_window(terms: ContractTerms, as_of_s: int | None) -> tuple[str, int]:
    if as_of_s is None or as_of_s >= terms.end:
        return STATUS_FINAL, terms.end
    if as_of_s < terms.start:
        raise ValueError("a provisional proof's as_of must not precede the window's start")
    return STATUS_PROVISIONAL, as_of_s


def _settlement_json(result: settlement.Settlement) -> dict[str, Any]:
    return {**result.to_json(), "currency": result.currency}


def build_proof(
    *,
    terms: ContractTerms,
    assignments: Iterable[Assignment],
    records: Iterable[Evidence],
    meter_evidence: MeterEvidence | Callable[[], MeterEvidence],
    key: signing.SigningKey,
    issued_at_s: int,
    as_of_s: int | None = None,
) -> dict[str, Any]:
    """Build and sign the delivery proof of `terms` (provisional when `as_of_s` < end).

    `records` are meter records, or roll-ups of them (`rollup.MeterRollup`) where a roll-up
    lies wholly inside or wholly outside each assigned span (ValueError otherwise).
    `meter_evidence` may be a callable, called once `records` have been consumed, for a
    commitment computed while they stream (`MeterRecordStream.evidence`).
    """
    status, as_of = _counted_window(terms, as_of_s)
    ledger = sorted(
        {a for a in assignments if a.contract_id == terms.contract_id},
        key=lambda a: (a.node, a.gpu_uuid, a.start_s, a.end_s),
    )
    window = (terms.start, as_of)
    assigned = accounting.assigned_spans(ledger, contract_id=terms.contract_id, window=window)
    summaries = _Summaries(assigned)
    healthy = accounting.healthy_spans(summaries.observe(records), window=window, gpus=assigned)
    delivered = accounting.delivered_gpu_seconds(
        terms.gpu_count, accounting.delivering_spans(assigned, healthy)
    )
    document: dict[str, Any] = {
        "format": PROOF_FORMAT,
        "status": status,
        "as_of": timefmt.format_utc(as_of),
        "issued_at": timefmt.format_utc(issued_at_s),
        "terms": terms.to_json(),
        "assignments": [evidence.assignment_to_json(a) for a in ledger],
        "gpus": [
            _gpu_entry(gpu, healthy.get(gpu, []), summaries.summary(gpu))
            for gpu in sorted(assigned)
        ],
        "meter_evidence": (
            meter_evidence if isinstance(meter_evidence, MeterEvidence) else meter_evidence()
        ).to_json(),
        "settlement": _settlement_json(settlement.settle(terms, delivered_gpu_seconds=delivered)),
    }
    document["evidence_root"] = _root_json(evidence_leaves(document))
    document["signature"] = {
        "algorithm": signing.ALGORITHM,
        "key_id": key.key_id,
        "value": key.sign(canonical.canonical_json(document)),
    }
    return document


@dataclass
class Verification:
    """The outcome of `verify`: `problems` is empty exactly when the proof holds."""

    key_id: str
    contract_id: str
    problems: list[str] = field(default_factory=list)
    settlement: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def _need(document: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in document:
        raise errors.ProofError(f"{name}: missing")
    value = document[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise errors.ProofError(f"{name}: has the wrong type ({type(value).__name__})")
    return value


def _parse_gpus(entries: list[Any], window: Span, problems: list[str]) -> dict[GpuKey, list[Span]]:
    healthy: dict[GpuKey, list[Span]] = {}
    previous: GpuKey | None = None
    for index, entry in enumerate(entries):
        where = f"gpus[{index}]"
        if not isinstance(entry, dict) or not {"node", "gpu_uuid", "healthy_spans"} <= entry.keys():
            raise errors.ProofError(
                f"{where}: must be an object with node, gpu_uuid, healthy_spans"
            )
        unknown = entry.keys() - {"node", "gpu_uuid", "healthy_spans", "summary"}
        if unknown:
            raise errors.ProofError(f"{where}.{sorted(unknown)[0]}: unknown field")
        gpu = (entry["node"], entry["gpu_uuid"])
        if not all(isinstance(part, str) and part for part in gpu):
            raise errors.ProofError(f"{where}: node and gpu_uuid must be non-empty strings")
        if previous is not None and gpu <= previous:
            problems.append(f"{where}: GPUs are not in canonical order (or repeat)")
        previous = gpu
        spans: list[Span] = []
        raw_spans = entry["healthy_spans"]
        if not isinstance(raw_spans, list):
            raise errors.ProofError(f"{where}.healthy_spans: must be a list")
        for number, raw in enumerate(raw_spans):
            span_at = f"{where}.healthy_spans[{number}]"
            if not isinstance(raw, list) or len(raw) != 2:
                raise errors.ProofError(f"{span_at}: must be a [from, to] pair")
            try:
                start = timefmt.parse_utc(raw[0], field=span_at)
                end = timefmt.parse_utc(raw[1], field=span_at)
            except errors.InputError as exc:
                raise errors.ProofError(str(exc)) from exc
            if end <= start:
                problems.append(f"{span_at}: ends before it starts")
            elif spans and start <= spans[-1][1]:
                problems.append(f"{span_at}: overlaps, touches or precedes the span before it")
            elif start < window[0] or end > window[1]:
                problems.append(f"{span_at}: lies outside the counted window")
            spans.append((start, end))
        healthy[gpu] = spans
    return healthy


def _parse_ledger(entries: list[Any], contract_id: str, problems: list[str]) -> list[Assignment]:
    ledger: list[Assignment] = []
    for index, raw in enumerate(entries):
        try:
            assignment = evidence.assignment_from_json(raw)
        except errors.InputError as exc:
            raise errors.ProofError(f"assignments[{index}].{exc}") from exc
        if assignment.contract_id != contract_id:
            problems.append(f"assignments[{index}]: belongs to contract {assignment.contract_id}")
        order = (assignment.node, assignment.gpu_uuid, assignment.start_s, assignment.end_s)
        if ledger:
            last = ledger[-1]
            if order <= (last.node, last.gpu_uuid, last.start_s, last.end_s):
                problems.append(f"assignments[{index}]: not in canonical order (or repeats)")
        ledger.append(assignment)
    return ledger


def _check_signature(
    document: Mapping[str, Any], public_key: ed25519.Ed25519PublicKey, problems: list[str]
) -> str:
    block = _need(document, "signature", dict)
    expected = signing.key_id(public_key)
    named = block.get("key_id")
    if block.get("algorithm") != signing.ALGORITHM:
        problems.append(f"signature.algorithm: must be {signing.ALGORITHM}")
    if named != expected:
        problems.append(f"signature: made with key {named}, but the given public key is {expected}")
        return expected
    unsigned = {key: value for key, value in document.items() if key != "signature"}
    try:
        signing.verify(public_key, canonical.canonical_json(unsigned), block.get("value"))
    except errors.SignatureError as exc:
        problems.append(f"signature: {exc}")
    return expected


def _compare(label: str, stated: Any, recomputed: Any, problems: list[str]) -> None:
    if not isinstance(stated, dict):
        problems.append(f"{label}: must be an object")
        return
    for name in sorted(stated.keys() | recomputed.keys()):
        if stated.get(name) != recomputed.get(name):
            problems.append(
                f"{label}.{name}: proof says {stated.get(name)!r}, evidence gives "
                f"{recomputed.get(name)!r}"
            )


def verify(
    document: object,
    public_key: ed25519.Ed25519PublicKey,
    *,
    meter_records: Iterable[tuple[Mapping[str, Any], MeterRecord]] | None = None,
) -> Verification:
    """Verify a proof; `meter_records` (raw, parsed) also checks it against raw evidence.

    Raises `ProofError` when the document is too malformed to check at all.
    """
    if not isinstance(document, dict):
        raise errors.ProofError("a proof must be a JSON object")
    problems: list[str] = []
    unknown = document.keys() - _FIELDS
    if unknown:
        problems.append(f"{sorted(unknown)[0]}: unknown field")
    if document.get("format") != PROOF_FORMAT:
        raise errors.ProofError(f"format: must be {PROOF_FORMAT!r}")
    key_id = _check_signature(document, public_key, problems)
    stated_terms = _need(document, "terms", dict)
    try:
        terms = terms_module.parse_terms(stated_terms)
    except errors.TermsError as exc:
        raise errors.ProofError(f"terms.{exc}") from exc
    if terms.to_json() != stated_terms:
        problems.append("terms: not in canonical form (tiers mildest first, decimals as given)")
    _check_meter_evidence_shape(_need(document, "meter_evidence", dict), problems)
    try:
        as_of = timefmt.parse_utc(_need(document, "as_of", str), field="as_of")
    except errors.InputError as exc:
        raise errors.ProofError(str(exc)) from exc
    status = document.get("status")
    if status == STATUS_FINAL and as_of != terms.end:
        problems.append("as_of: a final proof counts the whole window, up to its end")
    elif status == STATUS_PROVISIONAL and not terms.start <= as_of < terms.end:
        problems.append("as_of: a provisional proof's as_of must lie in the window")
    elif status not in (STATUS_FINAL, STATUS_PROVISIONAL):
        problems.append(f"status: must be {STATUS_FINAL!r} or {STATUS_PROVISIONAL!r}")
    window = (terms.start, min(max(as_of, terms.start), terms.end))
    ledger = _parse_ledger(_need(document, "assignments", list), terms.contract_id, problems)
    stated_healthy = _parse_gpus(_need(document, "gpus", list), window, problems)

    _compare(
        "evidence_root",
        _need(document, "evidence_root", dict),
        _root_json(evidence_leaves(document)),
        problems,
    )
    assigned = accounting.assigned_spans(ledger, contract_id=terms.contract_id, window=window)
    if stated_healthy.keys() != assigned.keys():
        problems.append(
            f"gpus: lists {len(stated_healthy)} GPUs, but the ledger assigns "
            f"{len(assigned)} in the window"
        )
    delivered = accounting.delivered_gpu_seconds(
        terms.gpu_count, accounting.delivering_spans(assigned, stated_healthy)
    )
    recomputed = _settlement_json(settlement.settle(terms, delivered_gpu_seconds=delivered))
    _compare("settlement", _need(document, "settlement", dict), recomputed, problems)
    if meter_records is not None:
        _check_meter_evidence(document, assigned, window, meter_records, problems)
    return Verification(
        key_id=key_id, contract_id=terms.contract_id, problems=problems, settlement=recomputed
    )


def _check_meter_evidence_shape(stated: Mapping[str, Any], problems: list[str]) -> None:
    if set(stated) != {"leaves", "tree_size", "root_hash"}:
        problems.append("meter_evidence: must have exactly leaves, tree_size, root_hash")
    if stated.get("leaves") not in (LEAVES_METER_RECORDS, LEAVES_METER_BATCHES):
        problems.append(
            f"meter_evidence.leaves: must be {LEAVES_METER_RECORDS!r} or {LEAVES_METER_BATCHES!r}"
        )
    size = stated.get("tree_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        problems.append("meter_evidence.tree_size: must be a whole number >= 0")
    root = stated.get("root_hash")
    if not isinstance(root, str) or len(root) != 64 or root.strip("0123456789abcdef"):
        problems.append("meter_evidence.root_hash: must be a lower-case hex SHA-256")


def _check_meter_evidence(
    document: Mapping[str, Any],
    assigned: dict[GpuKey, list[Span]],
    window: Span,
    meter_records: Iterable[tuple[Mapping[str, Any], MeterRecord]],
    problems: list[str],
) -> None:
    stated = _need(document, "meter_evidence", dict)
    stream = MeterRecordStream(meter_records)
    summaries = _Summaries(assigned)
    healthy = accounting.healthy_spans(summaries.observe(stream), window=window, gpus=assigned)
    _compare("meter_evidence", stated, stream.evidence().to_json(), problems)
    for index, entry in enumerate(document["gpus"]):
        gpu = (entry["node"], entry["gpu_uuid"])
        if gpu not in assigned:
            continue
        expected = _gpu_entry(gpu, healthy.get(gpu, []), summaries.summary(gpu))
        for name in ("healthy_spans", "summary"):
            if entry.get(name) != expected.get(name):
                problems.append(f"gpus[{index}].{name}: does not match the meter records")
