"""NovoGrad on DTensor parameters (FSDP2, and a 2-D ("dp", "tp") mesh) against the
single-process NovoGrad fed the mean of the ranks' gradients, on real gloo ranks.

One forked world per world size runs every scenario (process start-up dominates on
2 cores); each test then checks one scenario's result. The 4-rank world also saves a
torch.distributed.checkpoint that the 2-rank world loads and continues.

The bugs guarded against: NovoGrad on FSDP2's local dim-0 chunks takes a norm per chunk
instead of per layer (a 5e-3 drift on a small GPT); a layer replicated over "tp" counted
tp times; a rank whose chunk of a layer is empty (1 row on 2 ranks) hanging or dropping
out of the reduction; ranks deciding differently on a NaN or on clipping.

Tolerances. Everything runs in float64. The ranks' sums of squares are added in another
order than the reference's, each local norm is squared after a square root, and FSDP2
averages the gradients in its own order (1.9e-9 measured against a direct mean in
fp32, so about 1e-16 relative in float64): a few ulp per step. NovoGrad divides by the
layer norm, which damps rather than amplifies such differences, so 1e-12 absolute on
weights of order 1 leaves a margin of 1e3 over the few steps run here, and is far below
the 1e-3 to 1e-2 by which one step moves them (a wrong norm, a wrong replication
factor or a skipped decision shows up at that scale).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile

import pytest
import torch
import torch.nn as nn

from sharded_novograd import NovoGrad

from .distributed import shared_world

TOL = 1e-12
F64 = torch.float64
HP = dict(lr=0.02, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
APEX_INF = dict(lr=0.02, betas=(0.9, 0.95), weight_decay=0.05, reg_inside_moment=False, bias_correction=True,
                grad_averaging=True, amsgrad=True, norm_type=math.inf)
STEPS = 4


# ---------------------------------------------------------------- models and data
class Block(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out, dtype=F64)

    def forward(self, x):
        return torch.tanh(self.lin(x))


class Net(nn.Module):
    """Uneven dim-0 chunks at 2 and 4 ranks: 7 rows (4/3, 2/2/2/1), 9 rows (5/4,
    3/3/3/0: rank 3 holds nothing), a 1-row layer (only rank 0 holds it), 3 rows
    (2/1, 1/1/1/0), 1-D biases and a 1-element layer (FSDP2 refuses 0-dim ones)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.b1 = Block(5, 7)
        self.b2 = Block(7, 9)
        self.gate = nn.Parameter(torch.randn(1, 9, dtype=F64))
        self.head = nn.Linear(9, 3, dtype=F64)
        self.scale = nn.Parameter(torch.tensor([1.3], dtype=F64))

    def forward(self, x):
        return (self.head(self.b2(self.b1(x)) * self.gate) * self.scale).square().mean()


class TPNet(nn.Module):
    """Column-parallel a, row-parallel b (its bias replicated over "tp"), and a
    LayerNorm that tensor parallelism does not split (it lives on the "dp" mesh)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(5, 6, dtype=F64)
        self.b = nn.Linear(6, 7, dtype=F64)
        self.norm = nn.LayerNorm(7, dtype=F64)

    def forward(self, x):
        return self.norm(self.b(torch.relu(self.a(x)))).square().mean()


def batch(step, part, d_in=5):
    g = torch.Generator().manual_seed(1000 * step + part)
    return torch.randn(6, d_in, generator=g, dtype=F64)


def fully_shard_net(model, mesh):
    from torch.distributed.fsdp import fully_shard
    for unit in (model.b1, model.b2):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def parallelize_tp(model, mesh):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    parallelize_module(model, mesh["tp"], {"a": ColwiseParallel(), "b": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    return model


class Reference:
    """Single-process NovoGrad on an unsharded copy, fed the mean of the parts' gradients."""

    def __init__(self, model_cls, seed, hp, extra=()):
        self.model = model_cls(seed)
        self.extra = list(extra)
        self.opt = NovoGrad(list(self.model.parameters()) + self.extra, **hp)

    def step(self, step, parts, clip=None, skip=False, extra_grads=()):
        self.opt.zero_grad(set_to_none=True)
        for part in parts:
            (self.model(batch(step, part)) / len(parts)).backward()
        for p, g in zip(self.extra, extra_grads):
            p.grad = g.clone()
        if skip:
            return
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.opt.step()


def max_diff(model, ref) -> float:
    """Largest |parameter - reference| (collective: gathers every DTensor)."""
    out = 0.0
    for (n, p), q in zip(model.named_parameters(), ref.model.parameters()):
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out = max(out, float((full.detach() - q.detach()).abs().max()))
    return out


def state_diff(opt, ref) -> float:
    """Largest difference of exp_avg (gathered) and exp_avg_sq from the reference's state."""
    out = 0.0
    params = [p for g in opt.param_groups for p in g["params"]]
    ref_params = [p for g in ref.opt.param_groups for p in g["params"]]
    for p, q in zip(params, ref_params):
        st, rs = opt.state[p], ref.opt.state[q]
        out = max(out, float((st["exp_avg"].full_tensor() - rs["exp_avg"]).abs().max()),
                  abs(float(st["exp_avg_sq"]) - float(rs["exp_avg_sq"])), abs(float(st["step"]) - float(rs["step"])))
    return out


def state_bytes(opt) -> int:
    """Bytes of this rank's optimizer state (a DTensor counts its local tensor)."""
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                v = v.to_local() if hasattr(v, "to_local") else v
                total += v.numel() * v.element_size()
    return total


def count_step_collectives(opt):
    """The collectives step() issues, counted at the dispatcher (c10d and functional ones)."""
    from torch.distributed.tensor.debug import CommDebugMode
    with CommDebugMode() as comm:
        opt.step()
    return {str(k).split("'")[1] if "'" in str(k) else str(k): v for k, v in comm.get_comm_counts().items()}


def raises_everywhere(fn, match):
    try:
        fn()
    except RuntimeError as e:
        return match in str(e), str(e)
    return False, "no error"


# ---------------------------------------------------------------- 1-D FSDP2 scenarios
def fsdp_trajectory(rank, world, mesh, hp, *, clip=None, clip_with_torch=False, poison=None, scalar=False):
    """STEPS steps of FSDP2 + NovoGrad against the reference; returns what the tests check."""
    from torch.distributed.tensor import DTensor, Replicate
    from sharded_novograd.dtensor import last_step
    model = fully_shard_net(Net(0), mesh)
    params, extra, ref_extra = list(model.parameters()), [], []
    if scalar:  # a 0-dim DTensor replicated on every rank (FSDP2 refuses 0-dim parameters)
        extra = [nn.Parameter(DTensor.from_local(torch.tensor(0.4, dtype=F64), mesh, [Replicate()],
                                                 run_check=False))]
        ref_extra = [nn.Parameter(torch.tensor(0.4, dtype=F64))]
    opt = NovoGrad(params + extra, **hp, max_grad_norm=None if clip_with_torch else clip)
    ref = Reference(Net, 0, hp, ref_extra)
    out = {"skipped_unchanged": None}
    for s in range(STEPS):
        opt.zero_grad(set_to_none=True)
        model(batch(s, rank)).backward()
        extra_grads = [torch.tensor(0.3 * (s + 1), dtype=F64)] if scalar else []
        for p, g in zip(extra, extra_grads):
            p.grad = DTensor.from_local(g.clone(), mesh, [Replicate()], run_check=False)
        skip = poison is not None and s == poison
        if skip and rank == world - 1:  # the last rank: its chunk of b2.lin.weight may be empty
            for p in (model.b2.lin.weight, model.b1.lin.weight):
                if p.grad.to_local().numel():
                    p.grad.to_local().view(-1)[-1] = float("nan")
                    break
        if clip_with_torch:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        before = [p.to_local().clone() for p in params]
        opt.step()
        ref.step(s, range(world), clip=clip, skip=skip, extra_grads=extra_grads)
        if skip:
            out["skipped_unchanged"] = all(torch.equal(b, p.to_local()) for b, p in zip(before, params))
            out["skipped_reason"] = last_step(opt)["skipped"]
    out["diff"] = max_diff(model, ref)
    out["state_diff"] = state_diff(opt, ref)
    if scalar:
        out["scalar_diff"] = abs(float(extra[0].detach().to_local()) - float(ref_extra[0].detach()))
    out["last"] = last_step(opt)
    out["state_bytes"] = state_bytes(opt)
    out["exp_avg_bytes"] = sum(p.to_local().numel() * 8 for p in params + extra)
    out["exp_avg_is_dtensor"] = all(isinstance(opt.state[p]["exp_avg"], DTensor)
                                    and opt.state[p]["exp_avg"].placements == p.placements for p in params + extra)
    out["local_rows"] = [p.to_local().shape[0] if p.dim() else None for p in params]
    return out, model, opt, ref


def amp_trajectory(rank, world, mesh, *, unscale_and_clip):
    """torch.amp.GradScaler: scaled losses, a NaN on the last rank at step 1 (skipped on
    every rank, and every rank's scale backs off), optionally scaler.unscale_ and
    torch's clip_grad_norm_ before the step."""
    from torch.amp import GradScaler
    model = fully_shard_net(Net(0), mesh)
    opt = NovoGrad(model.parameters(), **HP)
    scaler = GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=1000)
    ref = Reference(Net, 0, HP)
    clip = 0.05 if unscale_and_clip else None
    for s in range(STEPS):
        opt.zero_grad(set_to_none=True)
        scaler.scale(model(batch(s, rank))).backward()
        if s == 1 and rank == world - 1:
            model.b1.lin.weight.grad.to_local().view(-1)[0] = float("inf")
        if unscale_and_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(opt)
        scaler.update()
        ref.step(s, range(world), clip=clip, skip=s == 1)
    return {"diff": max_diff(model, ref), "state_diff": state_diff(opt, ref), "scale": float(scaler.get_scale())}


def collectives_in_step(rank, world, mesh, hp):
    """Collectives of a steady-state step() with NovoGrad, and with torch's AdamW."""
    out = {}
    for name, make in (("novograd", lambda ps: NovoGrad(ps, **hp)),
                       ("adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True))):
        model = fully_shard_net(Net(0), mesh)
        opt = make(list(model.parameters()))
        for s in range(2):
            opt.zero_grad(set_to_none=True)
            model(batch(s, rank)).backward()
            if s == 1:
                out[name] = count_step_collectives(opt)
            else:
                opt.step()
    return out


def errors_everywhere(rank, world, mesh):
    """Settings that differ across ranks, and a gradient on some ranks only: every rank
    raises, naming the problem, and no weight changes."""
    model = fully_shard_net(Net(0), mesh)
    opt = NovoGrad(model.parameters(), **HP)
    model(batch(0, rank)).backward()
    opt.step()
    before = [p.to_local().clone() for p in model.parameters()]
    out = {}
    model(batch(1, rank)).backward()
    opt.param_groups[0]["lr"] = 0.02 if rank == 0 else 0.03
    out["lr"] = raises_everywhere(opt.step, "settings differ across ranks")
    opt.param_groups[0]["lr"] = 0.02
    if rank == 1:
        model.head.weight.grad = None
    out["partial"] = raises_everywhere(opt.step, "has a gradient on some ranks only")
    model.head.weight.grad = None
    mixed = NovoGrad(list(model.parameters()) + [nn.Parameter(torch.zeros(3, dtype=F64))], **HP)
    out["mixed"] = raises_everywhere(mixed.step, "DTensor parameters and 1 plain tensors")
    out["unchanged"] = all(torch.equal(b, p.to_local()) for b, p in zip(before, model.parameters()))
    return out


# ---------------------------------------------------------------- 2-D mesh scenario
def tp_trajectory(rank, world, mesh2d, hp, clip):
    from torch.distributed.tensor import DTensor
    model = parallelize_tp(TPNet(0), mesh2d)
    dp = mesh2d["dp"].get_local_rank()
    opt = NovoGrad(model.parameters(), **hp, max_grad_norm=clip)
    ref = Reference(TPNet, 0, hp)
    out = {}
    for s in range(STEPS):
        opt.zero_grad(set_to_none=True)
        model(batch(s, dp)).backward()
        if s == STEPS - 1:
            out["collectives"] = count_step_collectives(opt)
        else:
            opt.step()
        ref.step(s, range(mesh2d["dp"].size()), clip=clip)
    out["diff"] = max_diff(model, ref)
    out["state_diff"] = state_diff(opt, ref)
    out["placements"] = {n: str(p.placements) for n, p in model.named_parameters()}
    out["state_bytes"] = state_bytes(opt)
    out["exp_avg_is_dtensor"] = all(isinstance(opt.state[p]["exp_avg"], DTensor)
                                    and opt.state[p]["exp_avg"].placements == p.placements
                                    for p in model.parameters())
    return out


# ---------------------------------------------------------------- checkpoints (DCP)
CKPT_STEPS = (3, 2)  # steps before the save at 4 ranks, and after the load at 2


def dcp_save(rank, world, mesh, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model = fully_shard_net(Net(0), mesh)
    opt = NovoGrad(model.parameters(), **APEX_INF)
    for s in range(CKPT_STEPS[0]):
        opt.zero_grad(set_to_none=True)
        model(batch(s, rank)).backward()
        opt.step()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    return True


def dcp_load_continue(rank, world, mesh, path, saved_world):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model = fully_shard_net(Net(7), mesh)  # another initialisation: the checkpoint must overwrite it
    opt = NovoGrad(model.parameters(), **APEX_INF)
    msd, osd = get_state_dict(model, opt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    ref = Reference(Net, 0, APEX_INF)
    for s in range(CKPT_STEPS[0]):
        ref.step(s, range(saved_world))
    out = {"loaded_diff": max_diff(model, ref), "loaded_state_diff": state_diff(opt, ref)}
    for s in range(CKPT_STEPS[0], sum(CKPT_STEPS)):
        opt.zero_grad(set_to_none=True)
        model(batch(s, rank)).backward()
        opt.step()
        ref.step(s, range(world))
    out["diff"] = max_diff(model, ref)
    out["state_diff"] = state_diff(opt, ref)
    return out


# ---------------------------------------------------------------- the worlds
def world_fsdp(rank, world, ckpt):
    """Every scenario of one world size; the 4-rank world also saves, the 2-rank one loads."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    out = {}
    out["paper"] = fsdp_trajectory(rank, world, mesh, HP, scalar=True)[0]
    out["apex_inf"] = fsdp_trajectory(rank, world, mesh, APEX_INF)[0]
    out["clip_option"] = fsdp_trajectory(rank, world, mesh, HP, clip=0.05)[0]
    out["clip_torch"] = fsdp_trajectory(rank, world, mesh, HP, clip=0.05, clip_with_torch=True)[0]
    out["nan"] = fsdp_trajectory(rank, world, mesh, HP, poison=1)[0]
    out["amp"] = amp_trajectory(rank, world, mesh, unscale_and_clip=False)
    out["amp_clip"] = amp_trajectory(rank, world, mesh, unscale_and_clip=True)
    out["collectives"] = collectives_in_step(rank, world, mesh, HP)
    apex = {**APEX_INF}
    out["collectives_inf"] = collectives_in_step(rank, world, mesh, apex)
    out["errors"] = errors_everywhere(rank, world, mesh)
    if world == 4:
        mesh2d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        out["tp"] = tp_trajectory(rank, world, mesh2d, HP, clip=None)
        out["tp_clip"] = tp_trajectory(rank, world, mesh2d, APEX_INF, clip=0.05)
        # Two pipeline stages, each a (dp=1, tp=2) sub-mesh that does not span the world:
        # the reduction runs over the sub-mesh's flattened group.
        mesh3d = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("pp", "dp", "tp"))
        out["pp_stage"] = tp_trajectory(rank, world, mesh3d["dp", "tp"], HP, clip=0.05)
        out["saved"] = dcp_save(rank, world, mesh, ckpt)
    else:
        out["dcp"] = dcp_load_continue(rank, world, mesh, ckpt, 4)
    return out


_CKPT = {}


def _ckpt_dir():
    if "dir" not in _CKPT:
        _CKPT["dir"] = tempfile.mkdtemp(prefix="sn_fsdp2_dcp_")
    return _CKPT["dir"]


@pytest.fixture(scope="module", autouse=True)
def _cleanup_ckpt():
    yield
    if "dir" in _CKPT:
        shutil.rmtree(_CKPT["dir"], ignore_errors=True)


def results(world):
    if world == 2:
        results(4)  # the 2-rank world loads the 4-rank world's checkpoint
    return shared_world(world_fsdp, world, os.path.join(_ckpt_dir(), "ckpt"), timeout=240)


# ---------------------------------------------------------------- tests
WORLDS = [2, 4]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", ["paper", "apex_inf", "clip_option", "clip_torch", "nan"])
def test_fsdp2_matches_reference(world, case):
    """Check that NovoGrad on fully_shard's DTensor parameters (uneven and empty dim-0
    chunks, a 1-row layer, 1-D layers) follows the single-process reference fed the
    mean gradient: paper preset (plus a replicated 0-dim DTensor), apex L-inf preset with
    amsgrad, clipping by ``max_grad_norm`` and by torch's ``clip_grad_norm_``, and a NaN
    on one rank."""
    r = results(world)[0][case]
    assert r["diff"] < TOL, r
    assert r["state_diff"] < TOL, r
    assert r["exp_avg_is_dtensor"]
    if case == "paper":
        assert r["scalar_diff"] < TOL
    if world == 4:
        # rank 0's chunks: gate (1 row of 1), scale, then 7/9/3-row layers split 2/3/1 (rank 3: 1/0/0)
        assert r["local_rows"] == [1, 1, 2, 2, 3, 3, 1, 1]


@pytest.mark.parametrize("world", WORLDS)
def test_nan_on_one_rank_skips_everywhere(world):
    """Check that a NaN in one rank's gradient skips the step on every rank, changing
    no weight, and that the next steps continue the reference that skipped it too."""
    for rank_result in results(world):
        r = rank_result["nan"]
        assert r["skipped_unchanged"] is True
        assert r["skipped_reason"] == "non-finite gradient"
        assert r["last"]["skipped_steps"] == 1 and r["last"]["skipped"] is None


@pytest.mark.parametrize("world", WORLDS)
def test_clipping_agrees(world):
    """Check that both ways of clipping clipped (the norm is far above 0.05) and that
    every rank computed the same global norm."""
    res = results(world)
    norms = {r["clip_option"]["last"]["grad_norm"] for r in res}
    assert len(norms) == 1 and norms.pop() > 0.05
    # After torch's clip_grad_norm_, the optimizer sees a gradient of norm 0.05.
    assert all(abs(r["clip_torch"]["last"]["grad_norm"] - 0.05) < 1e-5 for r in res)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", ["amp", "amp_clip"])
def test_grad_scaler(world, case):
    """Check that under torch.amp.GradScaler the step unscales inside the update, that
    an inf in one rank's shard skips the step on every rank, and that every rank's
    scale backs off alike (GradScaler alone decides per rank, which would leave the
    ranks without the inf waiting in the step's collective); with scaler.unscale_ and
    clip_grad_norm_ too."""
    res = results(world)
    for r in res:
        a = r[case]
        assert a["diff"] < TOL and a["state_diff"] < TOL, a
        assert a["scale"] == 2.0 ** 11, a


@pytest.mark.parametrize("world", WORLDS)
def test_one_collective_per_step(world):
    """Check that step() issues exactly one collective (an all-reduce; an all-gather for
    norm_type=inf), counted at the dispatcher, where torch's AdamW on the same FSDP2
    model issues none: one beyond FSDP2's own."""
    for r in results(world):
        assert r["collectives"] == {"novograd": {"c10d.allreduce_": 1}, "adamw": {}}
        assert r["collectives_inf"]["novograd"] == {"c10d._allgather_base_": 1}


@pytest.mark.parametrize("world", WORLDS)
def test_errors_raise_on_every_rank(world):
    """Check that a learning rate that differs across ranks, a gradient missing on one
    rank, and DTensor parameters mixed with plain ones make every rank raise with
    nothing changed."""
    for r in results(world):
        e = r["errors"]
        assert e["lr"][0], e["lr"][1]
        assert e["partial"][0], e["partial"][1]
        assert e["mixed"][0], e["mixed"][1]
        assert e["unchanged"]


@pytest.mark.parametrize("world", WORLDS)
def test_state_bytes(world):
    """Check that each rank keeps exp_avg for its local chunks only (a DTensor with the
    parameter's placements) plus 12 bytes per layer (exp_avg_sq, step)."""
    for r in results(world):
        p = r["paper"]
        assert p["state_bytes"] == p["exp_avg_bytes"] + 9 * (8 + 4)


@pytest.mark.parametrize("case", ["tp", "tp_clip"])
def test_2d_mesh_matches_reference(case):
    """Check NovoGrad on a ("dp", "tp") mesh: ColwiseParallel / RowwiseParallel on "tp",
    fully_shard on "dp". The row-parallel bias is replicated over "tp" and the LayerNorm
    lives on the "dp" mesh alone: both must count once, the tp-sharded layers summed,
    in one collective over the whole mesh. Without clipping, and with the apex L-inf
    preset and max_grad_norm (torch's clip_grad_norm_ refuses parameters on two meshes)."""
    res = results(4)
    for r in res:
        t = r[case]
        assert t["diff"] < TOL, t
        assert t["state_diff"] < 1e-10, t  # exp_avg_sq ~ 1e2: the same relative error
        assert t["exp_avg_is_dtensor"]
        want = "c10d.allreduce_" if case == "tp" else "c10d._allgather_base_"
        assert t["collectives"] == {want: 1}, t["collectives"]
    pl = res[0]["tp"]["placements"]
    assert pl["b.bias"] == "(Shard(dim=0), Replicate())" and pl["norm.weight"] == "(Shard(dim=0),)"
    assert "_StridedShard" in pl["a.weight"]


def test_2d_sub_mesh_of_a_pipeline_stage():
    """Check a 2-D ("dp", "tp") mesh cut from a 3-D mesh with a "pp" dimension, as
    pipeline parallelism makes: its parameters span half the world, and the step
    reduces over the sub-mesh's ranks, still in one collective."""
    for r in results(4):
        t = r["pp_stage"]
        assert t["diff"] < TOL and t["state_diff"] < 1e-10, t
        assert t["collectives"] == {"c10d.allreduce_": 1}


def test_dcp_save_at_4_load_at_2_continues():
    """Check that torch.distributed.checkpoint saves NovoGrad's DTensor state at 4 ranks,
    loads it into a differently initialised model at 2 ranks, and that the next steps
    continue the reference trajectory (mean of 4 ranks' gradients, then of 2)."""
    for r in results(2):
        d = r["dcp"]
        assert d["loaded_diff"] < TOL and d["loaded_state_diff"] < TOL, d
        assert d["diff"] < TOL and d["state_diff"] < TOL, d


def test_max_grad_norm_is_checked():
    """Check that max_grad_norm is validated, and refused for plain tensors (whose
    single-process step does not clip) instead of being ignored."""
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="DTensor path"):
        NovoGrad([p], max_grad_norm=1.0)
    for bad in (0.0, -1.0, True, "1", math.inf):
        with pytest.raises(ValueError, match="Invalid max_grad_norm"):
            NovoGrad([p], max_grad_norm=bad)
    NovoGrad([p], max_grad_norm=None)
