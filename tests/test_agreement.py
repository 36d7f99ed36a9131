"""Ranks agree or all raise: decisions taken from the reduced statistics, settings
checked on every rank, and parameters the fixed layout cannot hold.

Each scenario guards against a bug that was silent or aborted the process: a layer's
sum of squares that overflows only after the all-reduce froze the layer (v = inf)
where one rank alone would have skipped; clipping a gradient whose total norm
overflows zeroed it; ranks with different learning rates or flags stepped anyway; an
lr made invalid on one rank left the other blocked in the parameter gather until the
process-group timeout; duplicate or later-unfrozen parameters were never trained;
wrong-sized state was half loaded. After every refused step the parameters and every
piece of optimizer state are checked unchanged on every rank.

All scenarios run in one forked world per world size (start-up dominates on 2 cores).
Tolerance: fp64 runs differ from the reference by summation order only, 1e-12.
"""

from __future__ import annotations

import math

import pytest
import torch

from sharded_novograd import NovoGrad, ShardedNovoGrad

from .cases import close_ratio, make_params
from .distributed import shared_world

SHAPES = [(3,), (65,), (4, 5)]


def _snapshot(params, opt):
    sd = opt.state_dict()["state"]
    return ([p.detach().clone() for p in params],  # the skip counter is the one thing a skip changes
            {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sd.items() if k != "skipped_steps"})


def _same(before, params, opt):
    ps, st = before
    now = opt.state_dict()["state"]
    return (all(torch.equal(a, b) for a, b in zip(ps, params))
            and all(torch.equal(st[k], now[k]) if isinstance(st[k], torch.Tensor) else st[k] == now[k] for k in st))


def _refused(params, opt, action):
    """Run ``action``; report its RuntimeError/ValueError and whether nothing changed."""
    before = _snapshot(params, opt)
    try:
        action()
    except (RuntimeError, ValueError) as e:
        return {"error": str(e), "unchanged": _same(before, params, opt)}
    return {"error": None, "unchanged": _same(before, params, opt)}


def _grads(params, rank, value=0.5):
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, value * (1 + i + rank))


def _stepper(params, opt, rank):
    def go():
        _grads(params, rank)
        opt.step()
    return go


def overflow_after_reduce(rank, world):
    """A layer of 128 elements of 2e18 (align=1, so at world size 2 each rank holds about
    half of it): each rank's partial sum of squares (~2.6e38) is finite in fp32, their
    sum (5.1e38) is not. At world size 1 the one partial sum overflows already."""
    out = {}
    for clip in (None, 1.0):
        params = [torch.nn.Parameter(torch.ones(128)), torch.nn.Parameter(torch.ones(5))]
        opt = ShardedNovoGrad(params, lr=0.1, max_grad_norm=clip, zero_stage=1, align=1)
        before = _snapshot(params, opt)
        params[0].grad = torch.full((128,), 2e18)
        params[1].grad = torch.full((5,), 0.5)
        opt.step()
        out[clip] = {"skipped": opt.skipped_steps, "unchanged": _same(before, params, opt),
                     "finite": all(bool(torch.isfinite(p).all()) for p in params)}
    return out


def clip_total_overflow(rank, world):
    """Three layers of 128 elements around 1.2e18: each layer's sum of squares (<= 2e38) is
    finite in fp32, the total (~5e38) is not. Clipping must scale the gradient by a
    finite, non-zero factor."""
    params = [torch.nn.Parameter(torch.zeros(128)) for _ in range(3)]
    ref = [torch.nn.Parameter(torch.zeros(128, dtype=torch.float64)) for _ in range(3)]
    opt = ShardedNovoGrad(params, lr=0.1, max_grad_norm=1.0, zero_stage=2, align=1)
    refopt = NovoGrad(ref, lr=0.1)
    grads = [torch.full((128,), 1.25e18 * (1 - i / 10)) for i in range(3)]
    for p, gr in zip(params, grads):
        p.grad = gr.clone()
    opt.step()
    total = math.sqrt(sum(float((gr.double() ** 2).sum()) for gr in grads))
    for q, gr in zip(ref, grads):
        q.grad = gr.double() * (1.0 / (total + 1e-6))
    refopt.step()
    return {"grad_norm": opt.grad_norm, "expected_norm": total, "skipped": opt.skipped_steps,
            "err": max(close_ratio(p, q, 2e-5, 1e-6) for p, q in zip(params, ref)),
            "moved": max(float(p.abs().max()) for p in params)}


DIFFERING = [  # (name, how rank 1 differs after construction)
    ("lr", lambda g: g.__setitem__("lr", 0.5)),
    ("betas", lambda g: g.__setitem__("betas", (0.9, 0.98))),
    ("eps", lambda g: g.__setitem__("eps", 1e-6)),
    ("weight_decay", lambda g: g.__setitem__("weight_decay", 0.1)),
    ("amsgrad", lambda g: g.__setitem__("amsgrad", True)),
    ("bias_correction", lambda g: g.__setitem__("bias_correction", True)),
]


def settings_differ(rank, world):
    out = {}
    for name, change in DIFFERING:
        for stage in (1, 2):
            params = make_params(SHAPES, torch.float64)
            opt = ShardedNovoGrad(params, lr=0.01, zero_stage=stage)
            _stepper(params, opt, rank)()  # a good step first: state to protect
            if rank == 1:
                change(opt.param_groups[0])
            out[(name, stage)] = _refused(params, opt, _stepper(params, opt, rank))
    for name, kw in (("max_grad_norm", {"max_grad_norm": 1.0 if rank else None}),
                     ("bucket_size", {"bucket_size": 64 if rank else 128})):
        params = make_params(SHAPES, torch.float64)
        try:
            ShardedNovoGrad(params, lr=0.01, **kw)
            out[name] = None
        except RuntimeError as e:
            out[name] = str(e)
    return out


def invalid_on_one_rank(rank, world):
    """lr = -1 on rank 0 only: every rank raises, nothing changes, nothing is left in
    flight (a good step afterwards works on every rank)."""
    out = {}
    for stage in (1, 2):
        params = make_params(SHAPES, torch.float64)
        opt = ShardedNovoGrad(params, lr=0.01, zero_stage=stage)
        _stepper(params, opt, rank)()
        if rank == 0:
            opt.param_groups[0]["lr"] = -1.0
        res = _refused(params, opt, _stepper(params, opt, rank))
        opt.param_groups[0]["lr"] = 0.01
        opt.zero_grad()
        _stepper(params, opt, rank)()
        res["then_steps"] = True
        out[stage] = res
    return out


def unfrozen_later(rank, world):
    params = make_params(SHAPES, torch.float64)
    params[1].requires_grad_(False)
    opt = ShardedNovoGrad(params, lr=0.01)
    _stepper([p for p in params if p.requires_grad], opt, rank)()
    params[1].requires_grad_(True)
    return _refused(params, opt, _stepper(params, opt, rank))


def inf_norm_large(rank, world):
    """norm_type=inf with finite fp32 gradients of 2e19: the squared 2-norm overflows but
    the inf-norm never squares, so the step is taken, as the reference takes it."""
    params = [torch.nn.Parameter(torch.ones(128)), torch.nn.Parameter(torch.ones(3))]
    ref = [torch.nn.Parameter(torch.ones(128)), torch.nn.Parameter(torch.ones(3))]
    opt = ShardedNovoGrad(params, lr=0.1, norm_type=math.inf, zero_stage=1, align=1)
    refopt = NovoGrad(ref, lr=0.1, norm_type=math.inf)
    for ps in (params, ref):
        ps[0].grad = torch.full((128,), 2e19)
        ps[1].grad = torch.full((3,), 0.5)
    opt.step()
    refopt.step()
    out = {"skipped": opt.skipped_steps, "err": max(close_ratio(p, q, 2e-5, 1e-6) for p, q in zip(params, ref))}
    for bad in (float("nan"), float("inf")):  # on the last rank only: still skipped everywhere
        for p in params:
            p.grad = torch.full_like(p, 0.5)
        if rank == world - 1:
            params[0].grad[-1] = bad
        before = _snapshot(params, opt)
        opt.step()
        out[str(bad)] = _same(before, params, opt)
    out["skipped_after"] = opt.skipped_steps
    return out


def bad_state_dict(rank, world):
    params = make_params(SHAPES, torch.float64)
    opt = ShardedNovoGrad(params, lr=0.01)
    _stepper(params, opt, rank)()
    out = {}
    for name, wrong in (("short", lambda t: t[:1].clone()), ("one", lambda t: t[:1].clone().reshape(()))):
        sd = opt.state_dict()
        sd = {"state": dict(sd["state"]), "param_groups": sd["param_groups"], "layout": sd["layout"]}
        sd["state"]["exp_avg"] = wrong(sd["state"]["exp_avg"])
        out[name] = _refused(params, opt, lambda: opt.load_state_dict(sd))
    return out


def zero_grad_instead_of_step(rank, world):
    """After a backward, rank 0 calls step() and the others zero_grad(): every rank raises
    (this used to pair collectives of different sizes and abort gloo); when every rank
    drops the gradients nothing happens; the next step is exact on every rank."""
    out = {}
    for stage in (1, 2):
        for first in (True, False):  # in the first step (gradient source not known yet) and later
            params = make_params(SHAPES, torch.float64)
            opt = ShardedNovoGrad(params, lr=0.01, zero_stage=stage)

            def backward():
                sum((p * (1 + rank)).square().sum() for p in params).backward()
            if not first:
                backward()
                opt.step()
                opt.zero_grad()
            backward()
            res = _refused(params, opt, opt.step if rank == 0 else opt.zero_grad)
            opt.zero_grad()
            backward()
            res["all_dropped"] = _refused(params, opt, opt.zero_grad)
            backward()
            opt.step()
            res["then_steps"] = True
            out[(stage, first)] = res
    return out


def unused_last_layer(rank, world):
    """ZeRO-2 with small buckets and a large last layer (in flat order) that backward never
    reaches: its buckets used to hold back every other bucket until backward ended, so the
    whole model's gradients were buffered at once."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(16, 16).double() for _ in range(4)])
    unused = torch.nn.Parameter(torch.randn(1024, dtype=torch.float64))
    ref_net = torch.nn.Sequential(*[torch.nn.Linear(16, 16).double() for _ in range(4)])
    ref_net.load_state_dict(net.state_dict())
    ref_unused = torch.nn.Parameter(unused.detach().clone())
    opt = ShardedNovoGrad(list(net.parameters()) + [unused], lr=0.01, bucket_size=64)
    ref = NovoGrad(list(ref_net.parameters()) + [ref_unused], lr=0.01)
    peaks, sent = [], []
    for step in range(4):
        x = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(10 * step + rank))
        net(x).square().mean().backward()
        peaks.append(opt._buckets.peak_elements)
        sent.append(opt._buckets.pos)
        opt.step()
        opt.zero_grad()
        for r in range(world):
            xr = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(10 * step + r))
            (ref_net(xr).square().mean() / world).backward()
        ref.step()
        ref.zero_grad()
    err = max(close_ratio(p, q, 1e-10, 1e-12) for p, q in zip(list(net.parameters()) + [unused],
                                                             list(ref_net.parameters()) + [ref_unused]))
    return {"peaks": peaks, "sent": sent, "buckets": len(opt._buckets.ranges),
            "used_elements": sum(p.numel() for p in net.parameters()), "err": err,
            "unused_unchanged": torch.equal(unused, ref_unused)}


def bf16_reduce(rank, world):
    """bf16 parameters with reduce_dtype=torch.bfloat16: gradients travel in bf16 (half the
    bytes), and the result equals the reference fed the bf16-rounded sum divided by N."""
    out = {}
    for stage in (1, 2):
        params = make_params(SHAPES, torch.bfloat16)
        ref = [torch.nn.Parameter(p.detach().float()) for p in params]
        opt = ShardedNovoGrad(params, lr=0.01, zero_stage=stage, reduce_dtype=torch.bfloat16)
        refopt = NovoGrad(ref, lr=0.01)
        for step in range(3):
            grads = [[torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + 10 * i + r))
                      .to(torch.bfloat16) for i, p in enumerate(params)] for r in range(world)]
            for p, g in zip(params, grads[rank]):
                p.grad = g.clone()
            opt.step()
            for i, q in enumerate(ref):
                total = grads[0][i]
                for r in range(1, world):  # summed in bf16, rounded after each addition
                    total = (total.float() + grads[r][i].float()).to(torch.bfloat16)
                q.grad = total.float() / world
            refopt.step()
        wire = opt._buckets.dtype if stage == 2 else opt._grad_flat.dtype
        out[stage] = {"err": max(close_ratio(p.float(), q, 2.0 ** -8, 1e-6) for p, q in zip(params, ref)),
                      "wire": str(wire)}
    return out


def consolidated_to_one_rank(rank, world):
    """consolidated_state_dict(to_rank=0): the same dict on rank 0, nothing elsewhere; the
    whole state is held once (views of one buffer), not once plus a copy per layer."""
    params = make_params(SHAPES, torch.float64)
    opt = ShardedNovoGrad(params, lr=0.01)
    for _ in range(2):
        _stepper(params, opt, rank)()
    every = opt.consolidated_state_dict()
    one = opt.consolidated_state_dict(to_rank=0)
    storages = {t["exp_avg"].untyped_storage().data_ptr() for t in every["state"].values()}
    out = {"none": one is None, "storages": len(storages)}
    if one is not None:
        out["same"] = all(torch.equal(one["state"][k][key], v) for k, st in every["state"].items()
                          for key, v in st.items())
        out["bytes"] = one["state"][0]["exp_avg"].untyped_storage().nbytes()
        out["padded"] = opt.layout.padded_total * 8
    return out


def all_scenarios(rank, world):
    torch.manual_seed(0)
    return {"overflow": overflow_after_reduce(rank, world), "clip": clip_total_overflow(rank, world),
            "differ": settings_differ(rank, world), "invalid": invalid_on_one_rank(rank, world),
            "unfrozen": unfrozen_later(rank, world), "inf_norm": inf_norm_large(rank, world),
            "state": bad_state_dict(rank, world), "zero_grad": zero_grad_instead_of_step(rank, world),
            "unused": unused_last_layer(rank, world), "bf16_reduce": bf16_reduce(rank, world),
            "consolidated": consolidated_to_one_rank(rank, world)}


def results(world):
    return shared_world(all_scenarios, world, timeout=240.0, collective_timeout=30.0)


@pytest.mark.parametrize("world", [1, 2])
def test_overflow_after_the_reduce_skips_everywhere(world):
    """Check that a layer whose partial sums are finite on every rank but whose reduced sum
    overflows is skipped on every rank, as the same gradient is at world size 1, with and
    without clipping: nothing changes, nothing becomes NaN."""
    for r in results(world):
        for clip, o in r["overflow"].items():
            assert o == {"skipped": 1, "unchanged": True, "finite": True}, (clip, o)


@pytest.mark.parametrize("world", [1, 2])
def test_clipping_an_overflowing_total_norm(world):
    """Check that clipping a gradient whose total norm overflows fp32 (every layer's sum
    finite) scales it by a finite, non-zero factor and equals the reference fed the clipped
    gradient; grad_norm reports the finite total."""
    for r in results(world):
        c = r["clip"]
        assert c["skipped"] == 0 and c["moved"] > 0 and c["err"] <= 1.0, c
        assert math.isfinite(c["grad_norm"]) and abs(c["grad_norm"] / c["expected_norm"] - 1) < 1e-6, c


@pytest.mark.parametrize("name", [n for n, _ in DIFFERING])
@pytest.mark.parametrize("stage", [1, 2])
def test_settings_that_differ_across_ranks_raise_everywhere(name, stage):
    """Check that a hyperparameter changed on one rank only makes every rank raise at the
    next step, naming the cause, with nothing changed."""
    for r in results(2):
        o = r["differ"][(name, stage)]
        assert o["error"] and "differ across ranks" in o["error"] and o["unchanged"], o


@pytest.mark.parametrize("name", ["max_grad_norm", "bucket_size"])
def test_construction_settings_that_differ_raise(name):
    """Check that max_grad_norm and bucket_size that differ per rank are refused at
    construction on every rank, naming the setting (a bucket mismatch used to abort gloo)."""
    for r in results(2):
        assert r["differ"][name] and name in r["differ"][name], r["differ"][name]


@pytest.mark.parametrize("stage", [1, 2])
def test_invalid_hyperparameter_on_one_rank(stage):
    """Check that lr=-1 set on rank 0 only makes every rank raise (rank 0 naming it, rank 1
    pointing to it) with nothing changed and nothing in flight: the next good step runs."""
    res = results(2)
    for rank, r in enumerate(res):
        o = r["invalid"][stage]
        assert o["unchanged"] and o["then_steps"], o
        assert ("Invalid learning rate" in o["error"]) if rank == 0 else ("another rank" in o["error"]), o


@pytest.mark.parametrize("world", [1, 2])
def test_parameter_unfrozen_after_construction(world):
    """Check that a parameter frozen at construction and unfrozen later is not silently left
    untrained: every rank raises, naming it, with nothing changed."""
    for r in results(world):
        o = r["unfrozen"]
        assert o["error"] and "requires_grad=False when" in o["error"] and o["unchanged"], o


@pytest.mark.parametrize("world", [1, 2])
def test_inf_norm_with_a_large_finite_gradient(world):
    """Check that norm_type=inf takes the step for finite gradients whose squares overflow,
    and still skips a NaN or an inf on one rank on every rank."""
    for r in results(world):
        o = r["inf_norm"]
        assert o["skipped"] == 0 and o["err"] <= 1.0, o
        assert o["nan"] and o["inf"] and o["skipped_after"] == 2, o


@pytest.mark.parametrize("world", [1, 2])
def test_load_state_dict_checks_sizes_first(world):
    """Check that a state dict with a wrong-sized (or 1-element) exp_avg is refused before
    anything is written, instead of being half copied or broadcast into every element."""
    for r in results(world):
        for name, o in r["state"].items():
            assert o["error"] and "exp_avg" in o["error"] and o["unchanged"], (name, o)


def _duplicate(rank, world):
    p = torch.nn.Parameter(torch.ones(3))
    try:
        ShardedNovoGrad([p, torch.nn.Parameter(torch.ones(2)), p])
    except ValueError as e:
        return str(e)
    return None


def test_duplicate_parameters_are_refused():
    """Check that the same Parameter twice in params is an error at construction (it was
    silently never updated under ZeRO-2, and wrong under ZeRO-1)."""
    msg = shared_world(_duplicate, 1)[0]
    assert msg and "appears more than once" in msg, msg


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("first", [True, False])
def test_zero_grad_on_some_ranks_instead_of_step(stage, first):
    """Check that when some ranks call zero_grad() after backward and the others step(),
    every rank raises an exception naming it, with nothing changed, and that every rank
    dropping the gradients together is allowed."""
    for r in results(2):
        o = r["zero_grad"][(stage, first)]
        assert o["error"] and "zero_grad() after backward without step()" in o["error"] and o["unchanged"], o
        assert o["all_dropped"] == {"error": None, "unchanged": True} and o["then_steps"], o


@pytest.mark.parametrize("world", [1, 2])
def test_unused_last_layer_holds_back_no_bucket(world):
    """Check that from the second step (ordered by the first step's arrivals, agreed in the
    step's collective) an unused last layer no longer makes ZeRO-2 buffer every gradient:
    at most a few 64-element buckets are buffered at once, and the result is exact."""
    for r in results(world):
        u = r["unused"]
        assert u["err"] <= 1.0 and u["unused_unchanged"], u
        assert all(p <= 4 * 64 for p in u["peaks"][1:]), u
        assert u["used_elements"] > 4 * 4 * 64 // world, u  # the old order buffered all of them


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stage", [1, 2])
def test_reduce_dtype_bf16(world, stage):
    """Check that reduce_dtype=torch.bfloat16 sends bf16 gradients and equals the reference
    fed the bf16 sum over ranks divided by N (parameters within one bf16 ulp: they are the
    fp32 master weights rounded)."""
    for r in results(world):
        o = r["bf16_reduce"][stage]
        assert o["wire"] == "torch.bfloat16" and o["err"] <= 1.0, o


@pytest.mark.parametrize("world", [1, 2])
def test_consolidated_state_dict_to_one_rank(world):
    """Check that consolidated_state_dict(to_rank=0) gives rank 0 the same dict and the other
    ranks None, and that the whole state is one buffer of the padded size, not a copy per layer."""
    for rank, r in enumerate(results(world)):
        o = r["consolidated"]
        assert o["storages"] == 1, o
        if rank == 0:
            assert not o["none"] and o["same"] and o["bytes"] == o["padded"], o
        else:
            assert o["none"], o
