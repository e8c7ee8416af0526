"""An RFC 9162 Merkle tree: roots, inclusion proofs and consistency proofs.

This is the commitment behind every piece of delivery evidence: a proof names the root
and size of the tree over the evidence it was built from, and anyone holding a leaf can be
shown, with O(log n) hashes, that the leaf is in the tree (inclusion) and that a later tree
extends an earlier one without rewriting it (consistency). Leaf and interior hashes are
domain-separated (RFC 9162 section 2.1.1: SHA-256 of 0x00 || leaf, of 0x01 || left ||
right), so a leaf can never pass for an interior node.

The tree is kept as its levels, built bottom-up by pairing neighbours and carrying an odd
last node up unchanged; that yields exactly RFC 9162's split at the largest power of two.
`RootAccumulator` computes a root in O(log n) memory for streams too long to keep.

Every hash a root or proof needs is the root of a range of leaves (`inclusion_ranges`,
`consistency_ranges`), and every such range is a few complete subtrees (`subtrees`) joined
(`join`). A store that keeps complete subtrees' roots (api.evidence_log) builds any proof
from O(log n) of them this way, without holding the tree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "MerkleTree",
    "RootAccumulator",
    "Subtree",
    "consistency_ranges",
    "inclusion_ranges",
    "join",
    "leaf_hash",
    "node_hash",
    "root_of",
    "subtrees",
    "verify_consistency",
    "verify_inclusion",
]

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(_LEAF_PREFIX + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _largest_power_of_two_below(n: int) -> int:
    return 1 << ((n - 1).bit_length() - 1)


@dataclass(frozen=True, slots=True, order=True)
class Subtree:
    """A complete subtree: leaves [index * 2**level, (index + 1) * 2**level)."""

    level: int
    index: int

    @property
    def start(self) -> int:
        return self.index << self.level

    @property
    def end(self) -> int:
        return (self.index + 1) << self.level


def subtrees(start: int, end: int) -> tuple[Subtree, ...]:
    """The complete subtrees whose roots `join` into MTH(D[start:end]), left to right: one per
    binary digit of the width, largest first.

    Only ranges RFC 9162's recursion produces decompose this way, and those are all it asks
    for: `start` is a multiple of the largest power of two not above the width.
    """
    if not 0 <= start < end:
        raise ValueError(f"[{start}, {end}) is not a range of leaves")
    pieces: list[Subtree] = []
    while start < end:
        level = (end - start).bit_length() - 1
        if start % (1 << level):
            raise ValueError(f"leaf {start} does not start a subtree of {1 << level} leaves")
        pieces.append(Subtree(level, start >> level))
        start += 1 << level
    return tuple(pieces)


def join(roots: Sequence[bytes]) -> bytes:
    """MTH of the leaves of consecutive complete subtrees (`subtrees`), from their roots."""
    if not roots:
        raise ValueError("no subtree roots to join")
    current = roots[-1]
    for left in reversed(roots[:-1]):
        current = node_hash(left, current)
    return current


def inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """The leaf ranges [start, end) whose MTHs, in order, are PATH(index, D[0:size])."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of size {size}")
    return _path_ranges(index, 0, size)


def consistency_ranges(old_size: int, size: int) -> list[tuple[int, int]]:
    """The leaf ranges [start, end) whose MTHs, in order, are PROOF(old_size, D[0:size]);
    none for old_size 0 or old_size == size."""
    if not 0 <= old_size <= size:
        raise ValueError(f"old size {old_size} is not within 0..{size}")
    if old_size in (0, size):
        return []
    return _subproof_ranges(old_size, 0, size, complete=True)


def _path_ranges(index: int, start: int, end: int) -> list[tuple[int, int]]:
    width = end - start
    if width == 1:
        return []
    split = start + _largest_power_of_two_below(width)
    if index < split:
        return [*_path_ranges(index, start, split), (split, end)]
    return [*_path_ranges(index, split, end), (start, split)]


def _subproof_ranges(
    old_size: int, start: int, end: int, *, complete: bool
) -> list[tuple[int, int]]:
    width = end - start
    if old_size == width:
        return [] if complete else [(start, end)]
    split = _largest_power_of_two_below(width)
    if old_size <= split:
        return [
            *_subproof_ranges(old_size, start, start + split, complete=complete),
            (start + split, end),
        ]
    return [
        *_subproof_ranges(old_size - split, start + split, end, complete=False),
        (start, start + split),
    ]


class MerkleTree:
    """A tree over leaf hashes, with its root and proofs."""

    def __init__(self, leaf_hashes: Iterable[bytes]) -> None:
        level = list(leaf_hashes)
        self._levels: list[list[bytes]] = [level]
        while len(level) > 1:
            paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                paired.append(level[-1])
            self._levels.append(paired)
            level = paired

    @classmethod
    def from_leaves(cls, leaves: Iterable[bytes]) -> MerkleTree:
        return cls(leaf_hash(leaf) for leaf in leaves)

    @property
    def size(self) -> int:
        return len(self._levels[0])

    def root(self, size: int | None = None) -> bytes:
        """The root of the first `size` leaves (default: all)."""
        size = self.size if size is None else size
        self._check_size(size)
        return self._subtree(0, size) if size else EMPTY_ROOT

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 PATH(index, D[0:size])."""
        size = self.size if size is None else size
        self._check_size(size)
        if not 0 <= index < size:
            raise IndexError(f"leaf {index} is not in a tree of size {size}")
        return [self._subtree(start, end) for start, end in inclusion_ranges(index, size)]

    def consistency_proof(self, old_size: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 PROOF(old_size, D[0:size]); empty for old_size 0 or old_size == size."""
        size = self.size if size is None else size
        self._check_size(size)
        if not 0 <= old_size <= size:
            raise IndexError(f"old size {old_size} is not within 0..{size}")
        return [self._subtree(start, end) for start, end in consistency_ranges(old_size, size)]

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= self.size:
            raise IndexError(f"size {size} is not within 0..{self.size}")

    def _subtree(self, start: int, end: int) -> bytes:
        width = end - start
        if width & (width - 1) == 0 and start % width == 0:
            return self._levels[width.bit_length() - 1][start // width]
        split = _largest_power_of_two_below(width)
        return node_hash(self._subtree(start, start + split), self._subtree(start + split, end))


class RootAccumulator:
    """The root of a stream of leaves, in O(log n) memory."""

    def __init__(self) -> None:
        self._stack: list[tuple[int, bytes]] = []
        self.size = 0

    def add_leaf(self, leaf: bytes) -> None:
        self.add_hash(leaf_hash(leaf))

    def add_hash(self, hashed: bytes) -> None:
        width, current = 1, hashed
        while self._stack and self._stack[-1][0] == width:
            _, left = self._stack.pop()
            current = node_hash(left, current)
            width *= 2
        self._stack.append((width, current))
        self.size += 1

    def root(self) -> bytes:
        if not self._stack:
            return EMPTY_ROOT
        current = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            current = node_hash(left, current)
        return current


def root_of(leaves: Iterable[bytes]) -> tuple[int, bytes]:
    """(size, root) of the tree over `leaves`."""
    accumulator = RootAccumulator()
    for leaf in leaves:
        accumulator.add_leaf(leaf)
    return accumulator.size, accumulator.root()


def verify_inclusion(
    hashed_leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """RFC 9162 section 2.1.3.2: is the leaf with this hash at `index` of the tree `root`?"""
    if not 0 <= index < size:
        return False
    fn, sn, current = index, size - 1, hashed_leaf
    for sibling in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            current = node_hash(sibling, current)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            current = node_hash(current, sibling)
        fn >>= 1
        sn >>= 1
    return sn == 0 and current == root


def verify_consistency(
    old_size: int, size: int, proof: Sequence[bytes], old_root: bytes, root: bytes
) -> bool:
    """RFC 9162 section 2.1.4.2: does tree `root` of `size` extend tree `old_root`?"""
    if not 0 <= old_size <= size:
        return False
    if old_size == size:
        return not proof and old_root == root
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    first = second = path[0]
    for sibling in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            first = node_hash(sibling, first)
            second = node_hash(sibling, second)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            second = node_hash(second, sibling)
        fn >>= 1
        sn >>= 1
    return first == old_root and second == root and sn == 0
