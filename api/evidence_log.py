"""The evidence log: an RFC 9162 Merkle tree over every accepted meter batch.

Leaf i is the batch accepted i-th (`MeterBatch.leaf_index`), hashed as RFC 9162 hashes a
leaf: SHA-256 of 0x00 and the batch's canonical bytes (`MeterBatch.leaf_hash`, written at
ingest). A tree head is the provider's signature over the log's size and root at a time;
inclusion proofs show that a batch is in the tree of a head, consistency proofs that a
later head extends an earlier one without rewriting it. docs/evidence-log.md is the format
an exchange verifies offline with `gpudelivery.merkle`.

The log only grows, in whole ingest requests committed in leaf order (api.ingest takes a
lock before giving out indexes), so any single read of the leaves sees a prefix of it.
Not here: what goes into the log (api.ingest) and the HTTP side (api.routes.meter).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ed25519
from sqlalchemy import func
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, select

from gpudelivery import canonical, merkle, signing, timefmt
from gpudelivery.api import errors
from gpudelivery.api.models import MeterBatch, TreeHead

__all__ = [
    "TREE_HEAD_FORMAT",
    "ConsistencyProof",
    "EvidenceLogError",
    "InclusionProof",
    "consistency",
    "inclusion",
    "log_size",
    "statement",
    "tree_head",
    "verify_tree_head",
]

# The format tag of the signed tree-head statement (docs/evidence-log.md).
TREE_HEAD_FORMAT = "gpudelivery.tree-head/v1"
# Leaves are streamed from the database in chunks of this many rows to compute a root.
_ROOT_CHUNK_ROWS = 10_000


class EvidenceLogError(Exception):
    """The stored log is not a gap-free sequence of leaves: a bug, never bad input."""


@dataclass(frozen=True, slots=True)
class InclusionProof:
    """RFC 9162 audit path of leaf `leaf_index` in the tree of the first `tree_size`
    leaves; hashes in hex."""

    leaf_index: int
    tree_size: int
    leaf_hash: str
    hashes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ConsistencyProof:
    """RFC 9162 proof that the tree of `new_size` leaves extends that of `old_size`."""

    old_size: int
    new_size: int
    hashes: tuple[str, ...]


def statement(*, size: int, root_hash: str, timestamp_s: int) -> bytes:
    """The canonical JSON a tree head's signature covers."""
    return canonical.canonical_json(
        {
            "format": TREE_HEAD_FORMAT,
            "size": size,
            "root_hash": root_hash,
            "timestamp": timefmt.format_utc(timestamp_s),
        }
    )


def verify_tree_head(head: TreeHead, public_key: ed25519.Ed25519PublicKey) -> None:
    """Raise `gpudelivery.errors.SignatureError` unless `public_key` signed `head`."""
    payload = statement(size=head.size, root_hash=head.root_hash, timestamp_s=head.timestamp_s)
    signing.verify(public_key, payload, head.signature)


def log_size(session: Session) -> int:
    """How many leaves the log holds."""
    return int(session.exec(select(func.count()).select_from(MeterBatch)).one())


def tree_head(session: Session, *, key: signing.SigningKey, now_s: int) -> TreeHead:
    """The signed head of the whole log; the stored one while the log has not grown.

    A new head is stored (the caller commits), so every head the API ever answered can be
    shown again and proved consistent with a later one.
    """
    size = log_size(session)
    stored = session.get(TreeHead, size)
    if stored is not None and stored.key_id == key.key_id:
        return stored
    root_hash = _root(session, size).hex()
    signature = key.sign(statement(size=size, root_hash=root_hash, timestamp_s=now_s))
    values = {
        "size": size,
        "root_hash": root_hash,
        "timestamp_s": now_s,
        "key_id": key.key_id,
        "signature": signature,
    }
    if stored is not None:  # signed by a key the provider has since replaced
        for name, value in values.items():
            setattr(stored, name, value)
        session.add(stored)
        session.flush()
        return stored
    connection = session.connection()
    dialect_insert = postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert
    # Two requests may sign the same size at once: the first stored head stands.
    connection.execute(dialect_insert(TreeHead).values(values).on_conflict_do_nothing())
    head = session.get(TreeHead, size, populate_existing=True)
    assert head is not None  # inserted, or there before
    return head


def _root(session: Session, size: int) -> bytes:
    """The root over the first `size` leaves, streamed in index order.

    Bounded by `size`, not read to the end: leaves committed since the log was counted
    belong to a later head.
    """
    accumulator = merkle.RootAccumulator()
    rows = session.exec(
        select(MeterBatch.leaf_index, MeterBatch.leaf_hash)
        .where(col(MeterBatch.leaf_index) < size)
        .order_by(col(MeterBatch.leaf_index))
        .execution_options(yield_per=_ROOT_CHUNK_ROWS)
    )
    for leaf_index, leaf_hash in rows:
        if leaf_index != accumulator.size:
            raise EvidenceLogError(f"leaf {accumulator.size} is missing from the log")
        accumulator.add_hash(bytes.fromhex(leaf_hash))
    if accumulator.size != size:
        raise EvidenceLogError(f"the log counts {size} leaves but holds {accumulator.size}")
    return accumulator.root()


def _leaf_hashes(session: Session, size: int) -> list[bytes]:
    """The hashes of the first `size` leaves; NotFoundError when the log is shorter."""
    hashes = session.exec(
        select(MeterBatch.leaf_hash)
        .where(col(MeterBatch.leaf_index) < size)
        .order_by(col(MeterBatch.leaf_index))
    ).all()
    if len(hashes) < size:
        raise errors.NotFoundError(f"the evidence log has {len(hashes)} leaves, not {size}")
    return [bytes.fromhex(leaf_hash) for leaf_hash in hashes]


def inclusion(session: Session, *, leaf_index: int, size: int) -> InclusionProof:
    """The audit path of leaf `leaf_index` in the tree of the first `size` leaves."""
    if not 0 <= leaf_index < log_size(session):
        raise errors.NotFoundError(f"the evidence log has no leaf {leaf_index}")
    if not leaf_index < size:
        raise errors.UnprocessableError(f"leaf {leaf_index} is not in a tree of size {size}")
    hashes = _leaf_hashes(session, size)
    path = merkle.MerkleTree(hashes).inclusion_proof(leaf_index, size)
    return InclusionProof(
        leaf_index=leaf_index,
        tree_size=size,
        leaf_hash=hashes[leaf_index].hex(),
        hashes=tuple(node.hex() for node in path),
    )


def consistency(session: Session, *, old_size: int, new_size: int) -> ConsistencyProof:
    """The proof that the tree of `new_size` leaves extends the tree of `old_size`."""
    if not 0 <= old_size <= new_size:
        raise errors.UnprocessableError(
            f"a consistency proof needs 0 <= from <= to, not from {old_size} to {new_size}"
        )
    tree = merkle.MerkleTree(_leaf_hashes(session, new_size))
    return ConsistencyProof(
        old_size=old_size,
        new_size=new_size,
        hashes=tuple(node.hex() for node in tree.consistency_proof(old_size, new_size)),
    )
