"""Time back-to-back training steps with and without ``ShardedNovoGrad.attach(model)``.

``launch/benchmark.py`` puts a barrier before every timed step, which would absorb a
parameter gather left in flight by ``step()``; this script instead times ``--steps``
consecutive steps with no barrier in between (one before, one after, after waiting
for the parameters), so the time a gather still costs shows up in the next forward.
Variants: DDP + NovoGrad, ShardedNovoGrad ZeRO-2, and ZeRO-2 with ``attach``.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 launch/bench_overlap.py --models gpt,mlp
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # launch/ and the repository root
import bench_models  # noqa: E402

from sharded_novograd import NovoGrad, ShardedNovoGrad  # noqa: E402

HP = dict(lr=1e-3, betas=(0.95, 0.98), weight_decay=1e-3)


def build(variant, spec, seed):
    model = bench_models.build_model(spec, seed)
    if variant == "ddp_novograd":
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        return ddp, NovoGrad(model.parameters(), **HP), model
    opt = ShardedNovoGrad(model.parameters(), **HP)
    if variant == "sharded_zero2_attach":
        opt.attach(model)
    return model, opt, model


def run(variant, spec, args, rank):
    fwd, opt, model = build(variant, spec, args.seed)

    def one(step):
        loss = fwd(*bench_models.make_batch(spec, args.seed, step, rank, torch.float32))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for s in range(args.warmup):
        one(s)
    if hasattr(opt, "wait_params"):
        opt.wait_params()
    dist.barrier()
    t0 = time.perf_counter()
    for s in range(args.warmup, args.warmup + args.steps):
        one(s)
    if hasattr(opt, "wait_params"):
        opt.wait_params()
    dist.barrier()
    return (time.perf_counter() - t0) / args.steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gpt,mlp", help="comma-separated, from: " + ", ".join(bench_models.MODELS))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the median is reported")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rank, world = dist.get_rank(), dist.get_world_size()
    variants = ["ddp_novograd", "sharded_zero2", "sharded_zero2_attach"]
    for name in args.models.split(","):
        spec = bench_models.MODELS[name]
        times = {v: [] for v in variants}
        for _ in range(args.rounds):
            for v in variants:
                times[v].append(run(v, spec, args, rank))
        if rank == 0:
            base = statistics.median(times["sharded_zero2"])
            print(f"{name}, N={world}, ms per step (median of {args.rounds} rounds of {args.steps} steps):")
            for v in variants:
                med = statistics.median(times[v])
                print(f"  {v:22s} {1e3 * med:8.1f}  ({med / base:.2f}x sharded_zero2)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
