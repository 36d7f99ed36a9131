"""ShardedNovoGrad inside HF Trainer, Accelerate, Lightning, DDP loops and GradScaler.

The bugs these guard against were all silent: Trainer and Accelerate move the model
after the optimizer exists (new storage: the step updated a private copy and the
weights never changed), DDP averages gradients itself (ZeRO-2's hooks freed `.grad`
under it; ZeRO-1 reduced every gradient twice), framework clipping on freed `.grad`
had no effect, GradScaler's inf decision was per rank.

One torchrun world of 2 CPU gloo ranks runs every scenario of tests/scripts/stacks.py
(start-up dominates); each test reads one scenario's facts. The reference of a
framework scenario is the same framework run with the single-process NovoGrad: under
DDP (which every one of these stacks uses at world size 2) it is fed exactly the
rank-averaged gradients, clipped as the framework clips.

Tolerances. float64 runs differ from the reference only by summation order (per
fragment, then across ranks): ~1e-16 per step, so 1e-12 after 4 steps. The fp32
GradScaler run with bf16 autocast differs by the same effect at fp32 precision: 2e-5.
A power-of-two loss scale multiplies fp32 gradients exactly, so the scaled run equals
the plain one bit for bit. fp16 parameters: the scaled gradients underflow less than
the plain ones, a few fp16 ulps (2**-10) after 4 steps: 1e-2 of each tensor's scale.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

for mod in ("transformers", "accelerate", "lightning"):
    pytest.importorskip(mod, reason=f"{mod} is installed by launch/setup.sh (extra 'stacks')")

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
TIMEOUT = 420.0
FP64 = 1e-12


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("stacks")
    log = out / "log.txt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "tests/scripts/stacks.py", str(out)]
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        try:
            p.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            pytest.fail(f"the stacks world did not finish in {TIMEOUT} s:\n{log.read_text()[-6000:]}")
    if p.returncode != 0:
        pytest.fail(f"the stacks world exited with {p.returncode}:\n{log.read_text()[-6000:]}")
    return out


def scenario(results, name):
    facts = []
    for rank in range(2):
        path = results / f"{name}.rank{rank}.json"
        if not path.exists():
            pytest.fail(f"scenario {name} wrote nothing on rank {rank}")
        res = json.loads(path.read_text())
        if "error" in res:
            pytest.fail(f"scenario {name} failed on rank {rank}:\n{res['error']}")
        facts.append(res["ok"])
    return facts


FRAMEWORKS = ["trainer_z1", "trainer_z2", "accelerate_z1", "accelerate_z2", "fabric_z2", "lightning_z1",
              "lightning_z2", "ddp_z1", "ddp_z2"]


@pytest.mark.parametrize("name", FRAMEWORKS)
def test_framework_is_exact_and_reduces_once(results, name):
    """Check that inside the framework (which moves the model and wraps it in DDP, and
    clips at 1.0) the final weights equal the single-process NovoGrad's, that training
    moved them, ranks agree, GPT-2's tied embedding stays tied, and the optimizer sends
    no gradient collective of its own (DDP reduced each gradient once): one statistics
    collective and one parameter gather per step."""
    for f in scenario(results, name):
        assert f["err"] <= FP64, f
        assert f["moved"] > 1e-3, f
        assert f["ranks_agree"] and f["tied"], f
        assert f["grads_averaged"] is True, f
        assert f["calls"] == {"gradient": 0, "stats": STEPS, "gather": STEPS}, f


@pytest.mark.parametrize("name", ["moved_z1", "moved_z2"])
def test_moved_model_is_readopted(results, name):
    """Check that model.to(torch.device("cpu", 0)) (new storage for every parameter) and a
    replaced p.data after the optimizer was built are re-adopted: the run equals the
    reference instead of training a private copy."""
    for f in scenario(results, name):
        assert f["err"] <= FP64 and f["moved"] > 1e-3 and f["ranks_agree"] and f["tied"], f
        assert f["grads_averaged"] is False, f


def test_dtype_change_raises_on_every_rank(results):
    """Check that model.half() after construction makes every rank raise, naming the
    change and the fix, with parameters and optimizer state unchanged."""
    for f in scenario(results, "half_z2"):
        assert f["error"] and "changed dtype" in f["error"] and "build the optimizer" in f["error"], f
        assert f["unchanged"], f


@pytest.mark.parametrize("name", ["scaler_z1", "scaler_z2"])
def test_grad_scaler_unscales_in_the_step(results, name):
    """Check that with GradScaler the optimizer unscales inside the step (bit-identical to
    the run without a scaler), the overflowing first step is skipped on every rank, and
    the scale is the same on every rank afterwards."""
    for f in scenario(results, name):
        assert f["err"] == 0.0 and f["moved"] > 1e-3, f
        assert f["skipped"] == 1 and len(set(f["scales"])) == 1, f


def test_grad_scaler_with_fp16_parameters(results):
    """Check that fp16 parameters train with GradScaler (torch's unscale_ refuses fp16
    gradients; the step unscales them in fp32), skipping the overflowing step everywhere."""
    for f in scenario(results, "scaler_fp16_z2"):
        assert f["err"] <= 1e-2 and f["moved"] > 1e-3 and f["ranks_agree"], f
        assert f["skipped"] == 1 and len(set(f["scales"])) == 1, f


@pytest.mark.parametrize("name", ["scaler_ddp_z1", "scaler_ddp_z2"])
def test_grad_scaler_with_ddp_and_clipping(results, name):
    """Check GradScaler with DDP, bf16 autocast and clip_grad_norm_ after scaler.unscale_:
    equal to the reference NovoGrad under the same scaler, with the same skipped step
    and the same final scale."""
    for f in scenario(results, name):
        assert f["err"] <= 2e-5 and f["moved"] > 1e-3 and f["ranks_agree"], f
        assert f["skipped"] == 1 and f["scale"] == f["ref_scale"], f
