"""A small deterministic training run for the fault tests.

It checkpoints every ``--every`` steps into ``CHECKPOINT_DIR/step_NNNNNN`` and, on
start, resumes from the latest complete checkpoint there. On the first attempt only
(``TORCHELASTIC_RESTART_COUNT`` is 0), rank ``--die-rank`` dies with ``os._exit``:
before step ``--die-at`` (``--die-in step``) or half-way through writing its file of the
first checkpoint taken at or after that step (``--die-in save``). The data of a step
is a function of (step, rank) only, so a resumed run repeats exactly the steps an
uninterrupted one takes.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node=2 --max-restarts=1 \\
        tests/scripts/fault_train.py --steps 14 --every 4 --die-rank 1 --die-at 10 \\
        --checkpoint-dir /tmp/ck --out /tmp/out

Rank 0 writes ``OUT/params.pt`` (the final parameters) and ``OUT/result.json``. The
tests also import :func:`train` to run the uninterrupted reference.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import torch
import torch.distributed as dist

from sharded_novograd import ShardedNovoGrad, checkpoint


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(11, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3)).double()


def batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return (torch.randn(8, 11, generator=g, dtype=torch.float64),
            torch.randn(8, 3, generator=g, dtype=torch.float64))


def _die_while_writing(path, obj):
    with open(f"{path}.{os.getpid()}.tmp", "wb") as f:
        f.write(b"PK\x03\x04 half a file")
        f.flush()
    os._exit(13)


def train(rank: int, world: int, steps: int, every: int = 0, checkpoint_dir=None, die_rank: int = -1,
          die_at: int = -1, die_in: str = "step", restart_count: int = 0):
    """Train ``steps`` steps (resuming if a checkpoint exists); return (parameters, first step run)."""
    net = build()
    opt = ShardedNovoGrad(net.parameters(), lr=0.01, weight_decay=0.001)
    start = 0
    last = checkpoint.latest(checkpoint_dir) if checkpoint_dir else None
    if last is not None:
        start = checkpoint.load(last, opt, net)["user"]["step"]
    dying = restart_count == 0 and rank == die_rank
    for step in range(start, steps):
        if dying and die_in == "step" and step == die_at:
            os._exit(13)
        x, y = batch(rank, step)
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        done = step + 1
        if every and done % every == 0:
            if dying and die_in == "save" and done >= die_at:
                checkpoint._write_tensors = _die_while_writing
            checkpoint.save(os.path.join(checkpoint_dir, f"step_{done:06d}"), opt, net, metadata={"step": done})
    return [p.detach().clone() for p in net.parameters()], start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--die-rank", type=int, default=-1)
    ap.add_argument("--die-at", type=int, default=-1)
    ap.add_argument("--die-in", choices=["step", "save"], default="step")
    ap.add_argument("--checkpoint-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--timeout-s", type=float, default=60.0, help="process group timeout (default: 60)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    timeout = datetime.timedelta(seconds=args.timeout_s)
    # torchrun's agent keeps one TCP store for every attempt. Keys the failed attempt left
    # there (a dead rank's gloo address) can be read by the next attempt, which then fails
    # to connect or hangs (pytorch/pytorch#135712); a prefix per attempt keeps them apart.
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt{restarts}/", store), rank=rank,
                            world_size=world, timeout=timeout)
    try:
        params, start = train(rank, world, args.steps, args.every, args.checkpoint_dir, args.die_rank,
                              args.die_at, args.die_in, restarts)
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
            torch.save(params, os.path.join(args.out, "params.pt"))
            with open(os.path.join(args.out, "result.json"), "w") as f:
                json.dump({"restart_count": restarts, "resumed_from": start, "steps": args.steps}, f)
        # Tear down together: a rank that destroys its gloo group while a peer is still
        # busy can abort at exit ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
