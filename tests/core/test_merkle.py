"""RFC 9162 Merkle trees: roots, inclusion and consistency proofs against the RFC's definitions."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpudelivery import merkle


def leaves(count: int) -> list[bytes]:
    return [f"leaf-{index}".encode() for index in range(count)]


# -- RFC 9162, section 2.1, written as plainly as the RFC states it: the oracle --------------


def split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(data: list[bytes]) -> bytes:
    if not data:
        return hashlib.sha256(b"").digest()
    if len(data) == 1:
        return hashlib.sha256(b"\x00" + data[0]).digest()
    k = split(len(data))
    return hashlib.sha256(b"\x01" + mth(data[:k]) + mth(data[k:])).digest()


def path(m: int, data: list[bytes]) -> list[bytes]:
    if len(data) == 1:
        return []
    k = split(len(data))
    if m < k:
        return [*path(m, data[:k]), mth(data[k:])]
    return [*path(m - k, data[k:]), mth(data[:k])]


def subproof(m: int, data: list[bytes], complete: bool) -> list[bytes]:
    if m == len(data):
        return [] if complete else [mth(data)]
    k = split(len(data))
    if m <= k:
        return [*subproof(m, data[:k], complete), mth(data[k:])]
    return [*subproof(m - k, data[k:], False), mth(data[:k])]


# -- roots ------------------------------------------------------------------------------------


def test_empty_tree_root_is_the_hash_of_nothing() -> None:
    assert merkle.MerkleTree([]).root() == hashlib.sha256(b"").digest()
    assert merkle.root_of([]) == (0, hashlib.sha256(b"").digest())


def test_single_leaf_root_is_its_prefixed_hash() -> None:
    assert merkle.MerkleTree.from_leaves([b"x"]).root() == hashlib.sha256(b"\x00x").digest()


def test_leaf_and_node_hashes_are_domain_separated() -> None:
    left, right = hashlib.sha256(b"l").digest(), hashlib.sha256(b"r").digest()
    assert merkle.leaf_hash(left + right) != merkle.node_hash(left, right)


@pytest.mark.parametrize("size", range(71))
def test_root_equals_rfc_definition_for_every_size(size: int) -> None:
    data = leaves(size)
    tree = merkle.MerkleTree.from_leaves(data)
    assert tree.root() == mth(data)
    assert merkle.root_of(data) == (size, mth(data))
    for prefix in range(size + 1):
        assert tree.root(prefix) == mth(data[:prefix])


@given(st.lists(st.binary(max_size=40), max_size=90))
def test_streamed_root_equals_tree_root(data: list[bytes]) -> None:
    accumulator = merkle.RootAccumulator()
    for leaf in data:
        accumulator.add_leaf(leaf)
    assert accumulator.size == len(data)
    assert accumulator.root() == merkle.MerkleTree.from_leaves(data).root() == mth(data)


# -- inclusion ----------------------------------------------------------------------------------

SIZES = range(1, 41)
TREE = merkle.MerkleTree.from_leaves(leaves(40))


@pytest.mark.parametrize("size", SIZES)
def test_inclusion_proofs_match_rfc_and_verify_for_every_leaf(size: int) -> None:
    data = leaves(size)
    root = mth(data)
    for index in range(size):
        proof = TREE.inclusion_proof(index, size)
        assert proof == path(index, data)
        assert merkle.verify_inclusion(merkle.leaf_hash(data[index]), index, size, proof, root)


@st.composite
def inclusion_cases(draw: st.DrawFn) -> tuple[int, int, list[bytes]]:
    size = draw(st.integers(min_value=2, max_value=40))
    index = draw(st.integers(min_value=0, max_value=size - 1))
    return size, index, TREE.inclusion_proof(index, size)


def flip(digest: bytes, bit: int) -> bytes:
    return bytes([digest[0] ^ (1 << bit)]) + digest[1:]


@given(inclusion_cases(), st.data())
def test_altered_inclusion_proofs_fail(
    case: tuple[int, int, list[bytes]], data: st.DataObject
) -> None:
    size, index, proof = case
    leaf, root = merkle.leaf_hash(leaves(40)[index]), TREE.root(size)
    assert merkle.verify_inclusion(leaf, index, size, proof, root)
    where = data.draw(st.integers(0, len(proof) - 1))
    altered = [
        *proof[:where],
        flip(proof[where], data.draw(st.integers(0, 7))),
        *proof[where + 1 :],
    ]
    assert not merkle.verify_inclusion(leaf, index, size, altered, root)
    assert not merkle.verify_inclusion(leaf, index, size, proof[:-1], root)
    assert not merkle.verify_inclusion(leaf, index, size, [*proof, root], root)
    assert not merkle.verify_inclusion(leaf, (index + 1) % size, size, proof, root)
    assert not merkle.verify_inclusion(flip(leaf, 0), index, size, proof, root)
    assert not merkle.verify_inclusion(leaf, index, size, proof, flip(root, 0))
    # No assertion on a wrong tree size: some paths are the same for two sizes (leaf 0 of 17
    # or 18 leaves); RFC 9162 binds the size to the root in the signed tree head instead.


def test_inclusion_out_of_range_raises_for_the_tree_and_fails_for_the_verifier() -> None:
    with pytest.raises(IndexError, match="leaf 5 is not in a tree of size 5"):
        TREE.inclusion_proof(5, 5)
    with pytest.raises(IndexError, match=r"size 41 is not within 0\.\.40"):
        TREE.inclusion_proof(0, 41)
    assert not merkle.verify_inclusion(merkle.leaf_hash(b"x"), 3, 3, [], TREE.root(3))
    assert not merkle.verify_inclusion(merkle.leaf_hash(b"x"), -1, 3, [], TREE.root(3))


# -- consistency ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_consistency_proofs_match_rfc_and_verify_for_every_old_size(size: int) -> None:
    data = leaves(size)
    for old_size in range(1, size + 1):
        proof = TREE.consistency_proof(old_size, size)
        assert proof == ([] if old_size == size else subproof(old_size, data, True))
        assert merkle.verify_consistency(old_size, size, proof, mth(data[:old_size]), mth(data))


@st.composite
def consistency_cases(draw: st.DrawFn) -> tuple[int, int, list[bytes]]:
    size = draw(st.integers(min_value=2, max_value=40))
    old_size = draw(st.integers(min_value=1, max_value=size - 1))
    return old_size, size, TREE.consistency_proof(old_size, size)


@given(consistency_cases(), st.data())
def test_altered_consistency_proofs_fail(
    case: tuple[int, int, list[bytes]], data: st.DataObject
) -> None:
    old_size, size, proof = case
    old_root, root = TREE.root(old_size), TREE.root(size)
    assert merkle.verify_consistency(old_size, size, proof, old_root, root)
    where = data.draw(st.integers(0, len(proof) - 1))
    altered = [
        *proof[:where],
        flip(proof[where], data.draw(st.integers(0, 7))),
        *proof[where + 1 :],
    ]
    assert not merkle.verify_consistency(old_size, size, altered, old_root, root)
    assert not merkle.verify_consistency(old_size, size, proof[:-1], old_root, root)
    assert not merkle.verify_consistency(old_size, size, [*proof, root], old_root, root)
    assert not merkle.verify_consistency(old_size, size, proof, flip(old_root, 0), root)
    assert not merkle.verify_consistency(old_size, size, proof, old_root, flip(root, 0))
    assert not merkle.verify_consistency(old_size, size, [], old_root, root)


def test_a_rewritten_history_is_not_consistent() -> None:
    rewritten = leaves(20)
    rewritten[3] = b"forged"
    forged = merkle.MerkleTree.from_leaves(rewritten)
    proof = forged.consistency_proof(10, 20)
    assert not merkle.verify_consistency(10, 20, proof, TREE.root(10), forged.root(20))


def test_trivial_consistency_cases() -> None:
    assert TREE.consistency_proof(0, 7) == []
    assert TREE.consistency_proof(7, 7) == []
    assert merkle.verify_consistency(7, 7, [], TREE.root(7), TREE.root(7))
    assert not merkle.verify_consistency(7, 7, [TREE.root(7)], TREE.root(7), TREE.root(7))
    assert merkle.verify_consistency(0, 7, [], merkle.MerkleTree([]).root(), TREE.root(7))
    assert not merkle.verify_consistency(8, 7, [], TREE.root(7), TREE.root(7))
    with pytest.raises(IndexError, match=r"old size 8 is not within 0\.\.7"):
        TREE.consistency_proof(8, 7)
