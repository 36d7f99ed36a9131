"""The Triton kernels against the torch kernels and a float64 transcription of the math.

Without CUDA these run under Triton's CPU interpreter (``tests/conftest.py`` sets
``TRITON_INTERPRET=1``); with CUDA they run compiled on the GPU. They skip only where
Triton is not installed.

Bugs guarded against: a launch on the current CUDA device instead of the tensors',
a program straddling two layers (another layer's scalars at a
fragment boundary), the tail of a fragment that is not a multiple of the block lost,
a chunk taking the vector-aligned path when its start or length is not aligned,
writes into the padding between fragments, elements of a fragment left unwritten,
the sums of a layer split over several fragments not accumulated, a NaN, an inf or a
sum that overflows across chunks not reported.

Tolerances (``(atol, rtol)``: ``|x - ref| <= atol + rtol * |ref|``):

- Update against torch_impl. Both round the same operations in the same order
  (the Triton launch turns FMA contraction off and divides with correct rounding),
  so under the interpreter the results are asserted equal bit for bit. On a GPU
  torch's own CUDA kernels may differ by an ulp (a division through a reciprocal),
  hence ``TORCH_TOL``.
- Update against float64. Moments, weights and gradients are O(1) and no term of
  the update exceeds ~1e2, so the ~7 fp32 roundings (2**-24 each) of one element
  stay under 1e-5 of the larger of 1 and the result; fp64 is 2**29 times finer.
- ``param_out`` against the cast of the kernel's own weight: one ulp of the
  low-precision format, because the interpreter truncates fp32 -> bf16 stores where
  a GPU rounds to nearest. One bf16 ulp is at most 2**-7 of the value (8 significant
  bits), one fp16 ulp at most 2**-10 (11 bits; atol covers fp16 subnormals).
- Sums of squares against float64: non-negative terms, so the relative error of a
  tree sum over a block plus one atomic add per chunk is at most
  ``(log2(BLOCK) + chunks) * 2**-24``, under 1e-5 for these tables. torch_impl
  rounds a bf16/fp16 gradient's norm to that format before squaring: a half-ulp
  ``e`` (2**-8 for bf16, 2**-11 for fp16) becomes ``(1 + e)**2 - 1``, just over
  ``2 * e``; 2**-14 more covers that excess and the fp32 summation. Max-abs is exact.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sys

import pytest
import torch

from sharded_novograd import ShardedNovoGrad
from sharded_novograd import functional as F
from sharded_novograd import kernels
from sharded_novograd.kernels import torch_impl, triton_impl
from sharded_novograd.layout import FragmentTable, ShardLayout

from .cases import SHAPES, close_ratio, make_params, random_table, rank_grad
from .distributed import run_world

RUNNABLE = triton_impl.TRITON_AVAILABLE and (triton_impl._INTERPRETED or torch.cuda.is_available())
needs_triton = pytest.mark.skipif(
    not RUNNABLE, reason="Triton is not installed (pip install 'sharded-novograd[triton]')"
    if not triton_impl.TRITON_AVAILABLE else "no CUDA device and TRITON_INTERPRET is not 1")
DEVICE = "cpu" if triton_impl._INTERPRETED or not torch.cuda.is_available() else "cuda"
EXACT = DEVICE == "cpu"

UPDATE_TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-13, 1e-13)}
TORCH_TOL = {torch.float32: (1e-6, 1e-6), torch.float64: (1e-15, 1e-15)}
CAST_TOL = {torch.bfloat16: (0.0, 2.0 ** -7), torch.float16: (2.0 ** -24, 2.0 ** -10), torch.float32: (0.0, 0.0)}
STATS_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5, torch.float64: 1e-13}
TORCH_STATS_TOL = {torch.float32: 2e-5, torch.float64: 2e-13, torch.bfloat16: 2.0 ** -7 + 2.0 ** -14,
                   torch.float16: 2.0 ** -10 + 2.0 ** -14}

SENTINEL = -7777.0  # exactly representable in every dtype used here


def _mixed_table(seed: int = 0) -> FragmentTable:
    """24 fragments of 5 of 6 layers, odd sizes, gaps, layers split many times."""
    return random_table(seed, 24, [0, 0, 1, 5, 64], [1, 2, 3, 63, 64, 65, 100, 127, 129, 300], 5, 6, tail=37)


# name: (table, block); block None is the launcher's own choice.
TABLES = {
    "empty": (lambda: FragmentTable([], [], [], 128, 3), 64),
    "single_elements": (lambda: FragmentTable([0, 1, 2, 1, 0, 3, 3, 1, 2, 0, 3, 1],
                                              [0, 1, 3, 4, 10, 11, 20, 63, 64, 65, 100, 127], [1] * 12, 131, 5),
                        16),
    "mixed_block64": (_mixed_table, 64),
    "mixed_block256": (_mixed_table, 256),
    "layout_rank1_of_3": (lambda: ShardLayout(tuple(SHAPES), 3).table(1), 16),
    # Every fragment on the vector grid: only the vector launch runs.
    "aligned": (lambda: FragmentTable([0, 1, 0, 2], [0, 64, 200, 320], [64, 128, 96, 192], 576, 3), 64),
    # One odd layer (a bias of 50257) shifts every later one off the vector grid.
    "shifted_by_odd_layer": (lambda: ShardLayout(((50257,), (64, 70), (1000,), (3,), (129,)), 1).table(0), 4096),
    "large": (lambda: FragmentTable([0, 1, 0, 2, 1], [0, 40001, 40010, 60010, 70100],
                                    [40001, 1, 20000, 9999, 33], 70200, 4), 4096),
    "large_default_block": (lambda: FragmentTable([0, 1, 0, 2, 1], [0, 40001, 40010, 60010, 70100],
                                                  [40001, 1, 20000, 9999, 33], 70200, 4), None),
}

BASE_HP = dict(lr=0.01, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01, grad_averaging=False, amsgrad=False,
               reg_inside_moment=True, bias_correction=False, init_zero=False, norm_type=2)
# name: (hyperparameters over BASE_HP, gradient scale for clipping)
PRESETS = {
    "paper": ({}, 1.0),
    "apex": (dict(reg_inside_moment=False, bias_correction=True), 1.0),
    "grad_averaging": (dict(grad_averaging=True), 1.0),
    "amsgrad": (dict(amsgrad=True, init_zero=True), 1.0),
    "linf": (dict(norm_type=math.inf, reg_inside_moment=False, bias_correction=True), 1.0),
    "clipped": ({}, 0.3),
}


def _table(name):
    build, block = TABLES[name]
    return build(), block


def _seed(*parts) -> int:
    return sum((i + 1) * 7919 * sum(map(ord, str(p))) for i, p in enumerate(parts)) % (2 ** 31)


def _layer_of(table: FragmentTable) -> torch.Tensor:
    """Layer of every shard element, -1 in the padding."""
    out = torch.full((table.shard_size,), -1, dtype=torch.int64)
    for layer, off, n in zip(table.layers, table.offsets, table.numels):
        out[off:off + n] = layer
    return out


def _grad(table, dtype, seed, scales=None) -> torch.Tensor:
    """Random gradient of per-layer scale, NaN in the padding (which must never be read)."""
    gen = torch.Generator().manual_seed(seed)
    layer = _layer_of(table)
    if scales is None:
        scales = 10.0 ** (torch.rand(table.num_layers, generator=gen, dtype=torch.float64) * 2 - 1)
    g = torch.randn(table.shard_size, generator=gen, dtype=torch.float64) * scales[layer.clamp(min=0)]
    g[layer < 0] = float("nan")
    return g.to(dtype)


def _reference_stats(grad, table):
    g = grad.detach().cpu().to(torch.float64)
    L = table.num_layers
    sumsq, maxabs = torch.zeros(L, dtype=torch.float64), torch.zeros(L, dtype=torch.float64)
    for layer, off, n in zip(table.layers, table.offsets, table.numels):
        if n:
            frag = g[off:off + n]
            sumsq[layer] += frag.square().sum()
            maxabs[layer] = max(maxabs[layer], frag.abs().max())
    return sumsq, maxabs


def _coeffs(table, grad, preset, dtype):
    """Coefficients from functional.layer_update for the gradient's own statistics.

    Layers 2 and 5 take no gradient (identity rows); layer 0 takes its first step.
    """
    hp = dict(BASE_HP, **PRESETS[preset][0])
    F.validate_hyperparameters(hp)
    L = table.num_layers
    hyper = F.LayerHyper.from_groups([hp], [0] * L, dtype, "cpu")
    sumsq, maxabs = _reference_stats(grad, table)
    gscale = PRESETS[preset][1]
    stat = (sumsq * gscale ** 2 if hp["norm_type"] == 2 else maxabs * gscale).to(dtype)
    gen = torch.Generator().manual_seed(L)
    has_grad = torch.tensor([i % 3 != 2 for i in range(L)])
    step = torch.tensor([float(i % 4) for i in range(L)], dtype=dtype)
    v = stat * (0.5 + 1.5 * torch.rand(L, generator=gen, dtype=dtype))
    v_max = v * (1 + torch.rand(L, generator=gen, dtype=dtype))
    coeffs = F.layer_update(stat, has_grad, v, v_max, step, hyper, norm_type=hp["norm_type"], gscale=gscale)[3]
    return coeffs, has_grad


def _reference_update(grad, exp_avg, weight, table, coeffs):
    """The documented formula, written out in float64."""
    g, m, w = (t.detach().cpu().to(torch.float64).clone() for t in (grad, exp_avg, weight))
    for layer, off, n in zip(table.layers, table.offsets, table.numels):
        c = dict(zip(F.COEFF_COLUMNS, coeffs[layer].tolist()))
        s = slice(off, off + n)
        m[s] = c["b1"] * m[s] + c["b3"] * (c["gscale"] * g[s] / c["d_in"] + c["wd_in"] * w[s])
        w[s] = w[s] - c["step"] * (m[s] / c["d_out"] + c["wd_out"] * w[s])
    return m, w


def _within(a, b, atol, rtol) -> bool:
    a, b = a.detach().cpu().to(torch.float64), b.detach().cpu().to(torch.float64)
    return bool(((a - b).abs() <= atol + rtol * b.abs()).all())


def run_update(table_name, preset, state_dtype, out_dtype):
    """Run both implementations from the same poisoned inputs; return everything to check."""
    table, block = _table(table_name)
    S, seed = table.shard_size, _seed(table_name, preset, state_dtype, out_dtype)
    gen = torch.Generator().manual_seed(seed)
    inside = _layer_of(table) >= 0
    grad = _grad(table, state_dtype, seed)
    m0 = torch.randn(S, generator=gen, dtype=torch.float64).to(state_dtype)
    w0 = torch.randn(S, generator=gen, dtype=torch.float64).to(state_dtype)
    m0[~inside] = SENTINEL
    w0[~inside] = SENTINEL
    coeffs, has_grad = _coeffs(table, grad, preset, state_dtype)
    outs = {}
    for name, impl, kw in (("triton", triton_impl, {"block": block}), ("torch", torch_impl, {})):
        m, w = m0.clone().to(DEVICE), w0.clone().to(DEVICE)
        out = None
        if out_dtype is not None:
            # NaN inside the fragments proves that every element is written.
            out = torch.where(inside, float("nan"), SENTINEL).to(out_dtype).to(DEVICE)
        impl.fused_update(grad.to(DEVICE), m, w, out, table, coeffs.to(DEVICE), **kw)
        outs[name] = (m.cpu(), w.cpu(), None if out is None else out.cpu())
    ref = _reference_update(grad, m0, w0, table, coeffs)
    return table, inside, has_grad, m0, w0, outs, ref


def check_update(table_name, preset, state_dtype, out_dtype):
    table, inside, has_grad, m0, w0, outs, (m_ref, w_ref) = run_update(table_name, preset, state_dtype, out_dtype)
    (m, w, out), (m_t, w_t, out_t) = outs["triton"], outs["torch"]
    # Padding untouched, bit for bit.
    assert torch.equal(m[~inside], m0[~inside]) and torch.equal(w[~inside], w0[~inside])
    if EXACT:
        assert torch.equal(m, m_t) and torch.equal(w, w_t)
    else:
        assert _within(m, m_t, *TORCH_TOL[state_dtype]) and _within(w, w_t, *TORCH_TOL[state_dtype])
    atol, rtol = UPDATE_TOL[state_dtype]
    assert _within(m[inside], m_ref[inside], atol, rtol), close_ratio(m[inside], m_ref[inside], rtol, atol)
    assert _within(w[inside], w_ref[inside], atol, rtol), close_ratio(w[inside], w_ref[inside], rtol, atol)
    # Layers without a gradient keep m and w bit for bit.
    frozen = inside & ~has_grad[_layer_of(table).clamp(min=0)]
    assert torch.equal(m[frozen], m0[frozen]) and torch.equal(w[frozen], w0[frozen])
    if out is not None:
        assert torch.equal(out[~inside], out_t[~inside])
        assert bool(torch.isfinite(out[inside]).all()), "an element of param_out inside a fragment was not written"
        assert _within(out[inside], w[inside].to(out.dtype), *CAST_TOL[out.dtype])
        assert _within(out[inside], out_t[inside], *CAST_TOL[out.dtype])


@needs_triton
@pytest.mark.parametrize("state_dtype,out_dtype", [(torch.float32, None), (torch.float32, torch.bfloat16),
                                                   (torch.float32, torch.float16), (torch.float64, None)])
@pytest.mark.parametrize("table_name", list(TABLES))
def test_fused_update_tables(table_name, state_dtype, out_dtype):
    """Check that the update matches torch and float64 on every fragment table, writes every
    fragment element and nothing else."""
    check_update(table_name, "apex", state_dtype, out_dtype)


@needs_triton
@pytest.mark.parametrize("state_dtype,out_dtype", [(torch.float32, torch.bfloat16), (torch.float64, torch.float32)])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_fused_update_presets(preset, state_dtype, out_dtype):
    """Check that every coefficient preset (identity rows included) matches torch and float64."""
    check_update("mixed_block256", preset, state_dtype, out_dtype)


def check_stats(table, block, grad):
    got = triton_impl.partial_stats(grad.to(DEVICE), table, block=block).cpu()
    want = torch_impl.partial_stats(grad, table)
    L = table.num_layers
    sumsq, maxabs = _reference_stats(grad, table)
    assert got.shape == (2 * L + 1,) and got.dtype == want.dtype
    rtol = STATS_TOL[grad.dtype]
    assert _within(got[:L], sumsq, 0.0, rtol), (got[:L], sumsq)
    assert _within(got[:L], want[:L], 0.0, TORCH_STATS_TOL[grad.dtype]), (got[:L], want[:L])
    assert torch.equal(got[L:2 * L], maxabs.to(got.dtype)) and torch.equal(got[L:2 * L], want[L:2 * L])
    return got


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("table_name", list(TABLES))
def test_partial_stats(table_name, dtype):
    """Check per-layer sums of squares and max-abs against torch and float64, with layers
    split over fragments, layers absent, and NaN in the padding that must not be read."""
    table, block = _table(table_name)
    got = check_stats(table, block, _grad(table, dtype, _seed(table_name, dtype)))
    assert got[2 * table.num_layers] == 0


@needs_triton
@pytest.mark.parametrize("block", [16, 128, 1 << 16])
def test_partial_stats_blocks(block):
    """Check that the statistics do not depend on the block size."""
    table = _mixed_table(1)
    check_stats(table, block, _grad(table, torch.float32, block))


# Layer 0's fragment spans two 64-element chunks; layer 1 stays clean.
POISON_TABLE = (lambda: FragmentTable([0, 1, 0], [0, 200, 300], [128, 50, 10], 400, 2), 64)


@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("poison", ["nan", "inf", "-inf", "nan_and_inf", "overflow"])
def test_partial_stats_flags_nonfinite(poison):
    """Check that a NaN, an inf, both in one fragment, or a sum of squares that overflows
    only across chunks (each chunk's own sum finite) set the non-finite slot, and leave
    the other layer's statistics exact."""
    table, block = POISON_TABLE[0](), POISON_TABLE[1]
    g = _grad(table, torch.float32, 3, scales=torch.ones(2, dtype=torch.float64))
    if poison == "overflow":
        # 64 * (1.8e18)**2 = 2.1e38 fits in fp32 (max 3.4e38); the layer's 128 elements do not.
        g[0:128] = 1.8e18
    else:
        values = {"nan": [math.nan], "inf": [math.inf], "-inf": [-math.inf], "nan_and_inf": [math.nan, math.inf]}
        for i, v in enumerate(values[poison]):
            g[70 + i] = v
    got = triton_impl.partial_stats(g.to(DEVICE), table, block=block).cpu()
    assert got[4] > 0, got
    assert torch_impl.partial_stats(g, table)[4] > 0  # the contract both implementations keep
    sumsq, maxabs = _reference_stats(g, table)
    assert _within(got[1:2], sumsq[1:2], 0.0, STATS_TOL[torch.float32]) and got[3] == maxabs[1]


@needs_triton
def test_empty_tables():
    """Check that a table without fragments (or with only empty ones) returns zeros and writes nothing."""
    for table, block in ((FragmentTable([], [], [], 128, 3), 64), (FragmentTable([1, 0], [5, 9], [0, 0], 64, 2), 16)):
        S, L = table.shard_size, table.num_layers
        g = torch.full((S,), float("nan"), device=DEVICE)
        m, w = torch.full((S,), SENTINEL, device=DEVICE), torch.full((S,), SENTINEL, device=DEVICE)
        out = torch.full((S,), SENTINEL, dtype=torch.bfloat16, device=DEVICE)
        st = triton_impl.partial_stats(g, table, block=block)
        assert torch.equal(st.cpu(), torch.zeros(2 * L + 1))
        triton_impl.fused_update(g, m, w, out, table, F.identity_coeffs(L).to(DEVICE), block=block)
        assert bool((m == SENTINEL).all() and (w == SENTINEL).all() and (out == SENTINEL).all())


def _error_args():
    table = FragmentTable([0, 1], [0, 40], [30, 20], 64, 2)
    S = table.shard_size
    return dict(grad=torch.randn(S, device=DEVICE), exp_avg=torch.zeros(S, device=DEVICE),
                weight=torch.randn(S, device=DEVICE), param_out=None, table=table,
                coeffs=F.identity_coeffs(2).to(DEVICE))


# (name, change to the valid arguments, error, message fragment)
ERROR_CASES = [
    ("grad_short", lambda a: a.update(grad=a["grad"][:-1]), ValueError, "1-D shard of 64"),
    ("grad_2d", lambda a: a.update(grad=a["grad"].view(8, 8)), ValueError, "1-D shard of 64"),
    ("weight_strided", lambda a: a.update(weight=torch.zeros(128, device=DEVICE)[::2]), ValueError, "contiguous"),
    ("mixed_dtypes", lambda a: a.update(exp_avg=a["exp_avg"].double()), ValueError, "share one dtype"),
    ("bf16_state", lambda a: a.update(**{k: a[k].bfloat16() for k in ("grad", "exp_avg", "weight")}),
     ValueError, "fp32 and fp64 state"),
    ("param_out_int", lambda a: a.update(param_out=torch.zeros(64, dtype=torch.int32, device=DEVICE)),
     ValueError, "param_out must be bf16, fp16 or fp32"),
    ("param_out_elsewhere", lambda a: a.update(param_out=torch.zeros(64, device="meta")), ValueError,
     "param_out is on meta"),
    ("coeffs_shape", lambda a: a.update(coeffs=a["coeffs"][:, :7]), ValueError, "coeffs must have shape (2, 8)"),
    ("block_not_power_of_two", lambda a: a.update(block=100), ValueError, "Invalid block: 100"),
    ("block_bool", lambda a: a.update(block=True), ValueError, "Invalid block: True"),
]


@needs_triton
@pytest.mark.parametrize("name,change,error,message", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_fused_update_rejects_bad_input(name, change, error, message):
    """Check that invalid arguments raise (never assert, never write out of bounds) with a clear message."""
    args = _error_args()
    change(args)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        triton_impl.fused_update(**args)


@needs_triton
def test_partial_stats_rejects_bad_input():
    """Check that partial_stats raises on integer and wrongly sized gradients."""
    table = FragmentTable([0], [0], [10], 16, 1)
    with pytest.raises(ValueError, match="floating point"):
        triton_impl.partial_stats(torch.zeros(16, dtype=torch.int32, device=DEVICE), table)
    with pytest.raises(ValueError, match="1-D shard of 16"):
        triton_impl.partial_stats(torch.zeros(17, device=DEVICE), table)


@needs_triton
def test_cpu_without_interpreter_raises(monkeypatch):
    """Check that kernels compiled for a GPU refuse CPU tensors with a RuntimeError saying what to set."""
    monkeypatch.setattr(triton_impl, "_INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton_impl.partial_stats(torch.zeros(16), FragmentTable([0], [0], [10], 16, 1))


def test_imports_without_triton(monkeypatch):
    """Check that the module imports where Triton is missing and then raises a RuntimeError saying how
    to install it, and that the dispatch refuses fused=True."""
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("sharded_novograd.kernels._triton_probe", triton_impl.__file__)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    assert probe.TRITON_AVAILABLE is False
    table = FragmentTable([0], [0], [10], 16, 1)
    with pytest.raises(RuntimeError, match=r"pip install 'sharded-novograd\[triton\]'"):
        probe.partial_stats(torch.zeros(16), table)
    with pytest.raises(RuntimeError, match="not installed"):
        probe.fused_update(torch.zeros(16), torch.zeros(16), torch.zeros(16), None, table, torch.zeros(1, 8))
    monkeypatch.setattr(kernels, "TRITON_AVAILABLE", False)
    with pytest.raises(RuntimeError, match="fused=True was requested but Triton is not installed"):
        kernels.use_triton(torch.zeros(1), True)


@needs_triton
def test_dispatch():
    """Check that fused=None keeps CPU tensors on torch even under the interpreter, and that
    fused=True reaches the Triton kernels through the public entry points."""
    table, block = _table("mixed_block256")
    g = _grad(table, torch.float32, 5)
    assert kernels.use_triton(torch.zeros(1), None) is False
    assert kernels.use_triton(torch.zeros(1), False) is False
    g = g.to(DEVICE)
    assert kernels.use_triton(g, True) is True
    assert kernels.use_triton(g, None) is (DEVICE == "cuda")
    if EXACT:  # the interpreter runs programs one after another: atomics add in a fixed order
        assert torch.equal(kernels.partial_stats(g, table, fused=True), triton_impl.partial_stats(g, table))


# name: (parameter dtype, optimizer kwargs, (atol, rtol) for parameters)
SHARDED_CASES = {
    # fp32: only the summation order of the per-layer sums of squares differs (a few ulps
    # of v), which NovoGrad's division by sqrt(v) passes on unamplified.
    "paper_fp32": (torch.float32, dict(lr=0.01, weight_decay=0.01), (1e-6, 1e-5)),
    # L-inf statistics are exact; bf16 parameters differ by the interpreter's truncating cast.
    "apex_linf_bf16": (torch.bfloat16, dict(lr=0.01, norm_type=math.inf, reg_inside_moment=False,
                                            bias_correction=True), (0.0, 2.0 ** -7)),
    "clip_amsgrad_fp64": (torch.float64, dict(lr=0.01, max_grad_norm=0.5, amsgrad=True), (1e-13, 1e-12)),
}


def _sharded_fused_vs_torch(rank, world):
    out = {}
    for name, (dtype, kwargs, _) in SHARDED_CASES.items():
        finals = []
        for fused in (True, False):
            params = make_params(SHAPES, dtype)
            opt = ShardedNovoGrad(params, fused=fused, **kwargs)
            for step in range(4):
                for i, p in enumerate(params):
                    p.grad = rank_grad(rank, step, i, p.shape, dtype)
                opt.step()
            finals.append(([p.detach().clone() for p in params], opt.state_dict()["state"]["exp_avg"].clone()))
        out[name] = finals
    return out


@needs_triton
@pytest.mark.skipif(DEVICE != "cpu", reason="gloo ranks hold CPU tensors, which need the Triton interpreter")
def test_sharded_fused_matches_torch():
    """Check that ShardedNovoGrad(fused=True) follows fused=False over 4 steps on one rank,
    layers without a gradient included."""
    results = run_world(_sharded_fused_vs_torch, 1, timeout=240)[0]
    for name, ((p_tri, m_tri), (p_torch, m_torch)) in results.items():
        dtype, _, (atol, rtol) = SHARDED_CASES[name]
        state_tol = UPDATE_TOL[torch.promote_types(dtype, torch.float32)]
        assert max(close_ratio(p, q, rtol, atol) for p, q in zip(p_tri, p_torch)) <= 1.0, name
        assert close_ratio(m_tri, m_torch, state_tol[1], state_tol[0]) <= 1.0, name


@needs_triton
def test_launches_run_under_the_tensors_device(monkeypatch):
    """Check that every kernel launch happens inside a guard that selects the tensors' device
    (Triton launches on the current CUDA device), and that the guard is ``torch.cuda.device``
    on CUDA and a no-op elsewhere."""
    inside, launched = [None], []

    @contextlib.contextmanager
    def guard(device):
        inside[0] = device
        try:
            yield
        finally:
            inside[0] = None

    class Spy:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(inside[0])
                return self.fn[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(triton_impl, "_device_guard", guard)
    monkeypatch.setattr(triton_impl, "_partial_stats_kernel", Spy(triton_impl._partial_stats_kernel))
    monkeypatch.setattr(triton_impl, "_fused_update_kernel", Spy(triton_impl._fused_update_kernel))
    table, block = _table("mixed_block64")
    g = _grad(table, torch.float32, 11).to(DEVICE)
    st = triton_impl.partial_stats(g, table, block=block)
    w, m = torch.randn(table.shard_size, device=DEVICE), torch.zeros(table.shard_size, device=DEVICE)
    triton_impl.fused_update(g, m, w, None, table, F.identity_coeffs(table.num_layers).to(DEVICE), block=block)
    # Two launches per call: the aligned bodies and the ragged ends of the fragments.
    assert launched == [g.device] * 4, launched
    assert _within(st[:table.num_layers].cpu(), _reference_stats(g.cpu(), table)[0], 0.0, STATS_TOL[torch.float32])
    monkeypatch.undo()
    cuda_guard = triton_impl._device_guard(torch.device("cuda", 1))
    assert isinstance(cuda_guard, torch.cuda.device) and cuda_guard.idx == 1
    assert isinstance(triton_impl._device_guard(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.skipif(not (RUNNABLE and DEVICE == "cuda" and torch.cuda.device_count() >= 2),
                    reason="needs two CUDA devices")
def test_kernels_on_a_device_that_is_not_current():
    """Check that tensors on cuda:1 are updated correctly while cuda:0 is the current device."""
    table, block = _table("mixed_block256")
    grad = _grad(table, torch.float32, 13)
    coeffs = _coeffs(table, grad, "apex", torch.float32)[0]
    gen = torch.Generator().manual_seed(13)
    m0, w0 = torch.randn(table.shard_size, generator=gen), torch.randn(table.shard_size, generator=gen)
    with torch.cuda.device(0):
        dev = torch.device("cuda", 1)
        m, w = m0.to(dev), w0.to(dev)
        st = triton_impl.partial_stats(grad.to(dev), table, block=block)
        triton_impl.fused_update(grad.to(dev), m, w, None, table, coeffs.to(dev), block=block)
        torch.cuda.synchronize(dev)
    m_ref, w_ref = _reference_update(grad, m0, w0, table, coeffs)
    inside = _layer_of(table) >= 0
    atol, rtol = UPDATE_TOL[torch.float32]
    assert _within(m.cpu()[inside], m_ref[inside], atol, rtol) and _within(w.cpu()[inside], w_ref[inside], atol, rtol)
    assert _within(st.cpu()[:table.num_layers], _reference_stats(grad, table)[0], 0.0, STATS_TOL[torch.float32])


BIG_SHARD = 2 ** 31 + 1024


@pytest.mark.skipif(not (RUNNABLE and DEVICE == "cuda"), reason="needs a CUDA device")
def test_shard_beyond_int32_on_gpu():
    """Check both kernels on a shard of more than 2**31 elements, with a fragment that crosses
    index 2**31 and one wholly past it: the 64-bit tables and pointer arithmetic reach the right
    elements and nothing else. Only windows around the fragments are initialised and read."""
    S = BIG_SHARD
    need = S * (3 * 4 + 2)
    if torch.cuda.mem_get_info()[0] < need * 1.1:
        pytest.skip(f"needs {need / 2 ** 30:.0f} GiB of free GPU memory")
    base = 2 ** 31
    table = FragmentTable([0, 1, 0, 2], [0, base - 37, base + 101, base + 700], [10, 90, 301, 3], S, 3)
    assert table.index_dtype == torch.int64
    windows = [slice(0, 64), slice(base - 64, S)]
    gen = torch.Generator().manual_seed(17)
    tensors = {}
    for name, dtype in (("g", torch.float32), ("m", torch.float32), ("w", torch.float32), ("out", torch.bfloat16)):
        t = torch.empty(S, dtype=dtype, device="cuda")
        for win in windows:
            n = win.stop - win.start
            t[win] = (torch.randn(n, generator=gen) if name != "out" else torch.full((n,), SENTINEL)).to(dtype).cuda()
        tensors[name] = t
    g, m, w, out = tensors["g"], tensors["m"], tensors["w"], tensors["out"]
    before = {k: [v[win].cpu().clone() for win in windows] for k, v in tensors.items()}
    coeffs = F.identity_coeffs(3)
    for col, value in ((F.B1, 0.9), (F.B3, 1.0), (F.GSCALE, 1.0), (F.D_IN, 2.0), (F.WD_IN, 0.01), (F.STEP, 0.1),
                       (F.WD_OUT, 0.001)):
        coeffs[:, col] = value
    st = triton_impl.partial_stats(g, table).cpu()
    triton_impl.fused_update(g, m, w, out, table, coeffs.cuda())
    torch.cuda.synchronize()
    sumsq = torch.zeros(3, dtype=torch.float64)
    c = dict(zip(F.COEFF_COLUMNS, coeffs[0].tolist()))
    for wi, win in enumerate(windows):
        g0, m0, w0 = (before[k][wi].double() for k in ("g", "m", "w"))
        m_ref, w_ref = m0.clone(), w0.clone()
        touched = torch.zeros(win.stop - win.start, dtype=torch.bool)
        for layer, off, n in zip(table.layers, table.offsets, table.numels):
            lo, hi = max(off, win.start) - win.start, min(off + n, win.stop) - win.start
            if lo >= hi:
                continue
            s = slice(lo, hi)
            touched[s] = True
            sumsq[layer] += g0[s].square().sum()
            m_ref[s] = c["b1"] * m0[s] + c["b3"] * (c["gscale"] * g0[s] / c["d_in"] + c["wd_in"] * w0[s])
            w_ref[s] = w0[s] - c["step"] * (m_ref[s] / c["d_out"] + c["wd_out"] * w0[s])
        m_got, w_got, out_got = (tensors[k][win].cpu() for k in ("m", "w", "out"))
        atol, rtol = UPDATE_TOL[torch.float32]
        assert _within(m_got[touched], m_ref[touched], atol, rtol), wi
        assert _within(w_got[touched], w_ref[touched], atol, rtol), wi
        assert _within(out_got[touched], w_got[touched].to(torch.bfloat16), *CAST_TOL[torch.bfloat16])
        # Everything outside the fragments is untouched, bit for bit.
        for k, got in (("m", m_got), ("w", w_got), ("out", out_got)):
            assert torch.equal(got[~touched], before[k][wi][~touched]), (k, wi)
    assert _within(st[:3], sumsq, 0.0, STATS_TOL[torch.float32]), (st[:3], sumsq)
