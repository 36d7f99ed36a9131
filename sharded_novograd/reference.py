"""Single-process NovoGrad: the specification every other path is tested against."""

from __future__ import annotations

import math
import sys
from typing import Callable, Iterable, Optional

import torch

from . import functional as F

__all__ = ["NovoGrad"]

_MOMENT_KEYS = ("exp_avg_sq", "max_exp_avg_sq")


def _checked_state_dict(optimizer: "NovoGrad", state_dict: dict) -> dict:
    """``state_dict`` with missing group keys filled from the optimizer's defaults, once
    its groups and the state of every layer as given were checked (see load_state_dict)."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("param_groups"), (list, tuple)) \
            or not isinstance(state_dict.get("state"), dict):
        keys = f" with keys {sorted(map(str, state_dict))}" if isinstance(state_dict, dict) else ""
        raise ValueError("not an optimizer state dict: expected a dict with 'state' (a dict) and "
                         f"'param_groups' (a list), got {type(state_dict).__name__}{keys}")
    saved = state_dict["param_groups"]
    if len(saved) != len(optimizer.param_groups):
        raise ValueError(f"loaded state dict has {len(saved)} param groups, the optimizer has "
                         f"{len(optimizer.param_groups)}")
    groups, where = [], {}
    for gi, (sg, group) in enumerate(zip(saved, optimizer.param_groups)):
        if not isinstance(sg, dict) or not isinstance(sg.get("params"), (list, tuple)):
            raise ValueError(f"param group {gi} of the loaded state dict is not a dict with a 'params' list")
        if len(sg["params"]) != len(group["params"]):
            raise ValueError(f"param group {gi} has {len(sg['params'])} parameters in the loaded state dict, "
                             f"{len(group['params'])} in the optimizer")
        merged = {**{k: v for k, v in optimizer.defaults.items() if k not in sg}, **sg}
        try:
            F.validate_hyperparameters(merged)
        except ValueError as e:
            raise ValueError(f"param group {gi} of the loaded state dict: {e}") from None
        groups.append(merged)
        names = sg.get("param_names") or group.get("param_names") or [None] * len(group["params"])
        for j, (index, p) in enumerate(zip(sg["params"], group["params"])):
            where[index] = (p, gi, j, names[j] if j < len(names) else None)
    given = {id(p) for p in getattr(optimizer, "_layers_given", ())}
    for index, st in state_dict["state"].items():
        if index not in where:
            raise ValueError(f"the loaded state dict has state for parameter {index!r}, which none of its "
                             f"param groups lists")
        p, gi, j, name = where[index]
        # An engine that swapped the layers for flat partitions checks its own state.
        if id(p) in given:
            _check_layer_state(st, p, f"parameter {index}{f' ({name})' if name else ''} (param group {gi}, "
                                      f"position {j}, shape {tuple(p.shape)})")
    return {**state_dict, "param_groups": groups}


def _check_layer_state(st, p: torch.Tensor, who: str) -> None:
    if not isinstance(st, dict):
        raise ValueError(f"state of {who} is a {type(st).__name__}, not a dict")
    if not st:
        return
    missing = [k for k in ("step", "exp_avg", "exp_avg_sq") if k not in st]
    if missing:
        raise ValueError(f"state of {who}: missing {missing} (it has {sorted(map(str, st))})")
    step = st["step"]
    number = isinstance(step, (int, float)) and not isinstance(step, bool)
    number |= isinstance(step, torch.Tensor) and step.numel() == 1 and step.dtype != torch.bool \
        and not step.is_complex()
    n = float(step) if number else math.nan
    if not math.isfinite(n) or n < 0 or n != int(n):
        raise ValueError(f"state of {who}: step must be a whole number >= 0 (an int or a 1-element tensor), "
                         f"got {step!r}")
    m = st["exp_avg"]
    if not isinstance(m, torch.Tensor) or not m.is_floating_point() or tuple(m.shape) != tuple(p.shape):
        got = f"a {m.dtype} tensor of shape {tuple(m.shape)}" if isinstance(m, torch.Tensor) else type(m).__name__
        raise ValueError(f"state of {who}: exp_avg must be a floating-point tensor of the parameter's shape "
                         f"{tuple(p.shape)}, got {got}")
    for key in _MOMENT_KEYS:
        v = st.get(key)
        if key in st and (not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.dim() != 0):
            got = f"a {v.dtype} tensor of shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else \
                type(v).__name__
            raise ValueError(f"state of {who}: {key} must be a 0-dim floating-point tensor (one value per "
                             f"layer), got {got}")


class NovoGrad(torch.optim.Optimizer):
    r"""NovoGrad with one second-moment scalar per layer (parameter tensor).

    .. math::
        \begin{aligned}
        n_l &= \lVert g_l \rVert_2^2 \quad(\text{or } \max|g_l| \text{ for norm\_type=inf}) \\
        v_l &= n_l \text{ on a layer's first step (} (1-\beta_2) n_l \text{ with init\_zero), else }
               \beta_2 v_l + (1-\beta_2) n_l \\
        \hat v_l &= \max(\hat v_l, v_l) \text{ with amsgrad, else } v_l \\
        d_l &= \sqrt{\hat v_l} / bc_2 + \epsilon \quad(\hat v_l / bc_2 + \epsilon \text{ for inf}) \\
        \text{reg\_inside\_moment:}\quad m_l &= \beta_1 m_l + b_3 (g_l / d_l + \lambda w_l),
            \quad w_l \mathrel{-}= \eta\, m_l / bc_1 \\
        \text{otherwise:}\quad m_l &= \beta_1 m_l + b_3 g_l,
            \quad w_l \mathrel{-}= \eta\,(m_l / (bc_1 d_l) + \lambda w_l)
        \end{aligned}

    with :math:`b_3 = 1-\beta_1` if ``grad_averaging`` else 1, and
    :math:`bc_1 = 1-\beta_1^t`, :math:`bc_2 = \sqrt{1-\beta_2^t}` if ``bias_correction``
    else 1. The defaults are the paper's algorithm (as in NVIDIA NeMo's Novograd and
    torch-optimizer's NovoGrad). ``reg_inside_moment=False, bias_correction=True``
    reproduces ``apex.optimizers.FusedNovoGrad``'s defaults.

    Args:
        params: iterable of parameters or dicts defining param groups.
        lr: learning rate (default: 1e-3)
        betas: coefficients of the first and second moments (default: (0.95, 0.98))
        eps: added to the denominator (default: 1e-8)
        weight_decay: weight decay (default: 0)
        grad_averaging: scale the moment's input by ``1 - beta1`` (default: False)
        amsgrad: use the running maximum of the second moment (default: False)
        reg_inside_moment: apply weight decay inside the first moment; False gives
            decoupled decay as in apex (default: True)
        bias_correction: apply Adam-style bias correction (default: False)
        init_zero: start the second moment at 0 rather than at the first norm (default: False)
        norm_type: 2 or ``float("inf")`` (default: 2)
        max_grad_norm: clip the gradient to this global L2 norm inside ``step()``, as
            ``torch.nn.utils.clip_grad_norm_`` would; DTensor parameters only (default: None)

    DTensor parameters (a model sharded by ``fully_shard`` and/or ``parallelize_module``)
    take the same update, made exact across ranks with one collective per step (see
    ``sharded_novograd.dtensor`` and docs/fsdp2.md); ``step()`` must then be called on
    every rank of their mesh.

    State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq`` (0-dim: ``v`` above,
    the squared norm for norm_type 2) and ``max_exp_avg_sq`` with amsgrad.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas=(0.95, 0.98), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, grad_averaging: bool = False, amsgrad: bool = False,
                 reg_inside_moment: bool = True, bias_correction: bool = False, init_zero: bool = False,
                 norm_type: float = 2, max_grad_norm: Optional[float] = None):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, grad_averaging=grad_averaging, amsgrad=amsgrad,
                        reg_inside_moment=reg_inside_moment, bias_correction=bias_correction,
                        init_zero=init_zero, norm_type=norm_type)
        F.validate_hyperparameters(defaults)
        self._layers_given = []
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        if max_grad_norm is not None:
            from . import dtensor
            dtensor.check_max_grad_norm(max_grad_norm, self.param_groups)
        if _holds_dtensors(self.param_groups):
            # GradScaler then hands itself to step(): the inf decision is taken across ranks.
            self._step_supports_amp_scaling = True

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        F.validate_hyperparameters(self.param_groups[-1])
        # The tensors as given: an engine that later swaps them for flat partitions marks these.
        getattr(self, "_layers_given", []).extend(self.param_groups[-1]["params"])

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of this class, or of NVIDIA NeMo's ``Novograd`` or
        torch-optimizer's ``NovoGrad`` (same state keys; integer ``step``).

        A saved param group without one of this class's keys (``norm_type``,
        ``reg_inside_moment``, ``bias_correction``, ``init_zero``; ``grad_averaging``
        or ``amsgrad``) takes the value this optimizer was constructed with. Every
        group's hyperparameters and every state tensor (its size and dtype against its
        parameter) are checked before anything is loaded: on an error nothing changes.

        Args:
            state_dict: optimizer state, as returned by :meth:`state_dict`.

        Raises:
            ValueError: naming the param group, or the parameter and the state key,
                that does not fit.
        """
        super().load_state_dict(_checked_state_dict(self, state_dict))

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None, grad_scaler=None):
        """Perform a single optimization step.

        Args:
            closure: a closure that re-evaluates the model and returns the loss (default: None)
            grad_scaler: passed by ``torch.amp.GradScaler.step`` for DTensor parameters: the
                step unscales, and skips on every rank alike (default: None)
        """
        deepspeed_step = _deepspeed_step(self)
        if deepspeed_step is not None:
            return deepspeed_step.step(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if _holds_dtensors(self.param_groups):
            from . import dtensor
            dtensor.step(self, grad_scaler)
            return loss
        if grad_scaler is not None:
            raise RuntimeError("grad_scaler is taken by NovoGrad's DTensor path only; for plain tensors "
                               "torch.amp.GradScaler unscales the gradients itself")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("NovoGrad does not support sparse gradients")
            self._step_group(group, params)
        return loss

    def _step_group(self, group, params):
        norm_type = 2 if group["norm_type"] == 2 else math.inf
        dtype = torch.promote_types(params[0].dtype, torch.float32)
        device = params[0].device
        stats, vs, vmaxs, steps = [], [], [], []
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros((), dtype=dtype, device=device)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros((), dtype=dtype, device=device)
            g = p.grad.to(dtype)
            stats.append(g.square().sum() if norm_type == 2 else g.abs().max() if g.numel() else g.sum())
            vs.append(state["exp_avg_sq"].to(dtype=dtype, device=device))
            vmaxs.append(state.get("max_exp_avg_sq", vs[-1]).to(dtype=dtype, device=device))
            steps.append(float(state["step"]))
        n = len(params)
        hp = F.LayerHyper.from_groups([group], [0] * n, dtype, device)
        v, v_max, t, coeffs = F.layer_update(
            torch.stack(stats), torch.ones(n, dtype=torch.bool, device=device), torch.stack(vs),
            torch.stack(vmaxs), torch.tensor(steps, dtype=dtype, device=device), hp, norm_type=norm_type)
        rows = coeffs.tolist()
        for i, p in enumerate(params):
            state = self.state[p]
            state["step"] = torch.tensor(float(t[i]))
            state["exp_avg_sq"] = v[i].clone()
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = v_max[i].clone()
            F.update_tensor(p.grad.to(p.dtype), state["exp_avg"], p, rows[i])


def _holds_dtensors(param_groups) -> bool:
    # No DTensor exists before torch.distributed.tensor is imported: the plain path never imports it.
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and any(isinstance(p, mod.DTensor) for g in param_groups for p in g["params"])


def _deepspeed_step(optimizer: NovoGrad):
    """What steps ``optimizer`` inside a DeepSpeed engine, or None for the plain step.

    DeepSpeed ZeRO-1/2 and its BF16_Optimizer swap each param group for one flat
    partition cut at arbitrary offsets, and mark every parameter it took with
    ``_hp_mapping`` (ZeRO-3: ``ds_id``). Per-layer norms over such a partition would be
    wrong, so the first step there binds the optimizer to DeepSpeed's fragment map
    (sharded_novograd.integrations.deepspeed), which steps it from then on. DeepSpeed's
    stage-0 fp16/bf16 wrappers also step once at construction with zero gradients, a
    step the reference never takes. Without DeepSpeed imported this is one dict lookup.
    """
    import sys

    binding = optimizer.__dict__.get("_deepspeed_binding")
    if binding is not None or "deepspeed" not in sys.modules:
        return binding
    given = getattr(optimizer, "_layers_given", ())
    marked = any(hasattr(p, "_hp_mapping") or hasattr(p, "ds_id") for p in given)
    current = {id(p) for group in optimizer.param_groups for p in group["params"]} if marked else ()
    flattened = marked and any(id(p) not in current for p in given)
    if not flattened and optimizer.state:
        return None
    from .integrations import deepspeed as ds  # DeepSpeed is imported: this imports nothing else heavy
    return ds.bind_on_step(optimizer, flattened)
