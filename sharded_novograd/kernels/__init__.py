"""The two kernels of a sharded step, behind one contract.

``partial_stats(grad, table)``
    Over the fragments of ``table`` in the 1-D shard ``grad``, returns a vector of
    length ``2 * L + 1`` (float64 for float64 gradients, else float32): per-layer
    sums of squares ``[0, L)``, per-layer max-abs ``[L, 2L)``, and at ``2L`` a value
    that is non-zero iff a fragment holds a non-finite element (or its sum of squares
    overflowed). Layers with no fragment in the shard get 0. A layer's max-abs is
    non-finite iff one of its elements is (NaN or inf; the value then is NaN or +inf),
    so ``norm_type=inf`` can tell non-finite elements from squares that overflow. With
    ``max_abs=False`` the max-abs slots may be left 0 (the torch implementation then
    skips that pass).

``fused_update(grad, exp_avg, weight, param_out, table, coeffs)``
    One pass over the fragments: reads ``grad``, ``exp_avg`` and ``weight`` (all 1-D,
    the same dtype), writes ``exp_avg`` and ``weight`` in place, and ``weight`` cast
    into ``param_out`` (a low-precision copy, or None). ``coeffs`` is the
    ``[L, NUM_COEFFS]`` table of :func:`sharded_novograd.functional.layer_update`.
    Shard elements outside every fragment are neither read nor written. With
    ``scratch_grad=True`` the caller gives up ``grad``, which may be overwritten.

Three implementations: ``torch_impl`` (torch foreach ops, about ten passes over the
shard; the reference the others are tested against), ``cpu_impl`` (one pass, C++
compiled at first use; bit for bit torch_impl's update on CPU) and ``triton_impl``
(one pass on CUDA, or on CPU under Triton's interpreter for testing).

``fused`` says whether a one-pass kernel is wanted, in torch's habit:

- ``None`` (default): the fastest one that can run. CUDA tensors take Triton when it
  is installed; CPU float32/float64 tensors take ``cpu_impl`` when its build succeeds.
  Everything else takes torch; a CPU kernel that cannot be built is logged once, with
  the reason, as a warning.
- ``True``: a one-pass kernel or a RuntimeError saying why there is none. CUDA
  tensors take Triton; CPU tensors take Triton's interpreter when ``TRITON_INTERPRET=1``
  is set (the variable asks for the Triton kernels), else ``cpu_impl``.
- ``False``: always torch.

:func:`backend` names the choice; calling it once up front builds the CPU kernels and
raises for an unsatisfiable ``fused=True`` before the first step.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..layout import FragmentTable
from . import cpu_impl, torch_impl

try:  # Triton is optional: CPU-only installs never import it.
    from . import triton_impl
    TRITON_AVAILABLE = triton_impl.TRITON_AVAILABLE
except ImportError:  # pragma: no cover - depends on the environment
    triton_impl = None
    TRITON_AVAILABLE = False

__all__ = ["partial_stats", "fused_update", "TRITON_AVAILABLE", "use_triton", "backend"]

_ONE_PASS_CPU = (torch.float32, torch.float64)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend(tensor: torch.Tensor, fused: Optional[bool]) -> str:
    """The implementation ``fused`` selects for ``tensor``: ``"triton"``, ``"cpu"`` or ``"torch"``.

    Raises:
        RuntimeError: ``fused=True`` and no one-pass kernel can run on ``tensor``.
    """
    if fused is False:
        return "torch"
    cpu = tensor.device.type == "cpu"
    if fused is None:
        if TRITON_AVAILABLE and tensor.is_cuda and tensor.dtype in (torch.float32, torch.float64):
            return "triton"
        if cpu and tensor.dtype in _ONE_PASS_CPU and cpu_impl.available():
            return "cpu"
        return "torch"
    if tensor.is_cuda or (cpu and _interpreting()):
        if TRITON_AVAILABLE:
            return "triton"
        raise RuntimeError("fused=True was requested but Triton is not installed "
                           "(pip install 'sharded-novograd[triton]')")
    if cpu:
        if tensor.dtype not in _ONE_PASS_CPU:
            raise RuntimeError(f"fused=True was requested but the CPU kernels take float32 and float64, "
                               f"not {tensor.dtype}; use fused=None or False")
        if not cpu_impl.available():
            raise RuntimeError(f"fused=True was requested but the one-pass CPU kernels are unavailable: "
                               f"{cpu_impl.unavailable_reason()}; use fused=None or False for the torch kernels")
        return "cpu"
    raise RuntimeError(f"fused=True was requested but no one-pass kernel runs on device {tensor.device} "
                       "(Triton needs CUDA, or TRITON_INTERPRET=1 on CPU)")


def use_triton(tensor: torch.Tensor, fused: Optional[bool]) -> bool:
    """Whether ``fused`` selects the Triton implementation for ``tensor`` (see :func:`backend`)."""
    return backend(tensor, fused) == "triton"


def partial_stats(grad: torch.Tensor, table: FragmentTable, *, max_abs: bool = True,
                  fused: Optional[bool] = None) -> torch.Tensor:
    which = backend(grad, fused)
    if which == "triton":
        return triton_impl.partial_stats(grad, table)  # one pass gives both statistics
    if which == "cpu":
        why = cpu_impl.check(grad, table)
        if why is None:
            return cpu_impl.partial_stats(grad, table, max_abs=max_abs)
        if fused:
            raise RuntimeError(f"fused=True was requested but the CPU kernels cannot take these tensors: {why}")
    return torch_impl.partial_stats(grad, table, max_abs=max_abs)


def fused_update(grad: torch.Tensor, exp_avg: torch.Tensor, weight: torch.Tensor,
                 param_out: Optional[torch.Tensor], table: FragmentTable, coeffs: torch.Tensor, *,
                 scratch_grad: bool = False, fused: Optional[bool] = None) -> None:
    which = backend(grad, fused)
    if which == "triton":
        triton_impl.fused_update(grad, exp_avg, weight, param_out, table, coeffs)
        return
    if which == "cpu":
        why = cpu_impl.check(grad, table, exp_avg, weight, param_out)
        if why is None:
            cpu_impl.fused_update(grad, exp_avg, weight, param_out, table, coeffs)
            return
        if fused:
            raise RuntimeError(f"fused=True was requested but the CPU kernels cannot take these tensors: {why}")
    torch_impl.fused_update(grad, exp_avg, weight, param_out, table, coeffs, scratch_grad=scratch_grad)
