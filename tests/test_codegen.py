"""The GPU code of the Triton kernels, compiled for sm_80 and sm_90 on a machine without a GPU.

The interpreter tests (tests/test_kernels.py) check the arithmetic, but the interpreter
ignores what decides how a GPU accesses memory: alignment and vector width. Here the
kernels are compiled to PTX exactly as the host would launch them, and the PTX is read.

How: one child process (``python tests/test_codegen.py OUT``, without
``TRITON_INTERPRET``: kernels defined under the interpreter cannot be compiled for a
GPU) replaces both kernels with recorders, calls the real ``partial_stats`` and
``fused_update`` on a fragment table with aligned and unaligned fragments (and on a
shard of more than 2**31 elements, as meta tensors that allocate nothing), and compiles
every recorded launch (its argument dtypes, constexprs, ``num_warps`` and
``enable_fp_fusion``) for both targets, once at the launched ``BLOCK`` and once at twice
it. Every kernel here is straight-line code, so the instructions in the PTX are what each
thread runs; the difference between the two blocks is what each element costs, with the
per-program loads (chunk row, coefficients) and atomics cancelled out.

Properties checked, each the cause of a wrong result or lost bandwidth on hardware:

- a launch that may see a chunk whose start or length is not a multiple of the vector
  width uses no vector load or store at all (a misaligned 16-byte access is a fatal CUDA
  error; a vector rounded past the chunk reads and writes the next layer);
- the launch over aligned chunks loads and stores g, m and w 16 bytes at a time;
- the update has no ``fma`` and divides with ``div.rn`` (what torch computes);
- the bytes loaded and stored per element are DESIGN.md section 4's budget: the update
  reads g, m, w and writes m, w and the optional low-precision copy, the statistics read
  g once and write nothing per element;
- tables of shards beyond 2**31 elements are int64 and every data pointer is advanced by
  a 64-bit offset.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (80, 90)
VEC_BYTES = 16
BYTES = {"fp32": 4, "fp64": 8, "bf16": 2, "fp16": 2}
STATS_CASES = ("fp32", "fp64", "bf16", "fp16")  # gradient dtype
UPDATE_CASES = (("fp32", None), ("fp32", "bf16"), ("fp32", "fp16"), ("fp64", None), ("fp64", "bf16"))
# Fragments (layer, start, numel): aligned bodies longer than a block, a start and an end
# off the vector grid, a fragment too short for one aligned vector.
FRAGMENTS = ((0, 0, 4099), (1, 4099, 10001), (2, 14100, 3), (1, 14105, 5000))
SHARD = 20000
# A shard past int32 (as meta tensors): layer 1 starts beyond 2**31.
BIG_FRAGMENTS = ((0, 0, 4096), (1, 2 ** 31 + 1, 10 ** 6))
BIG_SHARD = 2 ** 31 + 1 + 10 ** 6 + 7
CHILD_TIMEOUT_S = 300
# Pointers indexed by shard position (the statistics' out_ptr is indexed by layer).
DATA_POINTERS = {"partial_stats": ("grad_ptr",), "fused_update": ("grad_ptr", "exp_avg_ptr", "weight_ptr", "out_ptr")}


# --------------------------------------------------------------------------- child
def _child(out_path: str) -> None:
    """Record every launch of the real entry points, compile each, write JSON to ``out_path``."""
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, ROOT)
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sharded_novograd.kernels import triton_impl as T
    from sharded_novograd.layout import FragmentTable

    dtypes = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
    names = {v: k for k, v in dtypes.items()}
    names.update({torch.int32: "i32", torch.int64: "i64"})
    launches = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.fn, grid, args, kwargs))
            return launch

    T._partial_stats_kernel = Recorder(T._partial_stats_kernel)
    T._fused_update_kernel = Recorder(T._fused_update_kernel)
    T._check_runnable = lambda t: None  # the tensors below are never touched by a kernel

    def record(case, kernel, call):
        start = len(launches)
        try:
            call()
        except Exception as e:  # reported per case, so that one failure does not hide the others
            return [dict(case=case, kernel=kernel, error=f"{type(e).__name__}: {e}")]
        return [dict(case=case, kernel=kernel, launch=launches[i]) for i in range(start, len(launches))]

    coeffs = lambda L, dt: torch.zeros(L, T.NUM_COEFFS, dtype=dt)  # noqa: E731
    rows = []
    for big in (False, True):
        frags = BIG_FRAGMENTS if big else FRAGMENTS
        device, S = ("meta", BIG_SHARD) if big else ("cpu", SHARD)
        table = FragmentTable([f[0] for f in frags], [f[1] for f in frags], [f[2] for f in frags], S, 3)
        tag = "big_" if big else ""
        for g in STATS_CASES:
            grad = torch.empty(S, dtype=dtypes[g], device=device)
            rows += record(f"{tag}stats_{g}", "partial_stats",
                           lambda: T.partial_stats(grad, table, block=T.DEFAULT_BLOCK))
            if big:
                break
        for state, out in UPDATE_CASES:
            if big and (state, out) != ("fp32", "bf16"):
                continue
            st = [torch.empty(S, dtype=dtypes[state], device=device) for _ in range(3)]
            po = torch.empty(S, dtype=dtypes[out], device=device) if out else None
            rows += record(f"{tag}update_{state}_{out}", "fused_update",
                           lambda: T.fused_update(*st, po, table, coeffs(3, dtypes[state]), block=T.DEFAULT_BLOCK))

    results = []
    for row in rows:
        if "error" in row:
            results.append(row)
            continue
        fn, grid, args, kwargs = row.pop("launch")
        sig, attrs, consts, options, info = {}, {}, {}, {}, {}
        for i, (name, a) in enumerate(zip(fn.arg_names, args)):
            if isinstance(a, torch.Tensor):
                sig[name] = "*" + names[a.dtype]
                attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
                if name == "chunks_ptr":
                    info["table_dtype"] = names[a.dtype]
                    info["num_rows"] = a.shape[0]
                    if a.device.type == "cpu":
                        info["rows"] = a.tolist()
            else:
                sig[name] = "i32"
        for name, v in kwargs.items():
            if name in fn.arg_names:
                sig[name], consts[name] = "constexpr", v
            else:
                options[name] = v
        info.update(constexprs=consts, options=options, grid=list(grid), signature=sig)
        for arch in ARCHS:
            for scale in (1, 2):
                c = dict(consts, BLOCK=consts["BLOCK"] * scale)
                os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="codegen-")
                compiled = triton.compile(ASTSource(fn, dict(sig), c, attrs), target=GPUTarget("cuda", arch, 32),
                                          options=dict(options))
                results.append(dict(row, **info, arch=arch, scale=scale, ptx=compiled.asm["ptx"],
                                    ttir=compiled.asm["ttir"]))
                results[-1]["constexprs"] = c
    with open(out_path, "w") as f:
        json.dump(results, f)


# --------------------------------------------------------------------------- PTX reading
_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")
_WIDTH = re.compile(r"\.[bfsu](8|16|32|64)\b")


def accesses(ptx: str):
    """Every global load/store as ``(op, vector_length, bytes)``."""
    out = []
    for op, mods in _ACCESS.findall(ptx):
        vec = re.search(r"\.v(\d)\b", mods)
        width = _WIDTH.findall(mods)
        n = int(vec.group(1)) if vec else 1
        out.append((op, n, n * int(width[-1]) // 8))
    return out


def per_element(pair):
    """Bytes per element from the launch at ``BLOCK`` and at ``2 * BLOCK``: ``{(op, size): bytes}``
    where ``size`` is the bytes of one instruction; per-program accesses cancel out."""
    one, two = pair
    threads = 32 * one["options"]["num_warps"]
    extra_elems = (two["constexprs"]["BLOCK"] - one["constexprs"]["BLOCK"]) / threads  # per thread
    count = {}
    for r, sign in ((one, -1), (two, 1)):
        for op, _, nbytes in accesses(r["ptx"]):
            count[(op, nbytes)] = count.get((op, nbytes), 0) + sign * nbytes
    return {k: v / extra_elems for k, v in count.items() if v}


# --------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def launches():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed (pip install 'sharded-novograd[triton]')")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ptx.json")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), out], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        if proc.returncode != 0:
            pytest.fail(f"compiling the kernels failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(out) as f:
            results = json.load(f)
    sys.stderr.write(f"\ncodegen: {len(results)} compilations in {time.perf_counter() - t0:.1f} s\n")
    return results


def _cases(results, kernel, big=False):
    """``{case: {"errors": [...], "launches": [[BLOCK result, 2*BLOCK result] per launch and arch]}}``."""
    out = {}
    for r in results:
        if r["kernel"] != kernel or r["case"].startswith("big_") != big:
            continue
        c = out.setdefault(r["case"], {"errors": [], "launches": []})
        if "error" in r:
            c["errors"].append(r["error"])
        elif r["scale"] == 1:
            c["launches"].append([r])
        else:
            c["launches"][-1].append(r)
    return out


def _vec_elems(r):
    """Elements per 16-byte vector of the widest tensor the kernel streams."""
    return VEC_BYTES // BYTES[r["signature"]["grad_ptr"][1:]]


def _may_see_unaligned(r) -> bool:
    """Whether a launch can be handed a chunk off the vector grid.

    A table counted in vectors (``VEC`` > 1, the start and length multiplied by it in the
    kernel) cannot; any other launch can, unless every row it was handed is aligned.
    """
    if r["constexprs"].get("VEC", 1) > 1:
        return False
    v = _vec_elems(r)
    rows = r.get("rows")
    return rows is None or any(start % v or n % v for _, start, n in rows)


def _vector_accesses(ptx):
    return [a for a in accesses(ptx) if a[1] > 1]


@pytest.mark.parametrize("kernel", ["partial_stats", "fused_update"])
def test_unaligned_chunks_use_scalar_accesses(launches, kernel):
    """Check that every launch that can see a chunk off the vector grid has no vector load or
    store, and that such a launch exists (the unaligned fragments of the table need one)."""
    for case, c in _cases(launches, kernel).items():
        assert not c["errors"], (case, c["errors"])
        unaligned = [pair[0] for pair in c["launches"] if _may_see_unaligned(pair[0])]
        assert {r["arch"] for r in unaligned} == set(ARCHS), f"{case}: no launch covers the unaligned chunks"
        for r in unaligned:
            vec = _vector_accesses(r["ptx"])
            assert not vec, (f"{case} sm_{r['arch']}: a launch that handles chunks whose start or length is not "
                             f"a multiple of {_vec_elems(r)} uses vector accesses {sorted(set(vec))}")


@pytest.mark.parametrize("kernel", ["partial_stats", "fused_update"])
def test_aligned_chunks_are_vectorised(launches, kernel):
    """Check that the launch over aligned chunks moves every per-element byte of g (and m, w)
    in 16-byte instructions (for fp32 ``ld.global.v4.b32`` / ``st.global.v4.b32``)."""
    for case, c in _cases(launches, kernel).items():
        assert not c["errors"], (case, c["errors"])
        aligned = [pair for pair in c["launches"] if not _may_see_unaligned(pair[0])]
        assert {p[0]["arch"] for p in aligned} == set(ARCHS), f"{case}: no launch takes the aligned path"
        for pair in aligned:
            r = pair[0]
            state = BYTES[r["signature"]["grad_ptr"][1:]]
            got = per_element(pair)
            wide_loads = got.get(("ld", VEC_BYTES), 0)
            # Every per-element load is of g (and m, w): all of it in 16-byte instructions.
            assert wide_loads == (1 if kernel == "partial_stats" else 3) * state, (case, r["arch"], got)
            if kernel == "fused_update":  # m and w; the low-precision copy is narrower
                assert got.get(("st", VEC_BYTES), 0) == 2 * state, (case, r["arch"], got)
            if state == 4:
                assert "ld.global.v4.b32" in r["ptx"], case


@pytest.mark.parametrize("kernel", ["partial_stats", "fused_update"])
def test_bytes_per_element_match_the_budget(launches, kernel):
    """Check DESIGN.md section 4's byte budget per element, on both paths and targets: the update
    reads g, m, w and writes m, w and the optional copy; the statistics read g and write nothing."""
    for case, c in _cases(launches, kernel).items():
        assert not c["errors"], (case, c["errors"])
        for pair in c["launches"]:
            r = pair[0]
            sig = r["signature"]
            got = per_element(pair)
            loads = sum(v for (op, _), v in got.items() if op == "ld")
            stores = sum(v for (op, _), v in got.items() if op == "st")
            g = BYTES[sig["grad_ptr"][1:]]
            if kernel == "partial_stats":
                want = (g, 0)
            else:
                out = BYTES[sig["out_ptr"][1:]] if r["constexprs"]["HAS_OUT"] else 0
                want = (3 * g, 2 * g + out)
            assert (loads, stores) == want, (f"{case} sm_{r['arch']} VEC={r['constexprs'].get('VEC')}: "
                                             f"(loaded, stored) bytes per element {(loads, stores)}, budget {want}")
            atomics = [len(re.findall(r"\b(?:atom|red)\.global", p["ptx"])) for p in pair]
            assert atomics[0] == atomics[1], f"{case}: atomics per element {atomics}"


def test_update_rounds_like_torch(launches):
    """Check that no update launch contracts into ``fma`` and that division is ``div.rn``
    (not ``div.approx``/``div.full``/``rcp.approx``), as torch's kernels compute it."""
    for case, c in _cases(launches, "fused_update").items():
        assert not c["errors"], (case, c["errors"])
        for pair in c["launches"]:
            r = pair[0]
            ptx, state = r["ptx"], r["signature"]["grad_ptr"][1:]
            assert r["options"].get("enable_fp_fusion") is False, (case, r["options"])
            assert not re.search(r"\bfma\.", ptx), f"{case} sm_{r['arch']}: fma in the update"
            assert re.search(rf"\bdiv\.rn\.f{state[2:]}\b", ptx), f"{case} sm_{r['arch']}: no div.rn.f{state[2:]}"
            assert not re.search(r"\b(div\.approx|div\.full|rcp\.approx)", ptx), f"{case}: approximate division"


@pytest.mark.parametrize("kernel", ["partial_stats", "fused_update"])
def test_shards_beyond_int32_use_64_bit_indices(launches, kernel):
    """Check that a shard of more than 2**31 elements launches with int64 chunk tables (loaded
    as 64-bit values) and that every data pointer is advanced by a 64-bit offset."""
    cases = _cases(launches, kernel, big=True)
    assert cases, "no big-shard case recorded"
    for case, c in cases.items():
        assert not c["errors"], (case, c["errors"])
        assert c["launches"], case
        for pair in c["launches"]:
            r = pair[0]
            assert r["table_dtype"] == "i64", (case, r["table_dtype"])
            assert "ld.global.b64" in r["ptx"], case
            for name in DATA_POINTERS[kernel]:
                if name == "out_ptr" and not r["constexprs"]["HAS_OUT"]:
                    continue
                offsets = re.findall(rf"tt\.addptr %{name}, %[\w.]+ : !tt\.ptr<\w+>, (i\d+)", r["ttir"])
                assert offsets and set(offsets) == {"i64"}, (case, name, offsets)


if __name__ == "__main__":
    _child(sys.argv[1])
