"""Shared material for the distributed tests: layer shapes, deterministic per-rank
gradients, and a reference run fed the rank-averaged gradient."""

from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence

import torch

from sharded_novograd.layout import FragmentTable


# Odd sizes, a 0-dim and 1-element layer: with align=64 these 728 elements straddle
# rank boundaries at world sizes 2, 3 and 4, and leave ranks 6 and 7 empty at 8.
SHAPES = [(), (7,), (13, 5), (1,), (3, 3, 3), (64,), (33, 17), (2,)]


def make_params(shapes, dtype, seed: int = 0) -> List[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in shapes]


def rank_grad(rank: int, step: int, layer: int, shape, dtype) -> Optional[torch.Tensor]:
    """Rank ``rank``'s gradient; its scale sweeps 1e-3..1e3 across steps.

    Layer 3 has no gradient on any rank every fourth step; layer 1 has one only on
    rank 0 every third step.
    """
    if layer == 3 and step % 4 == 1:
        return None
    if layer == 1 and step % 3 == 2 and rank != 0:
        return None
    gen = torch.Generator().manual_seed(1000003 * step + 7919 * layer + rank)
    scale = 10.0 ** ((step % 7) - 3) * (1 + layer)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def averaged_grad(world: int, step: int, layer: int, shape, grad_dtype, out_dtype) -> Optional[torch.Tensor]:
    """Mean over ranks of :func:`rank_grad` (a missing gradient counts as zero)."""
    gs = [rank_grad(r, step, layer, shape, grad_dtype) for r in range(world)]
    if all(g is None for g in gs):
        return None
    total = sum(g.to(torch.float64) for g in gs if g is not None)
    return (total / world).to(out_dtype)


def close_ratio(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> float:
    """max |a-b| / (atol + rtol*|b|): <= 1 means within tolerance."""
    a, b = a.detach().to(torch.float64).cpu(), b.detach().to(torch.float64).cpu()
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    return float(((a - b).abs() / (atol + rtol * b.abs())).max())


def compare_state(consolidated: Dict, reference: Dict, rtol: float, atol: float) -> float:
    """Worst :func:`close_ratio` over exp_avg, exp_avg_sq and step of every layer."""
    if set(consolidated["state"]) != set(reference["state"]):
        return float("inf")
    worst = 0.0
    for idx, ref in reference["state"].items():
        got = consolidated["state"][idx]
        for key in ref:
            worst = max(worst, close_ratio(torch.as_tensor(got[key]), torch.as_tensor(ref[key]), rtol, atol))
    return worst


def reference_copy(params, dtype) -> List[torch.nn.Parameter]:
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().to(dtype).clone())
        q.requires_grad_(p.requires_grad)
        out.append(q)
    return out


def random_table(seed: int, fragments: int, gaps: Sequence[int], sizes: Sequence[int], layers_used: int,
                 num_layers: int, start: int = 0, tail: int = 0) -> FragmentTable:
    """A fragment table of ``fragments`` rows: random gaps and sizes from the given choices,
    layers drawn from the first ``layers_used`` (so a layer is split many times and one or
    more layers have no fragment), ``tail`` unused elements at the end of the shard."""
    rng = random.Random(seed)
    layers, offsets, numels, pos = [], [], [], start
    for _ in range(fragments):
        pos += rng.choice(gaps)
        n = rng.choice(sizes)
        layers.append(rng.randrange(layers_used))
        offsets.append(pos)
        numels.append(n)
        pos += n
    return FragmentTable(layers, offsets, numels, pos + tail, num_layers)
