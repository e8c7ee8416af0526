"""The evidence log: an RFC 9162 Merkle tree over every accepted meter batch.

Leaf i is the batch accepted i-th (`MeterBatch.leaf_index`), hashed as RFC 9162 hashes a
leaf: SHA-256 of 0x00 and the batch's canonical bytes (`MeterBatch.leaf_hash`, written at
ingest). A tree head is the provider's signature over the log's size and root at a time;
inclusion proofs show that a batch is in the tree of a head, consistency proofs that a
later head extends an earlier one without rewriting it. docs/evidence-log.md is the format
an exchange verifies offline with `gpudelivery.merkle`.

Heads and proofs read O(log n) rows, not the log. Every hash they need is the root of a few
complete subtrees (`gpudelivery.merkle.subtrees`). The roots of complete subtrees of
2**STORED_LEVEL leaves and more are kept in `merkle_nodes` (`MerkleNode`); a smaller one
comes from its leaves, read by range from its block of 2**STORED_LEVEL leaves, and a head
or proof reads at most two such blocks: the tree's last, and the one of the proved leaf or
of the old size's last leaf. A node is stored only once all its leaves exist, so stored
nodes never change. Every read first extends the stored nodes to its size (`_extend`) and computes
only what is missing, a bounded step of blocks at a time, so a backlog's leaves are read
once; `tree_head`, run periodically, extends them to the whole log, so proofs rarely
compute. Inserts skip rows already there, so transactions extending at once agree, and
neither fails.

The log only grows, in whole ingest requests committed in leaf order (api.ingest takes a
lock before giving out indexes), so the leaves below a size once read never change.
Not here: what goes into the log (api.ingest) and the HTTP side (api.routes.meter).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ed25519
from sqlalchemy import func, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, SQLModel, col, select

from gpudelivery import canonical, merkle, signing, timefmt
from gpudelivery.api import errors
from gpudelivery.api.models import MerkleNode, MeterBatch, TreeHead

__all__ = [
    "STORED_LEVEL",
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
# Subtrees of 2**8 = 256 leaves and up are stored: a proof then reads at most 3 blocks of
# 256 leaf hashes (one range query each) and the table holds one row per 128 leaves.
# Storing lower levels would multiply the rows to save reads that already cost one query.
STORED_LEVEL = 8
# A backlog is stored this many blocks at a time, bounding a first catch-up's memory.
_EXTEND_BLOCKS = 256
# Leaves are streamed from the database in chunks of this many rows.
_LEAF_CHUNK_ROWS = 10_000
# Stored nodes are looked up this many at a time: 1,000 parameters, well within SQLite's
# and PostgreSQL's limits.
_LOOKUP_KEYS = 500


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
    """How many leaves the log holds: one past the last index, an index lookup."""
    last = session.exec(select(func.max(col(MeterBatch.leaf_index)))).one()
    return 0 if last is None else int(last) + 1


def tree_head(session: Session, *, key: signing.SigningKey, now_s: int) -> TreeHead:
    """The signed head of the whole log; the stored one while the log has not grown.

    A new head is stored (the caller commits), so every head the API ever answered can be
    shown again and proved consistent with a later one. The stored subtrees are extended
    to the whole log first, so that later proofs find them.
    """
    size = log_size(session)
    _extend(session, size)
    stored = session.get(TreeHead, size)
    if stored is not None and stored.key_id == key.key_id:
        return stored
    root_hash = (_range_roots(session, [(0, size)])[0] if size else merkle.EMPTY_ROOT).hex()
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
    # Two requests may sign the same size at once: the first stored head stands.
    session.connection().execute(_insert(session, TreeHead), values)
    head = session.get(TreeHead, size, populate_existing=True)
    assert head is not None  # inserted, or there before
    return head


def inclusion(session: Session, *, leaf_index: int, size: int) -> InclusionProof:
    """The audit path of leaf `leaf_index` in the tree of the first `size` leaves."""
    leaves = log_size(session)
    if not 0 <= leaf_index < leaves:
        raise errors.NotFoundError(f"the evidence log has no leaf {leaf_index}")
    if not leaf_index < size:
        raise errors.UnprocessableError(f"leaf {leaf_index} is not in a tree of size {size}")
    _check_size(size, leaves)
    _extend(session, size)
    leaf_hash, *path = _range_roots(
        session, [(leaf_index, leaf_index + 1), *merkle.inclusion_ranges(leaf_index, size)]
    )
    return InclusionProof(
        leaf_index=leaf_index,
        tree_size=size,
        leaf_hash=leaf_hash.hex(),
        hashes=tuple(node.hex() for node in path),
    )


def consistency(session: Session, *, old_size: int, new_size: int) -> ConsistencyProof:
    """The proof that the tree of `new_size` leaves extends the tree of `old_size`."""
    if not 0 <= old_size <= new_size:
        raise errors.UnprocessableError(
            f"a consistency proof needs 0 <= from <= to, not from {old_size} to {new_size}"
        )
    _check_size(new_size, log_size(session))
    ranges = merkle.consistency_ranges(old_size, new_size)
    if ranges:
        _extend(session, new_size)
    return ConsistencyProof(
        old_size=old_size,
        new_size=new_size,
        hashes=tuple(node.hex() for node in _range_roots(session, ranges)),
    )


def _check_size(size: int, leaves: int) -> None:
    if size > leaves:
        raise errors.NotFoundError(f"the evidence log has {leaves} leaves, not {size}")


def _range_roots(session: Session, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """MTH of each range [start, end) of leaves, from the subtrees each is made of."""
    pieces = [merkle.subtrees(start, end) for start, end in ranges]
    wanted = {subtree for group in pieces for subtree in group}
    stored = {subtree for subtree in wanted if subtree.level >= STORED_LEVEL}
    roots = {**_stored_roots(session, stored), **_small_roots(session, wanted - stored)}
    return [merkle.join([roots[subtree] for subtree in group]) for group in pieces]


def _small_roots(
    session: Session, subtrees: Collection[merkle.Subtree]
) -> dict[merkle.Subtree, bytes]:
    """Roots of subtrees below STORED_LEVEL, from their leaves: one range read per block."""
    by_block: dict[int, list[merkle.Subtree]] = {}
    for subtree in subtrees:
        by_block.setdefault(subtree.start >> STORED_LEVEL, []).append(subtree)
    roots: dict[merkle.Subtree, bytes] = {}
    for group in by_block.values():
        start = min(subtree.start for subtree in group)
        hashes = list(_leaves(session, start, max(subtree.end for subtree in group)))
        for subtree in group:
            roots[subtree] = merkle.MerkleTree(
                hashes[subtree.start - start : subtree.end - start]
            ).root()
    return roots


def _extend(session: Session, size: int) -> None:
    """Store every complete subtree of STORED_LEVEL or more within the first `size` leaves.

    Each extension stores all of them up to its size, so the stored blocks are a prefix of
    the log and the last one says where to go on. A backlog is stored in steps of
    _EXTEND_BLOCKS blocks: each step resolves the subtrees of the root at its end, which
    reads only the leaves of the step's missing blocks and keeps only its own nodes.
    """
    block_leaves = 1 << STORED_LEVEL
    step_leaves = _EXTEND_BLOCKS * block_leaves
    done = _stored_blocks(session) * block_leaves
    target = size - size % block_leaves
    while done < target:
        step_end = min(target, done - done % step_leaves + step_leaves)
        _stored_roots(session, merkle.subtrees(0, step_end), stored_until=done)
        done = step_end


def _stored_blocks(session: Session) -> int:
    """How many blocks of leaves have their root stored (a prefix of the log's blocks)."""
    last = session.exec(
        select(func.max(col(MerkleNode.index))).where(col(MerkleNode.level) == STORED_LEVEL)
    ).one()
    return 0 if last is None else int(last) + 1


def _stored_roots(
    session: Session, subtrees: Collection[merkle.Subtree], *, stored_until: int | None = None
) -> dict[merkle.Subtree, bytes]:
    """Roots of subtrees at STORED_LEVEL or above: read, or computed and stored if missing.

    Subtrees ending after leaf `stored_until` (None: no bound) are taken to be missing and
    not looked up: an extension passes where the stored blocks end, so a catch-up looks up
    only the few nodes its new ones join. One stored meanwhile by another transaction is
    computed again, to the same hash, and skipped by the insert. The new rows go in at
    once, in key order, so that two transactions storing the same nodes take their row
    locks in one order and cannot deadlock.
    """
    roots: dict[merkle.Subtree, bytes] = {}
    computed: dict[merkle.Subtree, bytes] = {}
    _resolve(session, set(subtrees), roots, computed, stored_until=stored_until)
    if computed:
        session.connection().execute(
            _insert(session, MerkleNode),
            [
                {"level": subtree.level, "index": subtree.index, "hash": root.hex()}
                for subtree, root in sorted(computed.items())
            ],
        )
    return roots


def _resolve(
    session: Session,
    subtrees: set[merkle.Subtree],
    roots: dict[merkle.Subtree, bytes],
    computed: dict[merkle.Subtree, bytes],
    *,
    stored_until: int | None,
) -> None:
    """Put the roots of `subtrees` into `roots`, and those that were not stored also into
    `computed`: a block from its leaves, a higher node from its two children, resolved
    first, one level of the descent per lookup."""
    found = _lookup(
        session,
        [tree for tree in subtrees if stored_until is None or tree.end <= stored_until],
    )
    roots.update(found)
    missing = subtrees - found.keys()
    parents = {subtree for subtree in missing if subtree.level > STORED_LEVEL}
    children = {child for parent in parents for child in _children(parent)}
    if children:
        _resolve(session, children, roots, computed, stored_until=stored_until)
    new = _block_roots(session, sorted(subtree.index for subtree in missing - parents))
    for parent in parents:
        left, right = _children(parent)
        new[parent] = merkle.node_hash(roots[left], roots[right])
    roots.update(new)
    computed.update(new)


def _children(subtree: merkle.Subtree) -> tuple[merkle.Subtree, merkle.Subtree]:
    level, index = subtree.level - 1, subtree.index * 2
    return merkle.Subtree(level, index), merkle.Subtree(level, index + 1)


def _lookup(session: Session, subtrees: Collection[merkle.Subtree]) -> dict[merkle.Subtree, bytes]:
    """The stored roots among `subtrees`."""
    keys = sorted((subtree.level, subtree.index) for subtree in subtrees)
    found: dict[merkle.Subtree, bytes] = {}
    for chunk_start in range(0, len(keys), _LOOKUP_KEYS):
        rows = session.exec(
            select(MerkleNode.level, MerkleNode.index, MerkleNode.hash).where(
                tuple_(col(MerkleNode.level), col(MerkleNode.index)).in_(
                    keys[chunk_start : chunk_start + _LOOKUP_KEYS]
                )
            )
        )
        found.update(
            {merkle.Subtree(level, index): bytes.fromhex(root) for level, index, root in rows}
        )
    return found


def _block_roots(session: Session, blocks: Sequence[int]) -> dict[merkle.Subtree, bytes]:
    """The roots of blocks (subtrees at STORED_LEVEL), ascending indexes: one streamed range
    read per run of consecutive blocks."""
    block_leaves = 1 << STORED_LEVEL
    roots: dict[merkle.Subtree, bytes] = {}
    run_start = 0
    while run_start < len(blocks):
        run_end = run_start + 1
        while run_end < len(blocks) and blocks[run_end] == blocks[run_end - 1] + 1:
            run_end += 1
        first, last = blocks[run_start], blocks[run_end - 1]
        accumulator, block = merkle.RootAccumulator(), first
        for hashed in _leaves(session, first * block_leaves, (last + 1) * block_leaves):
            accumulator.add_hash(hashed)
            if accumulator.size == block_leaves:
                roots[merkle.Subtree(STORED_LEVEL, block)] = accumulator.root()
                accumulator, block = merkle.RootAccumulator(), block + 1
        run_start = run_end
    return roots


def _leaves(session: Session, start: int, end: int) -> Iterator[bytes]:
    """The hashes of leaves [start, end), streamed in index order.

    Bounded by `end`, not read to the end of the log: leaves committed since the log was
    measured belong to a later head.
    """
    expected = start
    rows = session.exec(
        select(MeterBatch.leaf_index, MeterBatch.leaf_hash)
        .where(col(MeterBatch.leaf_index) >= start, col(MeterBatch.leaf_index) < end)
        .order_by(col(MeterBatch.leaf_index))
        .execution_options(yield_per=_LEAF_CHUNK_ROWS)
    )
    try:  # a gap ends the read early: the server-side cursor is closed here, not by GC
        for leaf_index, leaf_hash in rows:
            if leaf_index != expected:
                break
            yield bytes.fromhex(leaf_hash)
            expected += 1
    finally:
        rows.close()
    if expected != end:
        raise EvidenceLogError(f"leaf {expected} is missing from the log")


def _insert(session: Session, model: type[SQLModel]) -> postgresql.Insert | sqlite.Insert:
    """An INSERT, of the rows it is executed with, that skips those already stored."""
    if session.connection().dialect.name == "postgresql":
        return postgresql.insert(model).on_conflict_do_nothing()
    return sqlite.insert(model).on_conflict_do_nothing()
