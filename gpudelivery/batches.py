"""Signed, hash-chained meter batches: what a metering agent ships and the API verifies.

A batch holds one node's meter records for one interval (docs/ingest.md gives the HTTP
side). It names its node, the id of the node key that signed it, its sequence number and
the hash of the batch before it, so the batches of a node form a chain: a batch cannot be
dropped, reordered or rewritten after the next one is signed without the chain showing it.
The first batch of a chain has `seq` 0 and `prev_hash` null. The signature is Ed25519 over
the RFC 8785 canonical JSON of the batch without its `signature` field; a batch's hash is the
SHA-256 of the canonical JSON of the whole signed batch.

A batch may instead carry a `gap` ({from, to, reason}): a signed admission that the records
of that span were lost (a full disk, say), so silence is never mistaken for an outage of the
meter's choosing. Gaps count as unmetered seconds in the settlement.

Two ways in, one verdict. `parse_batch` takes any decoded JSON value. `UsualBatch` is the
shape the metering agent makes (docs/meter-batch.md's fields, the agent's record fields,
integers within 2^53, no floats), decoded typed by msgspec: its types are checked in C while
decoding, its canonical bytes are one sorted encode (those values need no RFC 8785 walk),
and its structs are left out of the garbage collector's tracking. `parse_batch` gives a
`UsualBatch` exactly the verdict it gives the same batch decoded as plain JSON: one that
fails any check goes through the general path, which names the field. A property test
holds the two paths equal.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, NamedTuple

import msgspec
import orjson
from cryptography.hazmat.primitives.asymmetric import ed25519

from gpudelivery import canonical, errors, evidence, signing, timefmt
from gpudelivery.evidence import MeterRecord

__all__ = [
    "BATCH_FORMAT",
    "MAX_SEQ",
    "ChainError",
    "Gap",
    "MeterBatch",
    "RecordValues",
    "SignedBatch",
    "UsualBatch",
    "UsualRecord",
    "batch_hash",
    "check_link",
    "parse_batch",
    "sign_batch",
    "sign_batch_and_hash",
    "verify_batch",
    "verify_chain",
]

# The format tag of version 1 of the batch document.
BATCH_FORMAT = "gpudelivery.meter-batch/v1"
# RFC 8785 serialises numbers as IEEE doubles: larger integers would not survive.
_MAX_JSON_INTEGER = 2**53
# A batch's seq is below this.
MAX_SEQ = _MAX_JSON_INTEGER
_HASH_HEX_DIGITS = 64
_LOWER_HEX = "0123456789abcdef"
_FIELDS = frozenset({"format", "node", "key_id", "seq", "prev_hash", "records", "gap", "signature"})
_NUMBER_TYPES = (int, float)

# What a batch keeps of a record, in this order: gpu_uuid, t0_s, t1_s, healthy,
# utilization_gpu_pct, energy_mj (a MeterRecord's fields after its node, the batch's).
RecordValues = tuple[str, int, int, bool, int | float | None, int | None]


class ChainError(errors.GpuDeliveryError):
    """A batch that does not continue its node's chain (a gap, a fork or a replay)."""


@dataclass(frozen=True, slots=True)
class Gap:
    """Records of [start_s, end_s) were lost, for `reason`."""

    start_s: int
    end_s: int
    reason: str


@dataclass(frozen=True, slots=True)
class MeterBatch:
    """A parsed batch: its header, its records' values and its canonical bytes."""

    node: str
    key_id: str
    seq: int
    prev_hash: str | None
    record_values: tuple[RecordValues, ...]
    gap: Gap | None
    hash: str
    signature: str
    canonical: bytes  # the document's RFC 8785 bytes, which `hash` is the SHA-256 of

    @property
    def document(self) -> dict[str, Any]:
        """The signed JSON document, decoded afresh from its canonical bytes."""
        document: dict[str, Any] = orjson.loads(self.canonical)
        return document

    @property
    def records(self) -> tuple[MeterRecord, ...]:
        """The records as `MeterRecord`s, made on each access: the API's ingest stores
        `record_values` as they are, and a frozen value costs more to make than to check."""
        return tuple(MeterRecord(self.node, *values) for values in self.record_values)


def _unsigned(document: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in document.items() if key != "signature"}


def batch_hash(document: dict[str, Any]) -> str:
    """Hex SHA-256 of the canonical JSON of a whole signed batch."""
    return canonical.sha256_hex(canonical.canonical_json(document))


class SignedBatch(NamedTuple):
    """A batch as the signer made it: the document, its canonical bytes, their SHA-256."""

    document: dict[str, Any]
    canonical: bytes
    hash: str


def sign_batch_and_hash(
    *,
    key: signing.SigningKey,
    node: str,
    seq: int,
    prev_hash: str | None,
    records: Sequence[dict[str, Any]],
    gap: Gap | None = None,
    plain_records: bool = False,
) -> SignedBatch:
    """A signed batch document over `records` (JSON objects without `node`), with its
    canonical bytes and hash.

    The records are taken as given (the meter builds them); `parse_batch` is what checks
    batches that come from elsewhere. The document is canonicalised once: `signature` sorts
    after every other field and its base64 needs no escaping, so the canonical form of the
    signed batch is that of the unsigned one with the signature spliced in before the end.
    Its header (sequence, link, gap) is still checked: a chain never holds a bad link.
    `plain_records` says the records are plain JSON by construction (canonical.is_plain;
    the meter's are), so only the header is checked for it.
    """
    if isinstance(seq, bool) or not 0 <= seq < _MAX_JSON_INTEGER:
        raise errors.EvidenceError("must be a whole number from 0 to 2^53 - 1", field="seq")
    if (seq == 0) != (prev_hash is None):
        raise errors.EvidenceError("is null exactly when seq is 0", field="prev_hash")
    if gap is not None and gap.end_s <= gap.start_s:
        raise errors.EvidenceError("must be after gap.from", field="gap.to")
    document: dict[str, Any] = {
        "format": BATCH_FORMAT,
        "node": node,
        "key_id": key.key_id,
        "seq": seq,
        "prev_hash": prev_hash,
        "records": list(records),
    }
    if gap is not None:
        document["gap"] = {
            "from": timefmt.format_utc(gap.start_s),
            "to": timefmt.format_utc(gap.end_s),
            "reason": gap.reason,
        }
    assume_plain = plain_records and canonical.is_plain({**document, "records": []})
    unsigned = canonical.canonical_json(document, assume_plain=assume_plain)
    signature = key.sign(unsigned)
    document["signature"] = signature
    signed = unsigned[:-1] + b',"signature":"' + signature.encode("ascii") + b'"}'
    return SignedBatch(document, signed, canonical.sha256_hex(signed))


def sign_batch(
    *,
    key: signing.SigningKey,
    node: str,
    seq: int,
    prev_hash: str | None,
    records: Sequence[dict[str, Any]],
    gap: Gap | None = None,
) -> dict[str, Any]:
    """A signed batch document over `records` (JSON objects without `node`), checked whole.

    Refuses, naming the field, to sign what `parse_batch` would refuse.
    """
    document = sign_batch_and_hash(
        key=key, node=node, seq=seq, prev_hash=prev_hash, records=records, gap=gap
    ).document
    parse_batch(document)
    return document


def _parse_gap(value: object) -> Gap | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"from", "to", "reason"}:
        raise errors.EvidenceError("must be an object {from, to, reason}", field="gap")
    try:
        start_s = timefmt.parse_utc(value["from"], field="gap.from")
        end_s = timefmt.parse_utc(value["to"], field="gap.to")
    except errors.InputError as exc:
        raise errors.EvidenceError(exc.reason, field=exc.field) from exc
    if end_s <= start_s:
        raise errors.EvidenceError("must be after gap.from", field="gap.to")
    if not isinstance(value["reason"], str) or not value["reason"]:
        raise errors.EvidenceError("must be a non-empty string", field="gap.reason")
    return Gap(start_s, end_s, value["reason"])


def _canonical_or_refuse(document: dict[str, Any]) -> bytes:
    try:
        return canonical.canonical_json(document)
    except errors.InputError as exc:  # a value RFC 8785 cannot hold: NaN, a huge integer
        raise errors.EvidenceError(exc.reason, field="records") from exc


def _unsigned_canonical(batch: MeterBatch) -> bytes:
    """The canonical bytes the signature covers. `signature` sorts after every other field
    and its base64 needs no escaping, so they are the signed bytes with that member cut
    off (as `sign_batch_and_hash` spliced it in); anything else is canonicalised afresh."""
    suffix = b',"signature":"' + batch.signature.encode("utf-8") + b'"}'
    if batch.canonical.endswith(suffix):
        return batch.canonical[: -len(suffix)] + b"}"
    return canonical.canonical_json(_unsigned(batch.document))


def _record_values(raw: object, node: str, index: int) -> RecordValues:
    """A record's values, checked as `evidence.meter_record_from_json` checks a record of
    `node`: the usual record (exact JSON types, every check passing) right here, since a
    batch holds hundreds; anything else through that function, for its verdict and the
    field its refusal names."""
    if type(raw) is dict:
        gpu_uuid, t0, t1 = raw.get("gpu_uuid"), raw.get("t0"), raw.get("t1")
        healthy, energy = raw.get("healthy"), raw.get("energy_mj")
        utilization, named_node = raw.get("utilization_gpu_pct"), raw.get("node", node)
        if (
            type(gpu_uuid) is str
            and gpu_uuid
            and type(t0) is str
            and type(t1) is str
            and type(healthy) is bool
            and (utilization is None or type(utilization) in _NUMBER_TYPES)
            and (utilization is None or 0 <= utilization <= 100)
            and (energy is None or (type(energy) is int and energy >= 0))
            and type(named_node) is str
            and named_node == node
        ):
            try:
                t0_s = timefmt.parse_utc(t0, field="t0")
                t1_s = timefmt.parse_utc(t1, field="t1")
            except errors.InputError:
                pass  # the function below names the field
            else:
                if t0_s < t1_s:
                    return (gpu_uuid, t0_s, t1_s, healthy, utilization, energy)
    try:
        record = evidence.meter_record_from_json(raw, node=node)
    except errors.InputError as exc:
        where = f"records[{index}]" + (f".{exc.field}" if exc.field else "")
        raise errors.EvidenceError(exc.reason, field=where) from exc
    return (
        record.gpu_uuid,
        record.t0_s,
        record.t1_s,
        record.healthy,
        record.utilization_gpu_pct,
        record.energy_mj,
    )


def parse_batch(document: object) -> MeterBatch:
    """Check a batch's structure and records (not its signature): a decoded JSON value or
    a `UsualBatch`."""
    if isinstance(document, UsualBatch):
        return _parse_usual(document)
    if not isinstance(document, dict):
        raise errors.EvidenceError("a batch must be a JSON object")
    unknown = document.keys() - _FIELDS
    if unknown:
        raise errors.EvidenceError("unknown field", field=sorted(unknown)[0])
    if document.get("format") != BATCH_FORMAT:
        raise errors.EvidenceError(f"must be {BATCH_FORMAT!r}", field="format")
    node, key_id, seq = document.get("node"), document.get("key_id"), document.get("seq")
    if not isinstance(node, str) or not node:
        raise errors.EvidenceError("must be a non-empty string", field="node")
    if not isinstance(key_id, str) or not key_id:
        raise errors.EvidenceError("must be a non-empty string", field="key_id")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < _MAX_JSON_INTEGER:
        raise errors.EvidenceError("must be a whole number from 0 to 2^53 - 1", field="seq")
    prev_hash = document.get("prev_hash")
    if prev_hash is not None and not (
        isinstance(prev_hash, str)
        and len(prev_hash) == _HASH_HEX_DIGITS
        and not prev_hash.strip(_LOWER_HEX)
    ):
        raise errors.EvidenceError("must be null or a hex SHA-256", field="prev_hash")
    if (seq == 0) != (prev_hash is None):
        raise errors.EvidenceError("is null exactly when seq is 0", field="prev_hash")
    raw_records = document.get("records")
    if not isinstance(raw_records, list):
        raise errors.EvidenceError("must be a list", field="records")
    record_values = tuple(
        [_record_values(raw, node, index) for index, raw in enumerate(raw_records)]
    )
    if not isinstance(document.get("signature"), str):
        raise errors.EvidenceError("must be a base64 string", field="signature")
    signed = _canonical_or_refuse(document)
    return MeterBatch(
        node=node,
        key_id=key_id,
        seq=seq,
        prev_hash=prev_hash,
        record_values=record_values,
        gap=_parse_gap(document.get("gap")),
        hash=canonical.sha256_hex(signed),
        signature=document["signature"],
        canonical=signed,
    )


def verify_batch(document: object, public_key: ed25519.Ed25519PublicKey) -> MeterBatch:
    """Parse a batch and check that `public_key` signed it."""
    batch = parse_batch(document)
    expected = signing.key_id(public_key)
    if batch.key_id != expected:
        raise errors.SignatureError(f"batch names key {batch.key_id}, not {expected}")
    signing.verify(public_key, _unsigned_canonical(batch), batch.signature)
    return batch


# -- The usual batch, decoded typed -----------------------------------------------------------

# An integer RFC 8785 holds exactly (the general path refuses the others, naming them).
_SafeInt = Annotated[int, msgspec.Meta(gt=-_MAX_JSON_INTEGER, lt=_MAX_JSON_INTEGER)]
_Unset = msgspec.UnsetType
_UNSET = msgspec.UNSET
# A measurement the agent may leave out (not measured) or send as null.
_Measured = _SafeInt | _Unset | None
# Sorted fields: a UsualBatch's values are all plain (canonical.is_plain), so this is RFC 8785.
_USUAL_ENCODER = msgspec.json.Encoder(order="sorted")


class UsualRecord(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A meter record as the agent writes it (metering.records): a field it did not measure
    is left out (UNSET), so the record encodes back to exactly the fields it came with."""

    gpu_uuid: str
    t0: str
    t1: str
    healthy: bool
    node: str | _Unset = _UNSET
    xids: list[_SafeInt] | _Unset = _UNSET
    reasons: list[str] | _Unset = _UNSET
    utilization_gpu_pct: Annotated[int, msgspec.Meta(ge=0, le=100)] | _Unset | None = _UNSET
    utilization_memory_pct: _Measured = _UNSET
    memory_used_bytes: _Measured = _UNSET
    power_mw: _Measured = _UNSET
    temperature_c: _Measured = _UNSET
    energy_mj: Annotated[int, msgspec.Meta(ge=0, lt=_MAX_JSON_INTEGER)] | _Unset | None = _UNSET
    ecc_corrected: _Measured = _UNSET
    ecc_uncorrected: _Measured = _UNSET
    remapped_rows: _Measured = _UNSET
    pods: list[str] | _Unset = _UNSET


class _UsualGap(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    start: str = msgspec.field(name="from")
    end: str = msgspec.field(name="to")
    reason: str


class UsualBatch(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A batch in the agent's usual shape, as msgspec decodes it (`msgspec.json.decode(raw,
    type=UsualBatch)`, or as a field of a larger type); anything else fails to decode, and
    is parsed as plain JSON instead."""

    format: str
    node: str
    key_id: str
    seq: Annotated[int, msgspec.Meta(ge=0, lt=_MAX_JSON_INTEGER)]
    prev_hash: str | None
    records: list[UsualRecord]
    signature: str
    gap: _UsualGap | _Unset = _UNSET


def _parse_usual(wire: UsualBatch) -> MeterBatch:
    """`parse_batch` of a usual batch: checked here when every check passes, otherwise by
    the general path over the same JSON value, for its error."""
    batch = _usual(wire)
    return parse_batch(msgspec.to_builtins(wire)) if batch is None else batch


def _usual(wire: UsualBatch) -> MeterBatch | None:
    """The checks of `parse_batch` that msgspec's types left; None when one fails."""
    node, prev_hash = wire.node, wire.prev_hash
    if wire.format != BATCH_FORMAT or not node or not wire.key_id:
        return None
    if (prev_hash is None) != (wire.seq == 0) or not (
        prev_hash is None
        or (len(prev_hash) == _HASH_HEX_DIGITS and not prev_hash.strip(_LOWER_HEX))
    ):
        return None
    # A batch's records share a few instants (a round's GPUs, and a t1 is the next t0):
    # each is parsed once here.
    instants: dict[str, int] = {}
    parse_utc = timefmt.parse_utc
    values: list[RecordValues] = []
    append = values.append
    try:
        for record in wire.records:
            t0, t1, named_node = record.t0, record.t1, record.node
            t0_s = instants.get(t0)
            if t0_s is None:
                t0_s = instants[t0] = parse_utc(t0, field="t0")
            t1_s = instants.get(t1)
            if t1_s is None:
                t1_s = instants[t1] = parse_utc(t1, field="t1")
            gpu_uuid = record.gpu_uuid
            if t1_s <= t0_s or not gpu_uuid or (named_node is not _UNSET and named_node != node):
                return None
            utilization, energy = record.utilization_gpu_pct, record.energy_mj
            append(
                (
                    gpu_uuid,
                    t0_s,
                    t1_s,
                    record.healthy,
                    None if utilization is _UNSET else utilization,
                    None if energy is _UNSET else energy,
                )
            )
        gap = None if wire.gap is _UNSET else _parse_gap(msgspec.to_builtins(wire.gap))
    except errors.InputError:
        return None
    signed = _USUAL_ENCODER.encode(wire)
    return MeterBatch(
        node=node,
        key_id=wire.key_id,
        seq=wire.seq,
        prev_hash=prev_hash,
        record_values=tuple(values),
        gap=gap,
        hash=canonical.sha256_hex(signed),
        signature=wire.signature,
        canonical=signed,
    )


def check_link(previous: MeterBatch | None, batch: MeterBatch) -> None:
    """Raise `ChainError` unless `batch` directly follows `previous` (None: chain start)."""
    if previous is None:
        if batch.seq != 0:
            raise ChainError(f"node {batch.node}: chain starts at seq {batch.seq}, not 0")
        return
    if batch.node != previous.node or batch.key_id != previous.key_id:
        raise ChainError(f"seq {batch.seq} belongs to another node or key than seq {previous.seq}")
    if batch.seq != previous.seq + 1:
        raise ChainError(
            f"node {batch.node}: seq {batch.seq} does not follow seq {previous.seq} (gap)"
        )
    if batch.prev_hash != previous.hash:
        raise ChainError(
            f"node {batch.node}: seq {batch.seq} does not link to the hash of seq "
            f"{previous.seq} (fork)"
        )


def verify_chain(
    documents: Iterable[object], public_key: ed25519.Ed25519PublicKey
) -> list[MeterBatch]:
    """Verify every batch's signature and that they form one chain from seq 0."""
    chain: list[MeterBatch] = []
    for document in documents:
        batch = verify_batch(document, public_key)
        check_link(chain[-1] if chain else None, batch)
        chain.append(batch)
    return chain
