#!/usr/bin/env python
"""Everything that needs a GPU, in one command, with one results file.

    bash launch/gpu_check.sh                        # on a machine with one CUDA GPU
    bash launch/gpu_check.sh --out /tmp/gpu.json    # choose where the results go
    bash launch/gpu_check.sh --dry-run              # on CPU: the same steps, small, to check the plumbing
    python launch/gpu_check.py --list               # the steps and their time limits

Steps, each in its own process with its own time limit (a hang costs that step, not
the run), inside one overall budget (``--budget``, default 450 s):

1. ``env``: GPU, driver, torch, Triton, compute-sanitizer versions.
2. ``kernel-tests``: tests/test_kernels.py (compiled on CUDA: aligned and unaligned
   tables, a layout shifted by one odd layer, fp32/fp64 state, bf16/fp16/fp32 copies,
   the 64-bit shard) and tests/test_layout.py; ``codegen-tests``: tests/test_codegen.py
   with this machine's Triton (informational: CI runs it on CPU).
3. ``memcheck``: both kernels on tables whose fragments end at the shard's last element,
   start and end off the vector grid, and shards whose base address is not 16-byte
   aligned, under ``compute-sanitizer --tool memcheck`` (misaligned or out-of-bounds
   accesses fail the step), with torch's caching allocator off so that every tensor is
   its own allocation and a read past its end is out of bounds.
4. ``zero2-nccl``: ShardedNovoGrad (ZeRO-1 and ZeRO-2; fp32, fp64, and bf16 with fp32
   masters; real backward) at world size 1 on a group made by ``init_process_group()`` without a backend
   (``cpu:gloo,cuda:nccl``) against the single-process NovoGrad; the collective method
   must be ``reduce_scatter``.
5. ``zero2-gloo-2ranks``: the same against the reference on 2 ranks sharing the GPU
   over gloo (NCCL refuses two ranks on one GPU): real fragments straddling ranks, on
   CUDA kernels (informational: it depends on gloo's CUDA support).
6. ``train-sharded`` / ``train-novograd``: 50 steps of launch/train.py (the GPT-2-small
   byte model of configs/gpt_small_gpu.toml in fp32) with sharded and unsharded
   NovoGrad; ``train-compare`` requires the same losses and final parameters.
7. ``bench-aligned`` / ``bench-shifted``: launch/bench_kernels.py at 1e8 elements (GB/s
   of the update against copy bandwidth, torch._foreach and fused AdamW; block sweep),
   on the GPT-like layout and on it shifted off the vector grid by one odd layer.
8. ``initcheck``: the kernels of step 3 with the padding left uninitialised, under
   ``compute-sanitizer --tool initcheck``: the kernels never read it.

The results file is JSON: one object per step (status ``pass``, ``fail``, ``timeout``
or ``skipped``, seconds, the numbers it measured, the tail of its output), rewritten
after every step. The exit status is 0 only if every required step that ran passed.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THIS = os.path.abspath(__file__)
TAIL = 6000  # characters of each step's output kept in the results file
TRAIN_STEPS = 50
# Losses of the sharded and unsharded runs: the same forward and backward, NovoGrad's
# per-layer norms summed in another order (a few fp32 ulps of v), amplified by 50 steps
# of training at most to this relative difference.
LOSS_RTOL = 1e-4
# Final parameters of the two runs: the same, over 1 + |value|.
PARAM_TOL = 1e-4


# --------------------------------------------------------------------------- steps run by the driver
def _python() -> List[str]:
    return [sys.executable]


def find_sanitizer() -> Optional[str]:
    """compute-sanitizer on PATH, under CUDA_HOME, or in the usual CUDA install folders."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"]
    roots += sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + sorted(glob.glob("/opt/nvidia/*"))
    for root in filter(None, roots):
        for rel in ("bin/compute-sanitizer", "compute-sanitizer/compute-sanitizer",
                    "extras/compute-sanitizer/compute-sanitizer"):
            path = os.path.join(root, rel)
            if os.access(path, os.X_OK):
                return path
    return None


def plan(args) -> List[Dict]:
    """The steps, in order: name, command, time limit (s), extra environment, parser."""
    dry = args.dry_run
    work = args.workdir
    py = _python()
    sanitizer = None if dry else find_sanitizer()
    steps = [dict(name="env", cmd=py + [THIS, "--step", "env"], timeout=60)]
    pytest = py + ["-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider"]
    k = ["-k", "shifted_by_odd_layer or aligned or device or vector or int32"] if dry else []
    steps.append(dict(name="kernel-tests", cmd=pytest + ["tests/test_kernels.py", "tests/test_layout.py", *k],
                      timeout=300, parse="pytest"))
    # CI runs these on CPU with its own Triton; here they read the PTX of this machine's Triton.
    steps.append(dict(name="codegen-tests", cmd=pytest + ["tests/test_codegen.py"], timeout=120, parse="pytest",
                      required=False))
    smoke = py + [THIS, "--step", "kernels-smoke"]
    no_cache = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    if sanitizer:
        san = [sanitizer, "--error-exitcode", "99", "--print-limit", "30"]
        # Guard bytes after every allocation: a read just past a tensor's end is caught
        # even where the allocation's rounding would leave it inside the same page.
        steps.append(dict(name="memcheck", cmd=san + ["--tool", "memcheck", "--padding", "256"] + smoke,
                          timeout=240, env=no_cache, parse="sanitizer"))
    else:
        steps.append(dict(name="memcheck", cmd=smoke, timeout=120, env=no_cache, parse="sanitizer",
                          note="compute-sanitizer not found" + (" (dry run)" if dry else "") +
                               ": the kernels ran without it"))
    steps.append(dict(name="zero2-nccl", cmd=py + [THIS, "--step", "zero2"], timeout=180, parse="json"))
    # Informational: whether gloo carries these collectives on CUDA tensors is torch's business.
    steps.append(dict(name="zero2-gloo-2ranks", cmd=py + [THIS, "--step", "zero2-2ranks"], timeout=180,
                      parse="json", required=False))
    for opt in ("sharded-novograd", "novograd"):
        out = os.path.join(work, f"train-{opt}")
        if dry:
            conf = ["--config", "configs/tiny.toml", "--steps", "5"]
        else:
            conf = ["--config", "configs/gpt_small_gpu.toml", "--steps", str(TRAIN_STEPS), "--max-bytes", "8000000",
                    "--eval-windows", "64"]
        cmd = py + [THIS, "--step", "train", "--", *conf, "--dtype", "fp32", "--optimizer", opt, "--out", out,
                    "--checkpoint-dir", "", "--resume", "false", "--log-every", "1", "--progress", "false",
                    "--seed", "0", "--save-model", os.path.join(out, "model.pt")]
        steps.append(dict(name="train-" + opt.split("-")[0], cmd=cmd, timeout=240, metrics=out))
    steps.append(dict(name="train-compare", internal="train_compare", timeout=10))
    bench = py + ["launch/bench_kernels.py"]
    if dry:
        bench += ["--dry-run", "--sizes", "2e4"]
    else:
        bench += ["--sizes", "1e8"]
    steps.append(dict(name="bench-aligned", cmd=bench + ["--dtype", "bf16", "--out", os.path.join(work, "bench.csv")]
                      + ([] if dry else ["--blocks", "4096", "1024", "2048", "8192"]), timeout=200,
                      parse="bench", csv=os.path.join(work, "bench.csv")))
    steps.append(dict(name="bench-shifted", cmd=bench + ["--dtype", "bf16", "--layout", "shifted", "--out",
                                                         os.path.join(work, "bench_shifted.csv")],
                      timeout=120, parse="bench", csv=os.path.join(work, "bench_shifted.csv")))
    if sanitizer:
        steps.append(dict(name="initcheck", cmd=san + ["--tool", "initcheck"] + smoke + ["--uninitialized-padding"],
                          timeout=240, env=no_cache, parse="sanitizer"))
    else:
        steps.append(dict(name="initcheck", skip="compute-sanitizer not found" + (" (dry run)" if dry else "")))
    return steps


def _run(cmd: List[str], timeout: float, env: Dict[str, str]):
    """Run ``cmd`` in its own process group; on timeout kill the whole group."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out, False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out, True


def _parse_pytest(out: str) -> Dict:
    import re
    last = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", line)]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|errors?|skipped)", last[-1])} if last else {}
    return {"counts": counts, "failed": [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))],
            "skipped": [line for line in out.splitlines() if line.startswith("SKIPPED")]}


def _parse_json_line(out: str) -> Dict:
    for line in reversed(out.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {}


def _parse_sanitizer(out: str) -> Dict:
    import re
    summary = re.findall(r"ERROR SUMMARY: (\d+) error", out)
    res = _parse_json_line(out)
    res["sanitizer_errors"] = int(summary[-1]) if summary else None
    res["sanitizer_reports"] = [line for line in out.splitlines() if "Invalid" in line or "Misaligned" in line
                                or "Uninitialized" in line][:30]
    return res


def _parse_bench(path: str) -> Dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = list(csv.DictReader(f))
    table = {}
    for r in rows:
        table.setdefault(f"{r['impl']}|{r['size']}|{r['dtype']}", {})[r["metric"]] = float(r["p50"])
    device = rows[0]["device"] if rows else None
    return {"p50": table, "device": device}


def _read_metrics(path: str) -> List[Dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_compare(results: Dict[str, Dict]) -> Dict:
    runs = {}
    for name in ("train-sharded", "train-novograd"):
        r = results.get(name)
        if not r or not r.get("metrics_path") or not os.path.exists(r["metrics_path"]):
            return {"status": "skipped", "why": f"{name} wrote no metrics"}
        runs[name] = {row["step"]: row for row in _read_metrics(r["metrics_path"])}
    a, b = runs["train-sharded"], runs["train-novograd"]
    steps = sorted(set(a) & set(b))
    if not steps:
        return {"status": "fail", "why": "no common logged step"}
    worst = max(abs(a[s]["train_loss"] - b[s]["train_loss"]) / abs(b[s]["train_loss"]) for s in steps)
    summary = {"steps_compared": len(steps), "max_rel_loss_diff": worst, "rtol": LOSS_RTOL,
               "final_loss": {"sharded": a[steps[-1]]["train_loss"], "novograd": b[steps[-1]]["train_loss"]},
               "step_time_s_median": {k: sorted(r[s]["step_time_s"] for s in steps)[len(steps) // 2]
                                      for k, r in (("sharded", a), ("novograd", b))},
               "opt_state_bytes": {"sharded": a[steps[-1]].get("opt_state_bytes"),
                                   "novograd": b[steps[-1]].get("opt_state_bytes")}}
    ok = worst <= LOSS_RTOL
    paths = [os.path.join(os.path.dirname(results[n]["metrics_path"]), "model.pt")
             for n in ("train-sharded", "train-novograd")]
    if all(os.path.exists(p) for p in paths):
        import torch
        a_sd, b_sd = (torch.load(p, map_location="cpu", weights_only=True) for p in paths)
        if set(a_sd) != set(b_sd):
            summary["param_diff"] = "different parameter names"
            ok = False
        else:
            diff = max(float(((a_sd[k].double() - b_sd[k].double()).abs() / (1 + b_sd[k].double().abs())).max())
                       for k in a_sd)
            summary.update(max_param_diff=diff, param_tol=PARAM_TOL)
            ok = ok and diff <= PARAM_TOL
    summary["status"] = "pass" if ok else "fail"
    return summary


def drive(args) -> int:
    steps = plan(args)
    if args.list:
        for s in steps:
            what = s.get("skip") or (" ".join(s["cmd"]) if "cmd" in s else s.get("internal"))
            print(f"{s['name']:<20} {s.get('timeout', 0):>4} s  {what}")
        return 0
    if args.only:
        unknown = set(args.only) - {s["name"] for s in steps}
        if unknown:
            print(f"unknown step(s) {sorted(unknown)}; see --list", file=sys.stderr)
            return 2
        steps = [s for s in steps if s["name"] in args.only]
    os.makedirs(args.workdir, exist_ok=True)
    t0 = time.perf_counter()
    report = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "dry_run": args.dry_run, "budget_s": args.budget, "steps": []}
    results: Dict[str, Dict] = {}
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    if args.dry_run:
        env.setdefault("OMP_NUM_THREADS", "1")

    def save():
        report["total_s"] = round(time.perf_counter() - t0, 1)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, args.out)

    for s in steps:
        left = args.budget - (time.perf_counter() - t0)
        rec = {"name": s["name"]}
        if "skip" in s:
            rec.update(status="skipped", why=s["skip"])
        elif "internal" in s:
            rec.update(train_compare(results))
        elif left < 15:
            rec.update(status="skipped", why=f"out of time ({args.budget} s budget)")
        else:
            limit = min(s["timeout"], left)
            step_env = dict(env, **s.get("env", {}))
            start = time.perf_counter()
            print(f"[gpu_check] {s['name']} (limit {limit:.0f} s) ...", file=sys.stderr, flush=True)
            rc, out, timed_out = _run(s["cmd"], limit, step_env)
            rec.update(cmd=" ".join(s["cmd"]), seconds=round(time.perf_counter() - start, 1), rc=rc)
            if s.get("note"):
                rec["note"] = s["note"]
            parse = s.get("parse")
            try:
                if parse == "pytest":
                    rec["summary"] = _parse_pytest(out)
                elif parse == "json":
                    rec["summary"] = _parse_json_line(out)
                elif parse == "sanitizer":
                    rec["summary"] = _parse_sanitizer(out)
                elif parse == "bench":
                    rec["summary"] = _parse_bench(s["csv"])
            except Exception as e:  # a parser must not lose the step's output
                rec["parse_error"] = f"{type(e).__name__}: {e}"
            if "metrics" in s:
                rec["metrics_path"] = os.path.join(s["metrics"], "metrics.jsonl")
            rec["status"] = "timeout" if timed_out else ("pass" if rc == 0 else "fail")
            if not timed_out and rc == 0 and rec.get("summary", {}).get("ok") is False:
                rec["status"] = "fail"
            rec["output_tail"] = out[-TAIL:]
        if s.get("required") is False:
            rec["required"] = False
        results[s["name"]] = rec
        report["steps"].append(rec)
        print(f"[gpu_check] {s['name']}: {rec['status']}" + (f" ({rec.get('seconds')} s)" if "seconds" in rec else "")
              + (f" - {rec['why']}" if "why" in rec else ""), file=sys.stderr, flush=True)
        save()
    report["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    ran = [r for r in report["steps"] if r["status"] != "skipped" and r.get("required", True)]
    report["ok"] = bool(ran) and all(r["status"] == "pass" for r in ran)
    save()
    width = max(len(r["name"]) for r in report["steps"])
    for r in report["steps"]:
        extra = r.get("why", r.get("note", "")) + ("" if r.get("required", True) else " (informational)")
        print(f"{r['name']:<{width}}  {r['status']:<8} {r.get('seconds', ''):>6}  {extra}")
    print(f"results: {os.path.abspath(args.out)}")
    return 0 if report["ok"] else 1


# --------------------------------------------------------------------------- steps run in child processes
def _device():
    import torch
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before sharded_novograd defines its kernels
    return torch.device("cpu")


def step_env(_argv) -> int:
    import platform

    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2 ** 30, 1),
                    gpus=torch.cuda.device_count(), nccl=str(torch.cuda.nccl.version()))
    for tool, cmd in (("nvidia_smi", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                      "--format=csv,noheader"]),
                      ("compute_sanitizer", [find_sanitizer() or "compute-sanitizer", "--version"])):
        try:
            info[tool] = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()[-300:]
        except (OSError, subprocess.TimeoutExpired) as e:
            info[tool] = f"unavailable: {e}"
    for mod in ("matplotlib", "tqdm", "deepspeed", "mpi4py"):
        import importlib.util
        info[mod] = importlib.util.find_spec(mod) is not None
    print("RESULT " + json.dumps(info))
    return 0


def step_kernels_smoke(argv) -> int:
    """Both kernels on tables that end at the shard's last element and leave the vector grid."""
    p = argparse.ArgumentParser()
    p.add_argument("--uninitialized-padding", action="store_true",
                   help="leave every element outside the fragments uninitialised (for initcheck)")
    args = p.parse_args(argv)
    device = _device()
    import torch

    sys.path.insert(0, ROOT)
    from sharded_novograd import functional as F
    from sharded_novograd.kernels import triton_impl
    from sharded_novograd.layout import FragmentTable, ShardLayout

    if not triton_impl.TRITON_AVAILABLE:
        print("Triton is not installed", file=sys.stderr)
        return 1
    tables = {
        # the last fragment ends at the last element of the allocation, off the grid
        "odd_end": FragmentTable([0, 1, 0], [0, 5, 70], [5, 60, 33], 103, 2),
        "single_elements": FragmentTable([0, 1, 0, 1], [0, 1, 6, 10], [1, 1, 1, 1], 11, 2),
        "shifted_layout": ShardLayout(((50257,), (64, 70), (1000,), (3,), (129,)), 1, 1).table(0),
        "aligned_layout": ShardLayout(((4096,), (64, 64), (256,)), 1).table(0),
        "long_ragged": FragmentTable([0, 1], [3, 9001], [8998, 4097], 13098, 2),
    }
    cases = [("fp32", None), ("fp32", "bf16"), ("fp32", "fp16"), ("fp64", None), ("fp64", "fp32")]
    dtypes = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
    sentinel = -7680.0  # exact in bf16 and fp16 too
    worst = {"update": 0.0, "stats": 0.0}
    checks = 0
    ok = True

    def make(S, dtype, offset, table, values):
        # offset 1: the shard is a view one element into its allocation (not 16-byte aligned)
        base = torch.empty(S + offset, dtype=dtype, device=device)
        t = base.narrow(0, offset, S)
        if not args.uninitialized_padding:
            t.fill_(sentinel)
            if offset:
                base[:offset].fill_(sentinel)
        for off, n in zip(table.offsets, table.numels):
            t.narrow(0, off, n).copy_(values.narrow(0, off, n).to(dtype))
        return t

    def frag(t, table):
        return torch.cat([t.narrow(0, o, n).double().cpu() for o, n in zip(table.offsets, table.numels)])

    for tname, table in tables.items():
        S, L = table.shard_size, table.num_layers
        gen = torch.Generator().manual_seed(S)
        vals = {k: torch.randn(S, generator=gen, dtype=torch.float64) for k in ("g", "m", "w")}
        coeffs = F.identity_coeffs(L, torch.float64)
        for col, v in ((F.B1, 0.9), (F.B3, 1.0), (F.GSCALE, 1.0), (F.D_IN, 1.5), (F.WD_IN, 0.01), (F.STEP, 0.1),
                       (F.D_OUT, 1.0), (F.WD_OUT, 0.001)):
            coeffs[:, col] = v
        for offset in (0, 1):
            for gname in ("fp32", "bf16", "fp16", "fp64"):
                g = make(S, dtypes[gname], offset, table, vals["g"])
                got = triton_impl.partial_stats(g, table)
                want = torch.zeros(L, dtype=torch.float64)
                gf = frag(g, table)
                pos = 0
                for layer, n in zip(table.layers, table.numels):
                    want[layer] += gf[pos:pos + n].square().sum()
                    pos += n
                err = float(((got[:L].double().cpu() - want).abs() / want.clamp(min=1e-30)).max())
                worst["stats"] = max(worst["stats"], err)
                checks += 1
                if not err <= 1e-4 or float(got[2 * L]) != 0:
                    ok = False
                    print(f"FAIL stats {tname} {gname} offset {offset}: rel err {err:.3g}, flag {float(got[2 * L])}")
            for state, out in cases:
                sd = dtypes[state]
                g, m, w = (make(S, sd, offset, table, vals[k]) for k in ("g", "m", "w"))
                po = make(S, dtypes[out], offset, table, torch.zeros(S, dtype=torch.float64)) if out else None
                m0, w0 = frag(m, table), frag(w, table)
                triton_impl.fused_update(g, m, w, po, table, coeffs.to(device=device, dtype=sd))
                gf = frag(g, table)
                c = dict(zip(F.COEFF_COLUMNS, coeffs[0].tolist()))
                m_ref = c["b1"] * m0 + c["b3"] * (c["gscale"] * gf / c["d_in"] + c["wd_in"] * w0)
                w_ref = w0 - c["step"] * (m_ref / c["d_out"] + c["wd_out"] * w0)
                err = max(float(((frag(m, table) - m_ref).abs() / (1 + m_ref.abs())).max()),
                          float(((frag(w, table) - w_ref).abs() / (1 + w_ref.abs())).max()))
                worst["update"] = max(worst["update"], err)
                checks += 1
                bad = not err <= (1e-5 if state == "fp32" else 1e-12)
                if po is not None:
                    cast = (frag(po, table) - frag(w, table).to(dtypes[out]).double()).abs()
                    bad |= not bool((cast <= 2.0 ** -7 * frag(w, table).abs() + 2.0 ** -24).all())
                if not args.uninitialized_padding:
                    inside = torch.zeros(S, dtype=torch.bool)
                    for o, n in zip(table.offsets, table.numels):
                        inside[o:o + n] = True
                    for t in (m, w) + ((po,) if po is not None else ()):
                        if not bool((t.cpu()[~inside].double() == sentinel).all()):
                            bad = True
                            print(f"FAIL {tname} {state}/{out} offset {offset}: padding written")
                if bad:
                    ok = False
                    print(f"FAIL update {tname} {state}/{out} offset {offset}: err {err:.3g}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    print("RESULT " + json.dumps({"ok": ok, "checks": checks, "worst_rel_err": worst, "device": str(device),
                                  "uninitialized_padding": args.uninitialized_padding}))
    return 0 if ok else 1


def _zero2_cases(device):
    import torch
    f32, f64, bf16 = torch.float32, torch.float64, torch.bfloat16
    # (dtype, zero_stage, kwargs, (atol, rtol)): fp32 differs from the reference only by the
    # summation order of the per-layer sums of squares (a few ulps of v, passed on
    # unamplified by the division by sqrt(v)); fp64 is 2**29 times finer. bf16 parameters
    # (fp32 master weights, written back through the kernels' param_out) against an fp32
    # NovoGrad fed the same bf16 gradients: rtol is the rounding of the master to bf16
    # (at most 2**-8 of the value); atol allows the averaged gradient one bf16 rounding
    # (2**-8 of it, if the reduction runs in bf16), which NovoGrad's normalised update
    # passes on as at most lr * 2**-8 per step: 6 steps * 0.01 * 2**-8 = 2.3e-4.
    return [(bf16, 2, dict(lr=0.01, weight_decay=0.01), (3e-4, 2.0 ** -7)),
            (f32, 2, dict(lr=0.01, weight_decay=0.01), (1e-6, 1e-5)),
            (f32, 1, dict(lr=0.01, weight_decay=0.01), (1e-6, 1e-5)),
            (f32, 2, dict(lr=0.01, max_grad_norm=0.5, amsgrad=True), (1e-6, 1e-5)),
            (f64, 2, dict(lr=0.01, weight_decay=0.01, reg_inside_moment=False, bias_correction=True),
             (1e-13, 1e-12))]


SHAPES_GPU = [(50257,), (64, 70), (3,), (), (1000, 33), (129,), (7, 5, 3), (4096,)]


def _zero2_compare(rank, world, device) -> Dict:
    """ShardedNovoGrad with real backward (rank-dependent losses) against NovoGrad on the mean."""
    import torch

    from sharded_novograd import NovoGrad, ShardedNovoGrad, kernels
    out = {"cases": []}
    worst_all = 0.0
    for dtype, stage, kw, (atol, rtol) in _zero2_cases(device):
        gen = torch.Generator().manual_seed(0)
        init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES_GPU]
        weights = [[torch.randn(s, generator=torch.Generator().manual_seed(100 * r + i), dtype=torch.float64)
                    .to(dtype).to(device) for i, s in enumerate(SHAPES_GPU)] for r in range(world)]
        ref_dtype = torch.promote_types(dtype, torch.float32)  # the reference keeps no master copy
        mine = [torch.nn.Parameter(x.to(dtype).to(device)) for x in init]
        ref = [torch.nn.Parameter(x.to(dtype).to(ref_dtype).to(device)) for x in init]
        skw = dict(kw)
        max_norm = skw.pop("max_grad_norm", None)
        opt = ShardedNovoGrad(mine, zero_stage=stage, max_grad_norm=max_norm, **skw)
        ref_opt = NovoGrad(ref, **skw)
        for step in range(6):
            scale = 10.0 ** (step % 3 - 1)
            loss = sum((torch.sin(p) * c).sum() for p, c in zip(mine, weights[rank])) * scale
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            # The mean over ranks of autograd's d/dp sum(sin(p) * c_r) * scale, rounded in the
            # parameters' dtype as autograd rounds it: (scale * c_r) * cos(p).
            gs = torch.tensor(scale, dtype=dtype, device=device)
            for p, *cs in zip(ref, *weights):
                cos = torch.cos(p.detach().to(dtype))
                p.grad = sum(((gs * c) * cos).to(ref_dtype) for c in cs) / world
            if max_norm is not None:
                torch.nn.utils.clip_grad_norm_(ref, max_norm)
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
        worst = max(float(((a.detach() - b.detach()).double().abs() / (atol + rtol * b.detach().double().abs())).max())
                    for a, b in zip(mine, ref))
        worst_all = max(worst_all, worst)
        out["cases"].append({"dtype": str(dtype), "zero_stage": stage, "kwargs": kw, "close_ratio": worst,
                             "method": opt.method,
                             "kernels": kernels.backend(torch.zeros(1, dtype=ref_dtype, device=device), None)})
    out["worst_close_ratio"] = worst_all
    out["ok"] = worst_all <= 1.0
    return out


def step_zero2(_argv) -> int:
    device = _device()
    import torch
    import torch.distributed as dist
    with tempfile.TemporaryDirectory() as tmp:
        # No backend: torch makes "cpu:gloo,cuda:nccl" on a CUDA machine, and reports
        # get_backend() as "undefined"; pick_method must still choose NCCL's method.
        dist.init_process_group(init_method=f"file://{tmp}/rdzv", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60))
        try:
            res = {"backend_config": dist.get_backend_config(), "get_backend": dist.get_backend()}
            res.update(_zero2_compare(0, 1, device))
            if device.type == "cuda":
                res["ok"] = res["ok"] and all(c["method"] == "reduce_scatter" for c in res["cases"])
            torch.cuda.synchronize() if device.type == "cuda" else None
        finally:
            dist.destroy_process_group()
    print("RESULT " + json.dumps(res))
    return 0 if res["ok"] else 1


def _two_rank_child(rank, world, init, q):
    import torch
    import torch.distributed as dist
    try:
        device = _device()
        backend = "cpu:gloo,cuda:gloo" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        res = _zero2_compare(rank, world, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        dist.destroy_process_group()
        q.put((rank, res))
    except BaseException as e:  # report, do not hang the parent
        import traceback
        q.put((rank, {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}))


def step_zero2_two_ranks(_argv) -> int:
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_two_rank_child, args=(r, 2, os.path.join(tmp, "rdzv"), q)) for r in range(2)]
        for p in procs:
            p.start()
        got = {}
        deadline = time.time() + 150
        while len(got) < 2 and time.time() < deadline:
            try:
                r, res = q.get(timeout=5)
                got[r] = res
            except Exception:
                if any(p.exitcode not in (None, 0) for p in procs) and q.empty():
                    break
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    res = {"ranks": got, "ok": len(got) == 2 and all(v.get("ok") for v in got.values())}
    print("RESULT " + json.dumps(res))
    return 0 if res["ok"] else 1


def step_train(argv) -> int:
    """launch/train.py with these arguments; without matplotlib the final plot is skipped."""
    import importlib.util
    sys.path.insert(0, ROOT)
    if importlib.util.find_spec("matplotlib") is None:
        import launch.plot
        launch.plot.plot_runs = lambda *a, **k: print("plot skipped: matplotlib is not installed", file=sys.stderr)
    from launch import train
    return train.main(argv)


CHILD_STEPS = {"env": step_env, "kernels-smoke": step_kernels_smoke, "zero2": step_zero2,
               "zero2-2ranks": step_zero2_two_ranks, "train": step_train}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--step"]:
        if len(argv) < 2 or argv[1] not in CHILD_STEPS:
            print(f"--step takes one of {sorted(CHILD_STEPS)}", file=sys.stderr)
            return 2
        rest = argv[2:]
        if rest[:1] == ["--"]:
            rest = rest[1:]
        return CHILD_STEPS[argv[1]](rest)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT", "gpu_check.json"),
                   help="the results file, JSON (default: $GPU_CHECK_OUT or gpu_check.json)")
    p.add_argument("--workdir", default=None,
                   help="folder for the runs' metrics and CSVs (default: a new temporary folder)")
    p.add_argument("--budget", type=float, default=450.0,
                   help="seconds for all steps together; a step that would start later is skipped (default: 450)")
    p.add_argument("--only", nargs="+", default=None, metavar="STEP", help="run only these steps (see --list)")
    p.add_argument("--list", action="store_true", help="print the steps and their time limits, run nothing")
    p.add_argument("--dry-run", action="store_true",
                   help="on CPU: every step at a small size (kernels under TRITON_INTERPRET=1, gloo, tiny model)")
    args = p.parse_args(argv)
    if args.workdir is None:
        args.workdir = os.path.join(tempfile.gettempdir(), "gpu_check-WORKDIR") if args.list else \
            tempfile.mkdtemp(prefix="gpu_check-")
    args.out = os.path.abspath(args.out)
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
