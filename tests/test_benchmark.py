"""Smoke test of the training-step benchmark harness (launch/benchmark.py).

Guards against a harness that runs but measures nothing useful: it must start under
torchrun, run every requested variant for the same steps, count the step's
collectives, and find the sharded optimizer at the reference's parameters (up to
fp32 summation order: the two sum the ranks' gradients in a different order, about
1e-7 relative per step, so 1e-5 absolute on O(1) weights after 2 steps is loose).
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "launch", "benchmark.py")


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(args, timeout):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(120)
def test_two_ranks_two_variants(tmp_path):
    """Check that 2 ranks x 2 steps give CSV rows with the right columns, counted
    collectives, and a sharded run that matches the unsharded reference."""
    out = tmp_path / "n2"
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", BENCH,
                 "--out", str(out), "--models", "tiny", "--variants", "ddp_novograd,sharded_zero2",
                 "--warmup", "1", "--steps", "1"], timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["variant", "model", "world_size", "metric", "p20", "p50", "p80", "device",
                                     "torch_version", "note"]
        rows = list(reader)
    got = {(r["variant"], r["metric"]): r for r in rows}
    for variant in ("ddp_novograd", "sharded_zero2"):
        assert (variant, "status") not in got, got[(variant, "status")]["note"]
        for metric in ("step_time_s", "opt_state_bytes", "peak_rss_bytes", "collectives_per_step",
                       "collective_bytes_per_step", "max_abs_param_diff_vs_reference"):
            row = got[(variant, metric)]
            assert row["model"] == "tiny" and row["world_size"] == "2", row
            assert float(row["p50"]) >= 0.0, row
        assert float(got[(variant, "step_time_s")]["p50"]) > 0.0
        assert float(got[(variant, "collectives_per_step")]["p50"]) >= 1
    assert float(got[("ddp_novograd", "max_abs_param_diff_vs_reference")]["p50"]) == 0.0
    assert float(got[("sharded_zero2", "max_abs_param_diff_vs_reference")]["p50"]) < 1e-5
    assert float(got[("sharded_zero2", "step_time_ratio_vs_sharded_zero2")]["p50"]) == 1.0
    # The sharded optimizer keeps about half of the unsharded state on each of 2 ranks.
    ratio = (float(got[("sharded_zero2", "opt_state_bytes")]["p80"])
             / float(got[("ddp_novograd", "opt_state_bytes")]["p80"]))
    assert 0.45 < ratio < 0.6, ratio

    docs = tmp_path / "docs"
    _load_benchmark().main(["report", "--inputs", str(out), "--docs", str(docs)])
    text = (docs / "benchmarks.md").read_text()
    assert "## Training step benchmark (CPU, gloo)" in text and "ShardedNovoGrad zero_stage=2" in text
    assert (docs / "bench_step_time_ratio.png").stat().st_size > 0


@pytest.mark.timeout(60)
def test_overhead_smoke(tmp_path):
    """Check that launch/bench_overhead.py --smoke (world size 1, no torchrun) writes
    every (set-up, metric) row, with times measured and the counters seeing the
    step's collective and its host read (the skip decision)."""
    out = tmp_path / "overhead.csv"
    proc = _run([sys.executable, os.path.join(ROOT, "launch", "bench_overhead.py"), "--smoke", "--out", str(out)],
                timeout=50)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["impl", "L", "world", "metric", "p20", "p50", "p80"]
        got = {(r["impl"], r["metric"]): r for r in reader}
    impls = ("sharded_zero1", "sharded_zero1_lr", "sharded_zero2", "sharded_zero2_lr", "ddp_novograd",
             "ddp_adamw_foreach")
    for impl in impls:
        for metric in ("step_us", "backward_us", "backward_overhead_us_per_param", "collectives_backward",
                       "collectives_step", "host_reads_per_step"):
            row = got[(impl, metric)]
            assert (row["L"], row["world"]) == ("50", "1"), row
            assert float(row["p20"]) <= float(row["p50"]) <= float(row["p80"]), row
        assert float(got[(impl, "step_us")]["p50"]) > 0 and float(got[(impl, "backward_us")]["p50"]) > 0
        assert ((impl, "hook_us_per_param") in got) == impl.startswith("sharded")
    for impl in impls[:4]:
        # The step's one statistics collective, and its decision read on the host.
        assert float(got[(impl, "collectives_step")]["p50"]) >= 1
        assert float(got[(impl, "host_reads_per_step")]["p50"]) >= 1
        assert float(got[(impl, "hook_us_per_param")]["p50"]) > 0
    # ZeRO-2 issues its bucket reduce during backward; ZeRO-1 and DDP's C++ reducer show none.
    assert float(got[("sharded_zero2", "collectives_backward")]["p50"]) >= 1
    assert float(got[("sharded_zero1", "collectives_backward")]["p50"]) == 0
    assert "| set-up | L | world |" in proc.stdout
