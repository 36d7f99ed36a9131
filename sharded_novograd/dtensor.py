"""NovoGrad on DTensor parameters: FSDP2 (``fully_shard``), tensor parallelism, 2-D meshes.

:class:`sharded_novograd.NovoGrad` comes here from ``step()`` when its parameters are
DTensors. This module is a front end of the step engine (:mod:`sharded_novograd.engine`):

- the fragments are the parameters' local tensors (``p.to_local()``): a dim-0 chunk
  under FSDP2, any block under tensor parallelism; one ``torch._foreach_norm`` over
  the list gives every layer's partial sum of squares (and, for ``norm_type=inf``, a
  second one its max-abs), with no host sync and no collective per parameter;
- the gradients are whatever ``p.grad`` holds: FSDP2's reduce-scatter has already
  averaged them over "dp";
- the group is the one spanning every rank of the parameters' meshes, so parameters
  on the 1-D "dp" mesh and on the 2-D ("dp", "tp") mesh share ONE collective;
- each layer's replication factor comes from its placements: a ``Replicate`` mesh
  dimension of size k holds each element k times, a ``Shard`` (or ``_StridedShard``)
  dimension splits it, and a parameter on a sub-mesh is held once per copy of that
  sub-mesh in the group.

The elementwise update runs on the local tensors with ``torch._foreach`` ops in the
operation order of :func:`sharded_novograd.functional.update_tensor`. State keeps the
keys of the single-process path: ``exp_avg`` is a DTensor with the parameter's mesh and
placements (``torch.distributed.checkpoint`` saves and reshards it), ``exp_avg_sq``
(and ``max_exp_avg_sq``) a 0-dim tensor holding the same value on every rank.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from typing import Dict, List, Optional

import torch

from . import collectives as C
from . import functional as F
from .engine import StepEngine, hyper_text, plan_update, settings_digest

__all__ = ["holds_dtensors", "check_max_grad_norm", "step", "last_step"]

logger = logging.getLogger(__name__)

_HYPER_KEYS = ("lr", "betas", "eps", "weight_decay", "grad_averaging", "amsgrad", "reg_inside_moment",
               "bias_correction", "init_zero", "norm_type")


def _dtensor_type():
    from torch.distributed.tensor import DTensor
    return DTensor


def holds_dtensors(param_groups) -> bool:
    """Whether any parameter of ``param_groups`` is a DTensor."""
    DTensor = _dtensor_type()
    return any(isinstance(p, DTensor) for g in param_groups for p in g["params"])


def check_max_grad_norm(value, param_groups) -> None:
    """Raise ValueError unless ``max_grad_norm`` is None, or a float > 0 for DTensor parameters."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"Invalid max_grad_norm: {value!r} (expected None or a finite float > 0)")
    if not holds_dtensors(param_groups):
        raise ValueError("max_grad_norm is applied by NovoGrad's DTensor path (parameters sharded by fully_shard "
                         "or parallelize_module); for plain tensors call torch.nn.utils.clip_grad_norm_ before "
                         "step(), or use ShardedNovoGrad(max_grad_norm=...)")


@dataclasses.dataclass
class _Plan:
    key: tuple                      # the parameters the plan was built for, by identity
    params: List[torch.Tensor]      # every layer, in param-group order
    layer_group: List[int]
    group: object                   # process group spanning the meshes (None: the default group)
    group_size: int
    comm_device: torch.device
    replication: torch.Tensor       # float64 [L]
    problem: Optional[str]


class _Front:
    """Per-optimizer state of the DTensor path that is not optimizer state."""

    def __init__(self):
        self.plan: Optional[_Plan] = None
        self.skipped_steps = 0
        self.grad_norm = math.nan
        self.skipped: Optional[str] = None


def last_step(optimizer) -> Dict:
    """What the last DTensor step did: ``grad_norm`` (global L2 norm of the gradient before
    clipping, nan when skipped), ``skipped`` (the reason, or None) and ``skipped_steps``."""
    front = optimizer.__dict__.get("_dtensor_front") or _Front()
    return {"grad_norm": front.grad_norm, "skipped": front.skipped, "skipped_steps": front.skipped_steps}


def _mesh_key(mesh) -> tuple:
    return (mesh.device_type, tuple(mesh.mesh.shape), tuple(mesh.mesh.flatten().tolist()),
            tuple(mesh.mesh_dim_names or ()))


def _build_plan(optimizer, key) -> _Plan:
    """The layers, the group and the replication factors (local: no collective)."""
    DTensor = _dtensor_type()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    layer_group = [gi for gi, g in enumerate(optimizer.param_groups) for _ in g["params"]]
    problem = None
    plain = [i for i, p in enumerate(params) if not isinstance(p, DTensor)]
    if plain:
        i = plain[0]
        problem = (f"NovoGrad got {len(params) - len(plain)} DTensor parameters and {len(plain)} plain tensors "
                   f"(the first: layer {i} of shape {tuple(params[i].shape)}); hand it only DTensor parameters "
                   "(shard the whole model with fully_shard / parallelize_module) or only plain tensors")
    meshes = {}
    for p in params:
        if isinstance(p, DTensor):
            meshes.setdefault(_mesh_key(p.device_mesh), p.device_mesh)
    root = max(meshes.values(), key=lambda m: m.size())
    ranks = set(root.mesh.flatten().tolist())
    for k, m in meshes.items():
        if m.device_type != root.device_type:
            problem = problem or (f"parameters live on meshes of device types {m.device_type!r} and "
                                  f"{root.device_type!r}; NovoGrad reduces over one mesh")
        elif not set(k[2]) <= ranks:
            problem = problem or (f"parameters live on meshes with ranks {sorted(k[2])} and {sorted(ranks)}, and "
                                  "neither contains the other; NovoGrad needs one mesh that holds every parameter's "
                                  "ranks (the root mesh the sub-meshes were cut from)")
    world = C.group_size(None)
    if root.size() == world:
        group = None
    elif root.ndim == 1:
        group = root.get_group()
    else:
        group = root._flatten().get_group()
    size = C.group_size(group)
    reps = []
    for i, p in enumerate(params):
        if not isinstance(p, DTensor):
            reps.append(1.0)
            continue
        mesh = p.device_mesh
        rep = size // mesh.size()
        for d, pl in enumerate(p.placements):
            if pl.is_partial():
                problem = problem or (f"layer {i} of shape {tuple(p.shape)} has placements {p.placements}: a "
                                      "Partial parameter holds no value NovoGrad can update")
            elif pl.is_replicate():
                rep *= mesh.size(d)
        reps.append(float(rep))
    if root.device_type == "cuda":
        comm_device = torch.device("cuda", torch.cuda.current_device())
    else:
        comm_device = torch.device(root.device_type)
    return _Plan(key=key, params=params, layer_group=layer_group, group=group, group_size=size,
                 comm_device=comm_device, replication=torch.tensor(reps, dtype=torch.float64), problem=problem)


def _plan_lines(plan: _Plan) -> List[str]:
    DTensor = _dtensor_type()
    lines = [f"group of {plan.group_size} ranks, {len(plan.params)} layers"]
    for i, (p, gi) in enumerate(zip(plan.params, plan.layer_group)):
        where = (f"mesh {tuple(p.device_mesh.mesh.shape)} {p.device_mesh.mesh_dim_names} {p.placements}"
                 if isinstance(p, DTensor) else "plain tensor")
        lines.append(f"layer {i} (group {gi}): {tuple(p.shape)} {p.dtype} on {where}, "
                     f"replication {plan.replication[i]:g}")
    if plan.problem:
        lines.append(f"problem: {plan.problem}")
    return lines


def _plan_for(optimizer, front: _Front) -> _Plan:
    key = tuple(id(p) for g in optimizer.param_groups for p in g["params"])
    if front.plan is None or front.plan.key != key:
        plan = _build_plan(optimizer, key)
        lines = _plan_lines(plan)
        # Collective, at the first step and after the parameters change: ranks whose
        # layers differ would otherwise reduce vectors of different lengths.
        C.check_same_plan(lines, hashlib.sha256("\n".join(lines).encode()).digest(), plan.group,
                          plan.comm_device)
        front.plan = plan
    return front.plan


def _grad_problem(i: int, p, g) -> Optional[str]:
    DTensor = _dtensor_type()
    if not isinstance(g, DTensor):
        return f"layer {i} is a DTensor but its gradient is a {type(g).__name__}"
    if g.device_mesh != p.device_mesh or tuple(g.placements) != tuple(p.placements):
        return (f"the gradient of layer {i} has placements {g.placements} on {g.device_mesh}, its parameter "
                f"{p.placements} on {p.device_mesh}: redistribute the gradient to the parameter's placements")
    if g.to_local().shape != p.to_local().shape or g.to_local().is_sparse:
        return f"the local gradient of layer {i} does not match its local parameter"
    return None


def _scaler_inputs(optimizer, grad_scaler, device):
    """``(inv_scale, found_inf, the scaler's per-optimizer state)`` for a GradScaler step."""
    if grad_scaler is None:
        return None, None, None
    from torch.amp.grad_scaler import OptState
    state = grad_scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is OptState.UNSCALED:
        # scaler.unscale_(optimizer) ran (to clip, say): .grad is unscaled, and its inf
        # check saw this rank's elements only; the collective sums it over ranks.
        # A float: one host sync, only on this path.
        return None, float(sum(float(t) for t in state["found_inf_per_device"].values())), state
    return 1.0 / grad_scaler._scale.to(device, torch.float64), None, state


def step(optimizer, grad_scaler=None) -> None:
    """One NovoGrad step on DTensor parameters. This needs to be called on all ranks.

    Args:
        optimizer: the NovoGrad being stepped.
        grad_scaler: the ``torch.amp.GradScaler`` stepping it, or None. Its scale is
            divided out inside the update, and the skip decision it records for its
            ``update()`` is the one every rank took (default: None)

    Raises:
        RuntimeError: on every rank, with nothing changed, when the ranks' layers or
            settings differ, a rank's gradient does not fit its parameter, or a layer has a
            gradient on some ranks only.
    """
    front = optimizer.__dict__.setdefault("_dtensor_front", _Front())
    plan = _plan_for(optimizer, front)
    params, L = plan.params, len(plan.params)
    groups = optimizer.param_groups
    problem = plan.problem
    local_grads, with_grad = [], []
    for i, p in enumerate(params):
        g = p.grad
        if g is None:
            continue
        why = None if problem else _grad_problem(i, p, g)
        if why:
            problem = problem or why
            continue
        if not problem:
            local_grads.append(g.to_local())
            with_grad.append(i)
    device = params[0].to_local().device if not plan.problem else plan.comm_device
    norm_types = [2 if groups[gi]["norm_type"] == 2 else math.inf for gi in plan.layer_group]
    any_inf = any(nt != 2 for nt in norm_types)
    has_grad = torch.zeros(L, dtype=torch.float64, device=device)
    sumsq = torch.zeros(L, dtype=torch.float64, device=device)
    maxabs = torch.zeros(L, dtype=torch.float64, device=device) if any_inf else None
    nonfinite = torch.zeros((), dtype=torch.float64, device=device)
    if local_grads:
        idx = torch.tensor(with_grad, dtype=torch.int64, device=device)
        has_grad[idx] = 1.0
        # One launch for every layer's partial statistics; low-precision gradients are
        # summed in fp32, as the single-process path does.
        acc = torch.float64 if any(g.dtype == torch.float64 for g in local_grads) else torch.float32
        norms = torch.stack(torch._foreach_norm(local_grads, 2, dtype=acc)).to(torch.float64)
        sumsq[idx] = norms.square()
        nonfinite = (~torch.isfinite(norms)).sum().to(torch.float64)
        if any_inf:  # max-abs has no identity: empty local tensors stay at 0
            full = [k for k, g in enumerate(local_grads) if g.numel()]
            if full:
                mx = torch._foreach_norm([local_grads[k] for k in full], math.inf, dtype=acc)
                maxabs[idx[torch.tensor(full, dtype=torch.int64, device=device)]] = torch.stack(mx).to(torch.float64)
    mgn = getattr(optimizer, "max_grad_norm", None)
    digest = settings_digest(hyper_text(groups, _HYPER_KEYS, f"max_grad_norm={mgn!r}"))
    state_dtype = _state_dtypes(groups)
    # A reduced sum of squares that overflows the narrowest second moment skips the step.
    narrowest = torch.float32 if torch.float32 in state_dtype.values() else torch.float64
    engine = StepEngine(L, plan.group, plan.comm_device, norm_type=math.inf if any_inf else 2,
                        state_dtype=narrowest)
    inv_scale, found_inf, scaler_state = _scaler_inputs(optimizer, grad_scaler, device)
    red = engine.reduce(sumsq, has_grad, nonfinite, maxabs=maxabs, replication=plan.replication,
                        problem=problem, digest=digest, found_inf=found_inf, inv_scale=inv_scale)
    if scaler_state is not None:  # every rank's scaler.update() then backs off (or grows) alike
        found = torch.full((), 1.0 if red.skip else 0.0, dtype=torch.float32, device=grad_scaler._scale.device)
        scaler_state["found_inf_per_device"] = {found.device: found}
    if red.skip:
        front.skipped_steps += 1
        front.skipped, front.grad_norm = red.reason, math.nan
        if C.group_rank(plan.group) == 0:
            logger.warning("%s: NovoGrad step skipped on every rank (%d so far)", red.reason, front.skipped_steps)
        return
    _update(optimizer, front, plan, red, norm_types, state_dtype, mgn, device, inv_scale)


def _state_dtypes(groups) -> Dict[int, torch.dtype]:
    """The dtype of each param group's per-layer math, as in the single-process path."""
    out = {}
    for gi, g in enumerate(groups):
        first = next((p for p in g["params"] if p.grad is not None), g["params"][0] if g["params"] else None)
        if first is not None:
            out[gi] = torch.promote_types(first.dtype, torch.float32)
    return out


def _update(optimizer, front: _Front, plan: _Plan, red, norm_types, state_dtype, max_grad_norm, device,
            inv_scale) -> None:
    params, groups = plan.params, optimizer.param_groups
    parts: Dict[tuple, List[int]] = {}
    for i, gi in enumerate(plan.layer_group):
        parts.setdefault((state_dtype[gi], norm_types[i]), []).append(i)
    stat_dev = red.sumsq.device
    results = []
    for (dtype, nt), idx in parts.items():
        sel = torch.tensor(idx, dtype=torch.int64, device=stat_dev)
        sub = dataclasses.replace(red, sumsq=red.sumsq[sel], stat=(red.sumsq if nt == 2 else red.stat)[sel],
                                  has_grad=red.has_grad[sel])
        states = [optimizer.state[params[i]] for i in idx]
        zero = torch.zeros((), dtype=dtype, device=device)
        v = torch.stack([s["exp_avg_sq"].to(device, dtype) if s else zero for s in states])
        v_max = torch.stack([s.get("max_exp_avg_sq", s["exp_avg_sq"]).to(device, dtype) if s else zero
                             for s in states])
        t = torch.tensor([float(s["step"]) if s else 0.0 for s in states], dtype=dtype, device=device)
        hp = F.LayerHyper.from_groups(groups, [plan.layer_group[i] for i in idx], dtype, device)
        # v, v_max and t are fresh vectors: state changes only after every check below.
        coeffs = plan_update(sub, v, v_max, t, hp, norm_type=nt, max_grad_norm=max_grad_norm, inv_scale=inv_scale)
        results.append((idx, v, v_max, t, coeffs))
    expected = plan.group_size / plan.replication.to(stat_dev)
    partial = red.has_grad & (red.holders < expected - 0.5)
    # The step's second and last host sync: the coefficients become foreach scalars.
    flat = torch.cat([partial.to(device, torch.float64), red.total_norm.reshape(1).to(device)]
                     + [torch.cat([c.flatten(), tt]).to(device, torch.float64) for _, _, _, tt, c in results]).tolist()
    L = len(params)
    missing = [i for i in range(L) if flat[i]]
    if missing:
        i = missing[0]
        raise RuntimeError(f"layer {i} of shape {tuple(params[i].shape)} has a gradient on some ranks only "
                           f"({len(missing)} such layers); every rank must hold a gradient for a layer, or none "
                           "(zero_grad and backward on every rank); nothing was changed on any rank")
    front.grad_norm, front.skipped = flat[L], None
    pos = L + 1
    work: Dict[tuple, list] = {}
    for idx, v, v_max, t, coeffs in results:
        n = len(idx)
        rows = [flat[pos + k * F.NUM_COEFFS: pos + (k + 1) * F.NUM_COEFFS] for k in range(n)]
        steps = flat[pos + n * F.NUM_COEFFS: pos + n * F.NUM_COEFFS + n]
        pos += n * (F.NUM_COEFFS + 1)
        for k, i in enumerate(idx):
            p = params[i]
            if p.grad is None:
                continue
            group = groups[plan.layer_group[i]]
            state = optimizer.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros((), dtype=v.dtype, device=device)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros((), dtype=v.dtype, device=device)
            state["step"] = torch.tensor(steps[k])
            state["exp_avg_sq"] = v[k].clone()
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = v_max[k].clone()
            w = p.to_local()
            if w.numel() == 0:
                continue
            g = p.grad.to_local().to(p.dtype)
            m = state["exp_avg"].to_local()
            work.setdefault((w.device, w.dtype), []).append((g, m, w, rows[k]))
    for items in work.values():
        _foreach_update([x[0] for x in items], [x[1] for x in items], [x[2] for x in items], [x[3] for x in items])


def _foreach_update(gs, ms, ws, rows) -> None:
    """functional.update_tensor on lists of tensors, in the same operation order (the
    same bits on CPU), ``rows`` being each tensor's coefficient row."""
    col = lambda k: [r[k] for r in rows]  # noqa: E731
    u = torch._foreach_mul(gs, col(F.GSCALE))
    torch._foreach_div_(u, col(F.D_IN))
    _add_scaled(u, ws, col(F.WD_IN))
    torch._foreach_mul_(u, col(F.B3))
    torch._foreach_mul_(ms, col(F.B1))
    torch._foreach_add_(ms, u)
    t = u
    torch._foreach_copy_(t, ms)
    torch._foreach_div_(t, col(F.D_OUT))
    _add_scaled(t, ws, col(F.WD_OUT))
    torch._foreach_mul_(t, col(F.STEP))
    torch._foreach_sub_(ws, t)


def _add_scaled(acc, xs, scales) -> None:
    """``acc += x * s`` per tensor, skipped where every ``s`` is 0 (as update_tensor skips a 0 decay)."""
    if any(scales):
        torch._foreach_add_(acc, torch._foreach_mul(xs, scales))
