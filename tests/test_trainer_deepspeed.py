"""HF Trainer with a DeepSpeed config and NovoGrad, against the single-process NovoGrad.

What users run: ``TrainingArguments(deepspeed=cfg)`` with
``Trainer(optimizer_cls_and_kwargs=(NovoGrad, kwargs))``. Trainer hands the NovoGrad to
accelerate, which calls plain ``deepspeed.initialize``; NovoGrad binds itself to
DeepSpeed's ZeRO-2 fragment map at its first step. Two forked gloo ranks train a tiny
GPT2LMHeadModel built from a GPT2Config (no download; dropout off) for a few steps,
with Trainer's default ``max_grad_norm=1.0`` reaching DeepSpeed as
``"gradient_clipping": "auto"``.

The reference is independent of DeepSpeed: a replica of the model, the single-process
NovoGrad with the same two param groups Trainer builds (decayed weights, the rest
without decay), fed the gradient of the mean of both ranks' losses on the batches each
rank recorded, clipped with torch's clip_grad_norm_ at 1.0. Every sequence has the same
number of tokens, so the mean of the ranks' mean losses is the loss DeepSpeed averages.
The two differ by summation order only (fp32; 6e-8 relative per operation), and
NovoGrad divides by each layer's norm, which damps such errors: 2e-5 relative (as in
tests/test_deepspeed.py) holds with room after 5 steps.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
deepspeed = pytest.importorskip("deepspeed")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from sharded_novograd import NovoGrad  # noqa: E402
from sharded_novograd import engine as E  # noqa: E402

from .cases import close_ratio  # noqa: E402
from .distributed import shared_world  # noqa: E402

STEPS = 5
BATCH = 2  # sequences per rank and step
SEQ = 12
RTOL, ATOL = 2e-5, 1e-6
NOVOGRAD = dict(lr=0.02, betas=(0.9, 0.98), eps=1e-8)
WEIGHT_DECAY = 0.01


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=48, n_positions=SEQ, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 2 * BATCH * STEPS

    def __getitem__(self, i):
        ids = torch.randint(0, 48, (SEQ,), generator=torch.Generator().manual_seed(1000 + i))
        return {"input_ids": ids, "labels": ids}


class Recorder:
    """Keeps the inputs of every forward of the model (what this rank trained on)."""

    KEYS = ("input_ids", "labels", "num_items_in_batch")

    def __init__(self, model):
        self.batches = []
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        if module.training:
            self.batches.append({k: torch.as_tensor(kwargs[k]).clone() for k in self.KEYS if k in kwargs})


def ds_config(stage):
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


def counted_collectives():
    """Count what the steps send: NovoGrad's reduces (and their floats), and the elements
    of every other reducing collective (DeepSpeed's gradient buckets, its norm and
    overflow scalars)."""
    counts = {"novograd_reduces": 0, "novograd_floats": 0, "other_elements": 0, "inside": False}
    reduce = E.StepEngine.reduce

    def counted_reduce(self, *args, **kwargs):
        counts["novograd_reduces"] += 1
        counts["inside"] = True
        try:
            return reduce(self, *args, **kwargs)
        finally:
            counts["inside"] = False

    E.StepEngine.reduce = counted_reduce
    for name in ("all_reduce", "reduce_scatter_tensor", "reduce"):
        fn = getattr(dist, name)

        def wrapped(*args, _fn=fn, **kwargs):
            tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
            key = "novograd_floats" if counts["inside"] else "other_elements"
            counts[key] += max(t.numel() for t in tensors)  # a reduce-scatter's input
            return _fn(*args, **kwargs)
        setattr(dist, name, wrapped)
    return counts


def train(rank, world, stage):
    from transformers import Trainer, TrainingArguments

    # What torchrun would have set; the gloo group is already initialized (accelerate and
    # DeepSpeed adopt it), so the address is never dialled.
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29400")
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no g++ build in the suite
    import logging
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    model = gpt2()
    recorder = Recorder(model)
    with tempfile.TemporaryDirectory() as out_dir:
        args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=BATCH, max_steps=STEPS,
                                 learning_rate=NOVOGRAD["lr"], lr_scheduler_type="constant", warmup_steps=0,
                                 weight_decay=WEIGHT_DECAY, deepspeed=ds_config(stage), use_cpu=True,
                                 ddp_backend="gloo", report_to=[], save_strategy="no", logging_strategy="no",
                                 disable_tqdm=True, dataloader_num_workers=0, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=Tokens(),
                          optimizer_cls_and_kwargs=(NovoGrad, NOVOGRAD))
        decay = set(trainer.get_decay_parameter_names(model))
        counts = counted_collectives()
        trainer.train()
    engine = trainer.model_wrapped
    opt = engine.optimizer.optimizer
    module = engine.module
    names = [n for n, _ in module.named_parameters()]
    final = {n: p.detach().clone() for n, p in module.named_parameters()}
    every = [None] * world
    dist.all_gather_object(every, {"batches": recorder.batches, "final": final})
    state_bytes = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                      if isinstance(t, torch.Tensor))
    params = sum(p.numel() for p in module.parameters())
    out = {"optimizer": type(opt).__name__, "bound": opt.__dict__.get("_deepspeed_binding") is not None,
           "wrapper": type(engine.optimizer).__name__, "groups": len(opt.param_groups),
           "tied": module.transformer.wte.weight is module.lm_head.weight, "state_bytes": state_bytes,
           "params": params, "reduces_per_step": counts["novograd_reduces"] / STEPS,
           "novograd_floats_per_step": counts["novograd_floats"] / STEPS,
           "other_elements_per_step": counts["other_elements"] / STEPS,
           "ranks_agree": all(torch.equal(every[0]["final"][n], e["final"][n]) for e in every for n in names),
           "distinct_batches": len({tuple(b["input_ids"].flatten().tolist()) for e in every for b in e["batches"]}),
           "forwards": len(recorder.batches)}

    # The reference, from the batches the ranks recorded.
    ref_model = gpt2()
    ref_params = dict(ref_model.named_parameters())
    ref = NovoGrad([{"params": [ref_params[n] for n in names if n in decay], "weight_decay": WEIGHT_DECAY},
                    {"params": [ref_params[n] for n in names if n not in decay], "weight_decay": 0.0}], **NOVOGRAD)
    grad_norms = []
    for step in range(STEPS):
        ref.zero_grad()
        for e in every:
            # Trainer's loss: each rank's summed token losses over the token count of all
            # ranks (num_items_in_batch), times the world size, which DeepSpeed averages.
            ref_model(**e["batches"][step]).loss.backward()
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 1.0)))
        ref.step()
    out["grad_norms"] = grad_norms
    out["err"] = max(close_ratio(final[n], ref_params[n], RTOL, ATOL) for n in names)
    out["max_abs_diff"] = max(float((final[n] - ref_params[n].detach()).abs().max()) for n in names)
    out["moved"] = max(float((final[n] - p.detach()).abs().max()) for n, p in gpt2().named_parameters())
    return out


def trainer_world():
    # Import the stacks once in the parent so that forked ranks share them.
    import transformers.trainer  # noqa: F401
    import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401
    return shared_world(train, 2, 2, timeout=240)


def test_trainer_deepspeed_zero2_matches_reference():
    """Check that Trainer + a ZeRO-2 DeepSpeed config + optimizer_cls_and_kwargs=(NovoGrad, ...)
    trains exactly as the single-process NovoGrad fed the rank-averaged, clipped gradients;
    that ranks agree and GPT2's tied wte/lm_head stay one tensor."""
    for rank, r in enumerate(trainer_world()):
        assert r["optimizer"] == "NovoGrad" and r["bound"], r  # plain NovoGrad, bound to ZeRO-2's partitions
        assert r["wrapper"] == "DeepSpeedZeroOptimizer", r
        assert r["distinct_batches"] == 2 * STEPS, r  # each rank saw its own data
        assert r["moved"] > 1e-3, r  # it trained
        assert r["err"] <= 1.0, (rank, r)
        assert r["ranks_agree"] and r["tied"], r
        assert max(r["grad_norms"]) > 1.0, r  # Trainer's max_grad_norm=1.0 clipped, and it reached DeepSpeed


def test_trainer_deepspeed_collectives_and_state():
    """Check that NovoGrad adds one reduce of O(L) floats per param group and step (DeepSpeed
    steps each group alone), that every gradient element is reduced once (DeepSpeed's
    buckets plus a few scalars: Trainer does not wrap a DeepSpeed model in DDP), and that
    NovoGrad's state per rank is about half of the first moment's full size."""
    for r in trainer_world():
        assert r["reduces_per_step"] == r["groups"] == 2, r
        assert r["novograd_floats_per_step"] < 4 * 28 + 64, r  # 28 layers: 2 floats each, plus flags and digest
        assert r["params"] <= r["other_elements_per_step"] < r["params"] + 8, r
        # exp_avg of this rank's partition (about params / 2 fp32) plus O(L) per-layer vectors.
        assert r["state_bytes"] < 4 * r["params"] * 0.5 + 4096, r
