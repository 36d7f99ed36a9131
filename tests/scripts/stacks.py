"""ShardedNovoGrad inside the training stacks users run, one torchrun world, many scenarios.

Started by tests/test_stacks.py as ``torchrun --standalone --nproc_per_node=2
tests/scripts/stacks.py OUT_DIR [SCENARIO ...]``. Each scenario trains a tiny model
built from a config (no download) twice inside the same framework: once with
ShardedNovoGrad and once with the single-process NovoGrad. Every framework here wraps
the model in DDP at world size 2, so the reference NovoGrad is fed exactly the
rank-averaged gradients, clipped where the framework clips: it is the single-process
reference for that run. Each rank writes ``OUT_DIR/<scenario>.rank<r>.json`` with the
measured facts (or the error), which the tests read.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from sharded_novograd import NovoGrad, ShardedNovoGrad  # noqa: E402
from sharded_novograd import collectives as C  # noqa: E402

warnings.filterwarnings("ignore")
STEPS = 4
LR = 1e-2
RANK = int(os.environ.get("RANK", "0"))
WORLD = int(os.environ.get("WORLD_SIZE", "1"))


# ---------------------------------------------------------------------------- helpers
class Count:
    """Counts the optimizer's collectives by kind (every one goes through collectives.py)."""

    KINDS = {"reduce_gradients": "gradient", "start_bucket_reduce": "gradient", "all_reduce_stats": "stats",
             "all_gather_stats": "stats", "start_gather_shards": "gather"}

    def __init__(self):
        self.calls = {"gradient": 0, "stats": 0, "gather": 0}

    @contextlib.contextmanager
    def watch(self):
        saved = {name: getattr(C, name) for name in self.KINDS}

        def wrap(name, fn):
            def counted(*a, **k):
                self.calls[self.KINDS[name]] += 1
                return fn(*a, **k)
            return counted
        for name, fn in saved.items():
            setattr(C, name, wrap(name, fn))
        try:
            yield self
        finally:
            for name, fn in saved.items():
                setattr(C, name, fn)


def gpt2(dtype=torch.float64):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).to(dtype)


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 8 * WORLD * STEPS // 2

    def __getitem__(self, i):
        ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def snapshot(model):
    return {n: p.detach().to(torch.float64).clone() for n, p in model.named_parameters()}


def facts(got, ref, init, model, opt=None, count=None, **extra):
    """What every stack test checks: distance from the reference, that training moved the
    weights, that ranks agree, that tied weights stay tied, and the optimizer's collectives."""
    err = max(((got[n] - ref[n]).abs().max() / ref[n].abs().max().clamp(min=1e-30)).item() for n in ref)
    moved = max((got[n] - init[n]).abs().max().item() for n in got)
    flat = torch.cat([t.reshape(-1) for t in got.values()])
    every = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(every, flat)
    out = {"err": err, "moved": moved, "ranks_agree": all(torch.equal(every[0], e) for e in every)}
    tr = getattr(model, "transformer", None)
    if tr is not None:
        out["tied"] = model.lm_head.weight.data_ptr() == tr.wte.weight.data_ptr()
    if count is not None:
        out["calls"] = count.calls
    if isinstance(opt, ShardedNovoGrad):
        out["state_bytes"] = opt.state_bytes()
        out["grads_averaged"] = opt.grads_averaged
    out.update(extra)
    return out


# ---------------------------------------------------------------------------- HF Trainer
def _trainer(make_opt, stage, max_grad_norm=1.0):
    from transformers import Trainer, TrainingArguments
    model = gpt2()
    init = snapshot(model)
    args = TrainingArguments(output_dir=os.path.join(OUT, "trainer"), use_cpu=True, ddp_backend="gloo",
                             report_to=[], save_strategy="no", per_device_train_batch_size=4, max_steps=STEPS,
                             logging_steps=1, learning_rate=LR, lr_scheduler_type="constant", seed=0,
                             max_grad_norm=max_grad_norm, disable_tqdm=True)
    opt = make_opt(model, stage)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    count = Count()
    with count.watch():
        Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, sched)).train()
    return model, init, opt, count


def sharded(model, stage, **kw):
    return ShardedNovoGrad(model.parameters(), lr=LR, zero_stage=stage, **kw)


def reference(model, stage=None, **kw):
    return NovoGrad(model.parameters(), lr=LR)


def trainer(stage):
    ref_model, _, _, _ = _trainer(reference, stage)
    model, init, opt, count = _trainer(sharded, stage)
    return facts(snapshot(model), snapshot(ref_model), init, model, opt, count)


# ---------------------------------------------------------------------------- Accelerate
def _accelerate(make_opt, stage):
    from accelerate import Accelerator
    acc = Accelerator(cpu=True)
    model = gpt2()
    init = snapshot(model)
    opt = make_opt(model, stage)
    dl = torch.utils.data.DataLoader(Tokens(), batch_size=4)
    model, opt, dl = acc.prepare(model, opt, dl)
    count = Count()
    with count.watch():
        for batch in dl:
            loss = model(**batch).loss
            acc.backward(loss)
            acc.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
    inner = acc.unwrap_model(model)
    return inner, init, opt, count


def accelerate(stage):
    ref_model, _, _, _ = _accelerate(reference, stage)
    model, init, opt, count = _accelerate(sharded, stage)
    inner = getattr(opt, "optimizer", opt)
    return facts(snapshot(model), snapshot(ref_model), init, model, inner, count)


# ---------------------------------------------------------------------------- Lightning
def _lightning(make_opt, stage, fabric: bool):
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = gpt2()

        def training_step(self, batch, i):
            return self.net(**batch).loss

        def configure_optimizers(self):
            return make_opt(self.net, stage)

    count = Count()
    if fabric:
        fab = L.Fabric(accelerator="cpu", devices=WORLD, strategy="ddp")
        fab.launch()
        net = gpt2()
        init = snapshot(net)
        opt = make_opt(net, stage)
        net, opt = fab.setup(net, opt)
        dl = fab.setup_dataloaders(torch.utils.data.DataLoader(Tokens(), batch_size=4))
        with count.watch():
            for batch in dl:
                fab.backward(net(**batch).loss)
                fab.clip_gradients(net, opt, max_norm=1.0)
                opt.step()
                opt.zero_grad()
        inner_opt = getattr(opt, "optimizer", opt)
        return net.module if hasattr(net, "module") else net, init, inner_opt, count
    module = Module()
    init = snapshot(module.net)
    trainer = L.Trainer(accelerator="cpu", devices=WORLD, strategy="ddp", max_steps=STEPS, gradient_clip_val=1.0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=True)
    with count.watch():
        trainer.fit(module, torch.utils.data.DataLoader(Tokens(), batch_size=4))
    return module.net, init, trainer.optimizers[0], count


def lightning(stage, fabric=False):
    ref_model, _, _, _ = _lightning(reference, stage, fabric)
    model, init, opt, count = _lightning(sharded, stage, fabric)
    return facts(snapshot(model), snapshot(ref_model), init, model, opt, count)


# ---------------------------------------------------------------------------- plain loops
def _batch(step, rank):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randint(0, 64, (4, 16), generator=g)


def plain_ddp(stage):
    """DDP in a hand-written loop, torch's clip_grad_norm_ on the averaged .grad."""
    out = {}
    for kind in ("ref", "sharded"):
        model = gpt2()
        init = snapshot(model)
        opt = reference(model) if kind == "ref" else sharded(model, stage)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        count = Count()
        with count.watch():
            for step in range(STEPS):
                ids = _batch(step, RANK)
                ddp(input_ids=ids, labels=ids).loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
        out[kind] = (snapshot(model), init, model, opt, count)
    got, init, model, opt, count = out["sharded"]
    return facts(got, out["ref"][0], init, model, opt, count)


def _own_loop(stage, prepare=None, scaler=None, dtype=torch.float64, steps=STEPS, repeat_first=False, **kw):
    """No DDP: the optimizer averages. Returns the model, its initial weights and the optimizer.
    ``repeat_first`` runs the first batch twice (its first step is one a scaler skips)."""
    model = gpt2(dtype)
    init = snapshot(model)
    opt = sharded(model, stage, **kw)
    if prepare is not None:
        prepare(model)
    for step in range(steps + repeat_first):
        ids = _batch(max(0, step - repeat_first), RANK)
        loss = model(input_ids=ids, labels=ids).loss
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad()
    return model, init, opt


def _own_reference(dtype=torch.float64, steps=STEPS):
    """Single-process NovoGrad fed the mean of the ranks' gradients."""
    model = gpt2(dtype)
    opt = reference(model)
    for step in range(steps):
        for r in range(WORLD):
            ids = _batch(step, r)
            (model(input_ids=ids, labels=ids).loss / WORLD).backward()
        opt.step()
        opt.zero_grad()
    return snapshot(model)


def moved(stage):
    """The model moved and a parameter replaced after the optimizer was built."""
    def prepare(model):
        model.to(torch.device("cpu", 0))  # a copy: new storage for every parameter
        w = model.transformer.h[0].mlp.c_fc.weight
        w.data = w.data.clone()
    model, init, opt = _own_loop(stage, prepare)
    return facts(snapshot(model), _own_reference(), init, model, opt)


def _unchanged_after(model, opt, action):
    before = snapshot(model)
    state = opt.state_dict()["state"]
    saved = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    try:
        action()
    except RuntimeError as e:
        after = opt.state_dict()["state"]
        same = all(torch.equal(a, b) for a, b in zip(before.values(), snapshot(model).values()))
        same_state = all((torch.equal(saved[k], after[k]) if isinstance(saved[k], torch.Tensor)
                          else saved[k] == after[k]) for k in saved)
        return {"error": str(e), "unchanged": same and same_state}
    return {"error": None}


def cast_half(stage):
    """model.half() after the optimizer was built cannot be exact: every rank raises."""
    model, _, opt = _own_loop(stage, steps=1)
    model.half()

    def step():
        ids = _batch(9, RANK)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return _unchanged_after(model, opt, step)


def scaler_own(stage, dtype=torch.float32):
    """GradScaler without DDP, the optimizer averaging: with a power-of-two scale the
    scaled gradients are exactly 2**k times the plain ones (fp32), so the run equals the
    one without a scaler, which equals the reference. The first step's scale overflows:
    skipped on every rank, and the scale is the same everywhere afterwards."""
    big = 2.0 ** 127 if dtype == torch.float32 else 2.0 ** 40
    scaler = torch.amp.GradScaler("cpu", init_scale=big, backoff_factor=1024.0 / big)
    model, init, opt = _own_loop(stage, scaler=scaler, dtype=dtype, repeat_first=True)
    plain, _, _ = _own_loop(stage, dtype=dtype, steps=STEPS)
    scales = [torch.empty(1, dtype=torch.float64) for _ in range(WORLD)]
    dist.all_gather(scales, torch.tensor([scaler.get_scale()], dtype=torch.float64))
    return facts(snapshot(model), snapshot(plain), init, model, opt, skipped=opt.skipped_steps,
                 scales=[float(s) for s in scales])


def scaler_fp16(stage):
    """fp16 parameters with GradScaler (torch's own unscale_ refuses fp16 gradients)."""
    return scaler_own(stage, torch.float16)


def scaler_ddp(stage):
    """GradScaler with DDP and the framework's clipping after scaler.unscale_(opt)."""
    out = {}
    for kind in ("ref", "sharded"):
        model = gpt2(torch.float32)
        init = snapshot(model)
        opt = reference(model) if kind == "ref" else sharded(model, stage)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, backoff_factor=2.0 ** -117)
        for step in range(STEPS + 1):
            ids = _batch(max(0, step - 1), RANK)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = ddp(input_ids=ids, labels=ids).loss
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        out[kind] = (snapshot(model), init, model, opt, scaler.get_scale())
    got, init, model, opt, scale = out["sharded"]
    return facts(got, out["ref"][0], init, model, opt, skipped=opt.skipped_steps, scale=scale,
                 ref_scale=out["ref"][4])


SCENARIOS = {
    "trainer_z1": lambda: trainer(1), "trainer_z2": lambda: trainer(2),
    "accelerate_z1": lambda: accelerate(1), "accelerate_z2": lambda: accelerate(2),
    "fabric_z2": lambda: lightning(2, fabric=True), "lightning_z1": lambda: lightning(1),
    "lightning_z2": lambda: lightning(2),
    "ddp_z1": lambda: plain_ddp(1), "ddp_z2": lambda: plain_ddp(2),
    "moved_z1": lambda: moved(1), "moved_z2": lambda: moved(2),
    "half_z2": lambda: cast_half(2),
    "scaler_z1": lambda: scaler_own(1), "scaler_z2": lambda: scaler_own(2),
    "scaler_fp16_z2": lambda: scaler_fp16(2),
    "scaler_ddp_z1": lambda: scaler_ddp(1), "scaler_ddp_z2": lambda: scaler_ddp(2),
}


def main():
    global OUT
    OUT = sys.argv[1]
    names = sys.argv[2:] or list(SCENARIOS)
    torch.set_num_threads(1)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    for name in names:
        try:
            res = {"ok": SCENARIOS[name]()}
        except Exception:  # noqa: BLE001 - reported to the test, which fails with it
            res = {"error": traceback.format_exc()}
        with open(os.path.join(OUT, f"{name}.rank{RANK}.json"), "w") as f:
            json.dump(res, f)
        dist.barrier()
    dist.destroy_process_group()


OUT = "."
if __name__ == "__main__":
    main()
