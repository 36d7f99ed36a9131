"""Property tests of the pure layout: ownership, contiguity, balance, inverse map."""

from __future__ import annotations

import random

import pytest
import torch

from sharded_novograd.layout import FragmentTable, ShardLayout


def random_shapes(rng: random.Random):
    kinds = [(), (1,), (rng.randint(1, 9),), (rng.randint(1, 40), rng.randint(1, 40)), (0,),
             (rng.randint(1, 5), rng.randint(1, 5), rng.randint(1, 5)), (rng.randint(100, 5000),)]
    return [rng.choice(kinds) for _ in range(rng.randint(1, 12))]


def layouts():
    rng = random.Random(0)
    out = []
    for world in range(1, 17):
        for align in (1, 3, 64):
            for _ in range(8):
                out.append(ShardLayout(tuple(random_shapes(rng)), world, align))
    # Millions of elements, and a model far smaller than the world.
    out.append(ShardLayout(((4096, 1024), (4096,), (), (3_000_001,)), 16))
    out.append(ShardLayout(((), (1,)), 16, 1))
    return out


LAYOUTS = layouts()


def test_every_element_owned_exactly_once():
    """Check that the fragments of all ranks cover each layer's elements exactly once."""
    for lay in LAYOUTS:
        for layer, n in enumerate(lay.numels):
            covered = []
            for r in range(lay.world_size):
                for f in lay.fragments[r]:
                    if f.layer == layer:
                        covered.append((f.offset_in_layer, f.offset_in_layer + f.numel))
            covered.sort()
            pos = 0
            for lo, hi in covered:
                assert lo == pos and hi > lo, (lay.shapes, layer, covered)
                pos = hi
            assert pos == n


def test_fragments_are_contiguous_and_in_flat_order():
    """Check that fragment i of a rank sits at its flat position inside the rank's range,
    fragments do not overlap, and they follow layer order."""
    for lay in LAYOUTS:
        for r in range(lay.world_size):
            lo, hi = lay.shard_range(r)
            prev_end, prev_layer = 0, -1
            for f in lay.fragments[r]:
                flat = lay.offsets[f.layer] + f.offset_in_layer
                assert flat == lo + f.offset_in_shard
                assert f.offset_in_shard >= prev_end and f.offset_in_shard + f.numel <= hi - lo
                assert f.layer > prev_layer and f.numel > 0
                prev_end, prev_layer = f.offset_in_shard + f.numel, f.layer


def test_balanced_to_the_alignment():
    """Check that every rank's range has the same size and padding is below world*align."""
    for lay in LAYOUTS:
        assert lay.padded_total == lay.shard_size * lay.world_size
        assert lay.padded_total % (lay.world_size * lay.align) == 0
        assert 0 <= lay.padded_total - lay.total < lay.world_size * lay.align or lay.total == 0
        # Balanced to the element: full ranks, then at most one partial one, then empty ones.
        owned = [sum(f.numel for f in fr) for fr in lay.fragments]
        S = lay.shard_size
        assert owned == [min(S, max(0, lay.total - r * S)) for r in range(lay.world_size)]


def test_ranks_may_be_empty():
    """Check that tiny models on many ranks leave whole ranks without a fragment."""
    lay = ShardLayout(((), (1,)), 16, 1)
    assert sum(1 for fr in lay.fragments if not fr) == 14
    lay = ShardLayout(((), (5,), (7, 3)), 8)
    assert [len(fr) for fr in lay.fragments] == [3, 0, 0, 0, 0, 0, 0, 0]


def test_owners_is_the_inverse():
    """Check that owners(layer) lists exactly the fragments of that layer, in flat order."""
    for lay in LAYOUTS[::7]:
        for layer in range(lay.num_layers):
            got = lay.owners(layer)
            want = [(r, f) for r in range(lay.world_size) for f in lay.fragments[r] if f.layer == layer]
            assert got == want


def test_digest_identifies_the_plan():
    """Check that the digest changes with any shape, the world size or the alignment."""
    base = ShardLayout(((3, 4), (5,)), 2)
    assert base.digest() == ShardLayout(((3, 4), (5,)), 2).digest()
    for other in (ShardLayout(((4, 3), (5,)), 2), ShardLayout(((3, 4), (5,)), 3),
                  ShardLayout(((3, 4), (5,)), 2, 32), ShardLayout(((3, 4),), 2)):
        assert other.digest() != base.digest()


@pytest.mark.parametrize("block", [1, 7, 64, 4096])
def test_chunks_cover_fragments_within_one_layer(block):
    """Check that chunk rows tile every fragment, never exceed the block, never mix layers."""
    for lay in LAYOUTS[::5]:
        for r in range(lay.world_size):
            table = lay.table(r)
            chunks = table.chunks(block, "cpu").tolist()
            assert table.chunks(block, "cpu") is table.chunks(block, "cpu")  # built once
            expect = []
            for layer, off, n in zip(table.layers, table.offsets, table.numels):
                expect += [(layer, s) for s in range(off, off + n)]
            got = [(layer, s) for layer, start, n in chunks for s in range(start, start + n)]
            assert got == expect
            assert all(0 < n <= block for _, _, n in chunks)


@pytest.mark.parametrize("block,vec", [(16, 4), (64, 2), (4096, 4), (32, 8), (8, 1)])
def test_vector_chunks_split_fragments_on_the_vector_grid(block, vec):
    """Check that the aligned bodies (counted in vectors) and the ragged ends tile every
    fragment exactly once, that bodies start and end on multiples of ``vec`` and stay within
    the block, and that every ragged piece is shorter than ``2 * vec - 1`` elements."""
    tables = [lay.table(r) for lay in LAYOUTS[::7] for r in range(lay.world_size)]
    tables.append(FragmentTable([0, 1, 2, 1, 0], [0, 3, 13, 14, 40], [3, 10, 1, 25, 1000], 1100, 3))
    for table in tables:
        body, ragged = table.vector_chunks(block, vec, "cpu")
        assert table.vector_chunks(block, vec, "cpu")[0] is body  # built once
        assert body.dtype == ragged.dtype == torch.int32
        got = [(layer, i) for layer, s, n in body.tolist() for i in range(s * vec, (s + n) * vec)]
        got += [(layer, i) for layer, s, n in ragged.tolist() for i in range(s, s + n)]
        expect = [(layer, i) for layer, off, n in zip(table.layers, table.offsets, table.numels)
                  for i in range(off, off + n)]
        assert sorted(got, key=lambda x: x[1]) == sorted(expect, key=lambda x: x[1])
        assert all(0 < n * vec <= block for _, _, n in body.tolist())
        assert all(0 < n < 2 * vec - 1 for _, _, n in ragged.tolist())  # none at all for vec=1
    with pytest.raises(ValueError, match="Invalid vec"):
        tables[-1].vector_chunks(16, 3, "cpu")


def test_chunk_tables_beyond_int32():
    """Check that a shard of more than 2**31 elements (not allocated) gets int64 tables whose
    rows are exact past 2**31, and that a shard that fits keeps int32."""
    big = 2 ** 31 + 3 * 10 ** 9
    table = FragmentTable([0, 1, 0], [0, 5, 2 ** 31 + 1], [5, 2 ** 31 - 4, 3 * 10 ** 9 - 2], big, 2)
    assert table.index_dtype == torch.int64
    assert FragmentTable([0], [0], [2 ** 31 - 1], 2 ** 31 - 1, 1).index_dtype == torch.int32
    block = 1 << 22
    chunks = table.chunks(block, "cpu")
    assert chunks.dtype == torch.int64
    assert int(chunks[:, 2].sum()) == sum(table.numels)
    assert chunks[-1].tolist() == [0, 2 ** 31 + 1 + (3 * 10 ** 9 - 2) // block * block, (3 * 10 ** 9 - 2) % block]
    body, ragged = table.vector_chunks(block, 4, "cpu")
    assert body.dtype == ragged.dtype == torch.int64
    assert int(body[:, 2].sum()) * 4 + int(ragged[:, 2].sum()) == sum(table.numels)
    # Layer 0's second fragment: head [2**31 + 1, 2**31 + 4), body, tail up to 2**31 + 3e9 - 1.
    assert ragged.tolist() == [[0, 4, 1], [1, 5, 3], [1, 2 ** 31, 1], [0, 2 ** 31 + 1, 3],
                               [0, (big - 4), 3]]
    assert body[-1, 1] * 4 + body[-1, 2] * 4 == big - 4


def test_chunk_tables_refuse_more_programs_than_a_launch_holds():
    """Check that a table needing more than 2**31 - 1 programs raises, naming the fix."""
    table = FragmentTable([0], [0], [2 ** 32], 2 ** 32, 1)
    with pytest.raises(ValueError, match="use a larger block"):
        table.chunks(1, "meta")
    assert table.chunks(4096, "meta").shape == (2 ** 20, 3)


@pytest.mark.parametrize("bad,match", [
    (dict(shapes=((3,),), world_size=0), "world_size"),
    (dict(shapes=((3,),), world_size=2, align=0), "align"),
    (dict(shapes=((3, -1),), world_size=2), "shape"),
])
def test_invalid_layouts(bad, match):
    """Check that invalid layout arguments raise a ValueError naming the argument."""
    with pytest.raises(ValueError, match=match):
        ShardLayout(**bad)


def test_fragment_table_validates():
    """Check that a fragment table refuses fragments outside the shard or unknown layers."""
    with pytest.raises(ValueError, match="outside shard"):
        FragmentTable([0], [5], [10], shard_size=12, num_layers=1)
    with pytest.raises(ValueError, match="layer"):
        FragmentTable([3], [0], [1], shard_size=12, num_layers=2)
    assert FragmentTable([], [], [], 0, 0).chunks(8, torch.device("cpu")).shape == (0, 3)
