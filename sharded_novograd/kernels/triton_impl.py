"""Triton implementation of the kernel contract (CUDA, or CPU under ``TRITON_INTERPRET=1``).

Both kernels launch one program per row of a chunk table
(:meth:`sharded_novograd.layout.FragmentTable.vector_chunks`, built once per layout,
block size and vector width): a chunk is at most ``BLOCK`` consecutive elements of one
fragment, so a program belongs to exactly one layer and loads that layer's scalars
once. There is no per-element layer index; padding between fragments is never touched.

Each call is two launches of one kernel (docs/kernels.md, "Alignment"): the aligned
body of every fragment, in a table counted in 16-byte vectors so that the compiler
emits vector loads and stores, then the ragged ends (fewer than a vector's worth of
elements at either end of a fragment) with ``VEC=1``, which compiles to scalar
accesses only. ``tests/test_codegen.py`` checks both in the generated PTX. Tables are
int64 for shards of 2**31 elements or more; the kernels add the chunk's start to the
base pointers in 64 bits. Launches run under the tensors' CUDA device.

Bytes moved per element of the fragments: :func:`partial_stats` reads the gradient
once; :func:`fused_update` reads ``grad``, ``exp_avg`` and ``weight`` and writes
``exp_avg``, ``weight`` and, when given, the low-precision ``param_out`` (22 bytes
for fp32 state with a bf16 copy, 20 without one).

This module imports without Triton: ``TRITON_AVAILABLE`` is then False and both
functions raise a RuntimeError.
"""

from __future__ import annotations

import contextlib
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

# Alignment (docs/kernels.md): each fragment's body, between its first and last shard
# index that is a multiple of the vector width, runs in programs that load and store
# 16 bytes at a time; the at most VEC - 1 elements at either end of it (and fragments
# too short for one aligned vector) run in separate one-warp programs with VEC=1,
# scalar accesses only. tests/test_codegen.py checks both in the generated PTX.
_VEC_BYTES = 16
_RAGGED_BLOCK, _RAGGED_WARPS = 32, 1  # ragged pieces are shorter than 2 * VEC - 1 <= 15

# Contracting g * g into the running sum (FMA) only makes the sum more accurate; the
# update rounds every product on its own, as the torch kernels do.
_STATS_OPTIONS = {"enable_fp_fusion": True}
_UPDATE_OPTIONS = {"enable_fp_fusion": False}

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

    @triton.jit
    def _chunk(chunks_ptr, VEC: tl.constexpr):
        """This program's ``(layer, start, length)``; the table counts in units of ``VEC``.

        Multiplying by ``VEC`` (not a ``tl.multiple_of`` hint) is what tells the compiler
        that ``start`` and ``length`` are multiples of ``VEC``: it holds for whatever the
        table contains, and with ``VEC=1`` the compiler assumes nothing. ``start`` is
        64-bit; the per-element offsets below it are 32-bit (``length <= BLOCK``).
        """
        row = chunks_ptr + tl.program_id(0).to(tl.int64) * 3
        layer = tl.load(row)
        start = tl.load(row + 1).to(tl.int64) * VEC
        length = tl.load(row + 2).to(tl.int32) * VEC
        return layer, start, length

    @triton.jit
    def _partial_stats_kernel(grad_ptr, chunks_ptr, out_ptr, num_layers, VEC: tl.constexpr, BLOCK: tl.constexpr):
        """For the chunk ``(l, start, n)`` of this program, with ``g = grad[start:start+n]``::

            out[l]      += sum(g * g)
            out[L + l]   = max(out[L + l], max|g|)
            out[2L]     += count(g non-finite) + (1 if out[l] became non-finite else 0)

        in ``out``'s dtype (fp32, or fp64 for fp64 gradients).
        """
        layer, start, length = _chunk(chunks_ptr, VEC)
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
        # NaN counts as +inf in the max, so a layer's max-abs is finite iff its elements are
        # (norm_type=inf decides from it alone: its squares may overflow, the max cannot).
        tl.atomic_max(out_ptr + num_layers + layer, tl.max(tl.where(a == a, a, float("inf")), axis=0),
                      sem="relaxed")
        tl.atomic_add(out_ptr + 2 * num_layers, bad.to(out_ptr.dtype.element_ty), mask=bad > 0, sem="relaxed")

    @triton.jit
    def _fused_update_kernel(grad_ptr, exp_avg_ptr, weight_ptr, out_ptr, chunks_ptr, coeffs_ptr,
                             HAS_OUT: tl.constexpr, IEEE_F32: tl.constexpr, VEC: tl.constexpr,
                             BLOCK: tl.constexpr):
        """For the chunk ``(l, start, n)`` of this program, with ``c = coeffs[l]`` and every
        operation rounded in the state dtype, in this order (torch_impl's)::

            u = (g * c.gscale) / c.d_in + w * c.wd_in
            u = u * c.b3
            m = c.b1 * m + u
            w = w - c.step * (m / c.d_out + w * c.wd_out)
            out = cast(w)                                   (if HAS_OUT)

        The launch disables FMA contraction so that each product is rounded on its own.
        """
        layer, start, length = _chunk(chunks_ptr, VEC)
        row = coeffs_ptr + layer * _NC
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
        g = tl.load(grad_ptr + start + idx, mask=mask)
        m = tl.load(exp_avg_ptr + start + idx, mask=mask)
        w = tl.load(weight_ptr + start + idx, mask=mask)
        u = _div(g * gscale, d_in, IEEE_F32) + w * wd_in
        u = u * b3
        m = m * b1 + u
        w = w - (_div(m, d_out, IEEE_F32) + w * wd_out) * step
        tl.store(exp_avg_ptr + start + idx, m, mask=mask)
        tl.store(weight_ptr + start + idx, w, mask=mask)
        if HAS_OUT:
            tl.store(out_ptr + start + idx, w.to(out_ptr.dtype.element_ty), mask=mask)


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
    """``(BLOCK, num_warps)`` of the vector path: one chunk of ``BLOCK`` elements per program."""
    if block is None:
        block = DEFAULT_BLOCK if device.type == "cuda" else _INTERPRETER_BLOCK
    if (isinstance(block, bool) or not isinstance(block, int) or not _MIN_BLOCK <= block <= _MAX_BLOCK
            or block & (block - 1)):
        raise ValueError(f"Invalid block: {block!r} (expected a power of two in [{_MIN_BLOCK}, {_MAX_BLOCK}])")
    num_warps = 4 if block < 2048 else 8 if block < 8192 else 16
    return block, num_warps


def _vec(dtype: torch.dtype) -> int:
    """Elements per vector access: 16 bytes of the widest tensor the kernel streams."""
    return max(1, _VEC_BYTES // dtype.itemsize)


def _paths(dtype: torch.dtype, block: Optional[int], device: torch.device):
    """The two launches of a kernel over a fragment table, as ``(VEC, BLOCK, num_warps)``.

    The first runs the table's aligned bodies (:meth:`FragmentTable.vector_chunks`,
    counted in vectors of ``VEC`` elements); the second runs the ragged ends with
    ``VEC=1``, which compiles to scalar loads and stores only.
    """
    BLOCK, num_warps = _launch_config(block, device)
    return (_vec(dtype), BLOCK, num_warps), (1, _RAGGED_BLOCK, _RAGGED_WARPS)


def _device_guard(device: torch.device):
    """Triton launches on the *current* CUDA device, not the tensors' device: select it."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch(run, table: FragmentTable, dtype: torch.dtype, block: Optional[int], device: torch.device) -> None:
    """Call ``run(chunks, VEC, BLOCK, num_warps)`` for the aligned bodies, then the ragged ends."""
    (vec, BLOCK, num_warps), ragged_path = _paths(dtype, block, device)
    body, ragged = table.vector_chunks(BLOCK, vec, device)
    with _device_guard(device):
        if body.shape[0]:
            run(body, vec, BLOCK, num_warps)
        if ragged.shape[0]:
            run(ragged, *ragged_path)


def partial_stats(grad: torch.Tensor, table: FragmentTable, *, block: Optional[int] = None) -> torch.Tensor:
    """Per-layer sums of squares, max-abs and a non-finite count; see :mod:`sharded_novograd.kernels`.

    Args:
        grad: 1-D gradient shard of ``table.shard_size`` elements (fp32, fp64, bf16 or fp16).
        table: the shard's fragment table.
        block: elements per program, a power of two (default: None, chosen per device)

    Returns:
        A ``[2 * L + 1]`` vector (fp64 for fp64 gradients, else fp32); slot ``2L`` counts
        non-finite elements plus layer sums that overflowed. The max-abs of a layer
        holding a NaN or inf is +inf.
    """
    _check_runnable(grad)
    _check_shard("grad", grad, table, grad.device)
    if not grad.dtype.is_floating_point:
        raise ValueError(f"grad must be floating point, got {grad.dtype}")
    L = table.num_layers
    out = torch.zeros(2 * L + 1, dtype=torch.float64 if grad.dtype == torch.float64 else torch.float32,
                      device=grad.device)
    _launch_config(block, grad.device)  # validates block even for an empty table
    if len(table) == 0:
        return out

    def run(chunks, VEC, BLOCK, num_warps):
        _partial_stats_kernel[(chunks.shape[0],)](grad, chunks, out, L, VEC=VEC, BLOCK=BLOCK,
                                                  num_warps=num_warps, **_STATS_OPTIONS)

    _launch(run, table, grad.dtype, block, grad.device)
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
    _launch_config(block, device)
    if len(table) == 0:
        return
    coeffs = coeffs.to(device=device, dtype=weight.dtype).contiguous()
    has_out = param_out is not None
    out = param_out if has_out else weight  # never touched without param_out

    def run(chunks, VEC, BLOCK, num_warps):
        _fused_update_kernel[(chunks.shape[0],)](
            grad, exp_avg, weight, out, chunks, coeffs, HAS_OUT=has_out, IEEE_F32=weight.dtype == torch.float32,
            VEC=VEC, BLOCK=BLOCK, num_warps=num_warps, **_UPDATE_OPTIONS)

    _launch(run, table, weight.dtype, block, device)
