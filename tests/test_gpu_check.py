"""launch/gpu_check.py without a GPU: the plan, the comparison of the two training runs,
and the kernel smoke test (the one compute-sanitizer runs) under Triton's interpreter.
The whole script runs on CPU with ``--dry-run`` (about two minutes, not run here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from launch import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["env", "kernel-tests", "codegen-tests", "memcheck", "zero2-nccl", "zero2-gloo-2ranks", "train-sharded",
         "train-novograd", "train-compare", "bench-aligned", "bench-shifted", "initcheck"]


def _run(*args, timeout=120, **env):
    full = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "gpu_check.py"), *args], cwd=ROOT,
                          env=full, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("dry", [False, True])
def test_plan_lists_every_step_with_a_time_limit(dry, capsys):
    """Check that --list names every step, each with its own time limit, and runs nothing."""
    assert gpu_check.main(["--list"] + (["--dry-run"] if dry else [])) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == STEPS
    for line in lines:
        name, limit = line.split()[:2]
        assert int(limit) > 0 or name == "initcheck", line
    if not dry:
        assert "--sizes 1e8" in "\n".join(lines) and f"--steps {gpu_check.TRAIN_STEPS}" in "\n".join(lines)


def _metrics(path, losses):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for i, loss in enumerate(losses):
            f.write(json.dumps({"step": i + 1, "train_loss": loss, "step_time_s": 0.1, "opt_state_bytes": [8]}) + "\n")


def test_train_compare(tmp_path):
    """Check that equal losses pass, a relative difference above the tolerance fails, and a
    run without metrics makes the comparison skip instead of pass."""
    a, b = str(tmp_path / "a" / "metrics.jsonl"), str(tmp_path / "b" / "metrics.jsonl")
    results = {"train-sharded": {"metrics_path": a}, "train-novograd": {"metrics_path": b}}
    _metrics(a, [5.0, 4.0, 3.0])
    _metrics(b, [5.0, 4.0, 3.0])
    assert gpu_check.train_compare(results)["status"] == "pass"
    _metrics(a, [5.0, 4.0, 3.0 * (1 + 3 * gpu_check.LOSS_RTOL)])
    out = gpu_check.train_compare(results)
    assert out["status"] == "fail" and out["max_rel_loss_diff"] > gpu_check.LOSS_RTOL
    os.remove(b)
    assert gpu_check.train_compare(results)["status"] == "skipped"


def test_kernel_smoke_passes_under_the_interpreter():
    """Check that the smoke test compute-sanitizer runs passes on CPU (Triton's interpreter),
    padding initialised and not, and reports what it checked."""
    pytest.importorskip("triton")
    for extra in ([], ["--uninitialized-padding"]):
        proc = _run("--step", "kernels-smoke", *extra, TRITON_INTERPRET="1")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        res = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
        assert res["ok"] and res["checks"] == 90 and res["worst_rel_err"]["update"] < 1e-5, res
