#!/usr/bin/env python
"""Host-side overhead of an optimizer step, with tensors so small that the arithmetic is nothing.

A model of ``L`` parameter tensors of 64 to 256 elements (``loss = sum_i sum(p_i**2)``)
is trained with each optimizer set-up below; what is timed is Python, dispatch, hooks
and collective latency, the part of a step that does not shrink with the model:

- ``sharded_zero1`` / ``sharded_zero2``: ``ShardedNovoGrad(zero_stage=1/2)``, no DDP, a
  constant learning rate;
- ``sharded_zero1_lr`` / ``sharded_zero2_lr``: the same with the learning rate changed
  before every step (a scheduler): only the per-layer lr vector should be rebuilt;
- ``ddp_novograd``: DDP + the single-process ``sharded_novograd.NovoGrad``;
- ``ddp_adamw_foreach``: DDP + ``torch.optim.AdamW(foreach=True)``.

Metrics, per set-up, ``L`` and world size (p20/p50/p80 over the timed steps; times of
a step are the slowest rank's, every rank starting the timed region together after an
untimed barrier):

- ``step_us``: wall time of ``optimizer.step()``;
- ``backward_us``: wall time of ``loss.backward()`` (with the optimizer's hooks, or DDP's);
- ``backward_overhead_us_per_param``: ``backward_us`` minus that of the same model with
  no hooks and no DDP, timed in the same step (so a change of load hits both), over L.
  For ZeRO-2 this holds the bucket copies and the issuing of the bucket reduces (their
  wait is in ``step()``); for DDP also the wait for its all-reduce, which DDP does at
  the end of backward;
- ``hook_us_per_param`` (ShardedNovoGrad): the time spent inside the optimizer's
  post-accumulate-grad hook (``_on_grad``), per parameter;
- ``collectives_backward`` / ``collectives_step``: Python-level ``torch.distributed``
  calls in one step's backward and ``step()`` (DDP's gradient all-reduce runs in C++
  and is not seen);
- ``host_reads_per_step``: ``Tensor.tolist``/``item``/``__float__``/``__int__``/
  ``__bool__`` calls during one backward and ``step()``: each is a host sync on CUDA
  when its tensor lives there (on CPU nothing waits; the count is what matters). The
  call sites are printed.

Under torchrun with 2 ranks both world sizes are measured in one run: world 2 over
both ranks, then world 1 on rank 0 alone (a one-rank group) while rank 1 waits. Run
without torchrun, it measures world size 1 only. Writes CSV rows
``impl,L,world,metric,p20,p50,p80`` to ``--out`` and prints a Markdown table.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 launch/bench_overhead.py --out runs/overhead.csv
    OMP_NUM_THREADS=1 python launch/bench_overhead.py --smoke --out /tmp/overhead.csv   # seconds
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import functools
import os
import sys
import tempfile
import time
import traceback
from typing import Dict, List

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from launch.bench_cpu_update import quantiles  # noqa: E402  (p20, p50, p80)
from sharded_novograd import NovoGrad, ShardedNovoGrad  # noqa: E402

IMPLS = ("sharded_zero1", "sharded_zero1_lr", "sharded_zero2", "sharded_zero2_lr", "ddp_novograd",
         "ddp_adamw_foreach")
SIZES = (64, 96, 128, 192, 256)  # elements per tensor, cycled: 147 on average
HP = dict(lr=1e-3, betas=(0.95, 0.98), weight_decay=1e-3)
COLLECTIVES = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_single",
               "_all_gather_base", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single",
               "_reduce_scatter_base", "all_to_all", "all_to_all_single", "gather", "scatter", "barrier",
               "monitored_barrier", "all_gather_object", "broadcast_object_list", "send", "recv", "isend", "irecv",
               "batch_isend_irecv")
HOST_READS = ("tolist", "item", "__float__", "__int__", "__bool__")
METRICS = ("step_us", "backward_us", "backward_overhead_us_per_param", "hook_us_per_param", "collectives_backward",
           "collectives_step", "host_reads_per_step")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[100, 1000, 3000], help="L values (default: 100 1000 3000)")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated set-ups (default: {','.join(IMPLS)})")
    p.add_argument("--worlds", type=int, nargs="+", default=None,
                   help="world sizes to measure (default: 1 and the launched world size)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per set-up (default: 3)")
    p.add_argument("--steps", type=int, default=15, help="timed steps per set-up (default: 15)")
    p.add_argument("--smoke", action="store_true", help="L=50, 1 warm-up and 2 timed steps: checks the harness")
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "bench_overhead.csv"),
                   help="CSV file to write (default: $TMPDIR/bench_overhead.csv)")
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.warmup, args.steps = [50], 1, 2
    args.impls = [s for s in args.impls.split(",") if s]
    for impl in args.impls:
        if impl not in IMPLS:
            p.error(f"unknown set-up {impl!r} (expected some of {', '.join(IMPLS)})")
    return args


# ---------------------------------------------------------------------- counters
class Counters:
    """Counts Python-level collectives and host reads while :meth:`counting` is active.

    The wrappers are installed once, at start-up; outside the counting window they only
    forward the call."""

    def __init__(self):
        self.active = False
        self.collectives = collections.Counter()
        self.reads = collections.Counter()  # (method, caller file:line)
        for name in COLLECTIVES:
            orig = getattr(dist, name, None)
            if orig is not None:
                setattr(dist, name, self._wrap_collective(name, orig))
        for name in HOST_READS:
            setattr(torch.Tensor, name, self._wrap_read(name, getattr(torch.Tensor, name)))

    def _wrap_collective(self, name, orig):
        @functools.wraps(orig)
        def wrapper(*args, **kwargs):
            if self.active:
                self.collectives[name] += 1
            return orig(*args, **kwargs)
        return wrapper

    def _wrap_read(self, name, orig):
        def wrapper(t, *args, **kwargs):
            if self.active:
                self.active = False  # the stack walk must not count itself
                try:
                    frame = traceback.extract_stack(limit=2)[0]
                    where = f"{os.path.relpath(frame.filename, ROOT)}:{frame.lineno}"
                finally:
                    self.active = True
                self.reads[(name, where)] += 1
            return orig(t, *args, **kwargs)
        wrapper.__name__ = name
        return wrapper

    @contextlib.contextmanager
    def counting(self):
        self.collectives.clear()
        self.reads.clear()
        self.active = True
        try:
            yield
        finally:
            self.active = False


# ---------------------------------------------------------------------- models
class Tiny(torch.nn.Module):
    """``L`` small parameter tensors; ``forward()`` is ``sum_i sum(p_i**2)``."""

    def __init__(self, num_layers: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.ps = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(SIZES[i % len(SIZES)], generator=gen)) for i in range(num_layers))

    def forward(self):
        return torch.stack([p.square().sum() for p in self.ps]).sum()


def build(impl: str, num_layers: int, group):
    """``(module to call, optimizer, the optimizer's own ShardedNovoGrad or None)``."""
    model = Tiny(num_layers, seed=0)
    if impl.startswith("sharded"):
        opt = ShardedNovoGrad(model.parameters(), zero_stage=int(impl[len("sharded_zero")]), process_group=group, **HP)
        return model, opt, opt
    ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=group)
    if impl == "ddp_novograd":
        return ddp, NovoGrad(model.parameters(), **HP), None
    return ddp, torch.optim.AdamW(model.parameters(), foreach=True, **HP), None


def time_hooks(opt: ShardedNovoGrad, spent: List[float]) -> None:
    """Make the optimizer's post-accumulate-grad hook add its time to ``spent[0]``
    (the hook calls ``opt._on_grad``, so an instance attribute takes its place)."""
    inner = opt._on_grad

    def timed(layer, p):
        t0 = time.perf_counter()
        inner(layer, p)
        spent[0] += time.perf_counter() - t0

    opt._on_grad = timed


# ---------------------------------------------------------------------- measurement
def measure(impls, num_layers: int, group, args, counters: Counters) -> Dict[tuple, tuple]:
    """Every set-up at one L on ``group``, round-robin, one step of each in turn."""
    world = dist.get_world_size(group)
    plain = Tiny(num_layers, seed=0)
    setups = {impl: build(impl, num_layers, group) for impl in impls}
    spent = {impl: [0.0] for impl in impls}
    for impl, (_, _, sharded) in setups.items():
        if sharded is not None:
            time_hooks(sharded, spent[impl])
    times = {impl: collections.defaultdict(list) for impl in impls}
    counts = {}
    total = args.warmup + args.steps
    for s in range(total):
        timed = s >= args.warmup
        for impl, (fwd, opt, sharded) in setups.items():
            if impl.endswith("_lr"):
                for g in opt.param_groups:
                    g["lr"] = HP["lr"] * (1.0 - 0.5 * s / total)
            count = s == total - 1  # the last step is also counted (its times are kept)
            # The model without hooks, in the same step, as the baseline of the backward.
            loss = plain()
            dist.barrier(group)
            t0 = time.perf_counter()
            loss.backward()
            t1 = time.perf_counter()
            plain.zero_grad(set_to_none=True)
            loss = fwd()
            spent[impl][0] = 0.0
            dist.barrier(group)
            with counters.counting() if count else contextlib.nullcontext():
                t2 = time.perf_counter()
                loss.backward()
                t3 = time.perf_counter()
                if count:
                    bwd_coll, bwd_reads = sum(counters.collectives.values()), collections.Counter(counters.reads)
            hooks = spent[impl][0]
            dist.barrier(group)
            with counters.counting() if count else contextlib.nullcontext():
                t4 = time.perf_counter()
                opt.step()
                t5 = time.perf_counter()
                if count:
                    counts[impl] = (bwd_coll, sum(counters.collectives.values()), bwd_reads + counters.reads,
                                    dict(counters.collectives))
            opt.zero_grad(set_to_none=True)
            if timed:
                t = times[impl]
                t["backward_us"].append((t3 - t2) * 1e6)
                t["backward_overhead_us_per_param"].append(((t3 - t2) - (t1 - t0)) * 1e6 / num_layers)
                t["step_us"].append((t5 - t4) * 1e6)
                if sharded is not None:
                    t["hook_us_per_param"].append(hooks * 1e6 / num_layers)
    out = {}
    for impl in impls:
        for metric, xs in times[impl].items():
            # Each step counts at its slowest rank (the hook time too: a rank's own).
            vec = torch.tensor(xs, dtype=torch.float64)
            dist.all_reduce(vec, op=dist.ReduceOp.MAX, group=group)
            out[(impl, num_layers, world, metric)] = quantiles(vec.tolist())
        bwd_coll, step_coll, reads, _ = counts[impl]
        n_reads = sum(reads.values())
        for metric, v in (("collectives_backward", bwd_coll), ("collectives_step", step_coll),
                          ("host_reads_per_step", n_reads)):
            out[(impl, num_layers, world, metric)] = (float(v),) * 3
    return out, counts


def markdown(results: Dict[tuple, tuple]) -> str:
    keys = sorted({k[:3] for k in results}, key=lambda k: (k[2], k[1], IMPLS.index(k[0])))

    def cell(k, metric, fmt="{:.0f}", spread=True):
        v = results.get(k + (metric,))
        if v is None:
            return "-"
        return fmt.format(v[1]) + (f" ({fmt.format(v[0])}-{fmt.format(v[2])})" if spread else "")

    rows = ["| set-up | L | world | step() µs p50 (p20-p80) | backward µs p50 | backward overhead µs/param p50 "
            "(p20-p80) | hook µs/param p50 | collectives bwd + step | host reads/step |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in keys:
        coll = f"{cell(k, 'collectives_backward', spread=False)} + {cell(k, 'collectives_step', spread=False)}"
        rows.append(f"| `{k[0]}` | {k[1]} | {k[2]} | {cell(k, 'step_us')} | {cell(k, 'backward_us', spread=False)} | "
                    f"{cell(k, 'backward_overhead_us_per_param', '{:.1f}')} | "
                    f"{cell(k, 'hook_us_per_param', '{:.1f}', spread=False)} | {coll} | "
                    f"{cell(k, 'host_reads_per_step', spread=False)} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    counters = Counters()
    launched = "RANK" in os.environ
    tmp = None
    if launched:
        dist.init_process_group("gloo")
    else:
        tmp = tempfile.mkdtemp(prefix="bench_overhead_")
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1)
    rank, size = dist.get_rank(), dist.get_world_size()
    worlds = args.worlds or sorted({1, size})
    for w in worlds:
        if not 1 <= w <= size:
            raise SystemExit(f"--worlds {w}: this run has {size} ranks")
    started = time.perf_counter()
    load = os.getloadavg()
    results, sites = {}, {}
    try:
        for w in sorted(worlds, reverse=True):
            group = dist.new_group(list(range(w))) if w < size else dist.group.WORLD
            if rank < w:
                for num_layers in args.layers:
                    t0 = time.perf_counter()
                    got, counts = measure(args.impls, num_layers, group, args, counters)
                    results.update(got)
                    for impl, (_, _, reads, coll) in counts.items():
                        sites[(impl, num_layers, w)] = (reads, coll)
                    if rank == 0:
                        print(f"world {w}, L={num_layers}: {time.perf_counter() - t0:.1f} s", flush=True)
            dist.barrier()  # the ranks outside a smaller world wait here
    finally:
        elapsed = time.perf_counter() - started
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["impl", "L", "world", "metric", "p20", "p50", "p80"])
            for (impl, num_layers, world, metric), (a, b, c) in sorted(results.items(), key=lambda kv: (
                    kv[0][2], kv[0][1], IMPLS.index(kv[0][0]), METRICS.index(kv[0][3]))):
                w.writerow([impl, num_layers, world, metric, f"{a:.6g}", f"{b:.6g}", f"{c:.6g}"])
        print(f"\ntorch {torch.__version__}, {size} rank(s) launched, OMP_NUM_THREADS="
              f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, load average at start {load[0]:.2f} {load[1]:.2f} "
              f"{load[2]:.2f}, at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {elapsed:.0f} s; "
              f"{args.steps} timed steps per set-up\n")
        print(markdown(results))
        print("\nHost reads in one step (backward + step()), by call site, at the largest L:")
        top = max(args.layers)
        for (impl, num_layers, world), (reads, coll) in sorted(sites.items(), key=lambda kv: (
                kv[0][2], IMPLS.index(kv[0][0]))):
            if num_layers != top:
                continue
            where = ", ".join(f"{n} x {m} at {site}" for (m, site), n in sorted(reads.items())) or "none"
            print(f"- {impl}, world {world}: {where}; collectives: "
                  f"{', '.join(f'{n} x {c}' for c, n in sorted(coll.items())) or 'none'} (in step())")
        print(f"\nCSV: {args.out}")
    dist.destroy_process_group()
    if tmp is not None:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
