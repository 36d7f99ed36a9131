"""The flat index space and its element-balanced partition across ranks.

Pure planning code: no torch.distributed, no tensors beyond small index tables.

Layers (parameter tensors) are concatenated in a fixed order into one flat index
space of ``total`` elements, padded to a multiple of ``world_size * align``. Rank r
owns the contiguous range ``[r * shard_size, (r + 1) * shard_size)``. A layer may
straddle ranks; a rank may own no element of a layer, or of any layer. Everything
downstream speaks in :class:`Fragment` s, the part of one layer inside one rank's
range.
"""

from __future__ import annotations

import hashlib
import numbers
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch

__all__ = ["Fragment", "FragmentTable", "ShardLayout", "DEFAULT_ALIGN", "INDEX_MAX_INT32"]

# 64 elements keeps every rank's range aligned to 128 bytes (bf16) / 256 bytes
# (fp32), so vector loads in the kernels never straddle a shard boundary.
DEFAULT_ALIGN = 64


@dataclass(frozen=True)
class Fragment:
    """The part of one layer that lies inside one rank's shard.

    Attributes:
        layer: index of the layer in the layout's order.
        offset_in_layer: first element of the fragment inside the flattened layer.
        offset_in_shard: first element of the fragment inside the rank's shard.
        numel: number of elements (always > 0).
    """

    layer: int
    offset_in_layer: int
    offset_in_shard: int
    numel: int


@dataclass(frozen=True)
class ShardLayout:
    """The flat index space of ``shapes`` split evenly over ``world_size`` ranks.

    Args:
        shapes: the shape of every layer, in layout order (0-dim layers allowed).
        world_size: number of ranks (>= 1).
        align: the padded length is a multiple of ``world_size * align``.
            (default: :data:`DEFAULT_ALIGN`)
    """

    shapes: Tuple[Tuple[int, ...], ...]
    world_size: int
    align: int = DEFAULT_ALIGN
    numels: Tuple[int, ...] = field(init=False)
    offsets: Tuple[int, ...] = field(init=False)
    total: int = field(init=False)
    padded_total: int = field(init=False)
    shard_size: int = field(init=False)
    fragments: Tuple[Tuple[Fragment, ...], ...] = field(init=False)

    def __post_init__(self):
        shapes = tuple(tuple(int(d) for d in s) for s in self.shapes)
        _validate(shapes, self.world_size, self.align)
        numels = tuple(_prod(s) for s in shapes)
        offsets, acc = [], 0
        for n in numels:
            offsets.append(acc)
            acc += n
        unit = self.world_size * self.align
        padded = max(unit, -(-acc // unit) * unit)
        shard = padded // self.world_size
        set_ = object.__setattr__
        set_(self, "shapes", shapes)
        set_(self, "numels", numels)
        set_(self, "offsets", tuple(offsets))
        set_(self, "total", acc)
        set_(self, "padded_total", padded)
        set_(self, "shard_size", shard)
        set_(self, "fragments", tuple(self._rank_fragments(r) for r in range(self.world_size)))

    def _rank_fragments(self, rank: int) -> Tuple[Fragment, ...]:
        lo, hi = rank * self.shard_size, (rank + 1) * self.shard_size
        out = []
        for layer, (off, n) in enumerate(zip(self.offsets, self.numels)):
            start, end = max(off, lo), min(off + n, hi)
            if start < end:
                out.append(Fragment(layer, start - off, start - lo, end - start))
        return tuple(out)

    @property
    def num_layers(self) -> int:
        return len(self.shapes)

    def shard_range(self, rank: int) -> Tuple[int, int]:
        """The ``[start, end)`` range of the flat index space that ``rank`` owns."""
        _check_rank(rank, self.world_size)
        return rank * self.shard_size, (rank + 1) * self.shard_size

    def owners(self, layer: int) -> List[Tuple[int, Fragment]]:
        """Every ``(rank, fragment)`` holding part of ``layer``, in flat order.

        This is the inverse map used by checkpoints and consolidation.
        """
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range for {self.num_layers} layers")
        if self.numels[layer] == 0:
            return []
        first = self.offsets[layer] // self.shard_size
        last = (self.offsets[layer] + self.numels[layer] - 1) // self.shard_size
        return [(r, f) for r in range(first, last + 1) for f in self.fragments[r] if f.layer == layer]

    def describe(self) -> List[str]:
        """One line per item that must agree across ranks (used to name mismatches)."""
        lines = [f"world_size={self.world_size}", f"align={self.align}", f"num_layers={self.num_layers}"]
        lines += [f"layer {i}: shape={tuple(s)}" for i, s in enumerate(self.shapes)]
        return lines

    def digest(self) -> bytes:
        """A 32-byte hash of :meth:`describe`, identical on ranks that built the same layout."""
        return hashlib.sha256("\n".join(self.describe()).encode()).digest()

    def table(self, rank: int) -> "FragmentTable":
        """The fragment table of ``rank``'s shard, the form the kernels take."""
        _check_rank(rank, self.world_size)
        return FragmentTable.from_fragments(self.fragments[rank], self.shard_size, self.num_layers)


class FragmentTable:
    """Fragments of one shard as index lists, with per-device tensor copies built once.

    This is the kernels' contract: element ``i`` of fragment ``k`` lives at shard
    index ``offsets[k] + i`` and belongs to layer ``layers[k]``. Elements of the shard
    outside every fragment (padding) are never read for statistics nor written.

    Index tables (:meth:`chunks`, :meth:`vector_chunks`) are int32 when every shard
    index fits (``shard_size <= 2**31 - 1``) and int64 otherwise; the choice is made
    here, at construction, and kept in :attr:`index_dtype`.
    """

    def __init__(self, layers: Sequence[int], offsets: Sequence[int], numels: Sequence[int],
                 shard_size: int, num_layers: int):
        self.shard_size = int(shard_size)
        self.num_layers = int(num_layers)
        if not 0 <= self.shard_size <= INDEX_MAX_INT64:
            raise ValueError(f"shard_size {self.shard_size} outside [0, 2**63 - 1]")
        if not 0 <= self.num_layers <= INDEX_MAX_INT32:
            raise ValueError(f"num_layers {self.num_layers} outside [0, 2**31 - 1]")
        rows = [(int(a), int(b), int(c)) for a, b, c in zip(layers, offsets, numels)]
        for layer, off, n in rows:
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"fragment layer {layer} not in [0, {self.num_layers})")
            if n < 0 or off < 0 or off + n > self.shard_size:
                raise ValueError(f"fragment [{off}, {off + n}) outside shard of size {self.shard_size}")
        rows = [r for r in rows if r[2] > 0]  # empty fragments hold nothing to read or write
        self.layers = [r[0] for r in rows]
        self.offsets = [r[1] for r in rows]
        self.numels = [r[2] for r in rows]
        self.index_dtype = torch.int32 if self.shard_size <= INDEX_MAX_INT32 else torch.int64
        self._tensors: Dict[tuple, object] = {}  # built tables, per (kind, device, block[, vec])

    @classmethod
    def from_fragments(cls, fragments: Sequence[Fragment], shard_size: int, num_layers: int) -> "FragmentTable":
        return cls([f.layer for f in fragments], [f.offset_in_shard for f in fragments],
                   [f.numel for f in fragments], shard_size, num_layers)

    def __len__(self) -> int:
        return len(self.layers)

    def chunks(self, block: int, device) -> torch.Tensor:
        """A ``[num_chunks, 3]`` table of ``(layer, start, length)`` in :attr:`index_dtype`.

        Each fragment is cut into chunks of at most ``block`` elements, so that one
        kernel program handles one chunk and never straddles two layers. Built once
        per ``(device, block)`` and cached.
        """
        block = _check_block(block)
        key = ("chunks", torch.device(device), block)
        if key not in self._tensors:
            cols = self._columns()
            self._tensors[key] = self._finish(_cut(*cols, block), device)
        return self._tensors[key]

    def vector_chunks(self, block: int, vec: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """The fragments split for kernels that load ``vec`` elements at a time.

        Returns ``(body, ragged)``, two ``[n, 3]`` tables in :attr:`index_dtype`:

        - ``body`` rows ``(layer, start // vec, length // vec)``: the part of every
          fragment between its first and last shard index that is a multiple of
          ``vec``, cut into chunks of at most ``block`` elements. Both columns count
          whole vectors, so a kernel that multiplies them back by ``vec`` knows, from
          the arithmetic alone, that every chunk starts and ends on a vector boundary.
        - ``ragged`` rows ``(layer, start, length)`` in elements: what is left, the
          at most ``vec - 1`` elements before and after each fragment's body, or the
          whole fragment when it holds no aligned vector (fewer than ``2 * vec - 1``
          elements). Every row is shorter than ``2 * vec - 1``.

        Together the two tables cover every fragment element exactly once. Built once
        per ``(device, block, vec)`` and cached.
        """
        block = _check_block(block)
        if isinstance(vec, bool) or not isinstance(vec, numbers.Integral) or vec < 1 or block % vec:
            raise ValueError(f"Invalid vec: {vec!r} (expected an int >= 1 that divides block={block})")
        vec = int(vec)
        key = ("vector_chunks", torch.device(device), block, vec)
        if key not in self._tensors:
            layer, off, n = self._columns()
            first = -(-off // vec)               # first whole vector, in vectors
            last = (off + n) // vec              # one past the last whole vector
            has_body = last > first
            body = _cut(layer[has_body], first[has_body], (last - first)[has_body], block // vec)
            head_end = torch.where(has_body, first * vec, off + n)
            tail_start = torch.where(has_body, last * vec, off + n)
            pieces = [(layer, off, head_end - off), (layer, tail_start, off + n - tail_start)]
            ragged = torch.stack([torch.stack(p, 1) for p in pieces], 1).reshape(-1, 3)
            ragged = ragged[ragged[:, 2] > 0]
            self._tensors[key] = (self._finish(body, device), self._finish(ragged, device))
        return self._tensors[key]

    def _columns(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(torch.tensor(c, dtype=torch.int64) for c in (self.layers, self.offsets, self.numels))

    def _finish(self, rows: torch.Tensor, device) -> torch.Tensor:
        return rows.to(self.index_dtype).contiguous().to(device)


# Largest shard index an int32 (int64) chunk table can hold.
INDEX_MAX_INT32 = 2 ** 31 - 1
INDEX_MAX_INT64 = 2 ** 63 - 1


def _check_block(block) -> int:
    if isinstance(block, bool) or not isinstance(block, numbers.Integral) or block < 1:
        raise ValueError(f"Invalid block: {block!r} (expected an int >= 1)")
    return int(block)


def _cut(layer: torch.Tensor, start: torch.Tensor, length: torch.Tensor, block: int) -> torch.Tensor:
    """Rows ``(layer, start, length)`` with every range cut into pieces of at most ``block``."""
    counts = (length + block - 1) // block
    total = int(counts.sum())
    # One program per row: CUDA's grid holds at most 2**31 - 1 programs.
    if total > INDEX_MAX_INT32:
        raise ValueError(f"{total} chunks of {block} exceed the 2**31 - 1 programs of one kernel launch; "
                         "use a larger block")
    owner = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    k = torch.arange(owner.numel()) - (torch.cumsum(counts, 0) - counts)[owner]
    first = start[owner] + k * block
    n = torch.clamp(length[owner] - k * block, max=block)
    return torch.stack([layer[owner], first, n], 1).reshape(-1, 3)


def _prod(shape: Tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")


def _validate(shapes, world_size, align) -> None:
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"Invalid world_size: {world_size!r} (expected an int >= 1)")
    if not isinstance(align, int) or align < 1:
        raise ValueError(f"Invalid align: {align!r} (expected an int >= 1)")
    for i, s in enumerate(shapes):
        if any(d < 0 for d in s):
            raise ValueError(f"Invalid shape for layer {i}: {s}")
