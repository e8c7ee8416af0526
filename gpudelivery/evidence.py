"""Assignment intervals and meter records: the two kinds of evidence a settlement uses.

An `Assignment` is a line of the operator's assignment ledger (GPU g on node n served
contract C over [from, to)); a `MeterRecord` is one metering sample interval of one GPU
([t0, t1), healthy or not). Both are plain frozen values with integer epoch seconds. The
parsers turn decoded JSON into them and name the offending field on bad input; they are
on the hot path of `gpudelivery settle`, so they check by hand rather than through a
model class.

Meter records may carry further fields (utilization, energy, XIDs, pods ...). Only
`utilization_gpu_pct` and `energy_mj` are read here, for a proof's per-GPU summary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpudelivery import errors, timefmt

__all__ = [
    "ASSIGNMENT_FIELDS",
    "Assignment",
    "GpuKey",
    "MeterRecord",
    "assignment_from_json",
    "assignment_to_json",
    "meter_record_from_json",
]

# A GPU is named by its node and its UUID: the ledger and the meter both say "g on n".
GpuKey = tuple[str, str]

# The fields of a ledger line, exactly (shared/SETTLEMENT.md, ASSIGN.jsonl).
ASSIGNMENT_FIELDS = frozenset({"contract_id", "node", "gpu_uuid", "from", "to"})


@dataclass(frozen=True, slots=True)
class Assignment:
    """GPU `gpu_uuid` on `node` was assigned to `contract_id` over [start_s, end_s)."""

    contract_id: str
    node: str
    gpu_uuid: str
    start_s: int
    end_s: int

    @property
    def gpu(self) -> GpuKey:
        return (self.node, self.gpu_uuid)


@dataclass(frozen=True, slots=True)
class MeterRecord:
    """One meter sample interval [t0_s, t1_s) of one GPU."""

    node: str
    gpu_uuid: str
    t0_s: int
    t1_s: int
    healthy: bool
    utilization_gpu_pct: int | float | None = None
    energy_mj: int | None = None

    @property
    def gpu(self) -> GpuKey:
        return (self.node, self.gpu_uuid)


def _text(data: dict[str, Any], field: str) -> str:
    value = data.get(field)
    if value is None:
        raise errors.EvidenceError("missing", field=field)
    if not isinstance(value, str) or not value:
        raise errors.EvidenceError("must be a non-empty string", field=field)
    return value


def _time(data: dict[str, Any], field: str) -> int:
    if field not in data:
        raise errors.EvidenceError("missing", field=field)
    try:
        return timefmt.parse_utc(data[field], field=field)
    except errors.InputError as exc:
        raise errors.EvidenceError(exc.reason, field=field) from exc


def assignment_from_json(data: object) -> Assignment:
    """Parse one ledger line `{contract_id, node, gpu_uuid, from, to}`; no other field."""
    if not isinstance(data, dict):
        raise errors.EvidenceError(f"must be a JSON object, got {type(data).__name__}")
    unknown = data.keys() - ASSIGNMENT_FIELDS
    if unknown:
        raise errors.EvidenceError("unknown field", field=sorted(unknown)[0])
    start_s = _time(data, "from")
    end_s = _time(data, "to")
    if end_s <= start_s:
        raise errors.EvidenceError("must be after from", field="to")
    return Assignment(
        contract_id=_text(data, "contract_id"),
        node=_text(data, "node"),
        gpu_uuid=_text(data, "gpu_uuid"),
        start_s=start_s,
        end_s=end_s,
    )


def assignment_to_json(assignment: Assignment) -> dict[str, Any]:
    """The ledger line of an assignment, as `assignment_from_json` reads it."""
    return {
        "contract_id": assignment.contract_id,
        "node": assignment.node,
        "gpu_uuid": assignment.gpu_uuid,
        "from": timefmt.format_utc(assignment.start_s),
        "to": timefmt.format_utc(assignment.end_s),
    }


def meter_record_from_json(data: object, *, node: str | None = None) -> MeterRecord:
    """Parse one meter record `{node, gpu_uuid, t0, t1, healthy, ...}`.

    `node` supplies the node for records inside a meter batch, which names it once; a record
    that names another node is refused.
    """
    if not isinstance(data, dict):
        raise errors.EvidenceError(f"must be a JSON object, got {type(data).__name__}")
    if node is None:
        node = _text(data, "node")
    elif data.get("node", node) != node:
        raise errors.EvidenceError(f"must be the batch's node {node!r}", field="node")
    t0_s = _time(data, "t0")
    t1_s = _time(data, "t1")
    if t1_s <= t0_s:
        raise errors.EvidenceError("must be after t0", field="t1")
    healthy = data.get("healthy")
    if not isinstance(healthy, bool):
        raise errors.EvidenceError(
            "missing" if healthy is None else "must be true or false", field="healthy"
        )
    utilization = data.get("utilization_gpu_pct")
    if utilization is not None and (
        isinstance(utilization, bool)
        or not isinstance(utilization, int | float)
        or not 0 <= utilization <= 100
    ):
        raise errors.EvidenceError("must be a number from 0 to 100", field="utilization_gpu_pct")
    energy = data.get("energy_mj")
    if energy is not None and (
        isinstance(energy, bool) or not isinstance(energy, int) or energy < 0
    ):
        raise errors.EvidenceError("must be a whole number >= 0", field="energy_mj")
    return MeterRecord(
        node=node,
        gpu_uuid=_text(data, "gpu_uuid"),
        t0_s=t0_s,
        t1_s=t1_s,
        healthy=healthy,
        utilization_gpu_pct=utilization,
        energy_mj=energy,
    )
