"""Bad input raises a clear error that names the problem, on every rank, instead of a
hang or a silently wrong result.

One table. "local" cases run in this process, which has no process group: the
sharded optimizer must reject bad hyperparameters before it touches torch.distributed.
"world" cases run in order in one forked world of 2 gloo ranks (start-up dominates on
2 cores), each rank catching its own exception; the test then checks every rank's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch
import torch.distributed as dist

from sharded_novograd import NovoGrad, ShardedNovoGrad, checkpoint

from .distributed import shared_world

WORLD = 2


def _p(*shapes, dtype=torch.float32, device="cpu"):
    return [torch.nn.Parameter(torch.ones(s, dtype=dtype, device=device)) for s in shapes]


def _shapes():
    return [(3,), (65,), (4, 5)]


def _grads(params, value=0.5):
    for p in params:
        p.grad = torch.full_like(p, value)


# ---------------------------------------------------------------------------- local cases
def _novograd_sparse(ctx):
    p = torch.nn.Parameter(torch.ones(4, 3))
    opt = NovoGrad([p])
    p.grad = torch.sparse_coo_tensor([[0, 2]], torch.ones(2, 3), (4, 3), check_invariants=True)
    opt.step()


def _save_novograd(ctx):
    checkpoint.save(os.path.join(ctx["tmp"], "x"), NovoGrad(_p(3)))


def _export_incomplete(ctx):
    os.makedirs(os.path.join(ctx["tmp"], "empty"), exist_ok=True)
    checkpoint.export_consolidated(os.path.join(ctx["tmp"], "empty"))


# ---------------------------------------------------------------------------- world cases
def _sharded_sparse(ctx):
    params = _p(*_shapes())
    opt = ShardedNovoGrad(params)
    _grads(params)
    if ctx["rank"] == 1:
        params[1].grad = torch.sparse_coo_tensor([[0, 2]], torch.ones(2), (65,), check_invariants=True)
    opt.step()


def _devices(ctx):
    ShardedNovoGrad([torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3, device="meta"))])


def _dtypes(ctx):
    ShardedNovoGrad(_p((3,)) + _p((4,), dtype=torch.float64))


def _shapes_differ(ctx):
    shapes = _shapes()
    if ctx["rank"] == 1:
        shapes[1] = (66,)
    ShardedNovoGrad(_p(*shapes))


def _order_differs(ctx):
    shapes = _shapes()
    ShardedNovoGrad(_p(*(shapes if ctx["rank"] == 0 else shapes[::-1])))


def _step_before_backward(ctx):
    ShardedNovoGrad(_p(*_shapes())).step()


def _nonfinite(ctx):
    params = _p(*_shapes())
    opt = ShardedNovoGrad(params, lr=0.1)
    _grads(params)
    opt.step()
    before = [p.detach().clone() for p in params]
    state = {k: v.clone() for k, v in opt.state_dict()["state"].items() if torch.is_tensor(v)}
    _grads(params)
    if ctx["rank"] == 1:
        params[2].grad[1, 1] = float("inf")
    opt.step()
    after = opt.state_dict()["state"]
    return {"skipped": opt.skipped_steps,
            "unchanged": all(torch.equal(a, b) for a, b in zip(before, params))
            and all(torch.equal(state[k], after[k]) for k in state)}


def _state_dict_other_rank(ctx):
    params = _p(*_shapes())
    opt = ShardedNovoGrad(params)
    _grads(params)
    opt.step()
    torch.save(opt.state_dict(), os.path.join(ctx["tmp"], f"sd{ctx['rank']}.pt"))
    dist.barrier()
    opt.load_state_dict(torch.load(os.path.join(ctx["tmp"], f"sd{1 - ctx['rank']}.pt"), weights_only=True))


def _state_dict_other_world(ctx):
    params = _p(*_shapes())
    opt = ShardedNovoGrad(params)
    sd = opt.state_dict()
    groups = [dist.new_group([0]), dist.new_group([1])]  # every rank creates every group
    alone = ShardedNovoGrad(_p(*_shapes()), process_group=groups[ctx["rank"]])
    alone.load_state_dict(sd)


def _subgroup_non_member(ctx):
    sub = dist.new_group([0])
    if ctx["rank"] == 1:
        ShardedNovoGrad(_p(*_shapes()), process_group=sub)


def _trained(shapes=None, norm_type=2, dtype=torch.float32):
    params = _p(*(shapes or _shapes()), dtype=dtype)
    model = torch.nn.ParameterList(params)
    opt = ShardedNovoGrad(params, norm_type=norm_type)
    _grads(params)
    opt.step()
    return params, model, opt


def _corrupted(ctx, name, edit):
    """A copy of the valid checkpoint, edited by rank 0; every rank then loads it."""
    path = os.path.join(ctx["tmp"], name)
    if ctx["rank"] == 0:
        shutil.copytree(ctx["ckpt"], path)
        with open(os.path.join(path, checkpoint.MANIFEST)) as f:
            manifest = json.load(f)
        edit(path, manifest)
    dist.barrier()
    _, model, opt = _trained()
    checkpoint.load(path, opt, model)


def _rank_file(path, manifest, rank):
    return os.path.join(path, next(f["name"] for f in manifest["files"] if f.get("rank") == rank))


def _rewrite_manifest(path, manifest):
    with open(os.path.join(path, checkpoint.MANIFEST), "w") as f:
        json.dump(manifest, f)


def _ckpt_no_manifest(ctx):
    _corrupted(ctx, "no_manifest", lambda path, m: os.remove(os.path.join(path, checkpoint.MANIFEST)))


def _ckpt_missing_file(ctx):
    _corrupted(ctx, "missing", lambda path, m: os.remove(_rank_file(path, m, 1)))


def _ckpt_truncated(ctx):
    def edit(path, m):
        f = _rank_file(path, m, 1)
        os.truncate(f, os.path.getsize(f) // 2)
    _corrupted(ctx, "truncated", edit)


def _ckpt_checksum(ctx):
    def edit(path, m):
        f = _rank_file(path, m, 0)
        with open(f, "r+b") as fh:
            fh.seek(os.path.getsize(f) // 2)
            byte = fh.read(1)
            fh.seek(-1, 1)
            fh.write(bytes([byte[0] ^ 0xFF]))
    _corrupted(ctx, "checksum", edit)


def _ckpt_corrupt(ctx):
    def edit(path, m):
        # Garbage whose size and checksum the manifest records: a writer bug, not bit rot.
        f = _rank_file(path, m, 1)
        with open(f, "wb") as fh:
            fh.write(b"not a tensor file" * 10)
        entry = next(e for e in m["files"] if e.get("rank") == 1)
        entry["bytes"] = os.path.getsize(f)
        entry["sha256"] = checkpoint._sha256(f)
        _rewrite_manifest(path, m)
    _corrupted(ctx, "corrupt", edit)


def _ckpt_bad_json(ctx):
    def edit(path, m):
        with open(os.path.join(path, checkpoint.MANIFEST), "w") as fh:
            fh.write('{"format": "sharded-novograd-checkpoint", ')
    _corrupted(ctx, "bad_json", edit)


def _ckpt_other_model(ctx):
    shapes = _shapes()
    shapes[2] = (5, 4)
    _, model, opt = _trained(shapes)
    checkpoint.load(ctx["ckpt"], opt, model)


def _ckpt_other_model_keys(ctx):
    _, _, opt = _trained()
    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(torch.ones(3))
    checkpoint.load(ctx["ckpt"], opt, model)


def _ckpt_norm_type(ctx):
    _, model, opt = _trained(norm_type=float("inf"))
    checkpoint.load(ctx["ckpt"], opt, model)


def _ckpt_without_model(ctx):
    _, model, opt = _trained()
    checkpoint.load(ctx["ckpt_no_model"], opt, model)


def _ckpt_missing_dir(ctx):
    _, model, opt = _trained()
    checkpoint.load(os.path.join(ctx["tmp"], "never_saved"), opt, model)


def _ckpt_loads(ctx):
    """The valid checkpoint loads (the corruptions above are what break it)."""
    _, model, opt = _trained()
    checkpoint.load(ctx["ckpt"], opt, model)
    return "loaded"


# ---------------------------------------------------------------------------- the table
@dataclass
class Case:
    name: str
    where: str  # "local" or "world"
    fn: Callable
    error: Optional[str]  # exception class name (or a base class name), None: no error
    match: str = ""  # regex the message must contain (on ranks listed in `on`)
    on: tuple = (0, 1)  # ranks that must raise `error` with a message matching `match`
    same_message: bool = False  # every rank raises the same message
    check: Optional[Callable] = None  # for error=None: a predicate on each rank's return value
    marks: list = field(default_factory=list)


CASES = [
    Case("novograd_lr", "local", lambda c: NovoGrad(_p(3), lr=-1.0), "ValueError", r"Invalid learning rate: -1"),
    Case("novograd_beta1", "local", lambda c: NovoGrad(_p(3), betas=(1.0, 0.9)), "ValueError",
         r"Invalid beta parameter at index 0: 1\.0"),
    Case("novograd_eps", "local", lambda c: NovoGrad(_p(3), eps=-1e-8), "ValueError", r"Invalid epsilon value"),
    Case("novograd_weight_decay", "local", lambda c: NovoGrad(_p(3), weight_decay=-0.1), "ValueError",
         r"Invalid weight_decay value: -0\.1"),
    Case("novograd_norm_type", "local", lambda c: NovoGrad(_p(3), norm_type=3), "ValueError",
         r"Invalid norm_type: 3"),
    Case("novograd_sparse_gradient", "local", _novograd_sparse, "RuntimeError", r"sparse gradients"),
    # ShardedNovoGrad must reject these before asking for a process group (there is none here).
    Case("sharded_lr", "local", lambda c: ShardedNovoGrad(_p(3), lr=-1.0), "ValueError", r"Invalid learning rate"),
    Case("sharded_beta2", "local", lambda c: ShardedNovoGrad(_p(3), betas=(0.9, 1.5)), "ValueError",
         r"Invalid beta parameter at index 1: 1\.5"),
    Case("sharded_eps", "local", lambda c: ShardedNovoGrad(_p(3), eps=float("nan")), "ValueError",
         r"Invalid epsilon value: nan"),
    Case("sharded_flag", "local", lambda c: ShardedNovoGrad(_p(3), amsgrad="yes"), "ValueError",
         r"Invalid amsgrad: 'yes'"),
    Case("sharded_norm_type", "local", lambda c: ShardedNovoGrad(_p(3), norm_type=1), "ValueError",
         r"Invalid norm_type: 1"),
    Case("zero_stage", "local", lambda c: ShardedNovoGrad(_p(3), zero_stage=3), "ValueError",
         r"Invalid zero_stage: 3 \(expected 1 or 2\)"),
    Case("max_grad_norm_zero", "local", lambda c: ShardedNovoGrad(_p(3), max_grad_norm=0.0), "ValueError",
         r"Invalid max_grad_norm: 0\.0"),
    Case("max_grad_norm_bool", "local", lambda c: ShardedNovoGrad(_p(3), max_grad_norm=True), "ValueError",
         r"Invalid max_grad_norm: True"),
    Case("no_process_group", "local", lambda c: ShardedNovoGrad(_p(3)), "RuntimeError",
         r"needs an initialized process group"),
    Case("checkpoint_of_novograd", "local", _save_novograd, "TypeError", r"take a ShardedNovoGrad, got NovoGrad"),
    Case("export_incomplete", "local", _export_incomplete, "CheckpointError", r"incomplete checkpoint"),

    Case("sparse_gradient_on_one_rank", "world", _sharded_sparse, "RuntimeError",
         r"rank 1: layer 1 \(shape \(65,\)\) has a sparse gradient", on=(1,)),
    Case("sparse_gradient_reaches_other_ranks", "world", _sharded_sparse, "RuntimeError",
         r"a problem on another rank", on=(0,)),
    Case("devices_differ", "world", _devices, "ValueError", r"different devices: layer 0 on cpu, layer 1 on meta"),
    Case("dtypes_differ", "world", _dtypes, "ValueError",
         r"different dtypes: layer 0 is torch\.float32, layer 1 is torch\.float64"),
    Case("shapes_differ_across_ranks", "world", _shapes_differ, "RuntimeError",
         r"parameter layouts and settings\) differ across ranks: rank 0 has 'layer 1: shape=\(65,\)' but rank 1 has 'layer 1: shape=\(66,\)'"),
    Case("order_differs_across_ranks", "world", _order_differs, "RuntimeError", r"plans \(parameter layouts and settings\) differ across ranks"),
    Case("step_before_backward", "world", _step_before_backward, "RuntimeError",
         r"no parameter has a gradient on any rank: call backward\(\) before step\(\)"),
    Case("nonfinite_gradient_skips", "world", _nonfinite, None,
         check=lambda r: r == {"skipped": 1, "unchanged": True}),
    Case("state_dict_of_other_rank", "world", _state_dict_other_rank, "ValueError",
         r"saved with rank=\d but this optimizer has rank=\d"),
    Case("state_dict_of_other_world_size", "world", _state_dict_other_world, "ValueError",
         r"saved with world_size=2 but this optimizer has world_size=1.*checkpoint\.load"),
    Case("process_group_without_this_rank", "world", _subgroup_non_member, "RuntimeError",
         r"not a member of the process.group", on=(1,)),
    Case("checkpoint_loads", "world", _ckpt_loads, None, check=lambda r: r == "loaded"),
    Case("checkpoint_incomplete", "world", _ckpt_no_manifest, "CheckpointError",
         r"ranks 0, 1: incomplete checkpoint: .* has no manifest\.json", same_message=True),
    Case("checkpoint_missing_file", "world", _ckpt_missing_file, "CheckpointError",
         r"rank 1: missing file \w+-rank00001\.pt", same_message=True),
    Case("checkpoint_truncated", "world", _ckpt_truncated, "CheckpointError",
         r"rank 1: file \w+-rank00001\.pt is truncated: \d+ bytes, the manifest records \d+", same_message=True),
    Case("checkpoint_checksum_mismatch", "world", _ckpt_checksum, "CheckpointError",
         r"rank 0: checksum mismatch in \w+-rank00000\.pt", same_message=True),
    Case("checkpoint_corrupt_file", "world", _ckpt_corrupt, "CheckpointError",
         r"rank 1: file \w+-rank00001\.pt cannot be read as a tensor file", same_message=True),
    Case("checkpoint_manifest_not_json", "world", _ckpt_bad_json, "CheckpointError",
         r"manifest\.json in .* is not valid JSON", same_message=True),
    Case("checkpoint_of_other_model", "world", _ckpt_other_model, "CheckpointError",
         r"different model: layer 2 has shape \(4, 5\) in the checkpoint but \(5, 4\) in the optimizer",
         same_message=True),
    Case("checkpoint_of_other_model_keys", "world", _ckpt_other_model_keys, "CheckpointError",
         r"different model: model keys missing from the checkpoint \['weight'\]", same_message=True),
    Case("checkpoint_norm_type", "world", _ckpt_norm_type, "CheckpointError",
         r"checkpoint uses norm_type=2, the optimizer norm_type=inf", same_message=True),
    Case("checkpoint_without_model", "world", _ckpt_without_model, "CheckpointError",
         r"saved with model=None", same_message=True),
    Case("checkpoint_missing_directory", "world", _ckpt_missing_dir, "CheckpointError",
         r"never_saved does not exist", same_message=True),
]
WORLD_CASES = [c for c in CASES if c.where == "world"]


def _outcome(fn, ctx):
    try:
        return ("returned", fn(ctx))
    except Exception as e:  # noqa: BLE001 - the exception is the result
        return ("raised", [c.__name__ for c in type(e).__mro__], str(e))


def _world_cases(rank, world, tmp):
    ctx = {"rank": rank, "tmp": tmp, "ckpt": os.path.join(tmp, "valid"),
           "ckpt_no_model": os.path.join(tmp, "valid_no_model")}
    _, model, opt = _trained()
    checkpoint.save(ctx["ckpt"], opt, model)
    checkpoint.save(ctx["ckpt_no_model"], opt)
    out = {}
    for case in WORLD_CASES:
        out[case.name] = _outcome(case.fn, ctx)
        dist.barrier()  # the next case starts together on every rank
    return out


def _world(tmp):
    return shared_world(_world_cases, WORLD, tmp, timeout=240, collective_timeout=30)


@pytest.fixture(scope="module")
def world_tmp(tmp_path_factory):
    return str(tmp_path_factory.mktemp("errors"))


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=c.marks) for c in CASES])
def test_error(case, world_tmp, tmp_path):
    """Check that the input raises the expected error, naming the problem, on every rank."""
    if case.where == "local":
        outcomes = [_outcome(case.fn, {"rank": 0, "tmp": str(tmp_path)})]
        ranks = (0,)
    else:
        outcomes = [r[case.name] for r in _world(world_tmp)]
        ranks = case.on
    for rank, out in enumerate(outcomes):
        if case.error is None:
            assert out[0] == "returned" and case.check(out[1]), (rank, out)
        elif rank in ranks:
            assert out[0] == "raised", (rank, out)
            assert case.error in out[1], (rank, out)
            assert re.search(case.match, out[2]), (rank, out[2])
    if case.same_message:
        assert len({out[2] for out in outcomes}) == 1, outcomes


def test_table_size():
    """Check that the table covers at least 15 distinct bad inputs."""
    assert len([c for c in CASES if c.error is not None]) >= 15
