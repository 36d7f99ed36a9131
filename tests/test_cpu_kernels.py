"""The compiled one-pass CPU kernels (``kernels/cpu_impl.py``) against the torch kernels.

These run wherever the project's setup runs (a C++ compiler is part of it): none of them
skips, and ``test_builds`` fails, with the compiler's reason, where the build does.
The library is built once per machine and cached; the first build takes about a second.

Bugs guarded against: a fused multiply-add where torch rounds the product (any
contraction changes the last bit of most elements), another layer's scalars at a
fragment boundary or at a thread's boundary, the tail of an odd-length fragment lost,
writes into the padding or into ``grad``, ``param_out`` truncated instead of rounded,
the weight-decay term added or skipped where torch_impl does the opposite (it flips
the sign of a zero), results that depend on the number of threads, a NaN, an inf or an
overflowing sum of squares not reported, NaN in the padding read.

Tolerances:

- The update is asserted equal to torch_impl bit for bit (compared as integers, so
  that -0 and +0 differ), in float32 and float64, with and without ``param_out``:
  both round the same IEEE operations in the same order.
- Max-abs is exact, so bit for bit too.
- Sums of squares: the CPU kernel sums in float64 and rounds once to the gradient's
  dtype, plus one rounding per further fragment of a layer when the fragments are
  added, so against a float64 sum its relative error is at most
  ``fragments_per_layer * 2**-24`` in float32 (1e-6 covers the tables here) and
  ``~n * 2**-53`` in float64 (1e-13). torch_impl squares a rounded float32 norm
  computed by its own reduction, a few ulps: the two agree to 1e-5 in float32.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

from sharded_novograd import functional as F
from sharded_novograd import kernels
from sharded_novograd.kernels import cpu_impl, torch_impl
from sharded_novograd.layout import FragmentTable, ShardLayout

from .cases import SHAPES, random_table

SENTINEL = -7777.0  # exactly representable in every dtype used here
_INT = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
        torch.float16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT[t.dtype])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _mixed_table(seed: int = 0) -> FragmentTable:
    """30 fragments of 6 of 7 layers: odd sizes and starts, gaps, empty fragments, layers split many times."""
    return random_table(seed, 30, [0, 0, 1, 5, 17], [0, 1, 2, 3, 15, 17, 63, 65, 127, 1000, 4099], 6, 7,
                        start=3, tail=29)


TABLES = {
    "empty": lambda: FragmentTable([], [], [], 100, 3),
    "only_empty_fragments": lambda: FragmentTable([0, 1], [5, 9], [0, 0], 100, 2),
    "single_elements": lambda: FragmentTable([0, 1, 2, 1, 0, 3], [0, 1, 3, 4, 10, 11], [1] * 6, 13, 4),
    "mixed": _mixed_table,
    "layout_rank1_of_3": lambda: ShardLayout(tuple(SHAPES), 3).table(1),
    # Enough elements for several threads, cut at an odd element inside a layer.
    "large": lambda: FragmentTable([0, 1, 0, 2, 1], [1, 40003, 40010, 140011, 300000],
                                   [40001, 1, 100001, 99999, 33], 300037, 3),
}

BASE_HP = dict(lr=0.01, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01, grad_averaging=False, amsgrad=False,
               reg_inside_moment=True, bias_correction=False, init_zero=False, norm_type=2)
PRESETS = {  # name: (hyperparameters over BASE_HP, gradient scale)
    "paper": ({}, 1.0),
    "apex": (dict(reg_inside_moment=False, bias_correction=True), 1.0),  # decay outside the moment
    "no_decay_averaged": (dict(weight_decay=0.0, grad_averaging=True), 0.3),
}


def _layer_of(table: FragmentTable) -> torch.Tensor:
    out = torch.full((table.shard_size,), -1, dtype=torch.int64)
    for layer, off, n in zip(table.layers, table.offsets, table.numels):
        out[off:off + n] = layer
    return out


def _inputs(table: FragmentTable, dtype, seed: int):
    """Gradient, moment and weight with per-layer scales; NaN gradient and sentinels in the padding."""
    gen = torch.Generator().manual_seed(seed)
    layer = _layer_of(table)
    inside = layer >= 0
    scales = 10.0 ** (torch.rand(table.num_layers, generator=gen, dtype=torch.float64) * 4 - 2)
    g = torch.randn(table.shard_size, generator=gen, dtype=torch.float64) * scales[layer.clamp(min=0)]
    m = torch.randn(table.shard_size, generator=gen, dtype=torch.float64) * 0.1
    w = torch.randn(table.shard_size, generator=gen, dtype=torch.float64)
    # Exact zeros of both signs: where a weight-decay term adds w * 0, the sign of a zero changes.
    for t in (g, m, w):
        t[::97] = 0.0
        t[1::89] = -0.0
    g[~inside] = float("nan")
    m[~inside] = SENTINEL
    w[~inside] = SENTINEL
    return g.to(dtype), m.to(dtype), w.to(dtype), inside


def _coeffs(table, grad, preset, dtype):
    """Coefficients from functional.layer_update; every third layer takes no gradient (identity row)."""
    hp = dict(BASE_HP, **PRESETS[preset][0])
    L = table.num_layers
    hyper = F.LayerHyper.from_groups([hp], [0] * L, dtype, "cpu")
    stat = torch.zeros(L, dtype=torch.float64)
    g = grad.to(torch.float64).nan_to_num(0.0)
    for layer, off, n in zip(table.layers, table.offsets, table.numels):
        stat[layer] += g[off:off + n].square().sum()
    gscale = PRESETS[preset][1]
    stat = (stat * gscale ** 2 + 1e-3).to(dtype)
    has_grad = torch.tensor([i % 3 != 2 for i in range(L)])
    step = torch.tensor([float(i % 4) for i in range(L)], dtype=dtype)
    v = stat * 1.5
    return F.layer_update(stat, has_grad, v, v.clone(), step, hyper, norm_type=2, gscale=gscale)[3], has_grad


def _run(impl, table, g, m, w, out_dtype, coeffs, **kw):
    m, w, g = m.clone(), w.clone(), g.clone()
    out = None if out_dtype is None else torch.full((table.shard_size,), SENTINEL, dtype=out_dtype)
    impl.fused_update(g, m, w, out, table, coeffs, **kw)
    return g, m, w, out


def test_builds():
    """Check that the CPU kernels build here (CI installs with launch/setup.sh, which has a compiler)."""
    assert cpu_impl.available(), cpu_impl.unavailable_reason()
    assert cpu_impl.unavailable_reason() is None
    assert "-ffp-contract=off" in cpu_impl._FLAGS  # torch rounds every product: no FMA


@pytest.mark.parametrize("table_name", list(TABLES))
@pytest.mark.parametrize("state_dtype,out_dtype", [(torch.float32, None), (torch.float32, torch.bfloat16),
                                                   (torch.float32, torch.float16), (torch.float64, None),
                                                   (torch.float64, torch.float32),
                                                   (torch.float64, torch.bfloat16)])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_update_equals_torch(table_name, state_dtype, out_dtype, preset):
    """Check the one-pass update against torch_impl bit for bit: m, w, param_out, padding and grad."""
    table = TABLES[table_name]()
    g, m, w, inside = _inputs(table, state_dtype, seed=len(table) + len(preset))
    coeffs, _ = _coeffs(table, g, preset, state_dtype)
    g1, m1, w1, o1 = _run(cpu_impl, table, g, m, w, out_dtype, coeffs)
    g2, m2, w2, o2 = _run(torch_impl, table, g, m, w, out_dtype, coeffs)
    assert _same_bits(m1, m2) and _same_bits(w1, w2)
    assert _same_bits(g1, g)  # grad is only read
    assert _same_bits(m1[~inside], m[~inside]) and _same_bits(w1[~inside], w[~inside])
    if out_dtype is not None:
        assert _same_bits(o1, o2)
        # Round to nearest: the copy is the nearest representable value of the weight.
        assert _same_bits(o1[inside], w1[inside].to(out_dtype))
        assert bool((o1[~inside] == SENTINEL).all())


@pytest.mark.parametrize("scratch_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dispatch_update_threads_and_scratch(monkeypatch, scratch_grad, dtype):
    """Check that kernels.fused_update (fused=None) takes the CPU kernels, that the result does not
    depend on the number of threads (1, 2 and 3, boundaries inside fragments), and scratch_grad."""
    table = TABLES["large"]()
    g, m, w, _ = _inputs(table, dtype, seed=11)
    coeffs, _ = _coeffs(table, g, "apex", dtype)
    ref = _run(torch_impl, table, g, m, w, torch.bfloat16, coeffs)
    monkeypatch.setattr(cpu_impl, "MIN_PER_THREAD", 1000)
    for threads in (1, 2, 3):
        monkeypatch.setattr(cpu_impl, "_num_threads", lambda threads=threads: threads)
        _, m1, w1, o1 = _run(kernels, table, g, m, w, torch.bfloat16, coeffs, scratch_grad=scratch_grad)
        assert _same_bits(m1, ref[1]) and _same_bits(w1, ref[2]) and _same_bits(o1, ref[3]), threads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identity_coefficients_change_nothing(dtype):
    """Check that identity rows (layers without a gradient) leave m and w bit for bit, but for the sign
    of a zero: ``w - 0 * m`` turns -0 into +0 where m < 0, in torch_impl and the reference alike."""
    table = TABLES["mixed"]()
    g, m, w, _ = _inputs(table, dtype, seed=5)
    coeffs = F.identity_coeffs(table.num_layers, dtype)
    _, m1, w1, _ = _run(cpu_impl, table, g, m, w, None, coeffs)
    for new, old in ((m1, m), (w1, w)):
        assert torch.equal(new, old)  # -0 == +0
        assert _same_bits(new[old != 0], old[old != 0])
    _, m2, w2, _ = _run(torch_impl, table, g, m, w, None, coeffs)
    assert _same_bits(m1, m2) and _same_bits(w1, w2)


def test_weight_decay_zero_signs_follow_torch():
    """Check that a layer with zero decay next to one with decay gets torch_impl's zero signs: torch_impl
    adds ``w * 0`` there (turning -0 into +0), the reference update_tensor does not."""
    table = FragmentTable([0, 1], [0, 8], [8, 8], 16, 2)
    g = torch.tensor([-0.0] * 16)
    m = torch.tensor([-0.0] * 16)
    w = torch.tensor([1.0, -1.0] * 8)
    coeffs = F.identity_coeffs(2)
    coeffs[:, F.GSCALE] = 1.0
    coeffs[1, F.WD_IN] = 0.5
    _, m1, w1, _ = _run(cpu_impl, table, g, m, w, None, coeffs)
    _, m2, w2, _ = _run(torch_impl, table, g, m, w, None, coeffs)
    assert _same_bits(m1, m2) and _same_bits(w1, w2)
    assert not _same_bits(m1[:8], m[:8])  # -0 became +0: the test sees signs


def _reference_stats(grad, table):
    g = grad.to(torch.float64)
    L = table.num_layers
    sumsq, maxabs = torch.zeros(L, dtype=torch.float64), torch.zeros(L, dtype=torch.float64)
    for layer, off, n in zip(table.layers, table.offsets, table.numels):
        sumsq[layer] += g[off:off + n].square().sum()
        maxabs[layer] = max(maxabs[layer], g[off:off + n].abs().max())
    return sumsq, maxabs


@pytest.mark.parametrize("table_name", list(TABLES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_partial_stats(table_name, dtype):
    """Check sums of squares (float64 reference and torch_impl), max-abs (exact), the flag, max_abs=False."""
    table = TABLES[table_name]()
    g, _, _, _ = _inputs(table, dtype, seed=3)  # NaN in the padding: never read
    L = table.num_layers
    st = cpu_impl.partial_stats(g, table)
    tt = torch_impl.partial_stats(g, table)
    assert st.dtype == tt.dtype == dtype and st.shape == (2 * L + 1,)
    sumsq, maxabs = _reference_stats(g, table)
    rtol = 1e-6 if dtype == torch.float32 else 1e-13
    assert bool(((st[:L].double() - sumsq).abs() <= rtol * sumsq).all())
    assert bool(((st[:L] - tt[:L]).abs() <= (1e-5 if dtype == torch.float32 else 1e-13) * tt[:L].abs()).all())
    assert _same_bits(st[L:2 * L], tt[L:2 * L]) and torch.equal(st[L:2 * L].double(), maxabs)
    assert st[2 * L] == 0
    no_max = cpu_impl.partial_stats(g, table, max_abs=False)
    assert _same_bits(no_max[:L], st[:L]) and bool((no_max[L:] == 0).all())


def test_partial_stats_threads_deterministic(monkeypatch):
    """Check that the statistics are the same bits whatever the number of threads."""
    table = TABLES["large"]()
    g, _, _, _ = _inputs(table, torch.float32, seed=8)
    monkeypatch.setattr(cpu_impl, "MIN_PER_THREAD", 1000)
    outs = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(cpu_impl, "_num_threads", lambda threads=threads: threads)
        outs.append(kernels.partial_stats(g, table))
    assert all(_same_bits(o, outs[0]) for o in outs)


@pytest.mark.parametrize("poison", ["nan", "inf", "-inf", "overflow"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_partial_stats_flags_nonfinite(poison, dtype):
    """Check the non-finite flag as torch_impl sets it, and max-abs of the poisoned layer."""
    table = TABLES["mixed"]()
    g, _, _, _ = _inputs(table, dtype, seed=4)
    k = max(range(len(table)), key=lambda i: table.numels[i])
    off, n, layer = table.offsets[k], table.numels[k], table.layers[k]
    if poison == "overflow":  # finite elements whose sum of squares exceeds the dtype
        big = 1e20 if dtype == torch.float32 else 1e160
        g[off:off + n] = big
    else:
        g[off + n // 2] = float(poison)
    L = table.num_layers
    st, tt = cpu_impl.partial_stats(g, table), torch_impl.partial_stats(g, table)
    assert st[2 * L] > 0 and st[2 * L] == tt[2 * L]
    assert not bool(torch.isfinite(st[layer]))
    if poison == "nan":
        assert bool(torch.isnan(st[L + layer])) and bool(torch.isnan(tt[L + layer]))
    else:
        assert _same_bits(st[L:2 * L], tt[L:2 * L])


def test_dispatch_choices(monkeypatch):
    """Check what ``fused`` selects on CPU, including fused=True without Triton's interpreter."""
    x = torch.zeros(4)
    assert kernels.backend(x, None) == "cpu"
    assert kernels.backend(x.double(), None) == "cpu"
    assert kernels.backend(x.bfloat16(), None) == "torch"
    assert kernels.backend(x, False) == "torch"
    assert kernels.use_triton(x, None) is False
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kernels.backend(x, True) == "cpu"
    with pytest.raises(RuntimeError, match="CPU kernels take float32 and float64"):
        kernels.backend(x.bfloat16(), True)
    # Tensors the CPU kernels cannot take fall back under fused=None and are refused under True.
    table = FragmentTable([0], [0], [4], 8, 1)
    strided = torch.zeros(16)[::2]
    st = kernels.partial_stats(strided, table)
    assert torch.equal(st, torch_impl.partial_stats(strided, table))
    with pytest.raises(RuntimeError, match="contiguous 1-D"):
        kernels.partial_stats(strided, table, fused=True)
    with pytest.raises(ValueError, match="3 elements but the fragments reach element 4"):
        cpu_impl.partial_stats(torch.zeros(3), table)


def test_fallback_without_compiler(monkeypatch, caplog, tmp_path):
    """Check that a missing compiler gives a logged reason, torch results under fused=None, and a
    RuntimeError naming the reason under fused=True."""
    for name, value in (("_tried", False), ("_lib", None), ("_reason", None), ("_build_seconds", None)):
        monkeypatch.setattr(cpu_impl, name, value)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with caplog.at_level(logging.WARNING, logger="sharded_novograd.kernels.cpu_impl"):
        assert not cpu_impl.available()
    assert "no C++ compiler found" in caplog.text
    table = TABLES["mixed"]()
    g, m, w, _ = _inputs(table, torch.float32, seed=9)
    coeffs, _ = _coeffs(table, g, "paper", torch.float32)
    assert kernels.backend(g, None) == "torch"
    _, m1, w1, _ = _run(kernels, table, g, m, w, None, coeffs)
    _, m2, w2, _ = _run(torch_impl, table, g, m, w, None, coeffs)
    assert _same_bits(m1, m2) and _same_bits(w1, w2)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler found"):
        kernels.fused_update(g, m, w, None, table, coeffs, fused=True)


def test_build_cache(monkeypatch, tmp_path):
    """Check a build into an empty TORCH_EXTENSIONS_DIR, then a load of the cached library without a build."""
    for name, value in (("_tried", False), ("_lib", None), ("_reason", None), ("_build_seconds", None)):
        monkeypatch.setattr(cpu_impl, name, value)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("SHARDED_NOVOGRAD_CPU_KERNELS", raising=False)
    assert cpu_impl.available(), cpu_impl.unavailable_reason()
    built = sorted(os.listdir(tmp_path / "sharded_novograd_cpu"))
    assert [f for f in built if f.endswith(".so")] and not [f for f in built if f.endswith(".cpp")]
    mtime = {f: os.stat(tmp_path / "sharded_novograd_cpu" / f).st_mtime_ns for f in built}
    monkeypatch.setattr(cpu_impl, "_tried", False)
    monkeypatch.setattr(cpu_impl, "_lib", None)
    assert cpu_impl.available()
    assert {f: os.stat(tmp_path / "sharded_novograd_cpu" / f).st_mtime_ns for f in built} == mtime
    monkeypatch.setenv("SHARDED_NOVOGRAD_CPU_KERNELS", "0")
    monkeypatch.setattr(cpu_impl, "_tried", False)
    monkeypatch.setattr(cpu_impl, "_lib", None)
    assert not cpu_impl.available() and "SHARDED_NOVOGRAD_CPU_KERNELS=0" in cpu_impl.unavailable_reason()


def test_build_falls_back_to_temp_folder(monkeypatch, tmp_path):
    """Check that an unwritable cache folder (here: below a file) sends the build to the temp folder."""
    import tempfile

    for name, value in (("_tried", False), ("_lib", None), ("_reason", None), ("_build_seconds", None)):
        monkeypatch.setattr(cpu_impl, name, value)
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "a_file"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert cpu_impl.available(), cpu_impl.unavailable_reason()
    assert [f for f in os.listdir(tmp_path / "tmp" / os.listdir(tmp_path / "tmp")[0]) if f.endswith(".so")]


def test_threads_survive_fork(monkeypatch):
    """Check that a forked child (as the gloo test ranks are) runs the threaded kernels after the
    parent started its thread pool, instead of waiting forever on the parent's threads."""
    import multiprocessing

    table = TABLES["large"]()
    g, m, w, _ = _inputs(table, torch.float32, seed=12)
    coeffs, _ = _coeffs(table, g, "paper", torch.float32)
    ref = _run(torch_impl, table, g, m, w, None, coeffs)
    monkeypatch.setattr(cpu_impl, "MIN_PER_THREAD", 1000)
    monkeypatch.setattr(cpu_impl, "_num_threads", lambda: 2)
    assert _same_bits(_run(cpu_impl, table, g, m, w, None, coeffs)[2], ref[2])  # the pool now exists

    def child():
        # torch's own OpenMP pool hangs in a forked child once the parent used it (this
        # suite's earlier tests do); the ranks of tests/distributed.py do the same.
        torch.set_num_threads(1)
        out = _run(cpu_impl, table, g, m, w, None, coeffs)
        os._exit(0 if _same_bits(out[1], ref[1]) and _same_bits(out[2], ref[2]) else 1)

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(60)
    if proc.is_alive():
        proc.kill()
        proc.join()
        pytest.fail("the forked child hung in the threaded CPU kernel")
    assert proc.exitcode == 0


def test_benchmark_script_runs(tmp_path, capsys):
    """Check that launch/bench_cpu_update.py runs end to end (tiny size, no DeepSpeed build) and
    writes one ms and one GB/s row per implementation."""
    import csv
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "bench_cpu_update.py")
    spec = importlib.util.spec_from_file_location("bench_cpu_update", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.csv"
    impls = ["novograd_cpu", "novograd_foreach", "novograd_cpu_stats", "copy"]
    assert bench.main(["--sizes", "4099", "--threads", "1", "--rounds", "1", "--repeats", "2", "--out", str(out),
                       "--impls", *impls]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["impl"], r["metric"]) for r in rows) == sorted((i, m) for i in impls for m in ("ms", "GB/s"))
    assert all(float(r["p50"]) > 0 for r in rows)
