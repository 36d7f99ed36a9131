"""NovoGrad (the single-process reference) against float64 transcriptions of the equations.

The transcriptions below are written from the published formulas, independently of
sharded_novograd.functional: the paper's algorithm, which stores the squared norm
``v``, and apex's FusedNovoGrad, which stores the norm ``V`` itself and blends it
from the first step. Both are float64, so the tolerance only absorbs reordering of
float64 operations over 25 steps (1e-12 relative).
"""

from __future__ import annotations

import math

import pytest
import torch

from sharded_novograd import NovoGrad

STEPS = 25
SHAPES = [(), (1,), (5,), (4, 3), (2, 3, 7)]


def grad_for(step, i, shape):
    """Gradient scale sweeps 1e-4..1e4; layer 2 gets an exactly-zero gradient at step 7
    (which must not restart its moment) and layer 3 has no gradient every fifth step."""
    if i == 3 and step % 5 == 4:
        return None
    if i == 2 and step == 7:
        return torch.zeros(shape, dtype=torch.float64)
    g = torch.Generator().manual_seed(97 * step + i)
    return torch.randn(shape, generator=g, dtype=torch.float64) * 10.0 ** ((step % 9) - 4)


def paper_transcription(w, grads, lr, b1, b2, eps, wd, grad_averaging, amsgrad):
    """Ginsburg et al. 2019, Algorithm 1, per layer, with the optional amsgrad max."""
    m, v, vmax, t = torch.zeros_like(w), 0.0, 0.0, 0
    for g in grads:
        if g is None:
            continue
        n = float((g * g).sum())
        v = n if t == 0 else b2 * v + (1 - b2) * n
        t += 1
        vmax = max(vmax, v)
        denom = math.sqrt(vmax if amsgrad else v) + eps
        u = g / denom + wd * w
        if grad_averaging:
            u = (1 - b1) * u
        m = b1 * m + u
        w = w - lr * m
    return w, {"exp_avg": m, "exp_avg_sq": v, "step": t, "max_exp_avg_sq": vmax}


def apex_transcription(w, grads, lr, b1, b2, eps, wd, grad_averaging, reg_inside_moment, bias_correction,
                       init_zero, norm_type):
    """apex.optimizers.FusedNovoGrad's update, storing the norm V."""
    m, V, t = torch.zeros_like(w), 0.0, 0
    for g in grads:
        if g is None:
            continue
        t += 1
        gn = float(g.norm()) if norm_type == 2 else float(g.abs().max())
        if t == 1:
            V = 0.0 if init_zero else gn
        V = math.sqrt(b2 * V * V + (1 - b2) * gn * gn) if norm_type == 2 else b2 * V + (1 - b2) * gn
        bc1, bc2 = (1 - b1 ** t, math.sqrt(1 - b2 ** t)) if bias_correction else (1.0, 1.0)
        b3 = 1 - b1 if grad_averaging else 1.0
        d = V / bc2 + eps
        if reg_inside_moment:
            m = b1 * m + b3 * (g / d + wd * w)
            w = w - lr * m / bc1
        else:
            m = b1 * m + b3 * g
            w = w - lr * ((m / bc1) / d + wd * w)
    v = V * V if norm_type == 2 else V  # what NovoGrad stores as exp_avg_sq
    return w, {"exp_avg": m, "exp_avg_sq": v, "step": t}


BASE = dict(lr=0.01, betas=(0.9, 0.97), eps=1e-8)
# (name, NovoGrad kwargs, transcription)
CASES = [
    ("paper", dict(), "paper"),
    ("paper_weight_decay", dict(weight_decay=0.05), "paper"),
    ("paper_grad_averaging", dict(weight_decay=0.05, grad_averaging=True), "paper"),
    ("paper_amsgrad", dict(amsgrad=True, betas=(0.9, 0.5)), "paper"),
    ("paper_linf", dict(norm_type=math.inf, weight_decay=0.01), "apex"),
    ("apex_defaults", dict(reg_inside_moment=False, bias_correction=True, weight_decay=0.05), "apex"),
    ("apex_grad_averaging_init_zero", dict(reg_inside_moment=False, bias_correction=True, grad_averaging=True,
                                           init_zero=True, weight_decay=0.05), "apex"),
    ("apex_linf", dict(reg_inside_moment=False, bias_correction=True, norm_type=math.inf, weight_decay=0.05), "apex"),
    ("apex_linf_init_zero", dict(reg_inside_moment=False, norm_type=math.inf, init_zero=True), "apex"),
    ("apex_reg_inside_bias_correction", dict(bias_correction=True, weight_decay=0.05), "apex"),
    ("paper_via_apex", dict(weight_decay=0.05), "apex"),  # the presets coincide
]


def _transcribe(kind, kwargs, w0, grads):
    hp = {**BASE, **kwargs}
    b1, b2 = hp["betas"]
    common = dict(lr=hp["lr"], b1=b1, b2=b2, eps=hp["eps"], wd=hp.get("weight_decay", 0.0),
                  grad_averaging=hp.get("grad_averaging", False))
    if kind == "paper":
        return paper_transcription(w0, grads, amsgrad=hp.get("amsgrad", False), **common)
    return apex_transcription(w0, grads, reg_inside_moment=hp.get("reg_inside_moment", True),
                              bias_correction=hp.get("bias_correction", False),
                              init_zero=hp.get("init_zero", False), norm_type=hp.get("norm_type", 2), **common)


@pytest.mark.parametrize("name,kwargs,kind", CASES, ids=[c[0] for c in CASES])
def test_matches_transcription(name, kwargs, kind):
    """Check that NovoGrad follows the written equations for 25 steps of gradients whose
    scale changes by eight orders of magnitude, layer by layer, state included."""
    init = [torch.randn(s, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
            for i, s in enumerate(SHAPES)]
    params = [torch.nn.Parameter(w.clone()) for w in init]
    opt = NovoGrad(params, **{**BASE, **kwargs})
    for step in range(STEPS):
        for i, p in enumerate(params):
            p.grad = grad_for(step, i, p.shape)
        opt.step()
    for i, (p, w0) in enumerate(zip(params, init)):
        w, st = _transcribe(kind, kwargs, w0.clone(), [grad_for(s, i, w0.shape) for s in range(STEPS)])
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14, msg=f"layer {i}")
        state = opt.state[p]
        torch.testing.assert_close(state["exp_avg"], st["exp_avg"], rtol=1e-12, atol=1e-14)
        assert math.isclose(float(state["exp_avg_sq"]), st["exp_avg_sq"], rel_tol=1e-12), (i, name)
        assert int(state["step"]) == st["step"]
        if kwargs.get("amsgrad"):
            assert math.isclose(float(state["max_exp_avg_sq"]), st["max_exp_avg_sq"], rel_tol=1e-12)


def test_param_groups_have_their_own_hyperparameters():
    """Check that each param group uses its own lr, weight decay and flags."""
    init = [torch.randn(4, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    params = [torch.nn.Parameter(w.clone()) for w in init]
    opt = NovoGrad([{"params": [params[0]], "lr": 0.05, "weight_decay": 0.1},
                    {"params": [params[1]], "reg_inside_moment": False, "bias_correction": True}], **BASE)
    for step in range(STEPS):
        for i, p in enumerate(params):
            p.grad = grad_for(step, i + 2, p.shape)
        opt.step()
    w0, _ = paper_transcription(init[0].clone(), [grad_for(s, 2, (4, 3)) for s in range(STEPS)], lr=0.05, b1=0.9,
                                b2=0.97, eps=1e-8, wd=0.1, grad_averaging=False, amsgrad=False)
    w1, _ = _transcribe("apex", dict(reg_inside_moment=False, bias_correction=True), init[1].clone(),
                        [grad_for(s, 3, (5,)) for s in range(STEPS)])
    torch.testing.assert_close(params[0].detach(), w0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(params[1].detach(), w1, rtol=1e-12, atol=1e-14)


def test_sparse_gradient_is_refused():
    """Check that a sparse gradient raises a clear error and changes nothing."""
    p = torch.nn.Parameter(torch.ones(4, 3))
    opt = NovoGrad([p])
    p.grad = torch.ones(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(4, 3)) and len(opt.state) == 0


def test_loads_nemo_style_state():
    """Check that a state dict in NVIDIA NeMo's / torch-optimizer's layout (integer step,
    0-dim exp_avg_sq) loads and continues the trajectory exactly."""
    init = torch.randn(6, dtype=torch.float64)
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    oa = NovoGrad([a], **BASE)
    for step in range(3):
        a.grad = grad_for(step, 1, (6,))
        oa.step()
    st = oa.state[a]
    b.data.copy_(a.detach())
    ob = NovoGrad([b], **BASE)
    nemo = {"state": {0: {"step": int(st["step"]), "exp_avg": st["exp_avg"].clone(),
                          "exp_avg_sq": st["exp_avg_sq"].clone()}},
            "param_groups": oa.state_dict()["param_groups"]}
    ob.load_state_dict(nemo)
    for step in range(3, 8):
        a.grad = grad_for(step, 1, (6,))
        b.grad = grad_for(step, 1, (6,))
        oa.step()
        ob.step()
    assert torch.equal(a.detach(), b.detach())
