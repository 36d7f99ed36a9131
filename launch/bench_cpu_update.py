#!/usr/bin/env python
"""Time the NovoGrad CPU update side by side with CPU Adam implementations and a copy.

One process, for each size N (elements, cut into ``--fragments`` equal layers) and each
thread count (``torch.set_num_threads``; DeepSpeed's op links no OpenMP runtime of its
own and runs on torch's):

- ``novograd_cpu``: the one-pass compiled kernel (``kernels/cpu_impl.py``), fp32 state,
  no low-precision copy: reads g, m, w, writes m, w: 20 bytes per element;
- ``novograd_foreach``: the torch foreach kernels (``kernels/torch_impl.py``) on the same
  data, with ``scratch_grad=True`` as the optimizer calls it (the gradient is restored,
  untimed, before each run): the same 20-byte minimum;
- ``deepspeed_cpu_adam``: ``deepspeed.ops.adam.DeepSpeedCPUAdam.step`` (the ZeRO-Offload
  optimizer; its op is JIT-built with g++ on first use, timed once): reads p, g, m, v,
  writes p, m, v: 28 bytes per element;
- ``torch_adamw_foreach`` / ``torch_adamw_fused``: ``torch.optim.AdamW(foreach=True)`` and
  ``(fused=True)``: 28 bytes per element;
- ``copy``: ``dst.copy_(src)``: 8 bytes per element;
- ``novograd_cpu_stats`` / ``novograd_foreach_stats``: ``partial_stats`` with the max-abs
  (one read of g: 4 bytes per element).

GB/s is each implementation's minimum traffic over its time. Implementations are timed
round-robin (``--rounds`` rounds of ``--repeats`` runs each, pooled), so that a change
in the machine's load hits all of them alike. Writes CSV rows
``impl,size,dtype,threads,metric,p20,p50,p80,note`` (metric ``ms`` or ``GB/s``) and
prints a Markdown table.

    OMP_NUM_THREADS=1 python launch/bench_cpu_update.py --out docs/bench_cpu_update.csv
    python launch/bench_cpu_update.py --sizes 65536 --threads 1 --rounds 1   # quick
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from typing import Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from sharded_novograd import functional as F  # noqa: E402
from sharded_novograd.kernels import cpu_impl, torch_impl  # noqa: E402
from sharded_novograd.layout import FragmentTable  # noqa: E402

BYTES = {"novograd_cpu": 20, "novograd_foreach": 20, "deepspeed_cpu_adam": 28, "torch_adamw_foreach": 28,
         "torch_adamw_fused": 28, "copy": 8, "novograd_cpu_stats": 4, "novograd_foreach_stats": 4}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2 ** 20, 2 ** 24], help="elements (default: 2**20 2**24)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default: 1 2)")
    p.add_argument("--fragments", type=int, default=8, help="equal layers per shard (default: 8)")
    p.add_argument("--rounds", type=int, default=3, help="round-robin rounds (default: 3)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per implementation and round (default: 5)")
    p.add_argument("--impls", nargs="+", default=list(BYTES), choices=list(BYTES),
                   help="implementations to time (default: all)")
    p.add_argument("--out", default=None, help="CSV file to write (default: none)")
    return p.parse_args(argv)


def quantiles(xs: List[float]):
    xs = sorted(xs)

    def q(f):
        k = (len(xs) - 1) * f
        lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return q(0.2), q(0.5), q(0.8)


def novograd_problem(n: int, k: int):
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    offsets = [sum(sizes[:i]) for i in range(k)]
    table = FragmentTable(list(range(k)), offsets, sizes, n, k)
    gen = torch.Generator().manual_seed(0)
    g0 = torch.randn(n, generator=gen)
    m = torch.randn(n, generator=gen) * 0.01
    w = torch.randn(n, generator=gen)
    # Paper preset with decay: every term of the update is live.
    coeffs = F.identity_coeffs(k)
    coeffs[:, F.B1] = 0.95
    coeffs[:, F.B3] = 1.0
    coeffs[:, F.GSCALE] = 1.0
    coeffs[:, F.D_IN] = torch.linspace(1.0, 3.0, k)
    coeffs[:, F.WD_IN] = 1e-3
    coeffs[:, F.STEP] = 1e-4
    return table, g0, m, w, coeffs, sizes


def adam_params(sizes, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in sizes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return ps


def build_impls(n: int, args, notes: Dict[str, str]) -> Dict[str, tuple]:
    """name -> (setup run before each timed run (untimed) or None, timed function)."""
    table, g0, m, w, coeffs, sizes = novograd_problem(n, args.fragments)
    g = g0.clone()
    impls = {}
    if "novograd_cpu" in args.impls:
        if not cpu_impl.available():
            notes["novograd_cpu"] = f"unavailable: {cpu_impl.unavailable_reason()}"
        else:
            impls["novograd_cpu"] = (None, lambda: cpu_impl.fused_update(g0, m, w, None, table, coeffs))
    if "novograd_foreach" in args.impls:
        impls["novograd_foreach"] = (lambda: g.copy_(g0),
                                     lambda: torch_impl.fused_update(g, m, w, None, table, coeffs, scratch_grad=True))
    if "novograd_cpu_stats" in args.impls and cpu_impl.available():
        impls["novograd_cpu_stats"] = (None, lambda: cpu_impl.partial_stats(g0, table, max_abs=True))
    if "novograd_foreach_stats" in args.impls:
        impls["novograd_foreach_stats"] = (None, lambda: torch_impl.partial_stats(g0, table, max_abs=True))
    if "deepspeed_cpu_adam" in args.impls:
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            start = time.perf_counter()
            ds = DeepSpeedCPUAdam(adam_params(sizes, 1), lr=1e-4, weight_decay=0.01, adamw_mode=True)
            ds.step()  # the first step builds or loads the op
            notes.setdefault("deepspeed_cpu_adam", f"op build/load {time.perf_counter() - start:.1f} s")
            impls["deepspeed_cpu_adam"] = (None, ds.step)
        except Exception as e:  # noqa: BLE001 - report any failure as a note, time the rest
            notes["deepspeed_cpu_adam"] = f"unavailable: {type(e).__name__}: {e}"[:300]
    if "torch_adamw_foreach" in args.impls:
        opt = torch.optim.AdamW(adam_params(sizes, 2), lr=1e-4, weight_decay=0.01, foreach=True)
        impls["torch_adamw_foreach"] = (None, opt.step)
    if "torch_adamw_fused" in args.impls:
        opt_f = torch.optim.AdamW(adam_params(sizes, 3), lr=1e-4, weight_decay=0.01, fused=True)
        impls["torch_adamw_fused"] = (None, opt_f.step)
    if "copy" in args.impls:
        src, dst = torch.randn(n), torch.empty(n)
        impls["copy"] = (None, lambda: dst.copy_(src))
    return impls


def time_round_robin(impls: Dict[str, tuple], rounds: int, repeats: int) -> Dict[str, List[float]]:
    times: Dict[str, List[float]] = {name: [] for name in impls}
    for setup, fn in impls.values():  # warm-up: first-call costs out of the timings
        if setup:
            setup()
        fn()
    for _ in range(rounds):
        for name, (setup, fn) in impls.items():
            for _ in range(repeats):
                if setup:
                    setup()
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    ok = cpu_impl.available()
    print(f"cpu_impl: available={ok} first call {time.perf_counter() - start:.2f} s"
          + ("" if ok else f" ({cpu_impl.unavailable_reason()})"), flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load:.2f}", flush=True)
    rows, notes = [], {}
    for n in args.sizes:
        impls = build_impls(n, args, notes)
        for threads in args.threads:
            torch.set_num_threads(threads)  # DeepSpeed's op runs on torch's OpenMP runtime
            times = time_round_robin(impls, args.rounds, args.repeats)
            for name, ts in times.items():
                ms = [t * 1e3 for t in ts]
                p20, p50, p80 = quantiles(ms)
                gbs = [BYTES[name] * n / (t * 1e9) for t in (p80 / 1e3, p50 / 1e3, p20 / 1e3)]
                base = dict(impl=name, size=n, dtype="fp32", threads=threads, note=notes.get(name, ""))
                rows.append(dict(base, metric="ms", p20=f"{p20:.4g}", p50=f"{p50:.4g}", p80=f"{p80:.4g}"))
                rows.append(dict(base, metric="GB/s", p20=f"{gbs[0]:.4g}", p50=f"{gbs[1]:.4g}",
                                 p80=f"{gbs[2]:.4g}"))
                print(f"n={n} threads={threads} {name:24s} {p50:9.3f} ms  {gbs[1]:6.1f} GB/s of "
                      f"{BYTES[name]} B/elem", flush=True)
        del impls
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["impl", "size", "dtype", "threads", "metric", "p20", "p50", "p80",
                                              "note"])
            w.writeheader()
            w.writerows(rows)
    print("\n| impl | size | threads | ms (p50 [p20, p80]) | GB/s of its minimum |")
    print("|---|---|---|---|---|")
    by = {(r["impl"], r["size"], r["threads"], r["metric"]): r for r in rows}
    for (impl, size, threads, metric), r in by.items():
        if metric == "ms":
            g = by[(impl, size, threads, "GB/s")]
            print(f"| {impl} | 2^{size.bit_length() - 1 if size & (size - 1) == 0 else size} | {threads} | "
                  f"{r['p50']} [{r['p20']}, {r['p80']}] | {g['p50']} ({BYTES[impl]} B/elem) |")
    for name, note in notes.items():
        print(f"note: {name}: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
