"""Pure-torch implementation of the kernel contract (CPU, and fallback everywhere).

Works on views of the shard, one per fragment, with torch's foreach ops; per-layer
scalars reach the foreach ops as Python lists, which costs one device-to-host copy
of the O(L) coefficient table per step.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..functional import B1, B3, D_IN, D_OUT, GSCALE, STEP, WD_IN, WD_OUT
from ..layout import FragmentTable

__all__ = ["partial_stats", "fused_update"]


def _views(flat: torch.Tensor, table: FragmentTable):
    return [flat.narrow(0, o, n) for o, n in zip(table.offsets, table.numels)]


def partial_stats(grad: torch.Tensor, table: FragmentTable, max_abs: bool = True) -> torch.Tensor:
    L = table.num_layers
    dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    out = torch.zeros(2 * L + 1, dtype=dtype, device=grad.device)
    if len(table) == 0:
        return out
    views = _views(grad, table)
    idx = torch.tensor(table.layers, dtype=torch.int64, device=grad.device)
    sq = torch.stack(torch._foreach_norm(views, 2)).to(dtype).square()
    out[:L].index_add_(0, idx, sq)
    # A NaN or inf element makes its fragment's sum of squares non-finite.
    out[2 * L] = (~torch.isfinite(sq)).sum()
    if max_abs:  # a second pass over the shard, several times slower than the norm on CPU
        mx = torch.stack(torch._foreach_norm(views, math.inf)).to(dtype)
        out[L:2 * L].scatter_reduce_(0, idx, mx, reduce="amax")
    return out


def fused_update(grad: torch.Tensor, exp_avg: torch.Tensor, weight: torch.Tensor,
                 param_out: Optional[torch.Tensor], table: FragmentTable, coeffs: torch.Tensor,
                 scratch_grad: bool = False) -> None:
    if len(table) == 0:
        return
    c = coeffs.tolist()
    col = lambda k: [c[layer][k] for layer in table.layers]  # noqa: E731
    gs, ms, ws = _views(grad, table), _views(exp_avg, table), _views(weight, table)
    # Same operation order as functional.update_tensor (the reference). One shard-sized
    # temporary at most (none when the gradient is scratch): fresh large buffers cost a
    # page fault per 4 KiB on CPU, more than the arithmetic.
    if scratch_grad:
        u = gs
        torch._foreach_mul_(u, col(GSCALE))
    else:
        u = torch._foreach_mul(gs, col(GSCALE))
    torch._foreach_div_(u, col(D_IN))
    _add_scaled(u, ws, col(WD_IN))
    torch._foreach_mul_(u, col(B3))
    torch._foreach_mul_(ms, col(B1))
    torch._foreach_add_(ms, u)
    t = u
    torch._foreach_copy_(t, ms)
    torch._foreach_div_(t, col(D_OUT))
    _add_scaled(t, ws, col(WD_OUT))
    torch._foreach_mul_(t, col(STEP))
    torch._foreach_sub_(ws, t)
    if param_out is not None:
        torch._foreach_copy_(_views(param_out, table), ws)


def _add_scaled(acc, xs, scales) -> None:
    """``acc += x * s`` per tensor; skipped where ``s`` is 0 (adding ``x * 0`` changes no value)."""
    if any(scales):
        torch._foreach_add_(acc, torch._foreach_mul(xs, scales))
