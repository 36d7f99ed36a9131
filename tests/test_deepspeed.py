"""NovoGrad inside DeepSpeed engines against the single-process NovoGrad, on gloo ranks.

Two routes build the engine: plain ``deepspeed.initialize(optimizer=NovoGrad(...))``, as
accelerate and HF Trainer call it (NovoGrad binds itself to DeepSpeed's fragment map at
its first step), and the convenience wrapper sharded_novograd.integrations.deepspeed.
initialize (config-defined NovoGrad, binding at initialize), also with
``deepspeed.initialize`` replaced by the wrapper.

DeepSpeed runs on its CPU accelerator over the gloo group that tests/distributed.py
already initialized (deepspeed.init_distributed adopts an initialized torch.distributed).
One forked world per world size runs every configuration: process start-up and
DeepSpeed's first initialize dominate on 2 cores. The parent imports DeepSpeed (and the
modules it imports lazily) once so that forked ranks share them, and every rank turns off
the JIT-compiled shared-memory op.

The model straddles partition boundaries: at 2 ranks the first param group (113
elements) is cut inside fc1.weight and the second (24 elements) inside norm.weight; at
3 ranks both fc1.weight and the norm's weight and bias are cut.

Two kinds of reference, both the single-process NovoGrad:

- fp32 runs: an independent replica of the model takes the gradient of the mean of every
  rank's (and micro-batch's) loss, clipped with torch's clip_grad_norm_ where the config
  clips. It differs from DeepSpeed's averaged gradient by summation order only (6e-8
  relative per operation); NovoGrad divides by the layer norm, which damps rather than
  amplifies such errors, and 2e-5 relative holds with room after 6 steps.
- bf16/fp16 runs: gradients are rounded in low precision before they reach the optimizer,
  so the reference is fed exactly what the optimizer was handed: each step's gradient
  partitions are recorded by a step pre-hook, gathered across ranks and cut into layers
  by shape alone (independent of DeepSpeed's fragment map). The fp32 master weights and
  the moments must then match at the fp32 tolerance above, and the model's bf16/fp16
  parameters, the master rounded to nearest, within one rounding (2**-8 relative for
  bf16, 2**-11 for fp16).
"""

from __future__ import annotations

import atexit
import math
import os
import sys
import shutil
import tempfile

import pytest
import torch
import torch.distributed as dist

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
deepspeed = pytest.importorskip("deepspeed")

from sharded_novograd import NovoGrad  # noqa: E402
from sharded_novograd.integrations import deepspeed as sn_deepspeed  # noqa: E402

from .cases import close_ratio  # noqa: E402
from .distributed import shared_world  # noqa: E402

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
STEPS = 6
RTOL, ATOL = 2e-5, 1e-6
ULP = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(13, 7)
        self.norm = torch.nn.LayerNorm(7)
        self.fc2 = torch.nn.Linear(7, 3)
        self.gain = torch.nn.Parameter(torch.full((1,), 1.5))  # 1 element, not 0-dim

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x)))) * self.gain


def build(seed=0):
    torch.manual_seed(seed)
    return Net()


def groups(net, norms=None):
    """Weights (decayed) and biases/norms in two groups with their own learning rates
    (and, with ``norms``, their own norm_type)."""
    decay = [net.fc1.weight, net.fc2.weight, net.gain]
    rest = [net.fc1.bias, net.norm.weight, net.norm.bias, net.fc2.bias]
    out = [{"params": decay, "lr": 0.02, "weight_decay": 0.01}, {"params": rest, "lr": 0.01, "weight_decay": 0.0}]
    for g, n in zip(out, norms or ()):
        g["norm_type"] = n
    return out


def is_bound(opt):
    """Whether NovoGrad steps DeepSpeed's partitions through their fragment map."""
    return opt.__dict__.get("_deepspeed_binding") is not None


def batch(rank, step, micro):
    g = torch.Generator().manual_seed(10007 * step + 101 * micro + rank)
    return torch.randn(4, 13, generator=g), torch.randn(4, 3, generator=g)


def loss_fn(out, y):
    return ((out.float() - y) ** 2).mean()


def base_config(stage, gas=1, clip=0.0, **extra):
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": gas, "gradient_clipping": clip,
           "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
    cfg.update(extra)
    return cfg


def json_config(name, **overrides):
    """A shipped config, as a path when unchanged (the JSON route) or a dict with overrides."""
    path = os.path.join(CONFIG_DIR, name)
    if not overrides:
        return path
    import json
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(overrides)
    return cfg


def plain_config(stage, **kw):
    """A config for plain deepspeed.initialize with a client optimizer (DeepSpeed asks for the flag)."""
    return base_config(stage, zero_allow_untested_optimizer=True, **kw)


# name: (how the optimizer is given, config, NovoGrad kwargs for the object/callable routes, options)
# Routes: "plain" is deepspeed.initialize(optimizer=NovoGrad(...)); "patched" the same call
# with deepspeed.initialize replaced by the wrapper; the others go through the wrapper.
# Options: "capture": feed the reference the recorded gradients (low precision);
# "ref_clip": max norm the independent reference clips to; "steps": iterations (default STEPS);
# "norms": per-group norm_type.
# The fp16 run starts at loss scale 2**17, which overflows until DeepSpeed has halved it
# twice: those iterations are skipped and must not touch NovoGrad's state.
HP = dict(lr=0.02, weight_decay=0.01)
APEX = dict(lr=0.02, weight_decay=0.05, reg_inside_moment=False, bias_correction=True, grad_averaging=True)
CASES = {
    "zero0_fp32_json": ("config", json_config("ds_zero0.json"), None, {"ref_clip": 1.0}),
    "zero1_fp32_json_gas": ("config", json_config("ds_zero1.json"), None, {"ref_clip": 1.0}),
    "zero2_fp32_json_args": ("args", json_config("ds_zero2.json"), None, {"ref_clip": 1.0}),
    "zero1_fp32_clip_callable": ("callable", base_config(1, gas=2, clip=0.05), HP, {"ref_clip": 0.05}),
    "patched_zero2_fp32_apex_linf": ("patched", base_config(2), dict(APEX, norm_type=math.inf), {}),
    "plain_zero1_fp32_gas_clip": ("plain", plain_config(1, gas=2, clip=0.05), HP, {"ref_clip": 0.05}),
    "plain_zero2_fp32": ("plain", plain_config(2), HP, {}),
    "plain_zero2_fp32_amsgrad_offload": ("plain", plain_config(2, zero_force_ds_cpu_optimizer=False, zero_optimization={
        "stage": 2, "offload_optimizer": {"device": "cpu"}}), dict(HP, amsgrad=True, init_zero=True), {}),
    "zero2_bf16_json": ("config", json_config("ds_zero2_bf16.json"), None, {"capture": True}),
    "plain_zero2_bf16_apex_mixed_norms": ("plain", plain_config(2, bf16={"enabled": True}), APEX,
                                          {"capture": True, "norms": (math.inf, 2)}),
    "plain_zero1_bf16_fp32_accum_mixed_norms": ("plain", plain_config(1, clip=0.1, bf16={"enabled": True},
                                                                      data_types={"grad_accum_dtype": "fp32"}),
                                                HP, {"capture": True, "norms": (2, math.inf)}),
    "zero0_bf16": ("object", base_config(0, bf16={"enabled": True}), HP, {"capture": True}),
    "plain_zero0_bf16": ("plain", plain_config(0, bf16={"enabled": True}), HP, {"capture": True}),
    "plain_zero2_fp16_loss_scale": ("plain", plain_config(2, clip=0.5, fp16={
        "enabled": True, "initial_scale_power": 17, "hysteresis": 1, "loss_scale_window": 1000}), HP,
        {"capture": True, "steps": STEPS + 2}),
}
WORLD_CASES = {2: list(CASES), 3: [c for c in CASES if "offload" not in c and "zero0" not in c]}


def setup_rank(rank, world):
    """What a launcher would have done, plus the test-only switches."""
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no g++ build in the suite
    import logging
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    if acc.device_name() == "cpu" and not acc.is_fp16_supported():
        # DeepSpeed's CPU accelerator refuses fp16 unless oneDNN has native fp16; torch's
        # CPU kernels still compute it, which is all the fp16 path needs here.
        acc.is_fp16_supported = lambda: True


def make_engine(how, config, hp, model, model_parameters=None, norms=None):
    params = model_parameters if model_parameters is not None else groups(model, norms)
    if how == "plain":
        return deepspeed.initialize(model=model, optimizer=NovoGrad(params, **hp), config=config)[:2]
    if how == "patched":  # the obvious monkeypatch must not recurse
        genuine = deepspeed.initialize
        deepspeed.initialize = sn_deepspeed.initialize
        try:
            return deepspeed.initialize(model=model, optimizer=NovoGrad(params, **hp), config=config)[:2]
        finally:
            deepspeed.initialize = genuine
    if how == "config":
        return sn_deepspeed.initialize(model=model, model_parameters=params, config=config)[:2]
    if how == "args":  # the config path in a launcher's argparse namespace
        import argparse
        args = argparse.Namespace(deepspeed_config=config, local_rank=int(os.environ["LOCAL_RANK"]))
        return sn_deepspeed.initialize(args, model, model_parameters=params)[:2]
    if how == "callable":
        return sn_deepspeed.initialize(model=model, model_parameters=params, config=config,
                                       optimizer=lambda ps: NovoGrad(ps, **hp))[:2]
    return sn_deepspeed.initialize(model=model, optimizer=NovoGrad(params, **hp), config=config)[:2]


def trainable_layout(engine):
    """Per param group: (model params in DeepSpeed's order, flat fp32 partition or None)."""
    w = engine.optimizer
    if hasattr(w, "single_partition_of_fp32_groups"):
        return list(zip(w.bit16_groups, w.single_partition_of_fp32_groups))
    if hasattr(w, "fp32_groups_flat_partition"):
        return list(zip(w.bf16_groups, w.fp32_groups_flat_partition))
    if hasattr(w, "fp16_groups"):
        return [(list(a), list(b)) for a, b in zip(w.fp16_groups, w.fp32_groups)]
    return [(list(g["params"]), None) for g in w.param_groups]


def gather_flat(part, layers):
    """Every rank's 1-D partition concatenated, cut into the layers' shapes (in order)."""
    world = dist.get_world_size()
    full = torch.empty(world * part.numel(), dtype=part.dtype)
    dist.all_gather_into_tensor(full, part.detach().contiguous())
    out, off = [], 0
    for p in layers:
        out.append(full[off:off + p.numel()].view(p.shape).clone())
        off += p.numel()
    return out


def masters(engine, opt):
    """fp32 master weights per model parameter (collective)."""
    out = {}
    for layers, flat in trainable_layout(engine):
        if isinstance(flat, torch.Tensor):
            vals = gather_flat(flat, layers)
        elif flat is None:
            vals = [p.detach().float() for p in layers]
        else:
            vals = [q.detach() for q in flat]
        out.update({id(p): v for p, v in zip(layers, vals)})
    return out


def states(engine, opt):
    """NovoGrad.state_dict-style state per model parameter (collective)."""
    out = {}
    for layers, flat in trainable_layout(engine):
        if isinstance(flat, torch.Tensor):
            st = opt.state[flat]
            exp_avg = gather_flat(st["exp_avg"], layers)
            for i, p in enumerate(layers):
                out[id(p)] = {"exp_avg": exp_avg[i], "exp_avg_sq": st["exp_avg_sq"][i], "step": st["step"][i]}
                if "max_exp_avg_sq" in st:
                    out[id(p)]["max_exp_avg_sq"] = st["max_exp_avg_sq"][i]
        else:
            keys = layers if flat is None else flat
            for p, q in zip(layers, keys):
                out[id(p)] = dict(opt.state[q])
    return out


def state_ratio(got, ref_state):
    worst = 0.0
    for key, val in ref_state.items():
        worst = max(worst, close_ratio(torch.as_tensor(got[key]).float(), torch.as_tensor(val).float(), RTOL, ATOL))
    return worst


def run_case(rank, world, name):
    """Train one configuration for STEPS optimizer steps next to its reference; return error ratios."""
    how, config, hp, opts = CASES[name]
    net = build()
    engine, _ = make_engine(how, config, hp, net, norms=opts.get("norms"))
    opt = engine.basic_optimizer
    gas = engine.gradient_accumulation_steps()
    lowp = engine.module.fc1.weight.dtype
    out = {"state_after_init": len(opt.state), "wrapper": type(engine.optimizer).__name__,
           "optimizer": type(opt).__name__}

    ref_net = build()
    for p, q in zip(ref_net.parameters(), engine.module.parameters()):
        p.data.copy_(q.detach().float())  # the (possibly rounded) weights DeepSpeed starts from
    if hp is None:  # a shipped JSON config defines the optimizer
        import json
        with open(config) as f:
            ref_hp = json.load(f)["optimizer"]["params"]
        ref_groups = [{"params": g["params"], **{k: v for k, v in g.items() if k in ("lr", "weight_decay")}}
                      for g in groups(ref_net)]
        ref = NovoGrad(ref_groups, **ref_hp)
    else:
        ref = NovoGrad(groups(ref_net, opts.get("norms")), **hp)
    ref_of = {id(p): q for p, q in zip(engine.module.parameters(), ref_net.parameters())}

    records = []
    if opts.get("capture"):
        def record(optimizer, args, kwargs):
            for g in optimizer.param_groups:
                records.append([(p, p.grad.detach().clone()) for p in g["params"]])
        opt.register_step_pre_hook(record)
    layout = trainable_layout(engine)
    skipped = 0
    for step in range(opts.get("steps", STEPS)):
        records.clear()
        for micro in range(gas):
            x, y = batch(rank, step, micro)
            engine.backward(loss_fn(engine(x.to(lowp)), y))
            engine.step()
        overflow = bool(getattr(engine.optimizer, "overflow", False))
        skipped += overflow
        if opts.get("capture"):
            if overflow:
                assert not records, "an overflow step reached the optimizer"
                continue
            grads = {}
            for rec in records:
                for layers, flat in layout:
                    if isinstance(flat, torch.Tensor) and rec[0][0] is flat:
                        grads.update({id(p): g for p, g in zip(layers, gather_flat(rec[0][1], layers))})
                    elif isinstance(flat, list) and rec[0][0] is flat[0]:
                        grads.update({id(p): g for p, (_, g) in zip(layers, rec)})
            for p in engine.module.parameters():
                ref_of[id(p)].grad = grads[id(p)].float()
        else:
            ref.zero_grad()
            for r in range(world):
                for micro in range(gas):
                    x, y = batch(r, step, micro)
                    (loss_fn(ref_net(x), y) / (world * gas)).backward()
            if opts.get("ref_clip"):
                torch.nn.utils.clip_grad_norm_(list(ref_net.parameters()), opts["ref_clip"])
        ref.step()
    out["skipped"] = skipped
    out["engine_skipped"] = engine.skipped_steps
    out["bound"] = is_bound(opt)
    master = masters(engine, opt)
    st = states(engine, opt)
    ulp = ULP.get(lowp, 0.0)
    out["master_err"] = max(close_ratio(master[id(p)], ref_of[id(p)], RTOL, ATOL) for p in engine.module.parameters())
    out["param_err"] = max(close_ratio(p.float(), ref_of[id(p)], RTOL + ulp, ATOL)
                           for p in engine.module.parameters())
    out["state_err"] = max(state_ratio(st[id(p)], ref.state[ref_of[id(p)]]) for p in engine.module.parameters())
    out["raw_master_max_abs"] = max(float((master[id(p)] - ref_of[id(p)]).abs().max())
                                    for p in engine.module.parameters())
    out["steps_taken"] = int(float(ref.state[ref_of[id(engine.module.fc1.weight)]]["step"]))
    if "fp32_json" in name:
        out["lr_from_json"] = [g["lr"] for g in opt.param_groups]
    return out


def checkpoint_roundtrip(rank, world, ckpt_dir, name, how, config, hp):
    """Save after 3 steps, then 3 more steps from the live engine and from a reloaded one."""
    def train(engine, steps):
        for step in steps:
            for micro in range(engine.gradient_accumulation_steps()):
                x, y = batch(rank, step, micro)
                engine.backward(loss_fn(engine(x.to(engine.module.fc1.weight.dtype)), y))
                engine.step()

    def snapshot(engine):
        opt = engine.basic_optimizer
        params = [p.detach().clone() for p in engine.module.parameters()]
        master = masters(engine, opt)
        st = states(engine, opt)
        return params, [master[id(p)] for p in engine.module.parameters()], [st[id(p)] for p in
                                                                             engine.module.parameters()]

    eng_a, _ = make_engine(how, config, hp, build(0))
    train(eng_a, range(3))
    eng_a.save_checkpoint(ckpt_dir, tag=name)
    train(eng_a, range(3, 6))
    a = snapshot(eng_a)
    eng_b, _ = make_engine(how, config, hp, build(7))
    eng_b.load_checkpoint(ckpt_dir, tag=name)
    train(eng_b, range(3, 6))
    b = snapshot(eng_b)
    out = {"params_equal": all(torch.equal(p, q) for p, q in zip(a[0], b[0])),
           "master_equal": all(torch.equal(p, q) for p, q in zip(a[1], b[1])),
           "state_equal": all(set(s) == set(t) and all(torch.equal(torch.as_tensor(s[k]), torch.as_tensor(t[k]))
                                                       for k in s) for s, t in zip(a[2], b[2])),
           "bound": is_bound(eng_b.basic_optimizer)}
    if out["bound"]:
        # A state saved under another partitioning: DeepSpeedNovoGrad refuses it at load;
        # a plain NovoGrad's next step refuses it on every rank, before changing anything.
        opt = eng_b.basic_optimizer
        sd = opt.state_dict()
        sd["state"][0] = dict(sd["state"][0], layout="saved elsewhere")
        before = [t.detach().clone() for _, t in trainable_layout(eng_b)]
        try:
            opt.load_state_dict(sd)
            train(eng_b, range(6, 7))
            out["mismatch"] = None
        except (ValueError, RuntimeError) as e:
            out["mismatch"] = str(e)
        out["unchanged_after_refusal"] = all(torch.equal(t, u) for (_, t), u in zip(trainable_layout(eng_b), before))
    return out


def first_step_error(config, step=None):
    """Build a plain engine with NovoGrad and take one step; the error message, or None."""
    try:
        net = build()
        engine = deepspeed.initialize(model=net, optimizer=NovoGrad(groups(net), **HP), config=config)[0]
        x, y = batch(0, 0, 0)
        engine.backward(loss_fn(engine(x), y))
        (step or engine.step)(engine)
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def engine_side_refusals(rank, world):
    """Checks that need a live engine: settings refused at the plain route's first step, the
    wrapper's engine-side round-robin check and bad optimizers."""
    out = {}
    cfg = plain_config(2)
    cfg["zero_optimization"]["round_robin_gradients"] = True
    out["plain_round_robin"] = first_step_error(cfg)
    # The safety net behind the flag: the fragment map is checked against where each
    # layer really lies in DeepSpeed's flat buffer, which round-robin permutes.
    flags = sn_deepspeed._refuse_zero_flags
    sn_deepspeed._refuse_zero_flags = lambda *args: None
    try:
        out["plain_permuted_layout"] = first_step_error(cfg)
    finally:
        sn_deepspeed._refuse_zero_flags = flags
    out["plain_elastic"] = first_step_error(plain_config(1, zero_optimization={"stage": 1,
                                                                               "elastic_checkpoint": True}))
    out["plain_zero3"] = first_step_error(plain_config(3))
    # NovoGrad stepped on a flat partition by hand, not by DeepSpeed's optimizer.
    out["plain_by_hand"] = first_step_error(plain_config(2), step=lambda e: e.basic_optimizer.step())
    net = build()
    opt = sn_deepspeed.DeepSpeedNovoGrad(groups(net), **HP)
    cfg = base_config(2, zero_allow_untested_optimizer=True)
    cfg["zero_optimization"]["round_robin_gradients"] = True
    engine = deepspeed.initialize(model=net, optimizer=opt, config=cfg)[0]
    try:
        sn_deepspeed._bind_engine(engine, opt)
    except ValueError as e:
        out["round_robin"] = str(e)
    try:
        sn_deepspeed.initialize(model=build(), config=base_config(1),
                                optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    except TypeError as e:
        out["callable_sgd"] = str(e)
    from sharded_novograd import ShardedNovoGrad
    net = build()
    try:
        sn_deepspeed.initialize(model=net, config=base_config(1), optimizer=ShardedNovoGrad(net.parameters()))
    except TypeError as e:
        out["sharded"] = str(e)
    return out


def run_all(rank, world, ckpt_dir):
    setup_rank(rank, world)
    out = {name: run_case(rank, world, name) for name in WORLD_CASES[world]}
    if world == 2:
        out["ckpt_zero2"] = checkpoint_roundtrip(rank, world, ckpt_dir, "zero2", "object", base_config(2),
                                                 dict(HP, amsgrad=True))
        out["ckpt_plain_zero1"] = checkpoint_roundtrip(rank, world, ckpt_dir, "plain1", "plain", plain_config(1),
                                                       dict(HP, amsgrad=True))
        out["ckpt_bf16_optimizer"] = checkpoint_roundtrip(
            rank, world, ckpt_dir, "bf16opt", "object",
            base_config(1, bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"}), HP)
        out["ckpt_zero0_bf16"] = checkpoint_roundtrip(rank, world, ckpt_dir, "zero0", "object",
                                                      base_config(0, bf16={"enabled": True}), HP)
        out["refusals"] = engine_side_refusals(rank, world)
    return out


def _preload():
    # DeepSpeed imports these on its first initialize (several seconds, mostly
    # torch.compile machinery): import them once in the parent, before forking.
    import deepspeed.runtime.bf16_optimizer  # noqa: F401
    import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401
    try:
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    except ImportError:
        pass


_CKPT_DIRS = {}


def world_results(world):
    _preload()
    if world not in _CKPT_DIRS:
        _CKPT_DIRS[world] = tempfile.mkdtemp(prefix=f"sn_ds_world{world}_")
        atexit.register(shutil.rmtree, _CKPT_DIRS[world], ignore_errors=True)
    return shared_world(run_all, world, _CKPT_DIRS[world], timeout=240)


@pytest.mark.parametrize("world,case", [(w, c) for w, cs in WORLD_CASES.items() for c in cs])
def test_matches_reference(world, case):
    """Check that weights and NovoGrad state equal the single-process reference after 6 steps."""
    how, config, hp, opts = CASES[case]
    for rank, res in enumerate(world_results(world)):
        r = res[case]
        assert r["master_err"] <= 1.0, (rank, r)
        assert r["param_err"] <= 1.0, (rank, r)
        assert r["state_err"] <= 1.0, (rank, r)
        stage = (config["zero_optimization"]["stage"] if isinstance(config, dict)
                 else int(case.split("_")[0][-1]))
        assert r["bound"] == (stage > 0), (rank, r)
        if how == "plain":
            assert r["optimizer"] == "NovoGrad", r  # no wrapper involved
        assert r["skipped"] == r["engine_skipped"], (rank, r)
        assert r["steps_taken"] == opts.get("steps", STEPS) - r["skipped"] >= 5, (rank, r)
        if "loss_scale" in case:
            assert r["skipped"] >= 1, (rank, r)  # overflow steps must not have touched NovoGrad's state
        else:
            assert r["skipped"] == 0, (rank, r)
        if "fp32_json" in case:
            assert r["lr_from_json"] == [0.02, 0.01], r  # the groups' own lr overrides the config's


def test_wrappers_cover_deepspeed_paths():
    """Check that the configurations reach every DeepSpeed optimizer wrapper the binding handles."""
    wrappers = {res["wrapper"] for res in world_results(2)[0].values() if isinstance(res, dict) and "wrapper" in res}
    assert wrappers == {"DeepSpeedNovoGrad", "FP16_UnfusedOptimizer", "DeepSpeedZeroOptimizer", "BF16_Optimizer"}


def test_stage0_bf16_construction_step_leaves_no_state():
    """Check that DeepSpeed's stage-0 bf16 wrapper, which steps once with zero gradients at
    construction, does not start NovoGrad's moments (the reference never saw that step)."""
    for res in world_results(2):
        for case in ("zero0_bf16", "plain_zero0_bf16"):  # through the wrapper, and plain deepspeed.initialize
            assert res[case]["state_after_init"] == 0, case
            assert res[case]["steps_taken"] == STEPS, case


PLAIN_REFUSALS = {
    "plain_round_robin": "ValueError: sharded_novograd.integrations.deepspeed refuses \"round_robin_gradients\": true",
    "plain_elastic": "ValueError: sharded_novograd.integrations.deepspeed refuses \"elastic_checkpoint\": true",
    "plain_zero3": "ValueError: sharded_novograd.integrations.deepspeed refuses \"zero_optimization\": {\"stage\": 3}",
    "plain_permuted_layout": "RuntimeError: NovoGrad cannot bind to ZeRO stage 2's partitions: rank 0: DeepSpeed's "
                             "fragment map puts layer",
    "plain_by_hand": "RuntimeError: NovoGrad is being stepped on DeepSpeed's flattened ZeRO partition",
}


@pytest.mark.parametrize("name", list(PLAIN_REFUSALS))
def test_plain_initialize_refusals(name):
    """Check that plain deepspeed.initialize with NovoGrad raises on every rank, naming the
    setting, where the binding cannot be exact: round_robin_gradients, elastic_checkpoint,
    ZeRO-3 (at the first step), a flat partition stepped
    by hand rather than by DeepSpeed's optimizer, and, without the round-robin flag check,
    a fragment map that disagrees with the flat buffer (every rank names every rank's
    first problem)."""
    for rank, res in enumerate(world_results(2)):
        msg = res["refusals"][name]
        assert msg is not None and msg.startswith(PLAIN_REFUSALS[name]), (rank, msg)


@pytest.mark.parametrize("name", ["ckpt_zero2", "ckpt_plain_zero1", "ckpt_bf16_optimizer", "ckpt_zero0_bf16"])
def test_checkpoint_roundtrip(name):
    """Check that engine.save_checkpoint/load_checkpoint resume NovoGrad bit for bit at the
    same world size, and that a bound state saved under another partitioning is refused
    (plain NovoGrad: at its next step, on every rank, with the partitions unchanged)."""
    for res in world_results(2):
        r = res[name]
        assert r["params_equal"] and r["master_equal"] and r["state_equal"], r
        assert r["bound"] == ("zero0" not in name), r
        if r["bound"]:
            assert r["mismatch"] is not None and "partitioning" in r["mismatch"], r
            assert r["unchanged_after_refusal"], r


def test_engine_side_refusals():
    """Check the engine-side round_robin_gradients check, a callable returning another
    optimizer, and ShardedNovoGrad handed to DeepSpeed."""
    r = world_results(2)[0]["refusals"]
    assert "round_robin_gradients" in r.get("round_robin", ""), r
    assert "SGD" in r.get("callable_sgd", ""), r
    assert "ShardedNovoGrad partitions the model itself" in r.get("sharded", ""), r


REFUSED = [
    ({"zero_optimization": {"stage": 3}}, ValueError, "stage\": 3"),
    ({"zero_optimization": {"stage": 2, "round_robin_gradients": True}}, ValueError, "round_robin_gradients"),
    ({"zero_optimization": {"stage": 1, "elastic_checkpoint": True}}, ValueError, "elastic_checkpoint"),
    ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "novograd", "params": {"lr": 0.1, "foo": 1}}},
     ValueError, "'foo'"),
]


@pytest.mark.parametrize("config,error,match", REFUSED)
def test_config_refusals(config, error, match):
    """Check that settings the binding cannot make exact raise before DeepSpeed builds anything."""
    net = build()
    kwargs = {} if "optimizer" in config else {"optimizer": NovoGrad(net.parameters())}
    with pytest.raises(error, match=match):
        sn_deepspeed.initialize(model=net, config=dict(config, train_micro_batch_size_per_gpu=1), **kwargs)


def test_config_and_object_conflict():
    """Check that an optimizer section naming NovoGrad plus optimizer= is an error, not a silent choice."""
    net = build()
    with pytest.raises(ValueError, match="give one of them"):
        sn_deepspeed.initialize(model=net, optimizer=NovoGrad(net.parameters()),
                                config={"optimizer": {"type": "NovoGrad"}, "train_micro_batch_size_per_gpu": 1})


def test_used_novograd_is_refused():
    """Check that a NovoGrad that already holds state is not silently restarted."""
    net = build()
    opt = NovoGrad(net.parameters())
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    with pytest.raises(ValueError, match="already taken steps"):
        sn_deepspeed.initialize(model=net, optimizer=opt, config={"train_micro_batch_size_per_gpu": 1})


def test_missing_deepspeed_says_how_to_install(monkeypatch):
    """Check that without DeepSpeed the error names the install command."""
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    with pytest.raises(ImportError, match=r"pip install 'sharded-novograd\[deepspeed\]'"):
        sn_deepspeed.initialize(model=build(), config={})


def test_unbound_deepspeed_novograd_is_novograd():
    """Check that DeepSpeedNovoGrad outside a ZeRO-1/2 engine steps exactly like NovoGrad
    and runs step hooks once per step."""
    a, b = build(), build()
    opt_a = NovoGrad(groups(a), **HP)
    opt_b = sn_deepspeed.DeepSpeedNovoGrad(groups(b), **HP)
    calls = []
    opt_b.register_step_pre_hook(lambda *args: calls.append(1))
    for step in range(3):
        for net in (a, b):
            x, y = batch(0, step, 0)
            net.zero_grad()
            loss_fn(net(x), y).backward()
        opt_a.step()
        opt_b.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert len(calls) == 3 and not opt_b.is_bound
