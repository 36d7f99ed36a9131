"""Bad inputs that used to pass silently: foreign state dicts, hyperparameters of the
wrong type or out of range, checkpoint manifests that point outside their directory,
saves that removed files they did not write, and manifests that differed per rank.

Every refused operation must leave the parameters and every piece of optimizer state
as they were, on every rank; each test checks that after each refusal. Multi-process
cases run in one forked gloo world per test module and topic (start-up dominates on
2 cores), each with a deadline so that a hang fails the test.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil

import pytest
import torch
import torch.distributed as dist

from sharded_novograd import NovoGrad, ShardedNovoGrad, checkpoint

from .distributed import shared_world

SHAPES = [(3,), (65,), (4, 5)]


def _same(a, b) -> bool:
    """Deep equality of state dicts: tensors bit for bit (dtype and shape included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and (a == b or (a != a and b != b))


def _snapshot(opt, params):
    return copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]


def _unchanged(opt, params, snap) -> bool:
    sd, values = snap
    return _same(opt.state_dict(), sd) and all(_same(p.detach(), v) for p, v in zip(params, values))


def _outcome(fn):
    try:
        return ("returned", fn())
    except Exception as e:  # noqa: BLE001 - the exception is the result
        return ("raised", type(e).__name__, str(e))


# ---------------------------------------------------------------------------- row 10: foreign state dicts
def _library_step(w, m, v, vmax, g, *, lr, betas, eps, weight_decay, grad_averaging, amsgrad):
    """One step of NeMo's Novograd / torch-optimizer's NovoGrad (identical updates), in float64,
    transcribed from their source: v starts at the first squared norm while it is 0."""
    b1, b2 = betas
    n = float((g * g).sum())
    v = n if v == 0 else b2 * v + (1 - b2) * n
    vmax = max(vmax, v)
    u = g / (math.sqrt(vmax if amsgrad else v) + eps)
    if weight_decay != 0:
        u = u + weight_decay * w
    if grad_averaging:
        u = u * (1 - b1)
    m = b1 * m + u
    return w - lr * m, m, v, vmax


def _library_state_dict():
    """A state dict laid out exactly as NeMo's ``Novograd`` and torch-optimizer's ``NovoGrad``
    save it: groups with only lr, betas, eps, weight_decay, grad_averaging, amsgrad (and
    params); per parameter an int ``step``, ``exp_avg`` shaped like the parameter, a 0-dim
    float32 ``exp_avg_sq`` (``torch.zeros([])``) and, with amsgrad, ``max_exp_avg_sq``.
    Parameter 1 has no state yet (it never had a gradient)."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(4, 3), (5,), (), (2, 3)]
    exp_avg = [torch.randn(s, generator=gen, dtype=torch.float64) * 0.1 for s in shapes]
    state = {
        0: {"step": 3, "exp_avg": exp_avg[0], "exp_avg_sq": torch.tensor(2.5)},
        2: {"step": 7, "exp_avg": exp_avg[2], "exp_avg_sq": torch.tensor(0.75), "max_exp_avg_sq": torch.tensor(1.25)},
        3: {"step": 1, "exp_avg": exp_avg[3], "exp_avg_sq": torch.tensor(4.0), "max_exp_avg_sq": torch.tensor(4.0)},
    }
    groups = [
        {"lr": 0.01, "betas": (0.95, 0.98), "eps": 1e-8, "weight_decay": 0.001, "grad_averaging": False,
         "amsgrad": False, "params": [0, 1]},
        {"lr": 0.02, "betas": (0.9, 0.0), "eps": 1e-6, "weight_decay": 0, "grad_averaging": True,
         "amsgrad": True, "params": [2, 3]},
    ]
    return {"state": state, "param_groups": groups}, shapes


def _library_params(shapes, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]


@pytest.mark.timeout(60)
def test_loads_nemo_and_torch_optimizer_state_dicts():
    """Check that a NeMo / torch-optimizer state dict loads into NovoGrad and continues
    their trajectory (it used to fail at step() with KeyError: 'norm_type', because
    torch replaces the param groups wholesale and theirs lack this project's keys).

    Tolerance: both sides run float64 from the same loaded values; only the order of
    the squared-norm sum may differ (NeMo takes ``norm().pow(2)``): 1e-12 relative.
    """
    sd, shapes = _library_state_dict()
    saved = copy.deepcopy(sd)
    params = _library_params(shapes)
    init = [p.detach().clone() for p in params]
    opt = NovoGrad([{"params": params[:2]}, {"params": params[2:]}], lr=0.5, betas=(0.5, 0.5))
    opt.load_state_dict(sd)

    for g, group in zip(opt.param_groups, saved["param_groups"]):
        for k, v in group.items():
            if k != "params":
                assert g[k] == v, (k, g[k], v)
        # Keys the libraries do not save take this optimizer's constructor values.
        assert (g["norm_type"], g["reg_inside_moment"], g["bias_correction"], g["init_zero"]) == (2, True, False, False)

    # The libraries' trajectory, continued from the saved state.
    ref = []
    for i, w in enumerate(init):
        st = saved["state"].get(i, {})
        ref.append({"w": w.clone(), "m": st["exp_avg"].clone() if st else torch.zeros_like(w),
                    "v": float(st.get("exp_avg_sq", 0.0)), "vmax": float(st.get("max_exp_avg_sq", 0.0)),
                    "step": st.get("step", 0)})
    hyper = [saved["param_groups"][0]] * 2 + [saved["param_groups"][1]] * 2
    gen = torch.Generator().manual_seed(11)
    for _ in range(5):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            r, h = ref[i], hyper[i]
            r["w"], r["m"], r["v"], r["vmax"] = _library_step(
                r["w"], r["m"], r["v"], r["vmax"], p.grad, lr=h["lr"], betas=h["betas"], eps=h["eps"],
                weight_decay=h["weight_decay"], grad_averaging=h["grad_averaging"], amsgrad=h["amsgrad"])
            r["step"] += 1
        opt.step()
    for i, p in enumerate(params):
        r, st = ref[i], opt.state[p]
        torch.testing.assert_close(p.detach(), r["w"], rtol=1e-12, atol=1e-14, msg=f"parameter {i}")
        torch.testing.assert_close(st["exp_avg"], r["m"], rtol=1e-12, atol=1e-14, msg=f"exp_avg {i}")
        assert math.isclose(float(st["exp_avg_sq"]), r["v"], rel_tol=1e-12), i
        assert int(st["step"]) == r["step"], i
        if hyper[i]["amsgrad"]:
            assert math.isclose(float(st["max_exp_avg_sq"]), r["vmax"], rel_tol=1e-12), i


def _bad_state_dicts():
    """(what, edit of the library state dict, expected error): each breaks the LAST entry,
    so that a loader writing as it checks would already have changed earlier ones."""
    def state(i, **kw):
        def edit(sd):
            sd["state"][i].update(kw)
        return edit

    def drop(i, key):
        def edit(sd):
            del sd["state"][i][key]
        return edit

    def group(i, **kw):
        def edit(sd):
            sd["param_groups"][i].update(kw)
        return edit

    def extra(sd):
        sd["state"][9] = {"step": 1}

    who = r"state of parameter 3 \(param group 1, position 1, shape \(2, 3\)\): "
    return [
        ("exp_avg of another size", state(3, exp_avg=torch.zeros(6, dtype=torch.float64)),
         who + r"exp_avg must be a floating-point tensor of the parameter's shape \(2, 3\), got a "
               r"torch\.float64 tensor of shape \(6,\)"),
        ("1-element exp_avg (broadcastable)", state(3, exp_avg=torch.zeros(1, dtype=torch.float64)),
         who + r"exp_avg must be .* got a torch\.float64 tensor of shape \(1,\)"),
        ("integer exp_avg", state(3, exp_avg=torch.zeros(2, 3, dtype=torch.int64)),
         who + r"exp_avg must be a floating-point tensor .* got a torch\.int64 tensor of shape \(2, 3\)"),
        ("exp_avg_sq per element", state(3, exp_avg_sq=torch.zeros(2, 3)),
         who + r"exp_avg_sq must be a 0-dim floating-point tensor \(one value per layer\), got a torch\.float32 "
               r"tensor of shape \(2, 3\)"),
        ("max_exp_avg_sq not a tensor", state(3, max_exp_avg_sq=4.0),
         who + r"max_exp_avg_sq must be a 0-dim floating-point tensor .* got float"),
        ("no exp_avg_sq", drop(3, "exp_avg_sq"),
         who + r"missing \['exp_avg_sq'\] \(it has \['exp_avg', 'max_exp_avg_sq', 'step'\]\)"),
        ("negative step", state(3, step=-1), who + r"step must be a whole number >= 0 .* got -1"),
        ("step as a string", state(3, step="1"), who + r"step must be a whole number .* got '1'"),
        ("invalid lr in a saved group", group(1, lr=-1.0),
         r"param group 1 of the loaded state dict: Invalid learning rate: -1\.0 \(lr must be"),
        ("eps 0 in a saved group", group(1, eps=0),
         r"param group 1 of the loaded state dict: Invalid epsilon value: 0"),
        ("state of a parameter no group lists", extra, r"state for parameter 9, which none of its param groups"),
    ]


@pytest.mark.timeout(60)
def test_load_state_dict_checks_every_tensor_before_writing():
    """Check that a state dict with a wrongly sized, typed or missing tensor (or an invalid
    group) is refused naming the parameter and key, with nothing changed (it used to be
    stored as given: a 1-element exp_avg broadcast, an (6,) exp_avg failing later, mid-step)."""
    good, shapes = _library_state_dict()
    params = _library_params(shapes)
    opt = NovoGrad([{"params": params[:2]}, {"params": params[2:]}])
    # Groups with every key of this class, so that only the state is under test here.
    good["param_groups"] = [{**opt.defaults, **g} for g in good["param_groups"]]
    opt.load_state_dict(copy.deepcopy(good))
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    failures = []
    for what, edit, match in _bad_state_dicts():
        bad = copy.deepcopy(good)
        edit(bad)
        snap = _snapshot(opt, params)
        out = _outcome(lambda: opt.load_state_dict(bad))
        if out[0] != "raised" or out[1] != "ValueError" or not re.search(match, out[2]):
            failures.append((what, out))
        if not _unchanged(opt, params, snap):
            failures.append((what, "state or parameters changed"))
    assert not failures, failures


# ---------------------------------------------------------------------------- row 13: hyperparameters
INF, NAN = math.inf, math.nan
LR = r"\(lr must be a finite number >= 0, a float or a 1-element tensor"
EPS = r"\(eps must be a finite number > 0"
WD = r"\(weight_decay must be a finite number >= 0"
HYPER_TABLE = [
    (dict(lr=torch.tensor([0.1, 0.2])), r"Invalid learning rate: tensor\(\[0\.1000, 0\.2000\]\) " + LR
     + r"; got a tensor of 2 elements\)"),
    (dict(lr=torch.zeros(3, 3)), r"Invalid learning rate: a torch\.float32 tensor of shape \(3, 3\) on cpu " + LR
     + r"; got a tensor of 9 elements\)"),
    (dict(lr=torch.tensor([])), r"Invalid learning rate: tensor\(\[\]\) " + LR + r"; got a tensor of 0 elements\)"),
    (dict(lr=torch.tensor(INF)), r"Invalid learning rate: tensor\(inf\) " + LR + r"\)"),
    (dict(lr=torch.tensor(True)), r"Invalid learning rate: tensor\(True\) " + LR + r"; got a torch\.bool tensor"),
    (dict(lr=None), r"Invalid learning rate: None " + LR + r"; got NoneType\)"),
    (dict(lr="0.1"), r"Invalid learning rate: '0\.1' " + LR + r"; got str\)"),
    (dict(lr=True), r"Invalid learning rate: True " + LR + r"; got a bool\)"),
    (dict(lr=INF), r"Invalid learning rate: inf " + LR + r"\)"),
    (dict(lr=-INF), r"Invalid learning rate: -inf " + LR),
    (dict(lr=NAN), r"Invalid learning rate: nan " + LR),
    (dict(lr=-0.1), r"Invalid learning rate: -0\.1 " + LR),
    (dict(eps=0), r"Invalid epsilon value: 0 " + EPS + r"\)"),
    (dict(eps=0.0), r"Invalid epsilon value: 0\.0 " + EPS),
    (dict(eps=-1e-8), r"Invalid epsilon value: -1e-08 " + EPS),
    (dict(eps=INF), r"Invalid epsilon value: inf " + EPS),
    (dict(eps=NAN), r"Invalid epsilon value: nan " + EPS),
    (dict(eps=None), r"Invalid epsilon value: None " + EPS + r"; got NoneType\)"),
    (dict(eps="1e-8"), r"Invalid epsilon value: '1e-8' " + EPS + r"; got str\)"),
    (dict(eps=torch.tensor(1e-8)), r"Invalid epsilon value: tensor\(1\.0000e-08\) " + EPS
     + r"; got a tensor: pass a Python float\)"),
    (dict(betas=(0.9, NAN)), r"Invalid beta parameter at index 1: nan \(betas\[1\] must be a float in \[0, 1\)\)"),
    (dict(betas=(0.9, 1.0)), r"Invalid beta parameter at index 1: 1\.0 \(betas\[1\] must be"),
    (dict(betas=(-0.1, 0.9)), r"Invalid beta parameter at index 0: -0\.1 \(betas\[0\] must be"),
    (dict(betas=(True, 0.9)), r"Invalid beta parameter at index 0: True \(betas\[0\] .*; got a bool\)"),
    (dict(betas=("0.9", 0.9)), r"Invalid beta parameter at index 0: '0\.9' \(betas\[0\] .*; got str\)"),
    (dict(betas=(torch.tensor(0.9), 0.9)), r"Invalid beta parameter at index 0: tensor\(0\.9000\) .*got a tensor"),
    (dict(betas=None), r"Invalid betas: None \(betas must be a pair of floats in \[0, 1\), got NoneType\)"),
    (dict(betas=(0.9,)), r"Invalid betas: \(0\.9,\) \(betas must be a pair .*got tuple of length 1\)"),
    (dict(betas=torch.tensor([0.9, 0.99])), r"Invalid betas: tensor\(\[0\.9000, 0\.9900\]\) \(betas must be a pair"
     r".*got Tensor\)"),
    (dict(weight_decay=INF), r"Invalid weight_decay value: inf " + WD + r"\)"),
    (dict(weight_decay=NAN), r"Invalid weight_decay value: nan " + WD),
    (dict(weight_decay=-1e-3), r"Invalid weight_decay value: -0\.001 " + WD),
    (dict(weight_decay=None), r"Invalid weight_decay value: None " + WD + r"; got NoneType\)"),
    (dict(weight_decay="0"), r"Invalid weight_decay value: '0' " + WD + r"; got str\)"),
    (dict(weight_decay=False), r"Invalid weight_decay value: False " + WD + r"; got a bool\)"),
    (dict(norm_type=torch.tensor([2.0, 2.0])), r"Invalid norm_type: tensor\(\[2\., 2\.\]\) \(norm_type must be 2 or "
     r"float\('inf'\)\)"),
    (dict(norm_type="inf"), r"Invalid norm_type: 'inf' \(norm_type must be 2"),
    (dict(norm_type=None), r"Invalid norm_type: None \(norm_type must be 2"),
    (dict(amsgrad=1), r"Invalid amsgrad: 1 \(amsgrad must be a bool, True or False\)"),
    (dict(grad_averaging=torch.tensor(True)),
     r"Invalid grad_averaging: tensor\(True\) \(grad_averaging must be a bool"),
]
# Values at the edges of the valid ranges, which both optimizers must accept.
HYPER_VALID = [dict(lr=0), dict(lr=torch.tensor(0.01)), dict(lr=torch.tensor([0.01], dtype=torch.float64)),
               dict(eps=1e-30), dict(betas=[0.0, 0.0]), dict(betas=(0.999, 0.999)), dict(weight_decay=0),
               dict(norm_type=float("inf")), dict(norm_type=2.0)]


def _hyper_world(rank, world):
    """Construct NovoGrad and ShardedNovoGrad (on this 1-rank gloo group) from each row."""
    out = []
    for kwargs in [k for k, _ in HYPER_TABLE] + HYPER_VALID:
        row = {}
        for cls in (NovoGrad, ShardedNovoGrad):
            params = [torch.nn.Parameter(torch.full(s, 0.5)) for s in SHAPES]
            ptrs = [p.data_ptr() for p in params]
            res = _outcome(lambda: [cls(params, **kwargs)] and None)
            intact = all(torch.equal(p.detach(), torch.full(p.shape, 0.5)) for p in params)
            row[cls.__name__] = (res, intact and ptrs == [p.data_ptr() for p in params])
        out.append(row)
    return out


@pytest.mark.timeout(120)
def test_hyperparameter_errors_name_argument_and_value():
    """Check that every invalid hyperparameter (a tensor of any size, None, str, bool, nan,
    inf, eps=0) raises ValueError naming the argument and the value, in NovoGrad and in
    ShardedNovoGrad, touching no parameter (lr as a 2-element tensor used to raise "only
    one element tensors can be converted...", lr=inf and eps=0 were accepted)."""
    results = shared_world(_hyper_world, 1, timeout=90, collective_timeout=30)[0]
    failures = []
    for (kwargs, match), row in zip(HYPER_TABLE, results):
        for name, (res, intact) in row.items():
            if res[0] != "raised" or res[1] != "ValueError" or not re.search(match, res[2]):
                failures.append((name, kwargs, res))
            if not intact:
                failures.append((name, kwargs, "parameters changed"))
    for kwargs, row in zip(HYPER_VALID, results[len(HYPER_TABLE):]):
        for name, (res, _) in row.items():
            if res[0] != "returned":
                failures.append((name, kwargs, res))
    assert not failures, "\n".join(map(repr, failures))


# ---------------------------------------------------------------------------- rows 11, 12, 14: checkpoints
def _trained(seed, steps=1):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    model = torch.nn.ParameterList(params)
    opt = ShardedNovoGrad(params, lr=0.1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, model, opt


def _escape(tmp, valid, kind):
    """A copy of ``valid`` whose manifest names rank 1's file outside the checkpoint directory
    (the file itself intact, its size and checksum as recorded): what a tampered manifest does."""
    base = os.path.join(tmp, kind)
    path = os.path.join(base, "ckpt")
    shutil.copytree(valid, path)
    with open(os.path.join(path, checkpoint.MANIFEST)) as f:
        m = json.load(f)
    entry = next(e for e in m["files"] if e.get("rank") == 1)
    outside = os.path.join(base, "outside.pt")
    if kind == "inside_link":  # a link that stays inside the directory is fine
        os.rename(os.path.join(path, entry["name"]), os.path.join(path, "real.pt"))
        os.symlink("real.pt", os.path.join(path, "link.pt"))
        entry["name"] = "link.pt"
    else:
        os.rename(os.path.join(path, entry["name"]), outside)
        if kind == "dotdot":
            entry["name"] = "../outside.pt"
        elif kind == "absolute":
            entry["name"] = outside
        elif kind == "symlink":
            os.symlink("../outside.pt", os.path.join(path, "link.pt"))
            entry["name"] = "link.pt"
    with open(os.path.join(path, checkpoint.MANIFEST), "w") as f:
        json.dump(m, f)
    return path


ESCAPES = ("dotdot", "absolute", "symlink", "inside_link")
USER_FILES = {  # names that look like this library's files, written by someone else
    "0123456789abcdef-rank00000.pt": b"user data 0",
    "fedcba9876543210-model.pt": b"user model",
    "0123456789abcdef-rank00001.pt.4242.tmp": b"user temp",
    f"{checkpoint.MANIFEST}.4242.tmp": b"user manifest draft",
    "aaaaaaaaaaaaaaaa-pending.json": b"not a record of this library",
}


def _read_bytes(path):
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return f.read()


def _checkpoint_world(rank, world, tmp):
    out = {}
    params, model, opt = _trained(0)
    valid = os.path.join(tmp, "valid")
    checkpoint.save(valid, opt, model)

    # Row 11: manifest names that lead out of the directory.
    if rank == 0:
        for kind in ESCAPES:
            _escape(tmp, valid, kind)
    dist.barrier()
    params, model, opt = _trained(1, steps=2)  # another state, which a refused load must keep
    for kind in ESCAPES:
        snap = _snapshot(opt, params)
        res = _outcome(lambda: checkpoint.load(os.path.join(tmp, kind, "ckpt"), opt, model) and "loaded")
        out[kind] = (res, _unchanged(opt, params, snap))
        dist.barrier()

    # Row 12: files with this library's names that no manifest of this checkpoint names.
    keep = os.path.join(tmp, "keep")
    if rank == 0:
        os.makedirs(keep)
        for name, data in USER_FILES.items():
            with open(os.path.join(keep, name), "wb") as f:
                f.write(data)
    dist.barrier()
    params, model, opt = _trained(2)
    first = checkpoint.save(keep, opt, model)
    snap = _snapshot(opt, params)
    second = checkpoint.save(keep, opt, model)
    out["keep"] = {"first": [e["name"] for e in first["files"]], "second": [e["name"] for e in second["files"]],
                   "listing": sorted(os.listdir(keep)), "unchanged": _unchanged(opt, params, snap),
                   "user": {n: _read_bytes(os.path.join(keep, n)) for n in USER_FILES}}
    dist.barrier()

    # Row 14: metadata (and the clock) differ per rank.
    meta = os.path.join(tmp, "meta")
    returned = checkpoint.save(meta, opt, model, metadata={"rank": rank, "note": "x" * (rank + 1)})
    dist.barrier()
    out["meta"] = {"returned": returned, "on_disk": checkpoint.read_manifest(meta)}
    return out


@pytest.fixture(scope="module")
def ckpt_tmp(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bad_inputs"))


def _ckpt(tmp):
    return shared_world(_checkpoint_world, 2, tmp, timeout=150, collective_timeout=30)


@pytest.mark.timeout(180)
def test_manifest_names_must_stay_inside_the_directory(ckpt_tmp):
    """Check that a manifest naming '../outside.pt', an absolute path or a symbolic link out
    of the directory is refused on every rank with the same error, nothing changed (such a
    file used to be loaded); a link that stays inside still loads."""
    results = _ckpt(ckpt_tmp)
    expected = {
        "dotdot": r"ranks 0, 1: manifest\.json in .* names the file '\.\./outside\.pt', which is not a plain file name",
        "absolute": r"ranks 0, 1: manifest\.json in .* names the file '/.*outside\.pt', which is not a plain file name",
        "symlink": r"ranks 0, 1: manifest\.json in .* names the file link\.pt, a symbolic link to .*outside\.pt, "
                   r"outside the checkpoint directory",
    }
    for kind, match in expected.items():
        outs = [r[kind] for r in results]
        for rank, (res, unchanged) in enumerate(outs):
            assert res[0] == "raised" and res[1] == "CheckpointError", (kind, rank, res)
            assert re.search(match, res[2]), (kind, rank, res[2])
            assert unchanged, (kind, rank)
        assert outs[0][0] == outs[1][0], kind  # the same message on every rank
        path = os.path.join(ckpt_tmp, kind, "ckpt")
        assert not checkpoint.is_complete(path)
        with pytest.raises(checkpoint.CheckpointError, match=match.replace("ranks 0, 1: ", "")):
            checkpoint.export_consolidated(path)
    for rank, r in enumerate(results):
        assert r["inside_link"][0] == ("returned", "loaded"), (rank, r["inside_link"])


@pytest.mark.timeout(180)
def test_save_removes_only_files_its_manifests_named(ckpt_tmp):
    """Check that saving into a directory keeps files no manifest of this checkpoint named,
    even with this library's names (they used to be deleted), while the replaced save's
    files go."""
    results = _ckpt(ckpt_tmp)
    r = results[0]["keep"]
    assert all(data == USER_FILES[n] for n, data in r["user"].items()), r["user"]
    assert r["listing"] == sorted([checkpoint.MANIFEST, *USER_FILES, *r["second"]]), r["listing"]
    assert not set(r["first"]) & set(r["listing"]), r["listing"]
    for rank, x in enumerate(results):
        assert x["keep"]["unchanged"], rank


@pytest.mark.timeout(180)
def test_save_returns_the_manifest_on_disk_on_every_rank(ckpt_tmp):
    """Check that save returns, on every rank, the manifest written to disk (rank 0's
    metadata), not a per-rank dict (rank 1's used to hold its own metadata and clock)."""
    results = _ckpt(ckpt_tmp)
    on_disk = results[0]["meta"]["on_disk"]
    assert on_disk["user"] == {"rank": 0, "note": "x"}
    for rank, r in enumerate(results):
        assert r["meta"]["returned"] == on_disk, rank
        assert r["meta"]["on_disk"] == on_disk, rank
