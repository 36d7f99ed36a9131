"""Checkpoints on real gloo ranks: resharding, crash safety, restarts, collective timeouts.

The resharding tests save at 4 ranks after 5 steps and resume at 1, 2, 3 and 4 ranks
for 10 more steps; the result must equal the uninterrupted 4-rank run.

Tolerances. Loading is a copy, so the state right after a load must equal the saved
state bit for bit, at every world size. The continued trajectory then differs from
the uninterrupted one only by summation order (the gradient mean over another number
of ranks, per-layer norms summed from other fragments): float64 runs stay within
1e-10 relative. bf16 runs compare the fp32 master weights at fp32 tolerance (2e-5
relative, as in test_sharded.py) and the bf16 parameters within one bf16 ulp (2**-8),
since a master value within fp32 error of a rounding boundary may round either way.
Their gradients are the same bf16 tensor on every rank, so that the fp32 mean is exact
at every world size and the trajectories differ only by the norms' summation order.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from sharded_novograd import NovoGrad, ShardedNovoGrad, checkpoint

from .cases import SHAPES, close_ratio, make_params
from .distributed import RankError, run_world, shared_world

SAVE_WORLD, SAVE_AT, MORE = 4, 5, 10
# 50 trainable elements (layer 2 is frozen): ranks 1.. hold padding only at every world size.
TINY = [(), (5,), (3, 7), (40,), (2, 2)]
SCENARIOS = {
    # two param groups with their own lr and decay
    "fp64": dict(shapes=SHAPES, dtype=torch.float64, same_grad=False, groups=True,
                 kwargs=dict(lr=0.01, weight_decay=0.01)),
    # amsgrad, apex-style, a frozen layer, empty ranks
    "fp64_tiny": dict(shapes=TINY, dtype=torch.float64, same_grad=False, frozen=2,
                      kwargs=dict(lr=0.02, amsgrad=True, betas=(0.9, 0.9), reg_inside_moment=False,
                                  bias_correction=True, weight_decay=0.1)),
    # fp32 master weights sharded in the checkpoint
    "bf16": dict(shapes=SHAPES, dtype=torch.bfloat16, same_grad=True, kwargs=dict(lr=0.01, weight_decay=0.01)),
}
BF16_ULP = 2.0 ** -8


def grad(rank, world, step, layer, shape, dtype, same):
    """A gradient whose mean over ranks is (up to rounding) the same at every world size."""
    gen = torch.Generator().manual_seed(7919 * step + 104729 * layer)
    g = torch.randn(shape, generator=gen, dtype=torch.float64) * 10.0 ** ((step % 5) - 2)
    if same:
        return g.to(dtype)
    h = torch.randn(shape, generator=gen, dtype=torch.float64)
    return (g + (rank - (world - 1) / 2) * h).to(dtype)


def build(name, dtype=None, seed=0, **override):
    sc = SCENARIOS[name]
    params = make_params(sc["shapes"], dtype or sc["dtype"], seed)
    if "frozen" in sc:
        params[sc["frozen"]].requires_grad_(False)
    model = torch.nn.ParameterList(params)
    groups = params
    if sc.get("groups"):
        groups = [{"params": params[:4], "lr": 0.02}, {"params": params[4:], "weight_decay": 0.05}]
    opt = ShardedNovoGrad(groups, **{**sc["kwargs"], **override})
    return params, model, opt


def feed(params, name, rank, world, step):
    sc = SCENARIOS[name]
    for i, p in enumerate(params):
        if p.requires_grad:
            p.grad = grad(rank, world, step, i, p.shape, p.dtype, sc["same_grad"])


def train(opt, params, name, rank, world, steps):
    for step in steps:
        feed(params, name, rank, world, step)
        opt.step()


def snapshot(opt, params, rank):
    lo, hi = opt.layout.shard_range(rank)
    st = opt.state_dict()["state"]
    return {"params": [p.detach().clone() for p in params],
            "master": (lo, hi, st["master_weight"].clone()) if "master_weight" in st else None,
            "consolidated": opt.consolidated_state_dict(),
            "lr": [g["lr"] for g in opt.param_groups]}


# ---------------------------------------------------------------------------- worlds
def save_world(rank, world, root):
    """Train 5 steps, save, train 10 more; and resume at the same world size."""
    out = {}
    for name in SCENARIOS:
        params, model, opt = build(name)
        train(opt, params, name, rank, world, range(SAVE_AT))
        checkpoint.save(os.path.join(root, name), opt, model, metadata={"step": SAVE_AT})
        saved = snapshot(opt, params, rank)
        train(opt, params, name, rank, world, range(SAVE_AT, SAVE_AT + MORE))
        params2, model2, opt2 = build(name, seed=1, lr=0.5)
        manifest = checkpoint.load(os.path.join(root, name), opt2, model2)
        train(opt2, params2, name, rank, world, range(manifest["user"]["step"], SAVE_AT + MORE))
        out[name] = {"saved": saved, "final": [p.detach().clone() for p in params],
                     "same_world_bit_exact": all(torch.equal(a, b) for a, b in zip(params, params2))}
    return out


def resume_world(rank, world, root):
    """Load the 4-rank checkpoints into fresh optimizers (other values, other lr) and continue."""
    out, read = {}, []
    real_read = checkpoint._read_verified

    def spy(directory, entry):
        read.append(entry["name"].split("-")[1])
        return real_read(directory, entry)

    checkpoint._read_verified = spy
    for name in SCENARIOS:
        params, model, opt = build(name, seed=1, lr=0.5)
        read.clear()
        manifest = checkpoint.load(os.path.join(root, name), opt, model)
        files_read = list(read)
        loaded = snapshot(opt, params, rank)
        train(opt, params, name, rank, world, range(manifest["user"]["step"], SAVE_AT + MORE))
        out[name] = {"loaded": loaded, "final": [p.detach().clone() for p in params], "read": files_read,
                     "range": opt.layout.shard_range(rank), "total": opt.layout.total}
    checkpoint._read_verified = real_read
    if world == 3:
        # The world-size-free route: NovoGrad-format export, imported at 3 ranks.
        name = "fp64"
        params, model, opt = build(name, seed=2)
        model.load_state_dict(checkpoint.model_state_dict(os.path.join(root, name)))
        opt.load_consolidated_state_dict(checkpoint.export_consolidated(os.path.join(root, name)))
        train(opt, params, name, rank, world, range(SAVE_AT, SAVE_AT + MORE))
        out["import"] = [p.detach().clone() for p in params]
    if world == 2:
        # A float64 checkpoint loaded into a float32 model: a cast.
        params, model, opt = build("fp64", dtype=torch.float32, seed=1)
        checkpoint.load(os.path.join(root, "fp64"), opt, model)
        out["to_fp32"] = {"consolidated": opt.consolidated_state_dict(),
                          "params": [p.detach().clone() for p in params]}
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ckpt"))


def results(kind, world, root):
    if kind == "resume":
        results("save", SAVE_WORLD, root)
    return shared_world({"save": save_world, "resume": resume_world}[kind], world, root, timeout=240)


def _equal_state(a, b):
    if set(a["state"]) != set(b["state"]):
        return False
    for idx, st in a["state"].items():
        if set(st) != set(b["state"][idx]):
            return False
        if not all(torch.equal(torch.as_tensor(st[k]), torch.as_tensor(b["state"][idx][k])) for k in st):
            return False
    return True


def _groups_without_params(groups):
    return [{k: v for k, v in g.items() if k != "params"} for g in groups]


def _trajectory_error(name, got, want):
    """Worst tolerance ratio (<= 1 passes) of parameters against the uninterrupted run."""
    if SCENARIOS[name]["dtype"] == torch.bfloat16:
        return max(close_ratio(p, q, BF16_ULP, 1e-6) for p, q in zip(got, want))
    return max(close_ratio(p, q, 1e-10, 1e-12) for p, q in zip(got, want))


def _full_master(snapshots):
    parts = sorted((s["master"] for s in snapshots), key=lambda x: x[0])
    return torch.cat([m for _, _, m in parts])


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_same_world_resume_is_bit_exact(root, name):
    """Check that save + load at the same world size continues bit for bit."""
    for r in results("save", SAVE_WORLD, root):
        assert r[name]["same_world_bit_exact"]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_reshard_state_is_exact(root, world, name):
    """Check that the state right after a load at another world size is the saved state,
    bit for bit: moments, step counts, master weights, parameters, hyperparameters."""
    saved = [r[name]["saved"] for r in results("save", SAVE_WORLD, root)]
    loaded = [r[name]["loaded"] for r in results("resume", world, root)]
    for snap in loaded:
        assert _equal_state(snap["consolidated"], saved[0]["consolidated"])
        assert _groups_without_params(snap["consolidated"]["param_groups"]) == \
            _groups_without_params(saved[0]["consolidated"]["param_groups"])
        assert snap["lr"] == saved[0]["lr"]
        assert all(torch.equal(a, b) for a, b in zip(snap["params"], saved[0]["params"]))
    if SCENARIOS[name]["dtype"] == torch.bfloat16:
        full = _full_master(saved)
        for snap in loaded:
            lo, hi, m = snap["master"]
            want = torch.nn.functional.pad(full, (0, max(0, hi - full.numel())))[lo:hi]
            assert torch.equal(m, want)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_load_reads_only_overlapping_files(root, world, name):
    """Check that each rank reads the model file and only the old rank files overlapping its
    range (one file, for the per-layer vectors, when its range is all padding)."""
    m = checkpoint.read_manifest(os.path.join(root, name))
    S_old = m["layout"]["shard_size"]
    for r in results("resume", world, root):
        res = r[name]
        (lo, hi), total = res["range"], res["total"]
        want = set(range(lo // S_old, (min(hi, total) - 1) // S_old + 1)) if lo < total else None
        got = {int(n[len("rank"):-len(".pt")]) for n in res["read"] if n.startswith("rank")}
        assert "model.pt" in res["read"] and len(res["read"]) == len(got) + 1, res["read"]
        assert got == want if want is not None else len(got) == 1, (lo, hi, got, want)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_resume_matches_uninterrupted(root, world, name):
    """Check that 10 steps after resuming a 4-rank checkpoint at 1, 2 or 3 ranks equal the
    uninterrupted 4-rank run (float64: 1e-10 relative; bf16: one ulp, master to fp32 tolerance)."""
    want = results("save", SAVE_WORLD, root)[0][name]["final"]
    for r in results("resume", world, root):
        assert _trajectory_error(name, r[name]["final"], want) <= 1.0


def test_export_consolidated_matches_and_novograd_continues(root):
    """Check that export_consolidated (no process group) equals consolidated_state_dict() at the
    save, and that single-process NovoGrad resumed from it follows the uninterrupted run."""
    name = "fp64"
    saved = results("save", SAVE_WORLD, root)[0][name]
    directory = os.path.join(root, name)
    exported = checkpoint.export_consolidated(directory)
    assert _equal_state(exported, saved["saved"]["consolidated"])
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in SHAPES]
    model = torch.nn.ParameterList(params)
    model.load_state_dict(checkpoint.model_state_dict(directory))
    ref = NovoGrad([{"params": params[:4], "lr": 0.02}, {"params": params[4:], "weight_decay": 0.05}],
                   **SCENARIOS[name]["kwargs"])
    ref.load_state_dict(exported)
    for step in range(SAVE_AT, SAVE_AT + MORE):
        for i, p in enumerate(params):
            gs = [grad(r, SAVE_WORLD, step, i, p.shape, torch.float64, False) for r in range(SAVE_WORLD)]
            p.grad = sum(gs) / SAVE_WORLD
        ref.step()
    assert _trajectory_error(name, params, saved["final"]) <= 1.0


def test_import_consolidated_at_other_world_size(root):
    """Check the reverse route: the NovoGrad-format export loaded with
    load_consolidated_state_dict at 3 ranks follows the uninterrupted run."""
    want = results("save", SAVE_WORLD, root)[0]["fp64"]["final"]
    for r in results("resume", 3, root):
        assert _trajectory_error("fp64", r["import"], want) <= 1.0


def test_load_casts_to_another_dtype(root):
    """Check that a float64 checkpoint loads into a float32 model as a cast of every value."""
    saved = results("save", SAVE_WORLD, root)[0]["fp64"]["saved"]
    for r in results("resume", 2, root):
        got = r["to_fp32"]
        for idx, st in saved["consolidated"]["state"].items():
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(got["consolidated"]["state"][idx][k], st[k].float())
        assert all(torch.equal(a, b.float()) for a, b in zip(got["params"], saved["params"]))


def test_manifest_records_layout_and_files(root):
    """Check the manifest: world size, layout, hyperparameters, versions, checksummed files."""
    results("save", SAVE_WORLD, root)
    m = checkpoint.read_manifest(os.path.join(root, "fp64_tiny"))
    trainable = [list(s) for i, s in enumerate(TINY) if i != SCENARIOS["fp64_tiny"]["frozen"]]
    assert m["world_size"] == SAVE_WORLD and m["layout"]["shapes"] == trainable
    assert m["layout"]["shard_size"] == 64 and m["torch_version"] == torch.__version__
    assert [f["rank"] for f in m["files"] if f["kind"] == "rank"] == list(range(SAVE_WORLD))
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in m["files"])
    assert m["param_groups"][0]["amsgrad"] is True and m["param_groups"][0]["params"] == [0, 1, 2, 3, 4]
    assert [x["param_index"] for x in m["layers"]] == [0, 1, 3, 4]  # layer 2 is frozen
    names = sorted(os.listdir(os.path.join(root, "fp64_tiny")))
    assert names == sorted([checkpoint.MANIFEST] + [f["name"] for f in m["files"]])


# ---------------------------------------------------------------------------- crashes
def _crash_world(rank, world, root):
    """Save A; a save whose manifest write fails; a save during which rank 1 dies."""
    params, model, opt = build("fp64")
    train(opt, params, "fp64", rank, world, range(3))
    good = os.path.join(root, "good")
    checkpoint.save(good, opt, model, metadata={"step": 3})
    if rank == 0:
        torch.save(opt.consolidated_state_dict(), os.path.join(root, "good_state.pt"))
    else:
        opt.consolidated_state_dict()
    train(opt, params, "fp64", rank, world, range(3, 5))

    def failing_json(path, obj):
        raise OSError(28, "No space left on device")

    real_json = checkpoint._write_json
    if rank == 0:
        checkpoint._write_json = failing_json
    try:
        checkpoint.save(os.path.join(root, "no_manifest"), opt, model)
        manifest_error = None
    except checkpoint.CheckpointError as e:
        manifest_error = str(e)
    checkpoint._write_json = real_json
    with open(os.path.join(root, f"manifest_error{rank}.json"), "w") as f:
        json.dump(manifest_error, f)

    def dying_writer(path, obj):
        with open(f"{path}.{os.getpid()}.tmp", "wb") as f:
            f.write(b"PK\x03\x04 half a file")
            f.flush()
        os._exit(3)

    if rank == 1:
        checkpoint._write_tensors = dying_writer
    t0 = time.monotonic()
    try:
        checkpoint.save(good, opt, model, metadata={"step": 5})
        outcome = "saved"
    except Exception as e:  # noqa: BLE001 - the survivors' error is the point
        outcome = f"{type(e).__name__}: {e}"
    with open(os.path.join(root, f"crash_report{rank}.json"), "w") as f:
        json.dump({"outcome": outcome, "seconds": time.monotonic() - t0}, f)
    return outcome


def _after_crash_world(rank, world, root):
    good = os.path.join(root, "good")
    leftovers = sorted(os.listdir(good))
    params, model, opt = build("fp64", seed=1)
    manifest = checkpoint.load(good, opt, model)
    state = opt.consolidated_state_dict()
    try:
        checkpoint.load(os.path.join(root, "no_manifest"), opt, model)
        incomplete = None
    except checkpoint.CheckpointError as e:
        incomplete = str(e)
    checkpoint.save(good, opt, model, metadata={"step": 3})  # cleans the dead save's files
    return {"step": manifest["user"]["step"], "state": state, "incomplete": incomplete,
            "leftovers": leftovers, "after_resave": sorted(os.listdir(good))}


@pytest.fixture(scope="module")
def crash(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("crash"))
    with pytest.raises(RankError) as info:
        run_world(_crash_world, 3, root, timeout=120, collective_timeout=30)
    after = run_world(_after_crash_world, 2, root, timeout=120)
    return root, str(info.value), after


def test_crash_during_save_keeps_previous_checkpoint(crash):
    """Check that a rank killed while writing leaves the previous checkpoint in the same
    directory loadable and unchanged, and that the survivors raise instead of hanging."""
    root, error, after = crash
    assert "rank 1 produced no result (exit code 3)" in error
    for r in (0, 2):
        with open(os.path.join(root, f"crash_report{r}.json")) as f:
            report = json.load(f)
        assert report["outcome"] != "saved" and report["seconds"] < 30, report
    want = torch.load(os.path.join(root, "good_state.pt"), weights_only=True)
    for r in after:
        assert r["step"] == 3 and _equal_state(r["state"], want)
        assert any(n.endswith(".tmp") for n in r["leftovers"]), r["leftovers"]
    m = checkpoint.read_manifest(os.path.join(root, "good"))
    assert sorted(after[0]["after_resave"]) == sorted([checkpoint.MANIFEST] + [f["name"] for f in m["files"]])


def test_failed_save_is_incomplete_everywhere(crash):
    """Check that a save whose manifest write fails raises on every rank, naming rank 0 and
    the cause, and leaves a directory that is recognised as incomplete."""
    root, _, after = crash
    for r in range(3):
        with open(os.path.join(root, f"manifest_error{r}.json")) as f:
            msg = json.load(f)
        assert msg is not None and "rank 0: OSError" in msg and "No space left" in msg, msg
    assert not checkpoint.is_complete(os.path.join(root, "no_manifest"))
    assert checkpoint.latest(root) == os.path.join(root, "good")
    for r in after:
        assert "incomplete checkpoint" in r["incomplete"] and "ranks 0, 1" in r["incomplete"], r["incomplete"]


# ---------------------------------------------------------------------------- timeouts
def _timeout_world(rank, world, flag):
    params = make_params(SHAPES, torch.float32)
    opt = ShardedNovoGrad(params, lr=0.01)
    for step in range(3):
        for p in params:
            p.grad = torch.ones_like(p)
        if rank == 1 and step == 2:
            # Skip this step's collectives but stay alive, so that only the timeout can end
            # rank 0's wait (a dead peer would close the connection first).
            deadline = time.monotonic() + 60
            while not os.path.exists(flag) and time.monotonic() < deadline:
                time.sleep(0.05)
            return "skipped"
        t0 = time.monotonic()
        try:
            opt.step()
        except RuntimeError as e:
            open(flag, "w").close()
            return {"step": step, "seconds": time.monotonic() - t0, "error": str(e)}
    return "finished"


def test_collective_timeout_raises(tmp_path):
    """Check that a collective one rank never joins raises on the others within the process
    group timeout given to init_process_group (gloo honours it)."""
    timeout = 4.0
    res = run_world(_timeout_world, 2, str(tmp_path / "flag"), timeout=60, collective_timeout=timeout)
    assert res[1] == "skipped"
    r = res[0]
    assert isinstance(r, dict) and r["step"] == 2, r
    # gloo words it "Timed out waiting ...ms for recv operation" or "Application timeout
    # caused pair closure", depending on where the wait was.
    assert re.search(r"timed out|timeout", r["error"], re.IGNORECASE), r
    assert timeout - 0.5 <= r["seconds"] <= timeout + 5.0, r


# ---------------------------------------------------------------------------- restarts
SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "fault_train.py")


def _load_script():
    import importlib.util
    spec = importlib.util.spec_from_file_location("fault_train", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _uninterrupted(rank, world, steps):
    return _load_script().train(rank, world, steps=steps)[0]


def test_torchrun_restart_resumes(tmp_path):
    """Check that a rank dying mid-run under torchrun --max-restarts=1 restarts the job, which
    resumes from the last complete checkpoint and ends bit-identical to an uninterrupted run.
    (The script's --die-in save, a death while writing a checkpoint, is covered without
    torchrun by test_crash_during_save_keeps_previous_checkpoint.)"""
    steps, every, die_at = 14, 4, 10
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=2",
           "--max-restarts=1", "--monitor-interval=0.2", SCRIPT, "--steps", str(steps), "--every", str(every),
           "--die-rank", "1", "--die-at", str(die_at), "--die-in", "step", "--checkpoint-dir", str(tmp_path / "ck"),
           "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "result.json") as f:
        res = json.load(f)
    # Rank 1 dies before step 10; the last complete checkpoint is step 8's.
    assert res == {"restart_count": 1, "resumed_from": 8, "steps": steps}, res
    got = torch.load(out / "params.pt", weights_only=True)
    want = run_world(_uninterrupted, 2, steps, timeout=120)[0]
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
