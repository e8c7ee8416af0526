"""RFC 9162 Merkle trees: roots, inclusion and consistency proofs, against the RFC itself.

The oracle is RFC 9162 section 2.1 written as plainly as the RFC states it (MTH, PATH,
PROOF/SUBPROOF over lists of leaves), checked once against the Certificate Transparency
reference vectors; `gpudelivery.merkle` must agree with it for every tree size up to 70 and
for random leaf lists. Verification is checked the other way round: every honest proof
verifies, and every alteration of a proof, its index, sizes, leaf or roots fails.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpudelivery import merkle

EMPTY_ROOT = hashlib.sha256(b"").digest()

# Every tree size checked exhaustively against the oracle, and the largest size whose every
# proof (and every alteration of it) is verified.
ORACLE_SIZES = range(71)
VERIFY_SIZES = range(1, 41)

LEAVES = [f"leaf-{index}".encode() for index in range(max(ORACLE_SIZES))]
LEAF_HASHES = [merkle.leaf_hash(leaf) for leaf in LEAVES]
# One tree over all leaves: its prefixes are the trees of every smaller size.
TREE = merkle.MerkleTree.from_leaves(LEAVES)
ROOTS = [TREE.root(size) for size in ORACLE_SIZES]


# -- the oracle: RFC 9162, section 2.1 --------------------------------------------------------


def split(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(data: list[bytes]) -> bytes:
    """MTH(D[n])."""
    if not data:
        return hashlib.sha256(b"").digest()
    if len(data) == 1:
        return hashlib.sha256(b"\x00" + data[0]).digest()
    k = split(len(data))
    return hashlib.sha256(b"\x01" + mth(data[:k]) + mth(data[k:])).digest()


def path(m: int, data: list[bytes]) -> list[bytes]:
    """PATH(m, D[n])."""
    if len(data) == 1:
        return []
    k = split(len(data))
    if m < k:
        return [*path(m, data[:k]), mth(data[k:])]
    return [*path(m - k, data[k:]), mth(data[:k])]


def subproof(m: int, data: list[bytes], complete: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b)."""
    if m == len(data):
        return [] if complete else [mth(data)]
    k = split(len(data))
    if m <= k:
        return [*subproof(m, data[:k], complete), mth(data[k:])]
    return [*subproof(m - k, data[k:], False), mth(data[:k])]


def proof(m: int, data: list[bytes]) -> list[bytes]:
    """PROOF(m, D[n]) for 0 < m < n; the trivial cases m = 0 and m = n need no proof."""
    return subproof(m, data, True) if 0 < m < len(data) else []


# The shape of a proof: which side each element hashes in from ("L", "R"), and for a
# consistency proof whether it starts with the old subtree ("S"). A proof verifies under
# another size exactly when that size gives its path the same shape, since the verifier
# then performs the very same hashes: RFC 9162 binds the size to the root in the signed
# tree head, not in the proof.


def path_shape(m: int, n: int) -> tuple[str, ...]:
    if n == 1:
        return ()
    k = split(n)
    if m < k:
        return (*path_shape(m, k), "R")
    return (*path_shape(m - k, n - k), "L")


def subproof_shape(m: int, n: int, complete: bool = True) -> tuple[str, ...]:
    if m == n:
        return () if complete else ("S",)
    k = split(n)
    if m <= k:
        return (*subproof_shape(m, k, complete), "R")
    return (*subproof_shape(m - k, n - k, False), "L")


def flip(digest: bytes, bit: int) -> bytes:
    """`digest` with bit `bit` (0 = the lowest bit of the first byte) inverted."""
    altered = bytearray(digest)
    altered[bit // 8] ^= 1 << (bit % 8)
    return bytes(altered)


def alterations(items: list[bytes], seed: int) -> list[list[bytes]]:
    """Every single-element bit flip of `items` (a bit varying with position and seed), every
    single element dropped, and an element appended or prepended."""
    altered = [
        [*items[:where], flip(items[where], (seed * 31 + where * 7) % 256), *items[where + 1 :]]
        for where in range(len(items))
    ]
    altered += [[*items[:where], *items[where + 1 :]] for where in range(len(items))]
    altered += [[*items, EMPTY_ROOT], [EMPTY_ROOT, *items]]
    if items:
        altered.append([*items, items[-1]])
    return altered


# -- known answers ------------------------------------------------------------------------------

# The Certificate Transparency reference tree (RFC 6962, which RFC 9162 keeps): its leaves,
# the root of each prefix of sizes 0..8, and some of its proofs.
CT_LEAVES = [
    bytes.fromhex(leaf)
    for leaf in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_INCLUSION = [
    (
        0,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (
        1,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]
CT_CONSISTENCY = [
    (1, 1, []),
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]


def test_empty_tree_root_is_sha256_of_the_empty_string() -> None:
    expected = bytes.fromhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    assert merkle.MerkleTree([]).root() == expected
    assert merkle.MerkleTree.from_leaves([]).root() == expected
    assert merkle.RootAccumulator().root() == expected
    assert merkle.root_of([]) == (0, expected)
    assert TREE.root(0) == expected


def test_single_leaf_root_is_sha256_of_zero_byte_and_leaf() -> None:
    expected = hashlib.sha256(b"\x00meter batch").digest()
    assert merkle.MerkleTree.from_leaves([b"meter batch"]).root() == expected
    assert merkle.root_of([b"meter batch"]) == (1, expected)


def test_leaf_and_node_hashes_are_sha256_with_their_prefix_byte() -> None:
    left, right = hashlib.sha256(b"l").digest(), hashlib.sha256(b"r").digest()
    assert merkle.leaf_hash(b"leaf") == hashlib.sha256(b"\x00leaf").digest()
    assert merkle.node_hash(left, right) == hashlib.sha256(b"\x01" + left + right).digest()
    assert (
        merkle.MerkleTree.from_leaves([b"a", b"b"]).root()
        == hashlib.sha256(
            b"\x01" + hashlib.sha256(b"\x00a").digest() + hashlib.sha256(b"\x00b").digest()
        ).digest()
    )


def test_a_leaf_equal_to_two_child_hashes_does_not_pass_for_their_parent() -> None:
    left, right = merkle.leaf_hash(b"a"), merkle.leaf_hash(b"b")
    assert merkle.leaf_hash(left + right) != merkle.node_hash(left, right)
    two_leaves = merkle.MerkleTree.from_leaves([b"a", b"b"]).root()
    assert merkle.MerkleTree.from_leaves([left + right]).root() != two_leaves
    # The parent node's hash is refused as a leaf hash of a one-leaf tree with that root.
    assert not merkle.verify_inclusion(left + right, 0, 1, [], two_leaves)


def test_roots_match_the_certificate_transparency_reference_tree() -> None:
    tree = merkle.MerkleTree.from_leaves(CT_LEAVES)
    assert [tree.root(size).hex() for size in range(9)] == CT_ROOTS
    assert [mth(CT_LEAVES[:size]).hex() for size in range(9)] == CT_ROOTS


@pytest.mark.parametrize(("index", "size", "expected"), CT_INCLUSION)
def test_inclusion_proofs_match_the_certificate_transparency_reference_tree(
    index: int, size: int, expected: list[str]
) -> None:
    tree = merkle.MerkleTree.from_leaves(CT_LEAVES)
    assert [node.hex() for node in tree.inclusion_proof(index, size)] == expected
    assert [node.hex() for node in path(index, CT_LEAVES[:size])] == expected
    assert merkle.verify_inclusion(
        merkle.leaf_hash(CT_LEAVES[index]),
        index,
        size,
        [bytes.fromhex(node) for node in expected],
        bytes.fromhex(CT_ROOTS[size]),
    )


@pytest.mark.parametrize(("old_size", "size", "expected"), CT_CONSISTENCY)
def test_consistency_proofs_match_the_certificate_transparency_reference_tree(
    old_size: int, size: int, expected: list[str]
) -> None:
    tree = merkle.MerkleTree.from_leaves(CT_LEAVES)
    assert [node.hex() for node in tree.consistency_proof(old_size, size)] == expected
    assert [node.hex() for node in proof(old_size, CT_LEAVES[:size])] == expected
    assert merkle.verify_consistency(
        old_size,
        size,
        [bytes.fromhex(node) for node in expected],
        bytes.fromhex(CT_ROOTS[old_size]),
        bytes.fromhex(CT_ROOTS[size]),
    )


# -- the tree equals the RFC's definitions --------------------------------------------------


@pytest.mark.parametrize("size", ORACLE_SIZES)
def test_tree_of_every_size_has_the_rfc_root_and_proofs(size: int) -> None:
    data = LEAVES[:size]
    tree = merkle.MerkleTree.from_leaves(data)
    assert tree.size == size
    assert tree.root() == mth(data)
    assert merkle.MerkleTree(LEAF_HASHES[:size]).root() == mth(data)
    assert merkle.root_of(data) == (size, mth(data))
    assert [tree.inclusion_proof(index) for index in range(size)] == [
        path(index, data) for index in range(size)
    ]
    assert [tree.consistency_proof(old_size) for old_size in range(size + 1)] == [
        proof(old_size, data) for old_size in range(size + 1)
    ]


@pytest.mark.parametrize("size", ORACLE_SIZES)
def test_prefix_of_a_larger_tree_has_the_rfc_root_and_proofs(size: int) -> None:
    data = LEAVES[:size]
    assert TREE.root(size) == mth(data)
    assert [TREE.inclusion_proof(index, size) for index in range(size)] == [
        path(index, data) for index in range(size)
    ]
    assert [TREE.consistency_proof(old_size, size) for old_size in range(size + 1)] == [
        proof(old_size, data) for old_size in range(size + 1)
    ]


def test_accumulator_root_after_every_leaf_is_the_rfc_root() -> None:
    by_leaf, by_hash = merkle.RootAccumulator(), merkle.RootAccumulator()
    sizes_and_roots = [(0, EMPTY_ROOT, EMPTY_ROOT)]
    for leaf in LEAVES:
        by_leaf.add_leaf(leaf)
        by_hash.add_hash(merkle.leaf_hash(leaf))
        sizes_and_roots.append((by_leaf.size, by_leaf.root(), by_hash.root()))
    assert sizes_and_roots == [
        (size, mth(LEAVES[:size]), mth(LEAVES[:size])) for size in range(len(LEAVES) + 1)
    ]


@st.composite
def trees_with_positions(draw: st.DrawFn) -> tuple[list[bytes], int, int, int]:
    """Random leaves, a tree size within them, a leaf index and an old size within that."""
    data = draw(st.lists(st.binary(max_size=80), max_size=100))
    size = draw(st.integers(min_value=0, max_value=len(data)))
    index = draw(st.integers(min_value=0, max_value=max(size - 1, 0)))
    old_size = draw(st.integers(min_value=0, max_value=size))
    return data, size, index, old_size


@given(trees_with_positions())
def test_random_leaf_lists_give_the_rfc_root_and_proofs(
    case: tuple[list[bytes], int, int, int],
) -> None:
    data, size, index, old_size = case
    tree = merkle.MerkleTree.from_leaves(data)
    accumulator = merkle.RootAccumulator()
    for leaf in data:
        accumulator.add_hash(merkle.leaf_hash(leaf))
    assert tree.root() == accumulator.root() == mth(data)
    assert merkle.root_of(data) == (len(data), mth(data))
    assert merkle.MerkleTree(merkle.leaf_hash(leaf) for leaf in data).root() == mth(data)
    assert tree.root(size) == mth(data[:size])
    assert tree.consistency_proof(old_size, size) == proof(old_size, data[:size])
    if size:
        assert tree.inclusion_proof(index, size) == path(index, data[:size])


# -- proofs as ranges of leaves, ranges as complete subtrees ----------------------------------


def assert_joins_from_its_subtrees(start: int, end: int) -> None:
    """[start, end) is covered, left to right, by aligned complete subtrees whose roots
    join into its MTH."""
    pieces = merkle.subtrees(start, end)
    bounds = [start, *(piece.end for piece in pieces)]
    assert [(piece.start, piece.end) for piece in pieces] == list(itertools.pairwise(bounds))
    assert bounds[-1] == end
    assert [piece.level for piece in pieces] == sorted(
        {piece.level for piece in pieces}, reverse=True
    )
    assert merkle.join([mth(LEAVES[piece.start : piece.end]) for piece in pieces]) == mth(
        LEAVES[start:end]
    )


@pytest.mark.parametrize("size", ORACLE_SIZES)
def test_proof_ranges_are_the_leaves_of_the_rfc_proofs(size: int) -> None:
    data = LEAVES[:size]
    assert [
        [mth(data[start:end]) for start, end in merkle.inclusion_ranges(index, size)]
        for index in range(size)
    ] == [path(index, data) for index in range(size)]
    assert [
        [mth(data[start:end]) for start, end in merkle.consistency_ranges(old_size, size)]
        for old_size in range(size + 1)
    ] == [proof(old_size, data) for old_size in range(size + 1)]


@pytest.mark.parametrize("size", ORACLE_SIZES[1:])
def test_every_range_a_proof_or_root_needs_joins_from_complete_subtrees(size: int) -> None:
    assert_joins_from_its_subtrees(0, size)
    for index in range(size):
        for start, end in merkle.inclusion_ranges(index, size):
            assert_joins_from_its_subtrees(start, end)
    for old_size in range(size + 1):
        for start, end in merkle.consistency_ranges(old_size, size):
            assert_joins_from_its_subtrees(start, end)


def test_the_subtrees_of_a_range_are_the_binary_digits_of_its_width() -> None:
    assert merkle.subtrees(0, 13) == (
        merkle.Subtree(3, 0),
        merkle.Subtree(2, 2),
        merkle.Subtree(0, 12),
    )
    assert merkle.subtrees(48, 64) == (merkle.Subtree(4, 3),)
    assert (merkle.Subtree(3, 2).start, merkle.Subtree(3, 2).end) == (16, 24)


@given(
    start=st.integers(min_value=0, max_value=2**40),
    width=st.integers(min_value=1, max_value=2**40),
    aligned=st.booleans(),
)
def test_a_range_that_starts_aligned_decomposes_and_any_other_is_refused(
    start: int, width: int, aligned: bool
) -> None:
    top = 1 << (width.bit_length() - 1)
    if aligned:
        start -= start % top
    if start % top:
        with pytest.raises(ValueError, match=r"^leaf \d+ does not start a subtree of \d+ leaves$"):
            merkle.subtrees(start, start + width)
        return
    pieces = merkle.subtrees(start, start + width)
    assert [piece.end - piece.start for piece in pieces] == [
        1 << bit for bit in reversed(range(width.bit_length())) if width >> bit & 1
    ]
    assert (pieces[0].start, pieces[-1].end) == (start, start + width)


OUT_OF_RANGE_RANGES: list[tuple[Callable[[], object], str]] = [
    (lambda: merkle.subtrees(3, 3), "[3, 3) is not a range of leaves"),
    (lambda: merkle.subtrees(-1, 3), "[-1, 3) is not a range of leaves"),
    (lambda: merkle.subtrees(1, 3), "leaf 1 does not start a subtree of 2 leaves"),
    (lambda: merkle.join([]), "no subtree roots to join"),
    (lambda: merkle.inclusion_ranges(5, 5), "leaf 5 is not in a tree of size 5"),
    (lambda: merkle.inclusion_ranges(-1, 5), "leaf -1 is not in a tree of size 5"),
    (lambda: merkle.consistency_ranges(8, 7), "old size 8 is not within 0..7"),
    (lambda: merkle.consistency_ranges(-1, 7), "old size -1 is not within 0..7"),
]


@pytest.mark.parametrize(
    ("call", "message"), OUT_OF_RANGE_RANGES, ids=[m for _, m in OUT_OF_RANGE_RANGES]
)
def test_ranges_and_subtrees_refuse_what_no_tree_has(
    call: Callable[[], object], message: str
) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        call()


# -- inclusion proofs ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", VERIFY_SIZES)
def test_every_inclusion_proof_verifies(size: int) -> None:
    assert all(
        merkle.verify_inclusion(
            LEAF_HASHES[index], index, size, TREE.inclusion_proof(index, size), ROOTS[size]
        )
        for index in range(size)
    )


@pytest.mark.parametrize("size", VERIFY_SIZES)
def test_inclusion_proof_with_an_element_flipped_dropped_or_added_fails(size: int) -> None:
    for index in range(size):
        honest = TREE.inclusion_proof(index, size)
        for altered in alterations(honest, seed=index):
            assert not merkle.verify_inclusion(
                LEAF_HASHES[index], index, size, altered, ROOTS[size]
            ), (index, altered)


@given(
    size=st.sampled_from(VERIFY_SIZES[1:]),
    data=st.data(),
)
def test_inclusion_proof_with_any_bit_of_any_element_flipped_fails(
    size: int, data: st.DataObject
) -> None:
    index = data.draw(st.integers(min_value=0, max_value=size - 1), label="index")
    honest = TREE.inclusion_proof(index, size)
    where = data.draw(st.integers(min_value=0, max_value=len(honest) - 1), label="element")
    bit = data.draw(st.integers(min_value=0, max_value=255), label="bit")
    altered = [*honest[:where], flip(honest[where], bit), *honest[where + 1 :]]
    assert not merkle.verify_inclusion(LEAF_HASHES[index], index, size, altered, ROOTS[size])


@pytest.mark.parametrize("size", VERIFY_SIZES)
def test_inclusion_proof_fails_for_any_other_index_leaf_or_root(size: int) -> None:
    for index in range(size):
        honest = TREE.inclusion_proof(index, size)
        leaf = LEAF_HASHES[index]
        for other in range(size):
            if other != index:
                assert not merkle.verify_inclusion(leaf, other, size, honest, ROOTS[size])
                assert not merkle.verify_inclusion(
                    LEAF_HASHES[other], index, size, honest, ROOTS[size]
                )
        for other_size in range(len(ROOTS)):
            if other_size != size:
                assert not merkle.verify_inclusion(leaf, index, size, honest, ROOTS[other_size])
        assert not merkle.verify_inclusion(flip(leaf, index), index, size, honest, ROOTS[size])
        assert not merkle.verify_inclusion(leaf, index, size, honest, flip(ROOTS[size], index))


@pytest.mark.parametrize("size", VERIFY_SIZES)
def test_inclusion_proof_fails_for_another_size_unless_its_path_has_the_same_shape(
    size: int,
) -> None:
    for index in range(size):
        honest = TREE.inclusion_proof(index, size)
        outcomes = {
            other_size: merkle.verify_inclusion(
                LEAF_HASHES[index], index, other_size, honest, ROOTS[size]
            )
            for other_size in range(-1, 2 * max(VERIFY_SIZES) + 2)
            if other_size != size
        }
        assert outcomes == {
            other_size: other_size > index
            and path_shape(index, other_size) == path_shape(index, size)
            for other_size in outcomes
        }


def test_inclusion_proof_for_another_size_with_the_same_shape_verifies() -> None:
    # Leaf 0 of 17 and of 18 leaves: both paths climb four full subtrees and then take one
    # right sibling, so the verifier computes the same hashes for either size.
    honest = TREE.inclusion_proof(0, 17)
    assert path_shape(0, 17) == path_shape(0, 18) == ("R", "R", "R", "R", "R")
    assert merkle.verify_inclusion(LEAF_HASHES[0], 0, 18, honest, ROOTS[17])
    assert not merkle.verify_inclusion(LEAF_HASHES[0], 0, 18, honest, ROOTS[18])


def test_inclusion_verifier_returns_false_for_out_of_range_index_or_size() -> None:
    leaf, honest, root = LEAF_HASHES[2], TREE.inclusion_proof(2, 3), ROOTS[3]
    assert merkle.verify_inclusion(leaf, 2, 3, honest, root) is True
    for index, size in [(3, 3), (4, 3), (-1, 3), (0, 0), (0, -1), (-1, -1), (2**70, 3)]:
        assert merkle.verify_inclusion(leaf, index, size, honest, root) is False, (index, size)
    assert merkle.verify_inclusion(leaf, 0, 0, [], EMPTY_ROOT) is False


# -- consistency proofs -------------------------------------------------------------------------


@pytest.mark.parametrize("size", VERIFY_SIZES)
def test_every_consistency_proof_verifies(size: int) -> None:
    assert all(
        merkle.verify_consistency(
            old_size, size, TREE.consistency_proof(old_size, size), ROOTS[old_size], ROOTS[size]
        )
        for old_size in range(1, size + 1)
    )


@pytest.mark.parametrize("size", VERIFY_SIZES)
def test_consistency_proof_with_an_element_flipped_dropped_or_added_fails(size: int) -> None:
    for old_size in range(1, size + 1):
        honest = TREE.consistency_proof(old_size, size)
        for altered in alterations(honest, seed=old_size):
            assert not merkle.verify_consistency(
                old_size, size, altered, ROOTS[old_size], ROOTS[size]
            ), (old_size, altered)


@given(size=st.sampled_from(VERIFY_SIZES[1:]), data=st.data())
def test_consistency_proof_with_any_bit_of_any_element_flipped_fails(
    size: int, data: st.DataObject
) -> None:
    old_size = data.draw(st.integers(min_value=1, max_value=size - 1), label="old size")
    honest = TREE.consistency_proof(old_size, size)
    where = data.draw(st.integers(min_value=0, max_value=len(honest) - 1), label="element")
    bit = data.draw(st.integers(min_value=0, max_value=255), label="bit")
    altered = [*honest[:where], flip(honest[where], bit), *honest[where + 1 :]]
    assert not merkle.verify_consistency(old_size, size, altered, ROOTS[old_size], ROOTS[size])


@pytest.mark.parametrize("size", VERIFY_SIZES)
def test_consistency_proof_fails_for_any_other_old_size_or_root(size: int) -> None:
    for old_size in range(1, size + 1):
        honest = TREE.consistency_proof(old_size, size)
        old_root, root = ROOTS[old_size], ROOTS[size]
        for other in range(-1, size + 2):
            if other != old_size:
                assert not merkle.verify_consistency(other, size, honest, old_root, root)
        for other in range(len(ROOTS)):
            if other != old_size:
                assert not merkle.verify_consistency(old_size, size, honest, ROOTS[other], root)
            if other != size:
                assert not merkle.verify_consistency(old_size, size, honest, old_root, ROOTS[other])
        assert not merkle.verify_consistency(old_size, size, honest, flip(old_root, size), root)
        assert not merkle.verify_consistency(old_size, size, honest, old_root, flip(root, size))


@pytest.mark.parametrize("size", VERIFY_SIZES)
def test_consistency_proof_fails_for_another_size_unless_its_path_has_the_same_shape(
    size: int,
) -> None:
    for old_size in range(1, size):
        honest = TREE.consistency_proof(old_size, size)
        outcomes = {
            other_size: merkle.verify_consistency(
                old_size, other_size, honest, ROOTS[old_size], ROOTS[size]
            )
            for other_size in range(-1, 2 * max(VERIFY_SIZES) + 2)
            if other_size != size
        }
        assert outcomes == {
            other_size: other_size > old_size
            and subproof_shape(old_size, other_size) == subproof_shape(old_size, size)
            for other_size in outcomes
        }


@given(size=st.sampled_from(VERIFY_SIZES[1:]), data=st.data())
def test_a_rewritten_history_is_not_consistent_with_the_old_root(
    size: int, data: st.DataObject
) -> None:
    old_size = data.draw(st.integers(min_value=1, max_value=size - 1), label="old size")
    rewritten = LEAVES[:size]
    rewritten[data.draw(st.integers(min_value=0, max_value=old_size - 1), label="index")] = (
        b"forged:" + data.draw(st.binary(max_size=8), label="forged leaf")
    )
    forged = merkle.MerkleTree.from_leaves(rewritten)
    assert not merkle.verify_consistency(
        old_size, size, forged.consistency_proof(old_size), ROOTS[old_size], forged.root()
    )


def test_equal_sizes_are_consistent_exactly_with_no_proof_and_equal_roots() -> None:
    assert TREE.consistency_proof(7, 7) == []
    assert merkle.verify_consistency(7, 7, [], ROOTS[7], ROOTS[7]) is True
    assert merkle.verify_consistency(7, 7, [ROOTS[7]], ROOTS[7], ROOTS[7]) is False
    assert merkle.verify_consistency(7, 7, [], ROOTS[6], ROOTS[7]) is False


def test_the_empty_tree_is_consistent_with_every_tree_by_an_empty_proof() -> None:
    assert TREE.consistency_proof(0, 7) == []
    assert merkle.verify_consistency(0, 7, [], EMPTY_ROOT, ROOTS[7]) is True
    assert merkle.verify_consistency(0, 0, [], EMPTY_ROOT, EMPTY_ROOT) is True
    assert merkle.verify_consistency(0, 7, [ROOTS[7]], EMPTY_ROOT, ROOTS[7]) is False
    assert merkle.verify_consistency(0, 7, [], ROOTS[1], ROOTS[7]) is False


def test_consistency_verifier_returns_false_for_out_of_range_sizes() -> None:
    honest = TREE.consistency_proof(3, 7)
    assert merkle.verify_consistency(3, 7, honest, ROOTS[3], ROOTS[7]) is True
    for old_size, size in [(8, 7), (-1, 7), (3, -1), (-1, -1), (7, 3), (3, 2**70)]:
        assert merkle.verify_consistency(old_size, size, honest, ROOTS[3], ROOTS[7]) is False, (
            old_size,
            size,
        )


# -- out of range for the tree ------------------------------------------------------------------


OUT_OF_RANGE: list[tuple[Callable[[merkle.MerkleTree], object], str]] = [
    (lambda tree: tree.root(71), "size 71 is not within 0..70"),
    (lambda tree: tree.root(-1), "size -1 is not within 0..70"),
    (lambda tree: tree.inclusion_proof(5, 5), "leaf 5 is not in a tree of size 5"),
    (lambda tree: tree.inclusion_proof(-1, 5), "leaf -1 is not in a tree of size 5"),
    (lambda tree: tree.inclusion_proof(0, 0), "leaf 0 is not in a tree of size 0"),
    (lambda tree: tree.inclusion_proof(70), "leaf 70 is not in a tree of size 70"),
    (lambda tree: tree.inclusion_proof(0, 71), "size 71 is not within 0..70"),
    (lambda tree: tree.consistency_proof(8, 7), "old size 8 is not within 0..7"),
    (lambda tree: tree.consistency_proof(-1, 7), "old size -1 is not within 0..7"),
    (lambda tree: tree.consistency_proof(71), "old size 71 is not within 0..70"),
    (lambda tree: tree.consistency_proof(0, 71), "size 71 is not within 0..70"),
]


@pytest.mark.parametrize(("call", "message"), OUT_OF_RANGE, ids=[m for _, m in OUT_OF_RANGE])
def test_tree_raises_index_error_for_out_of_range_indexes_and_sizes(
    call: Callable[[merkle.MerkleTree], object], message: str
) -> None:
    with pytest.raises(IndexError) as caught:
        call(TREE)
    assert str(caught.value) == message


def test_empty_tree_has_no_leaf_to_prove() -> None:
    with pytest.raises(IndexError) as caught:
        merkle.MerkleTree([]).inclusion_proof(0)
    assert str(caught.value) == "leaf 0 is not in a tree of size 0"
