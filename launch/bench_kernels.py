#!/usr/bin/env python
"""Check, then time, the NovoGrad kernels on one GPU.

For each size N (elements of one shard, laid out as the layers of a GPT-like model
that sum to N), this script:

1. checks the Triton kernels against the torch kernels and a float64 computation;
2. times, with CUDA events over ``--repeats`` runs (L2 flushed before each run):
   a device-to-device copy moving the same number of bytes as the update (read +
   write), the Triton update, the torch (foreach) update, ``torch.optim.AdamW(fused=True)``
   on N fp32 elements in the same layer sizes, and both partial-statistics kernels;
3. writes CSV rows ``impl,size,dtype,metric,p20,p50,p80,device,version`` and prints a
   Markdown table.

Bytes moved by the update: read g, m, w (fp32) and write m, w, plus the bf16/fp16
parameter copy: 20 bytes per element, 22 with a 2-byte copy. GB/s is those bytes over
the time, whatever the implementation actually moves (the torch path moves more).

    python launch/bench_kernels.py --out bench_kernels.csv        # GPU
    python launch/bench_kernels.py --sizes 1e8 --layout shifted   # every fragment off the vector grid
    python launch/bench_kernels.py --dry-run                      # CPU, tiny sizes

Exits with status 1 if a correctness check fails.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 0}
# Bytes of device memory per element the run needs at its peak (the correctness
# phase: g, m, w, their originals and the torch path's copies and temporaries).
PEAK_BYTES_PER_ELEM = 56
# Correctness bounds, as in tests/test_kernels.py: fp32 update vs float64 (errors
# over 1 + |ref|); the torch kernels run the same operations in the same order.
UPDATE_TOL = 1e-5
TORCH_TOL = 1e-6
# Sums of squares: one fp32 atomic add per chunk, up to ~1e4 chunks per layer at 1e9.
STATS_TOL = 1e-4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=float, nargs="+", default=None,
                   help="shard sizes in elements (default: 1e6 1e8 1e9; 1e4 2e4 with --dry-run)")
    p.add_argument("--dtype", choices=sorted(OUT_BYTES), default="bf16",
                   help="model parameter dtype; bf16/fp16 add the low-precision copy (param_out) "
                        "to the fp32 state, fp32 writes none (default: bf16)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default: 20; 3 dry)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 3; 1 dry)")
    p.add_argument("--layout", choices=["gpt", "shifted"], default="gpt",
                   help="gpt: the GPT-like layer sizes, every fragment on the 16-byte vector grid; shifted: the "
                        "first layer one element longer (and the last one shorter), which moves every later "
                        "fragment off the grid, as one odd-sized parameter does (default: gpt)")
    p.add_argument("--blocks", type=int, nargs="+", default=None,
                   help="Triton elements per program to time (default: the launcher's choice)")
    p.add_argument("--out", default=None, help="CSV file to write (default: none)")
    p.add_argument("--dry-run", action="store_true",
                   help="run on CPU at tiny sizes (Triton under TRITON_INTERPRET=1 if installed)")
    args = p.parse_args(argv)
    if args.sizes is None:
        args.sizes = [1e4, 2e4] if args.dry_run else [1e6, 1e8, 1e9]
    if args.repeats is None:
        args.repeats = 3 if args.dry_run else 20
    if args.warmup is None:
        args.warmup = 1 if args.dry_run else 3
    if args.repeats < 1 or args.warmup < 0:
        p.error(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    if any(not s >= 1 for s in args.sizes):
        p.error(f"--sizes must be >= 1, got {args.sizes}")
    return args


def transformer_numels(n: int) -> List[int]:
    """Layer sizes of a GPT-like model (embedding, then blocks of attention, MLP and
    norms, weights and biases as separate layers) summing to exactly ``n``."""
    h = max(16, 64 * round(math.sqrt(n / 300) / 64))
    block = [3 * h * h, 3 * h, h * h, h, h, h, 4 * h * h, 4 * h, 4 * h * h, h, h, h]
    sizes = [min(n, max(1, min(32000, n // (10 * h))) * h)]
    total = sizes[0]
    while total + sum(block) <= n:
        sizes += block
        total += sum(block)
    if n > total:
        sizes.append(n - total)
    return sizes


def percentiles(xs: List[float]):
    s = sorted(xs)

    def q(f):
        pos = f * (len(s) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)
    return q(0.2), q(0.5), q(0.8)


class Timer:
    """Seconds per call of ``fn``: CUDA events on a GPU (L2 flushed first), wall clock on CPU."""

    def __init__(self, device, repeats: int, warmup: int):
        self.device, self.repeats, self.warmup = device, repeats, warmup
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device=device) if self.cuda else None

    def __call__(self, fn: Callable[[], None]) -> List[float]:
        for _ in range(self.warmup):
            fn()
        if not self.cuda:
            out = []
            for _ in range(self.repeats):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
            return out
        torch.cuda.synchronize()
        events = []
        for _ in range(self.repeats):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return [s.elapsed_time(e) * 1e-3 for s, e in events]


class Report:
    def __init__(self, device_name: str, version: str):
        self.rows: List[Dict] = []
        self.device_name, self.version = device_name, version

    def add(self, impl, size, dtype, metric, values: List[float]):
        p20, p50, p80 = percentiles(values)
        self.rows.append(dict(impl=impl, size=f"{size:.0e}" if size >= 1e4 else str(size), dtype=dtype,
                              metric=metric, p20=f"{p20:.6g}", p50=f"{p50:.6g}", p80=f"{p80:.6g}",
                              device=self.device_name, version=self.version))

    def write_csv(self, path):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["impl", "size", "dtype", "metric", "p20", "p50", "p80", "device",
                                              "version"])
            w.writeheader()
            w.writerows(self.rows)

    def markdown(self) -> str:
        cols = ["time_ms", "GB/s", "pct_of_copy", "ns_per_elem", "vs_adamw"]
        table: Dict = {}
        for r in self.rows:
            if r["metric"] in cols:
                table.setdefault((r["impl"], r["size"], r["dtype"]), {})[r["metric"]] = r["p50"]
        lines = ["| impl | size | dtype | " + " | ".join(f"{c} (p50)" for c in cols) + " |",
                 "|" + "---|" * (3 + len(cols))]
        for (impl, size, dtype), m in table.items():
            lines.append(f"| {impl} | {size} | {dtype} | " + " | ".join(m.get(c, "") for c in cols) + " |")
        checks = [r for r in self.rows if r["impl"] == "check"]
        if checks:
            lines += ["", "| check | size | value |", "|---|---|---|"]
            lines += [f"| {r['metric']} | {r['size']} | {r['p50']} |" for r in checks]
        return "\n".join(lines)


def make_problem(n: int, out_dtype: Optional[torch.dtype], device, shifted: bool = False):
    numels = transformer_numels(n)
    if shifted and len(numels) > 1 and numels[-1] > 1:
        numels[0] += 1
        numels[-1] -= 1
    layout = ShardLayout(tuple((k,) for k in numels), 1)
    table = layout.table(0)
    S = layout.shard_size
    gen = torch.Generator(device=device).manual_seed(0)
    g = torch.randn(S, generator=gen, device=device).mul_(1e-2)
    m = torch.randn(S, generator=gen, device=device).mul_(1e-3)
    w = torch.randn(S, generator=gen, device=device)
    out = torch.zeros(S, dtype=out_dtype, device=device) if out_dtype is not None else None
    L = layout.num_layers
    hp = dict(lr=1e-3, betas=(0.95, 0.98), eps=1e-8, weight_decay=0.01, grad_averaging=False, amsgrad=False,
              reg_inside_moment=True, bias_correction=False, init_zero=False, norm_type=2)
    hyper = F.LayerHyper.from_groups([hp], [0] * L, torch.float32, device)
    stats = torch_impl.partial_stats(g, table)
    zeros = torch.zeros(L, device=device)
    coeffs = F.layer_update(stats[:L], torch.ones(L, dtype=torch.bool, device=device), zeros, zeros, zeros, hyper,
                            norm_type=2)[3]
    return numels, table, g, m, w, out, coeffs


def check(report: Report, n, dtype_name, table, g, m, w, out, coeffs, block) -> bool:
    """Triton vs torch vs float64 on the same inputs; records the errors, returns pass/fail."""
    ok = True
    L = table.num_layers

    def record(metric, value, limit=None):
        nonlocal ok
        report.add("check", n, dtype_name, metric, [value])
        if limit is not None and not value <= limit:
            ok = False
            print(f"CHECK FAILED at size {n:.0e}: {metric} = {value:.3g} > {limit:.3g}", file=sys.stderr)

    st_tri = triton_impl.partial_stats(g, table, block=block).double()
    st_torch = torch_impl.partial_stats(g, table).double()
    sumsq = torch.zeros(L, dtype=torch.float64, device=g.device)
    maxabs = torch.zeros(L, dtype=torch.float64, device=g.device)
    for layer, off, k in zip(table.layers, table.offsets, table.numels):
        frag = g.narrow(0, off, k).double()
        sumsq[layer] += frag.square().sum()
        maxabs[layer] = torch.maximum(maxabs[layer], frag.abs().max())
    rel = lambda a, b: float(((a - b).abs() / b.abs().clamp(min=1e-300)).max())  # noqa: E731
    record("stats_sumsq_rel_err_triton_vs_fp64", rel(st_tri[:L], sumsq), STATS_TOL)
    record("stats_sumsq_rel_err_torch_vs_fp64", rel(st_torch[:L], sumsq))
    record("stats_maxabs_err_triton_vs_fp64", float((st_tri[L:2 * L] - maxabs).abs().max()), 0.0)
    record("stats_nonfinite_slot_triton", float(st_tri[2 * L]), 0.0)

    m0, w0 = m.clone(), w.clone()
    m_t, w_t = m.clone(), w.clone()
    out_t = out.clone() if out is not None else None
    triton_impl.fused_update(g, m, w, out, table, coeffs, block=block)
    torch_impl.fused_update(g, m_t, w_t, out_t, table, coeffs)
    norm = lambda a, b: float(((a - b).abs() / (1 + b.abs())).max())  # noqa: E731
    record("update_m_err_triton_vs_torch", norm(m, m_t), TORCH_TOL)
    record("update_w_err_triton_vs_torch", norm(w, w_t), TORCH_TOL)
    del m_t, w_t
    worst_m = worst_w = worst_cast = 0.0
    c = coeffs.double().tolist()
    for layer, off, k in zip(table.layers, table.offsets, table.numels):
        b1, b3, gscale, d_in, wd_in, step, d_out, wd_out = (c[layer][i] for i in
                                                             (F.B1, F.B3, F.GSCALE, F.D_IN, F.WD_IN, F.STEP,
                                                              F.D_OUT, F.WD_OUT))
        gg, mm, ww = (t.narrow(0, off, k).double() for t in (g, m0, w0))
        mm = b1 * mm + b3 * (gscale * gg / d_in + wd_in * ww)
        ww = ww - step * (mm / d_out + wd_out * ww)
        worst_m = max(worst_m, norm(m.narrow(0, off, k), mm))
        worst_w = max(worst_w, norm(w.narrow(0, off, k), ww))
        if out is not None:
            # Within one ulp of the kernel's own weight: 2**-7 relative for bf16, 2**-10 for fp16
            # (plus fp16's subnormal spacing); the ratio is <= 1 when it holds.
            atol, rtol = (0.0, 2.0 ** -7) if out.dtype == torch.bfloat16 else (2.0 ** -24, 2.0 ** -10)
            mine = w.narrow(0, off, k)
            err = (out.narrow(0, off, k).float() - mine).abs() / (atol + rtol * mine.abs()).clamp(min=1e-38)
            worst_cast = max(worst_cast, float(err.max()))
    record("update_m_err_triton_vs_fp64", worst_m, UPDATE_TOL)
    record("update_w_err_triton_vs_fp64", worst_w, UPDATE_TOL)
    if out is not None:
        record("param_out_ulp_ratio_vs_weight", worst_cast, 1.0)
        record("param_out_max_diff_triton_vs_torch", float((out.float() - out_t.float()).abs().max()))
    m.copy_(m0)
    w.copy_(w0)
    return ok


def bench_size(report: Report, timer: Timer, n: int, args, device, use_triton: bool) -> bool:
    out_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.dtype]
    numels, table, g, m, w, out, coeffs = make_problem(n, out_dtype, device, args.layout == "shifted")
    bytes_per_elem = 20 + OUT_BYTES[args.dtype]
    dtype_name = args.dtype + ("-shifted" if args.layout == "shifted" else "")
    moved = bytes_per_elem * n
    blocks = args.blocks or [None]
    ok = True
    if use_triton:
        ok = check(report, n, dtype_name, table, g, m, w, out, coeffs, blocks[0])

    # Copy bandwidth: a buffer of half the update's bytes, read once and written once.
    src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_t = timer(lambda: dst.copy_(src))
    del src, dst
    copy_bw = 2 * (moved // 2) / percentiles(copy_t)[1] / 1e9
    report.add("copy", n, "uint8", "time_ms", [t * 1e3 for t in copy_t])
    report.add("copy", n, "uint8", "GB/s", [2 * (moved // 2) / t / 1e9 for t in copy_t])

    adam_params = [torch.zeros(k, device=device) for k in numels]
    for p in adam_params:
        p.grad = torch.full_like(p, 1e-3)
    try:
        adam = torch.optim.AdamW(adam_params, lr=1e-3, fused=True)
        adam_name = "adamw_fused"
    except (RuntimeError, ValueError):  # a device without fused AdamW
        adam = torch.optim.AdamW(adam_params, lr=1e-3, foreach=True)
        adam_name = "adamw_foreach"
    adam_t = timer(adam.step)
    adam_p50 = percentiles(adam_t)[1]
    del adam, adam_params
    report.add(adam_name, n, "fp32", "time_ms", [t * 1e3 for t in adam_t])
    report.add(adam_name, n, "fp32", "GB/s", [28 * n / t / 1e9 for t in adam_t])  # read p,g,m,v; write p,m,v
    report.add(adam_name, n, "fp32", "ns_per_elem", [t / n * 1e9 for t in adam_t])

    def update_rows(impl, ts):
        report.add(impl, n, dtype_name, "time_ms", [t * 1e3 for t in ts])
        report.add(impl, n, dtype_name, "GB/s", [moved / t / 1e9 for t in ts])
        report.add(impl, n, dtype_name, "pct_of_copy", [100 * moved / t / 1e9 / copy_bw for t in ts])
        report.add(impl, n, dtype_name, "ns_per_elem", [t / n * 1e9 for t in ts])
        report.add(impl, n, dtype_name, "vs_adamw", [t / adam_p50 for t in ts])

    def stats_rows(impl, ts):
        report.add(impl, n, "fp32", "time_ms", [t * 1e3 for t in ts])
        report.add(impl, n, "fp32", "GB/s", [4 * n / t / 1e9 for t in ts])
        report.add(impl, n, "fp32", "pct_of_copy", [100 * 4 * n / t / 1e9 / copy_bw for t in ts])

    if use_triton:
        for block in blocks:
            tag = "triton_update" if block is None else f"triton_update_b{block}"
            update_rows(tag, timer(lambda: triton_impl.fused_update(g, m, w, out, table, coeffs, block=block)))
            tag = "triton_stats" if block is None else f"triton_stats_b{block}"
            stats_rows(tag, timer(lambda: triton_impl.partial_stats(g, table, block=block)))
    update_rows("torch_update", timer(lambda: torch_impl.fused_update(g, m, w, out, table, coeffs)))
    stats_rows("torch_stats", timer(lambda: torch_impl.partial_stats(g, table)))
    return ok


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        # Triton reads this when the kernels are defined, at the first import below.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    global torch, F, ShardLayout, torch_impl, triton_impl
    import torch
    sys.path.insert(0, ROOT)
    from sharded_novograd import functional as F
    from sharded_novograd.kernels import torch_impl, triton_impl
    from sharded_novograd.layout import ShardLayout

    if args.dry_run:
        device = torch.device("cpu")
        use_triton = triton_impl.TRITON_AVAILABLE and triton_impl._INTERPRETED
        device_name = "cpu (dry run)"
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run on a GPU, or pass --dry-run to check the script on CPU", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        use_triton = triton_impl.TRITON_AVAILABLE
        device_name = torch.cuda.get_device_name(device)
    if not use_triton:
        print("Triton unavailable: timing the torch paths only", file=sys.stderr)
    version = f"torch-{torch.__version__}"
    if triton_impl.TRITON_AVAILABLE:
        import triton
        version += f"+triton-{triton.__version__}"
    report = Report(device_name, version)
    timer = Timer(device, args.repeats, args.warmup)
    ok = True
    for size in args.sizes:
        n = int(size)
        need = PEAK_BYTES_PER_ELEM * n
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
            if need > 0.9 * free:
                print(f"skipping size {n:.0e}: needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free",
                      file=sys.stderr)
                continue
        t0 = time.perf_counter()
        ok &= bench_size(report, timer, n, args, device, use_triton)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"size {n:.0e}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(report.markdown())
    if args.out:
        report.write_csv(args.out)
        print(f"wrote {len(report.rows)} rows to {args.out}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
