#!/usr/bin/env python
"""Soak run: a long CPU training run that checks, after EVERY step, that all ranks agree.

After each step every rank hashes (SHA-256) its per-layer second moments ``v``, step
counts, skipped-step count and full parameters, and the ranks all-gather the hashes:
any difference is a failure, recorded with its step. Every ``--nan-every`` steps one
rank's loss is multiplied by NaN, so the step must be skipped on every rank alike.
Every ``--checkpoint-every`` steps the run saves a checkpoint and loads it back into
the same optimizer and model, which must change nothing.

Started without torchrun it spawns ``--nproc`` gloo ranks itself (``file://``
rendezvous, no ports); under torchrun it uses the environment::

    python launch/soak.py --steps 2000 --nproc 3 --out soak_out
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node=3 launch/soak.py --out soak_out

Every knob also reads an environment variable (SOAK_STEPS, SOAK_NPROC, SOAK_DTYPE,
SOAK_ZERO_STAGE, SOAK_OUT). Rank 0 writes ``OUT/soak.json``; the exit status is 0
only when no step disagreed.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import multiprocessing as mp
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sharded_novograd import ShardedNovoGrad, checkpoint  # noqa: E402
from sharded_novograd import collectives as C  # noqa: E402

logger = logging.getLogger("soak")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None):
    env = os.environ.get
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=int(env("SOAK_STEPS", 2000)))
    ap.add_argument("--nproc", type=int, default=int(env("SOAK_NPROC", 3)), help="ranks to spawn without torchrun")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=env("SOAK_DTYPE", "fp32"))
    ap.add_argument("--zero-stage", type=int, choices=[1, 2], default=int(env("SOAK_ZERO_STAGE", 2)))
    ap.add_argument("--nan-every", type=int, default=250, help="inject a NaN loss every N steps (0: never)")
    ap.add_argument("--checkpoint-every", type=int, default=500, help="save and reload every N steps (0: never)")
    ap.add_argument("--timeout-s", type=float, default=120.0, help="process group timeout")
    ap.add_argument("--out", default=env("SOAK_OUT", "soak_out"))
    return ap.parse_args(argv)


def build(dtype):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 127), torch.nn.LayerNorm(127), torch.nn.GELU(),
                              torch.nn.Linear(127, 127), torch.nn.Tanh(), torch.nn.Linear(127, 10))
    net.scale = torch.nn.Parameter(torch.tensor(1.0))  # a 0-dim layer
    return net.to(dtype)


def batch(step, rank, dtype):
    """Rank ``rank``'s batch at ``step``: inputs and a fixed random teacher's noisy outputs."""
    teacher = torch.randn(64, 10, generator=torch.Generator().manual_seed(123)) / 8.0
    g = torch.Generator().manual_seed(7919 * step + rank)
    x = torch.randn(32, 64, generator=g)
    y = torch.tanh(x @ teacher) + 0.05 * torch.randn(32, 10, generator=g)
    return x.to(dtype), y.to(dtype)


def fingerprint(opt, net) -> str:
    """Hashes of what must be identical on every rank: v, step counts, skips, parameters."""
    st = opt.state_dict()["state"]
    parts = []
    for t in (st["exp_avg_sq"], st["step"], st["max_exp_avg_sq"]):
        parts.append(hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest())
    parts.append(str(opt.skipped_steps))
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).cpu()
    parts.append(hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest())
    return "/".join(parts)


def shard_state(opt):
    st = opt.state_dict()["state"]
    return {k: v.clone() for k, v in st.items() if torch.is_tensor(v)}


def soak(args) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = DTYPES[args.dtype]
    net = build(dtype)
    opt = ShardedNovoGrad(net.parameters(), lr=1e-2, weight_decay=1e-3, zero_stage=args.zero_stage)
    group, device = opt.process_group, opt.device
    mismatches, losses, expected_skips, reloads = [], {}, 0, 0
    t0 = time.perf_counter()
    for step in range(args.steps):
        x, y = batch(step, rank, dtype)
        loss = ((net(x) * net.scale - y).float() ** 2).mean()
        inject = args.nan_every and step % args.nan_every == args.nan_every // 2
        expected_skips += bool(inject)
        (loss * float("nan") if inject and rank == step % world else loss).backward()
        opt.step()
        opt.zero_grad()
        prints = C.all_gather_text(fingerprint(opt, net), group, device)
        if len(set(prints)) != 1:
            mismatches.append({"step": step, "fingerprints": prints})
            logger.error("step %d: ranks disagree: %s", step, prints)
        if step % 100 == 0 or step == args.steps - 1:
            losses[step] = float(loss.detach())
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            before, state = fingerprint(opt, net), shard_state(opt)
            checkpoint.save(os.path.join(args.out, "checkpoint"), opt, net, metadata={"step": step + 1})
            checkpoint.load(os.path.join(args.out, "checkpoint"), opt, net)
            after = shard_state(opt)
            same = before == fingerprint(opt, net) and all(torch.equal(state[k], after[k]) for k in state)
            if not same:
                mismatches.append({"step": step, "reload_changed_state": True})
            reloads += 1
    seconds = time.perf_counter() - t0
    return {"world_size": world, "steps": args.steps, "dtype": args.dtype, "zero_stage": args.zero_stage,
            "parameters": sum(p.numel() for p in net.parameters()), "layers": opt.layout.num_layers,
            "mismatched_steps": len(mismatches), "mismatches": mismatches[:10],
            "skipped_steps": opt.skipped_steps, "expected_skipped_steps": expected_skips,
            "checkpoint_reloads": reloads, "loss": losses, "seconds": round(seconds, 1),
            "steps_per_s": round(args.steps / seconds, 1), "torch": torch.__version__}


def run(args) -> int:
    rank = dist.get_rank()
    try:
        result = soak(args)
    finally:
        dist.destroy_process_group()
    ok = result["mismatched_steps"] == 0 and result["skipped_steps"] == result["expected_skipped_steps"]
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "soak.json"), "w") as f:
            json.dump({**result, "ok": ok}, f, indent=1)
        logger.info("soak %s: %s", "passed" if ok else "FAILED", json.dumps({**result, "mismatches": None}))
    return 0 if ok else 1


def _spawned(rank, world, init_file, args):
    torch.set_num_threads(1)
    os.environ["RANK"] = str(rank)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=args.timeout_s))
    sys.exit(run(args))


def main(argv=None) -> int:
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        torch.set_num_threads(1)
        logging.basicConfig(level=logging.INFO if os.environ["RANK"] == "0" else logging.WARNING,
                            format="%(asctime)s %(message)s")
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout_s))
        return run(args)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rdzv")
        procs = [ctx.Process(target=_spawned, args=(r, args.nproc, init_file, args)) for r in range(args.nproc)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    return 0 if all(p.exitcode == 0 for p in procs) else 1


if __name__ == "__main__":
    sys.exit(main())
