"""The two kernels of a sharded step, behind one contract.

``partial_stats(grad, table)``
    Over the fragments of ``table`` in the 1-D shard ``grad``, returns a vector of
    length ``2 * L + 1`` (float64 for float64 gradients, else float32): per-layer
    sums of squares ``[0, L)``, per-layer max-abs ``[L, 2L)``, and at ``2L`` a value
    that is non-zero iff a fragment holds a non-finite element (or its sum of squares
    overflowed). Layers with no fragment in the shard get 0. With ``max_abs=False``
    the max-abs slots may be left 0 (the torch implementation then skips that pass).

``fused_update(grad, exp_avg, weight, param_out, table, coeffs)``
    One pass over the fragments: reads ``grad``, ``exp_avg`` and ``weight`` (all 1-D,
    the same dtype), writes ``exp_avg`` and ``weight`` in place, and ``weight`` cast
    into ``param_out`` (a low-precision copy, or None). ``coeffs`` is the
    ``[L, NUM_COEFFS]`` table of :func:`sharded_novograd.functional.layer_update`.
    Shard elements outside every fragment are neither read nor written. With
    ``scratch_grad=True`` the caller gives up ``grad``, which may be overwritten.

Dispatch follows torch's habit: ``fused=None`` takes Triton for CUDA tensors when
Triton is installed and torch otherwise; ``fused=True`` demands Triton and raises
where it cannot run; ``fused=False`` always takes torch.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..layout import FragmentTable
from . import torch_impl

try:  # Triton is optional: CPU-only installs never import it.
    from . import triton_impl
    TRITON_AVAILABLE = triton_impl.TRITON_AVAILABLE
except ImportError:  # pragma: no cover - depends on the environment
    triton_impl = None
    TRITON_AVAILABLE = False

__all__ = ["partial_stats", "fused_update", "TRITON_AVAILABLE", "use_triton"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(tensor: torch.Tensor, fused: Optional[bool]) -> bool:
    """Whether ``fused`` selects the Triton implementation for ``tensor``'s device."""
    if fused is False:
        return False
    runnable = TRITON_AVAILABLE and (tensor.is_cuda or (_interpreting() and tensor.device.type == "cpu"))
    if fused is None:
        return bool(TRITON_AVAILABLE and tensor.is_cuda and tensor.dtype in (torch.float32, torch.float64))
    if not runnable:
        why = ("Triton is not installed (pip install 'sharded-novograd[triton]')" if not TRITON_AVAILABLE
               else f"Triton cannot run on device {tensor.device} (needs CUDA, or TRITON_INTERPRET=1 on CPU)")
        raise RuntimeError(f"fused=True was requested but {why}")
    return True


def partial_stats(grad: torch.Tensor, table: FragmentTable, *, max_abs: bool = True,
                  fused: Optional[bool] = None) -> torch.Tensor:
    if use_triton(grad, fused):
        return triton_impl.partial_stats(grad, table)  # one pass gives both statistics
    return torch_impl.partial_stats(grad, table, max_abs=max_abs)


def fused_update(grad: torch.Tensor, exp_avg: torch.Tensor, weight: torch.Tensor,
                 param_out: Optional[torch.Tensor], table: FragmentTable, coeffs: torch.Tensor, *,
                 scratch_grad: bool = False, fused: Optional[bool] = None) -> None:
    if use_triton(grad, fused):
        triton_impl.fused_update(grad, exp_avg, weight, param_out, table, coeffs)
    else:
        torch_impl.fused_update(grad, exp_avg, weight, param_out, table, coeffs, scratch_grad=scratch_grad)
