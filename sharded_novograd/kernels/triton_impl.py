"""Triton implementation of the kernel contract (CUDA, or CPU under ``TRITON_INTERPRET=1``).

Both kernels launch one program per row of the chunk table
(:meth:`sharded_novograd.layout.FragmentTable.chunks`, built once per layout and
block size): a chunk is at most ``BLOCK`` consecutive elements of one fragment, so a
program belongs to exactly one layer and loads that layer's scalars once. There is
no per-element layer index; padding between fragments is never touched.

Bytes moved per element of the fragments: :func:`partial_stats` reads the gradient
once; :func:`fused_update` reads ``grad``, ``exp_avg`` and ``weight`` and writes
``exp_avg``, ``weight`` and, when given, the low-precision ``param_out`` (22 bytes
for fp32 state with a bf16 copy, 20 without one).

This module imports without Triton: ``TRITON_AVAILABLE`` is then False and both
functions raise a RuntimeError.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from ..functional import B1, B3, D_IN, D_OUT, GSCALE, NUM_COEFFS, STEP, WD_IN, WD_OUT
from ..layout import FragmentTable

try:
    import triton
    import triton.language as tl
    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = tl = None
    TRITON_AVAILABLE = False

__all__ = ["TRITON_AVAILABLE", "partial_stats", "fused_update", "DEFAULT_BLOCK"]

# Triton decides at decoration time whether a kernel is interpreted; kernels defined
# without the variable are compiled for a GPU and cannot take CPU tensors.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Elements per program on a GPU (not yet tuned on hardware: see launch/bench_kernels.py
# --blocks). The interpreter's cost is mostly per program up to about 8192 elements.
DEFAULT_BLOCK = 4096
_INTERPRETER_BLOCK = 8192
_MIN_BLOCK, _MAX_BLOCK = 16, 1 << 20

_STATE_DTYPES = (torch.float32, torch.float64)
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


if TRITON_AVAILABLE:
    _NC = tl.constexpr(NUM_COEFFS)
    _B1, _B3, _GSCALE, _D_IN = tl.constexpr(B1), tl.constexpr(B3), tl.constexpr(GSCALE), tl.constexpr(D_IN)
    _WD_IN, _STEP, _D_OUT, _WD_OUT = tl.constexpr(WD_IN), tl.constexpr(STEP), tl.constexpr(D_OUT), tl.constexpr(WD_OUT)

    @triton.jit
    def _div(a, b, IEEE_F32: tl.constexpr):
        # Triton's fp32 ``/`` is approximate (up to 2 ulp) on NVIDIA GPUs; div_rn rounds
        # correctly, as torch does. fp64 ``/`` is correctly rounded already.
        if IEEE_F32:
            return tl.math.div_rn(a, b)
        else:
            return a / b

    # Chunks whose start and length are multiples of _VEC elements (nearly all of them
    # in real models) take a path where Triton knows it and emits vector loads and
    # stores (16 bytes for fp32); the others run the same code without the hint.
    _VEC = tl.constexpr(4)

    @triton.jit
    def _stats_chunk(grad_ptr, out_ptr, num_layers, layer, start, length, BLOCK: tl.constexpr):
        idx = tl.arange(0, BLOCK)
        # Upcast first: bf16/fp16 arithmetic would lose the sum (and is wrong in the interpreter).
        g = tl.load(grad_ptr + start + idx, mask=idx < length, other=0.0).to(out_ptr.dtype.element_ty)
        a = tl.abs(g)
        sumsq = tl.sum(g * g, axis=0)
        # NaN compares false, so this counts NaN and +-inf.
        bad = tl.sum(tl.where(a < float("inf"), 0, 1), axis=0)
        old = tl.atomic_add(out_ptr + layer, sumsq, sem="relaxed")
        # The layer's sum can overflow across chunks whose own sums are finite.
        bad += tl.where(tl.abs(old + sumsq) < float("inf"), 0, 1)
        tl.atomic_max(out_ptr + num_layers + layer, tl.max(a, axis=0), sem="relaxed")
        tl.atomic_add(out_ptr + 2 * num_layers, bad.to(out_ptr.dtype.element_ty), mask=bad > 0, sem="relaxed")

    @triton.jit
    def _partial_stats_kernel(grad_ptr, chunks_ptr, out_ptr, num_layers, BLOCK: tl.constexpr):
        """For the chunk ``(l, start, n)`` of this program, with ``g = grad[start:start+n]``::

            out[l]      += sum(g * g)
            out[L + l]   = max(out[L + l], max|g|)
            out[2L]     += count(g non-finite) + (1 if out[l] became non-finite else 0)

        in ``out``'s dtype (fp32, or fp64 for fp64 gradients).
        """
        pid = tl.program_id(0)
        layer = tl.load(chunks_ptr + pid * 3)
        start = tl.load(chunks_ptr + pid * 3 + 1).to(tl.int64)
        length = tl.load(chunks_ptr + pid * 3 + 2)
        if (start % _VEC == 0) & (length % _VEC == 0):
            _stats_chunk(grad_ptr, out_ptr, num_layers, layer, tl.multiple_of(start, _VEC),
                         tl.multiple_of(length, _VEC), BLOCK)
        else:
            _stats_chunk(grad_ptr, out_ptr, num_layers, layer, start, length, BLOCK)

    @triton.jit
    def _update_chunk(grad_ptr, exp_avg_ptr, weight_ptr, out_ptr, row, start, length,
                      HAS_OUT: tl.constexpr, IEEE_F32: tl.constexpr, BLOCK: tl.constexpr):
        b1 = tl.load(row + _B1)
        b3 = tl.load(row + _B3)
        gscale = tl.load(row + _GSCALE)
        d_in = tl.load(row + _D_IN)
        wd_in = tl.load(row + _WD_IN)
        step = tl.load(row + _STEP)
        d_out = tl.load(row + _D_OUT)
        wd_out = tl.load(row + _WD_OUT)
        idx = tl.arange(0, BLOCK)
        mask = idx < length
        offs = start + idx
        g = tl.load(grad_ptr + offs, mask=mask)
        m = tl.load(exp_avg_ptr + offs, mask=mask)
        w = tl.load(weight_ptr + offs, mask=mask)
        u = _div(g * gscale, d_in, IEEE_F32) + w * wd_in
        u = u * b3
        m = m * b1 + u
        w = w - (_div(m, d_out, IEEE_F32) + w * wd_out) * step
        tl.store(exp_avg_ptr + offs, m, mask=mask)
        tl.store(weight_ptr + offs, w, mask=mask)
        if HAS_OUT:
            tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _fused_update_kernel(grad_ptr, exp_avg_ptr, weight_ptr, out_ptr, chunks_ptr, coeffs_ptr,
                             HAS_OUT: tl.constexpr, IEEE_F32: tl.constexpr, BLOCK: tl.constexpr):
        """For the chunk ``(l, start, n)`` of this program, with ``c = coeffs[l]`` and every
        operation rounded in the state dtype, in this order (torch_impl's)::

            u = (g * c.gscale) / c.d_in + w * c.wd_in
            u = u * c.b3
            m = c.b1 * m + u
            w = w - c.step * (m / c.d_out + w * c.wd_out)
            out = cast(w)                                   (if HAS_OUT)

        The launch disables FMA contraction so that each product is rounded on its own.
        """
        pid = tl.program_id(0)
        layer = tl.load(chunks_ptr + pid * 3)
        start = tl.load(chunks_ptr + pid * 3 + 1).to(tl.int64)
        length = tl.load(chunks_ptr + pid * 3 + 2)
        row = coeffs_ptr + layer * _NC
        if (start % _VEC == 0) & (length % _VEC == 0):
            _update_chunk(grad_ptr, exp_avg_ptr, weight_ptr, out_ptr, row, tl.multiple_of(start, _VEC),
                          tl.multiple_of(length, _VEC), HAS_OUT, IEEE_F32, BLOCK)
        else:
            _update_chunk(grad_ptr, exp_avg_ptr, weight_ptr, out_ptr, row, start, length, HAS_OUT, IEEE_F32, BLOCK)


def _check_runnable(t: torch.Tensor) -> None:
    if not TRITON_AVAILABLE:
        raise RuntimeError("the Triton kernels need Triton, which is not installed "
                           "(pip install 'sharded-novograd[triton]'); use fused=False for the torch kernels")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected tensors, got {type(t).__name__}")
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu":
        if not _INTERPRETED:
            raise RuntimeError("the Triton kernels were defined without TRITON_INTERPRET=1 and cannot run on "
                               "CPU tensors; set TRITON_INTERPRET=1 before importing sharded_novograd, "
                               "or use fused=False")
        return
    raise RuntimeError(f"the Triton kernels cannot run on device {t.device} (needs CUDA, or CPU under "
                       "TRITON_INTERPRET=1)")


def _check_shard(name: str, t: torch.Tensor, table: FragmentTable, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.numel() != table.shard_size:
        raise ValueError(f"{name} must be a 1-D shard of {table.shard_size} elements, got shape {tuple(t.shape)}")
    if t.numel() > 1 and t.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got stride {t.stride(0)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (all tensors on one device)")


def _launch_config(block: Optional[int], device: torch.device) -> Tuple[int, int]:
    """``(BLOCK, num_warps)``: one chunk of ``BLOCK`` elements per program."""
    if block is None:
        block = DEFAULT_BLOCK if device.type == "cuda" else _INTERPRETER_BLOCK
    if (isinstance(block, bool) or not isinstance(block, int) or not _MIN_BLOCK <= block <= _MAX_BLOCK
            or block & (block - 1)):
        raise ValueError(f"Invalid block: {block!r} (expected a power of two in [{_MIN_BLOCK}, {_MAX_BLOCK}])")
    num_warps = 4 if block < 2048 else 8 if block < 8192 else 16
    return block, num_warps


def partial_stats(grad: torch.Tensor, table: FragmentTable, *, block: Optional[int] = None) -> torch.Tensor:
    """Per-layer sums of squares, max-abs and a non-finite count; see :mod:`sharded_novograd.kernels`.

    Args:
        grad: 1-D gradient shard of ``table.shard_size`` elements (fp32, fp64, bf16 or fp16).
        table: the shard's fragment table.
        block: elements per program, a power of two (default: None, chosen per device)

    Returns:
        A ``[2 * L + 1]`` vector (fp64 for fp64 gradients, else fp32); slot ``2L`` counts
        non-finite elements plus layer sums that overflowed. The max-abs of a layer
        holding a NaN is unspecified (the count says the step must be skipped).
    """
    _check_runnable(grad)
    _check_shard("grad", grad, table, grad.device)
    if not grad.dtype.is_floating_point:
        raise ValueError(f"grad must be floating point, got {grad.dtype}")
    L = table.num_layers
    out = torch.zeros(2 * L + 1, dtype=torch.float64 if grad.dtype == torch.float64 else torch.float32,
                      device=grad.device)
    BLOCK, num_warps = _launch_config(block, grad.device)
    if len(table) == 0:
        return out
    chunks = table.chunks(BLOCK, grad.device)
    if chunks.shape[0]:
        # Contracting g * g into the running sum (FMA) only makes the sum more accurate.
        _partial_stats_kernel[(chunks.shape[0],)](grad, chunks, out, L, BLOCK=BLOCK, num_warps=num_warps,
                                                  enable_fp_fusion=True)
    return out


def fused_update(grad: torch.Tensor, exp_avg: torch.Tensor, weight: torch.Tensor,
                 param_out: Optional[torch.Tensor], table: FragmentTable, coeffs: torch.Tensor, *,
                 block: Optional[int] = None) -> None:
    """The elementwise NovoGrad update over the fragments, in one pass; see :mod:`sharded_novograd.kernels`.

    Args:
        grad, exp_avg, weight: 1-D shards of ``table.shard_size`` elements, all fp32 or
            all fp64; ``exp_avg`` and ``weight`` are updated in place.
        param_out: a 1-D bf16, fp16 or fp32 shard that receives ``weight`` cast, or None.
        table: the shard's fragment table.
        coeffs: the ``[L, NUM_COEFFS]`` table of :func:`sharded_novograd.functional.layer_update`.
        block: elements per program, a power of two (default: None, chosen per device)
    """
    _check_runnable(weight)
    device = weight.device
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("weight", weight)):
        _check_shard(name, t, table, device)
    if weight.dtype not in _STATE_DTYPES:
        raise ValueError(f"the Triton update supports fp32 and fp64 state, got weight of dtype {weight.dtype}; "
                         "use fused=False")
    if grad.dtype != weight.dtype or exp_avg.dtype != weight.dtype:
        raise ValueError(f"grad, exp_avg and weight must share one dtype, got {grad.dtype}, {exp_avg.dtype} "
                         f"and {weight.dtype}")
    if param_out is not None:
        _check_shard("param_out", param_out, table, device)
        if param_out.dtype not in _OUT_DTYPES:
            raise ValueError(f"param_out must be bf16, fp16 or fp32, got {param_out.dtype}")
    if not isinstance(coeffs, torch.Tensor) or tuple(coeffs.shape) != (table.num_layers, NUM_COEFFS):
        shape = tuple(coeffs.shape) if isinstance(coeffs, torch.Tensor) else type(coeffs).__name__
        raise ValueError(f"coeffs must have shape ({table.num_layers}, {NUM_COEFFS}), got {shape}")
    BLOCK, num_warps = _launch_config(block, device)
    if len(table) == 0:
        return
    chunks = table.chunks(BLOCK, device)
    if not chunks.shape[0]:
        return
    coeffs = coeffs.to(device=device, dtype=weight.dtype).contiguous()
    has_out = param_out is not None
    # Without param_out the kernel never touches out_ptr; weight stands in for it.
    _fused_update_kernel[(chunks.shape[0],)](
        grad, exp_avg, weight, param_out if has_out else weight, chunks, coeffs,
        HAS_OUT=has_out, IEEE_F32=weight.dtype == torch.float32, BLOCK=BLOCK,
        num_warps=num_warps, enable_fp_fusion=False)
