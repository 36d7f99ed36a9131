"""NovoGrad's math, split into the per-layer part and the elementwise part.

The per-layer part (:func:`layer_update`) runs on O(L) vectors: it turns each
layer's gradient statistic into the new second moment and eight scalars that fully
describe that layer's elementwise update. The elementwise part is then the same for
every preset (paper, apex-compatible, with or without decoupled decay)::

    gs = g * gscale
    m  = b1 * m + b3 * (gs / d_in + wd_in * w)
    w  = w - step * (m / d_out + wd_out * w)

A layer that takes no update gets ``b1=1, b3=gscale=step=wd_in=wd_out=0, d_in=d_out=1``,
which leaves ``m`` and ``w`` bit-for-bit unchanged. The single-process reference,
the sharded optimizer, the torch kernels and the Triton kernels all share this
contract, so every preset goes through every path.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "COEFF_COLUMNS", "NUM_COEFFS", "LayerHyper", "validate_hyperparameters",
    "layer_update", "update_tensor", "identity_coeffs",
]

COEFF_COLUMNS = ("b1", "b3", "gscale", "d_in", "wd_in", "step", "d_out", "wd_out")
NUM_COEFFS = len(COEFF_COLUMNS)
B1, B3, GSCALE, D_IN, WD_IN, STEP, D_OUT, WD_OUT = range(NUM_COEFFS)

_FLAGS = ("grad_averaging", "amsgrad", "reg_inside_moment", "bias_correction", "init_zero")


def _shown(value) -> str:
    """``value`` as an error message shows it: by repr, a large tensor by its dtype and shape."""
    if isinstance(value, torch.Tensor) and (value.numel() > 8 or value.device.type == "meta"):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    return repr(value)


def _as_real(value, tensor_ok: bool = False) -> Tuple[Optional[float], str]:
    """``(float(value), "")`` for a real number, else ``(None, what was given instead)``.

    bools are refused although Python counts them as ints: ``lr=True`` is a mistake.
    With ``tensor_ok``, a 1-element real tensor counts as a number (torch accepts a
    tensor learning rate).
    """
    if isinstance(value, bool):
        return None, "; got a bool"
    if isinstance(value, (int, float)):
        try:
            return float(value), ""
        except OverflowError:  # an int beyond float range
            return math.inf, ""
    if isinstance(value, torch.Tensor):
        if not tensor_ok:
            return None, "; got a tensor: pass a Python float"
        if value.numel() != 1:
            return None, f"; got a tensor of {value.numel()} elements"
        if value.dtype == torch.bool or value.is_complex() or value.device.type == "meta":
            return None, f"; got a {value.dtype} tensor on {value.device}"
        return float(value), ""
    return None, f"; got {type(value).__name__}"


def validate_hyperparameters(hp: Dict) -> None:
    """Raise ValueError naming the first invalid hyperparameter in ``hp``, and its value.

    ``lr`` must be a finite number >= 0 (a float, an int or a 1-element tensor);
    ``eps`` a finite number > 0; ``betas`` a pair of numbers in [0, 1);
    ``weight_decay`` a finite number >= 0; ``norm_type`` 2 or ``float("inf")``; the
    flags bools. A missing key counts as the value None.
    """
    lr = hp.get("lr")
    x, got = _as_real(lr, tensor_ok=True)
    if x is None or not math.isfinite(x) or x < 0.0:
        raise ValueError(f"Invalid learning rate: {_shown(lr)} (lr must be a finite number >= 0, a float or "
                         f"a 1-element tensor{got})")
    eps = hp.get("eps")
    x, got = _as_real(eps)
    if x is None or not math.isfinite(x) or x <= 0.0:
        raise ValueError(f"Invalid epsilon value: {_shown(eps)} (eps must be a finite number > 0{got})")
    betas = hp.get("betas")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {_shown(betas)} (betas must be a pair of floats in [0, 1), "
                         f"got {type(betas).__name__}"
                         f"{f' of length {len(betas)}' if isinstance(betas, (tuple, list)) else ''})")
    for i, b in enumerate(betas):
        x, got = _as_real(b)
        if x is None or not 0.0 <= x < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {_shown(b)} (betas[{i}] must be a float "
                             f"in [0, 1){got})")
    wd = hp.get("weight_decay")
    x, got = _as_real(wd)
    if x is None or not math.isfinite(x) or x < 0.0:
        raise ValueError(f"Invalid weight_decay value: {_shown(wd)} (weight_decay must be a finite number "
                         f">= 0{got})")
    nt = hp.get("norm_type")
    x, _ = _as_real(nt)
    if x not in (2.0, math.inf):
        raise ValueError(f"Invalid norm_type: {_shown(nt)} (norm_type must be 2 or float('inf'))")
    for name in _FLAGS:
        if not isinstance(hp.get(name), bool):
            raise ValueError(f"Invalid {name}: {_shown(hp.get(name))} ({name} must be a bool, True or False)")


@dataclass
class LayerHyper:
    """Per-layer hyperparameter vectors (one entry per layer), on one device and dtype."""

    lr: torch.Tensor
    beta1: torch.Tensor
    beta2: torch.Tensor
    eps: torch.Tensor
    weight_decay: torch.Tensor
    grad_averaging: torch.Tensor
    amsgrad: torch.Tensor
    reg_inside_moment: torch.Tensor
    bias_correction: torch.Tensor
    init_zero: torch.Tensor

    @classmethod
    def from_groups(cls, groups: Sequence[Dict], layer_group: Sequence[int], dtype, device) -> "LayerHyper":
        """Build the vectors from torch-style param groups; layer i uses ``groups[layer_group[i]]``.

        One host-to-device copy for all ten vectors (each would otherwise be its own,
        and on CUDA a copy from pageable memory waits for the stream).
        """
        rows = torch.tensor([[float(g["lr"]), g["betas"][0], g["betas"][1], g["eps"], g["weight_decay"]]
                             + [float(g[f]) for f in _FLAGS] for g in groups], dtype=torch.float64)
        table = rows[torch.tensor(list(layer_group), dtype=torch.long)].to(device=device)
        cols = table.t()
        num = cols[:5].to(dtype)
        return cls(lr=num[0], beta1=num[1], beta2=num[2], eps=num[3], weight_decay=num[4],
                   **{f: cols[5 + i] > 0.5 for i, f in enumerate(_FLAGS)})

    def with_lr(self, groups: Sequence[Dict], layer_group: Sequence[int]) -> "LayerHyper":
        """The same vectors with the learning rates of ``groups`` (a scheduler's change)."""
        lrs = torch.tensor([float(g["lr"]) for g in groups], dtype=torch.float64)
        lr = lrs[torch.tensor(list(layer_group), dtype=torch.long)].to(device=self.lr.device, dtype=self.lr.dtype)
        return dataclasses.replace(self, lr=lr)


def layer_update(stat: torch.Tensor, has_grad: torch.Tensor, v: torch.Tensor, v_max: torch.Tensor,
                 step: torch.Tensor, hp: LayerHyper, *, norm_type: float, gscale=1.0):
    """One step of the per-layer math on O(L) vectors.

    Args:
        stat: per-layer ``||g||_2^2`` (norm_type 2) or ``max|g|`` (inf) of the gradient
            as it will be used, that is already multiplied by ``gscale`` (squared for 2).
        has_grad: bool vector, layers that take an update this step.
        v, v_max, step: per-layer second moment, its running max (amsgrad) and step count.
        hp: per-layer hyperparameters.
        norm_type: 2 or inf; for 2, ``v`` holds the squared norm.
        gscale: gradient multiplier (clipping), a float or a 0-dim tensor.

    Returns:
        ``(v, v_max, step, coeffs)``: the new state vectors and a ``[L, NUM_COEFFS]``
        coefficient table in the column order of :data:`COEFF_COLUMNS`.
    """
    one = torch.ones_like(v)
    b1, b2 = hp.beta1, hp.beta2
    t = step + has_grad.to(step.dtype)
    first = has_grad & (step == 0)
    blended = b2 * v + (1 - b2) * stat
    v_first = torch.where(hp.init_zero, (1 - b2) * stat, stat)
    v_new = torch.where(has_grad, torch.where(first, v_first, blended), v)
    # Without amsgrad, v_max follows v, so switching amsgrad on later starts from the
    # current v (as the reference's max(v_old, v_new) does).
    v_max_new = torch.where(has_grad, torch.where(hp.amsgrad, torch.maximum(v_max, v_new), v_new), v_max)
    v_used = torch.where(hp.amsgrad, v_max_new, v_new)

    bc1 = torch.where(hp.bias_correction, 1 - b1 ** t, one)
    bc2 = torch.where(hp.bias_correction, torch.sqrt(1 - b2 ** t), one)
    root = torch.sqrt(v_used) if norm_type == 2 else v_used
    d = root / bc2 + hp.eps
    b3 = torch.where(hp.grad_averaging, 1 - b1, one)
    inside = hp.reg_inside_moment
    zero = torch.zeros_like(v)

    cols = [None] * NUM_COEFFS
    cols[B1] = b1
    cols[B3] = b3
    cols[GSCALE] = one * gscale
    cols[D_IN] = torch.where(inside, d, one)
    cols[WD_IN] = torch.where(inside, hp.weight_decay, zero)
    cols[STEP] = torch.where(inside, hp.lr / bc1, hp.lr)
    cols[D_OUT] = torch.where(inside, one, bc1 * d)
    cols[WD_OUT] = torch.where(inside, zero, hp.weight_decay)
    coeffs = torch.stack(cols, dim=1)
    coeffs = torch.where(has_grad.unsqueeze(1), coeffs, identity_coeffs(len(v), v.dtype, v.device))
    return v_new, v_max_new, t, coeffs


def identity_coeffs(num_layers: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Coefficients that leave ``m`` and ``w`` unchanged (layers without a gradient)."""
    c = torch.zeros(num_layers, NUM_COEFFS, dtype=dtype, device=device)
    c[:, B1] = 1.0
    c[:, D_IN] = 1.0
    c[:, D_OUT] = 1.0
    return c


def update_tensor(g: torch.Tensor, m: torch.Tensor, w: torch.Tensor, c: List[float]) -> None:
    """Apply one layer's elementwise update in place, ``c`` being its coefficient row."""
    # The same operation sequence as the foreach kernel, so fp32 results agree bit for bit.
    # Weight-decay terms are skipped where the decay is 0, as the foreach kernel does.
    u = g.mul(c[GSCALE]).div_(c[D_IN])
    if c[WD_IN]:
        u.add_(w.mul(c[WD_IN]))
    m.mul_(c[B1]).add_(u.mul_(c[B3]))
    t = m.div(c[D_OUT])
    if c[WD_OUT]:
        t.add_(w.mul(c[WD_OUT]))
    w.sub_(t.mul_(c[STEP]))
