"""Compiled one-pass CPU implementation of the kernel contract.

The torch implementation makes about ten foreach passes over the shard; these kernels
make one: :func:`fused_update` reads ``grad``, ``exp_avg`` and ``weight`` once and
writes ``exp_avg``, ``weight`` (and ``param_out``) once, 20 bytes per fp32 element;
:func:`partial_stats` reads the gradient once for the sum of squares, the max-abs and
the non-finite flag together. The per-layer scalars come from the coefficient table
through the fragment table, never from a per-element index.

The C++ source below has no torch headers. At first use it is compiled with the system
C++ compiler (``$CXX``, else ``c++``/``g++``/``clang++``) into a shared library cached
under ``$TORCH_EXTENSIONS_DIR/sharded_novograd_cpu`` (default
``~/.cache/torch_extensions``; the temp folder where that is not writable), keyed by a
hash of the source, the flags, the compiler and the CPU, and loaded with ctypes; a build takes about a second and happens once per
machine, later processes only load the file. Concurrent first uses (forked ranks) take
a file lock, so one process builds and the others load its result.

Rounding: each product, quotient and sum is one IEEE operation in the tensors' dtype, in
the order of :func:`sharded_novograd.functional.update_tensor`, as torch_impl does; the
build passes ``-ffp-contract=off`` (no fused multiply-add) and no fast-math flag, so the
update is bit for bit torch_impl's in float32 and float64. ``param_out`` is rounded to
nearest even (float64 weights through float32 first, as torch's copy does). The sums of
squares are accumulated in float64 in a fixed order that depends on neither the thread
count nor the data, then rounded to the gradient's dtype, so they agree with torch_impl
to rounding (torch squares a rounded norm), and the max-abs is exact.

Threads: ``torch.get_num_threads()`` per call, at least :data:`MIN_PER_THREAD` elements
each, from a small pool of the library's own (not OpenMP, so no second OpenMP runtime
competes with torch's); its workers poll briefly after a call, then sleep, and a forked
child starts a pool of its own instead of waiting on threads it does not have.

``available()`` is False, with the reason logged once, where the compiler is missing,
the build fails, or ``SHARDED_NOVOGRAD_CPU_KERNELS=0`` is set; the dispatch in
:mod:`sharded_novograd.kernels` then takes the torch implementation.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import weakref
from typing import List, Optional

import torch

from ..functional import NUM_COEFFS, WD_IN, WD_OUT
from ..layout import FragmentTable

__all__ = ["available", "unavailable_reason", "build_seconds", "check", "partial_stats", "fused_update",
           "MIN_PER_THREAD"]

logger = logging.getLogger(__name__)

# Elements per thread below which starting one more thread costs more than it saves.
MIN_PER_THREAD = 1 << 16
# Statistics are summed per block of this many elements, then per fragment in block order.
STATS_BLOCK = 1 << 14

_DTYPES = {torch.float32: 0, torch.float64: 1}
_OUT_KINDS = {torch.float32: 1, torch.float64: 2, torch.bfloat16: 3, torch.float16: 4}
_FEATURE_BITS = {torch.bfloat16: 1, torch.float16: 2}
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fno-strict-aliasing", "-std=c++17",
          "-fPIC", "-shared", "-pthread"]

_state_lock = threading.Lock()
_lib = None
_reason: Optional[str] = None
_build_seconds: Optional[float] = None
_tried = False
_tables: "weakref.WeakKeyDictionary[FragmentTable, tuple]" = weakref.WeakKeyDictionary()


def _cache_root() -> str:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "torch_extensions")
    return os.path.join(root, "sharded_novograd_cpu")


def _compiler() -> Optional[List[str]]:
    """The compiler command: ``$CXX`` (which may carry arguments, as ``ccache g++``), else the first found."""
    cxx = shlex.split(os.environ.get("CXX", ""))
    if cxx:
        path = shutil.which(cxx[0]) or (cxx[0] if os.path.isfile(cxx[0]) else None)
        return [path, *cxx[1:]] if path else None
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def _cpu_identity() -> str:
    """What -march=native depends on: a library built for one CPU may not run on another."""
    seen = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part") and key not in seen:
                    seen[key] = line.strip()
    except OSError:
        pass
    return "\n".join(seen.values()) or platform.processor() or platform.machine()


def _build(cxx: List[str]) -> str:
    """Compile the library (or find it built), return its path; raise RuntimeError on failure."""
    version = subprocess.run([*cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([_SOURCE, " ".join(_FLAGS), version, platform.machine(), _cpu_identity()])
                         .encode()).hexdigest()[:16]
    directory = _cache_root()
    try:
        os.makedirs(directory, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=directory)
        probe.close()
    except OSError:  # a read-only home: build in the temp folder instead
        user = os.getuid() if hasattr(os, "getuid") else 0
        directory = os.path.join(tempfile.gettempdir(), f"sharded_novograd_cpu_{user}")
        os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"sn_cpu_{key}.so")
    if os.path.exists(path):
        return path
    with open(os.path.join(directory, f"sn_cpu_{key}.lock"), "w") as lock:
        try:
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same file
        except ImportError:  # pragma: no cover - no fcntl (Windows): the rename below stays atomic
            pass
        if os.path.exists(path):
            return path
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
        os.close(fd)
        src = tmp[:-3] + ".cpp"
        try:
            with open(src, "w") as f:
                f.write(_SOURCE)
            for flags in (_FLAGS, [f for f in _FLAGS if f != "-march=native"]):
                done = subprocess.run([*cxx, *flags, src, "-o", tmp], capture_output=True, text=True, timeout=600)
                if done.returncode == 0:
                    break
            else:
                raise RuntimeError(f"{' '.join(cxx)} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
            os.replace(tmp, path)
        finally:
            for leftover in (src, tmp):
                if os.path.exists(leftover):
                    os.remove(leftover)
    return path


def _load():
    global _lib, _reason, _build_seconds, _tried
    with _state_lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("SHARDED_NOVOGRAD_CPU_KERNELS", "1") == "0":
            _reason = "SHARDED_NOVOGRAD_CPU_KERNELS=0 is set"
        else:
            cxx = _compiler()
            if cxx is None:
                _reason = ("no C++ compiler found (set CXX, or install g++ or clang++)")
            else:
                start = time.perf_counter()
                try:
                    lib = ctypes.CDLL(_build(cxx))
                    lib.sn_features.restype = ctypes.c_int
                    lib.sn_update.restype = ctypes.c_int
                    lib.sn_update.argtypes = ([ctypes.c_int] * 4 + [ctypes.c_void_p] * 5
                                              + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64])
                    lib.sn_stats.restype = ctypes.c_int
                    lib.sn_stats.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                             ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                             ctypes.c_int64, ctypes.c_int64]
                    lib.features = lib.sn_features()
                    _lib = lib
                    _build_seconds = time.perf_counter() - start
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    _reason = f"building the CPU kernels failed: {e}"
        if _reason is not None:
            logger.warning("sharded_novograd: one-pass CPU kernels unavailable, using the torch kernels: %s",
                           _reason)
        return _lib


def available() -> bool:
    """Whether the compiled CPU kernels can run (builds or loads them on the first call)."""
    return _load() is not None


def unavailable_reason() -> Optional[str]:
    """Why :func:`available` is False (None when it is True)."""
    _load()
    return _reason


def build_seconds() -> Optional[float]:
    """Wall time of this process's first :func:`available` (compile or load), None before it."""
    return _build_seconds


def _table_rows(table: FragmentTable):
    """``(int64 [F, 3] rows (layer, offset, numel), layer index tensor, end of the last fragment)``."""
    try:
        hit = _tables.get(table)
    except TypeError:  # pragma: no cover - an unhashable table: build every call
        hit = None
    if hit is None:
        rows = torch.tensor(list(zip(table.layers, table.offsets, table.numels)), dtype=torch.int64).reshape(-1, 3)
        end = max((o + n for o, n in zip(table.offsets, table.numels)), default=0)
        hit = (rows.contiguous(), torch.tensor(table.layers, dtype=torch.int64), end)
        try:
            _tables[table] = hit
        except TypeError:  # pragma: no cover
            pass
    return hit


def _flat_problem(name: str, t: torch.Tensor, end: int) -> Optional[str]:
    if t.device.type != "cpu":
        return f"{name} is on {t.device}, not the CPU"
    if t.dim() != 1 or (t.numel() > 1 and t.stride(0) != 1):
        return f"{name} must be a contiguous 1-D tensor (got shape {tuple(t.shape)}, stride {t.stride()})"
    if t.numel() < end:
        return f"{name} has {t.numel()} elements but the fragments reach element {end}"
    return None


def check(grad: torch.Tensor, table: FragmentTable, exp_avg: Optional[torch.Tensor] = None,
          weight: Optional[torch.Tensor] = None, param_out: Optional[torch.Tensor] = None) -> Optional[str]:
    """Why these tensors cannot take the compiled kernels (None when they can)."""
    if grad.dtype not in _DTYPES:
        return f"dtype {grad.dtype} (the CPU kernels take float32 and float64)"
    end = _table_rows(table)[2]
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("weight", weight)):
        if t is not None:
            if t.dtype != grad.dtype:
                return f"{name} is {t.dtype} but grad is {grad.dtype}"
            why = _flat_problem(name, t, end)
            if why:
                return why
    if param_out is not None:
        if param_out.dtype not in _OUT_KINDS:
            return f"param_out dtype {param_out.dtype} (expected float32, float64, bfloat16 or float16)"
        lib = _load()
        bit = _FEATURE_BITS.get(param_out.dtype, 0)
        if lib is not None and bit and not lib.features & bit:
            return f"this compiler cannot convert to {param_out.dtype}"
        why = _flat_problem("param_out", param_out, end)
        if why:
            return why
    return None


def _num_threads() -> int:
    return torch.get_num_threads()


def _library():
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the one-pass CPU kernels are unavailable: {_reason}")
    return lib


def partial_stats(grad: torch.Tensor, table: FragmentTable, max_abs: bool = True) -> torch.Tensor:
    """One pass over ``grad``: the ``2 * L + 1`` statistics vector of the kernel contract."""
    lib = _library()
    why = check(grad, table)
    if why:
        raise ValueError(f"partial_stats: {why}")
    L = table.num_layers
    out = torch.zeros(2 * L + 1, dtype=grad.dtype)
    if len(table) == 0:
        return out
    rows, idx, _ = _table_rows(table)
    F_ = len(table)
    sq = torch.empty(F_, dtype=torch.float64)
    mx = torch.zeros(F_, dtype=torch.float64)
    rc = lib.sn_stats(_DTYPES[grad.dtype], grad.data_ptr(), rows.data_ptr(), F_, int(max_abs), sq.data_ptr(),
                      mx.data_ptr(), _num_threads(), STATS_BLOCK, MIN_PER_THREAD)
    if rc != 0:  # pragma: no cover - the arguments were checked above
        raise RuntimeError(f"sn_stats returned {rc}")
    sq = sq.to(grad.dtype)
    out[:L].index_add_(0, idx, sq)
    # NaN or inf elements, or a sum of squares too large for the dtype.
    out[2 * L] = (~torch.isfinite(sq)).sum()
    if max_abs:
        mx = torch.where(torch.isnan(sq), sq.new_tensor(float("nan")), mx.to(grad.dtype))  # as torch's norm
        out[L:2 * L].scatter_reduce_(0, idx, mx, reduce="amax")
    return out


def fused_update(grad: torch.Tensor, exp_avg: torch.Tensor, weight: torch.Tensor,
                 param_out: Optional[torch.Tensor], table: FragmentTable, coeffs: torch.Tensor,
                 scratch_grad: bool = False) -> None:
    """One pass over the fragments; the contract of :func:`sharded_novograd.kernels.fused_update`.

    ``grad`` is only read, whatever ``scratch_grad`` says.
    """
    lib = _library()
    why = check(grad, table, exp_avg, weight, param_out)
    if why:
        raise ValueError(f"fused_update: {why}")
    if coeffs.dim() != 2 or coeffs.shape[1] != NUM_COEFFS or coeffs.shape[0] < table.num_layers:
        raise ValueError(f"fused_update: coeffs must be [{table.num_layers}, {NUM_COEFFS}], "
                         f"got {tuple(coeffs.shape)}")
    if len(table) == 0:
        return
    rows, idx, _ = _table_rows(table)
    # torch_impl adds a weight-decay term to every fragment when any of them has one
    # (adding w * 0 can turn -0 into +0, so this is part of bit equality).
    wd_in, wd_out = coeffs.index_select(0, idx.to(coeffs.device))[:, [WD_IN, WD_OUT]].ne(0).any(0).tolist()
    c = coeffs.detach().to(device="cpu", dtype=grad.dtype).contiguous()
    rc = lib.sn_update(_DTYPES[grad.dtype], 0 if param_out is None else _OUT_KINDS[param_out.dtype],
                       int(wd_in), int(wd_out), grad.data_ptr(), exp_avg.data_ptr(), weight.data_ptr(),
                       None if param_out is None else param_out.data_ptr(), rows.data_ptr(), len(table),
                       c.data_ptr(), _num_threads(), MIN_PER_THREAD)
    if rc != 0:  # pragma: no cover - the arguments were checked above
        raise RuntimeError(f"sn_update returned {rc}")


_SOURCE = r"""
// One-pass CPU kernels of the kernel contract (see sharded_novograd/kernels/__init__.py).
//
// Compiled at first use by the Python code above with the system C++ compiler, loaded with ctypes;
// no torch headers, so the build takes about a second. The arithmetic must round exactly
// like torch_impl: every product, quotient and sum is one IEEE operation in the tensor's
// dtype, in the order of functional.update_tensor. The build passes -ffp-contract=off
// (no fused multiply-add) and no fast-math flag; the compiler still vectorises the loops,
// and vector IEEE operations round as scalar ones do.
//
// Threads: a small pool of its own (below), not OpenMP: a second OpenMP runtime next to
// torch's would fight over cores, and the pool is made safe across fork().

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include <pthread.h>

namespace {

enum Out { OUT_NONE = 0, OUT_F32 = 1, OUT_F64 = 2, OUT_BF16 = 3, OUT_F16 = 4 };
// Coefficient columns, functional.COEFF_COLUMNS.
enum { B1 = 0, B3 = 1, GSCALE = 2, D_IN = 3, WD_IN = 4, STEP = 5, D_OUT = 6, WD_OUT = 7, NUM_COEFFS = 8 };

struct Frag {
    int64_t layer, offset, numel;
};

// float -> bfloat16, round to nearest even (c10::BFloat16's rule; NaN -> quiet NaN).
inline uint16_t to_bf16(float f) {
    uint32_t b;
    std::memcpy(&b, &f, 4);
    uint32_t r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
    return f != f ? uint16_t(0x7FC0) : uint16_t(r);
}

template <typename O> struct Store;
template <> struct Store<float> { template <typename T> static float cast(T x) { return float(x); } };
template <> struct Store<double> { template <typename T> static double cast(T x) { return double(x); } };
// Through float first, as torch's double -> bf16/fp16 copies are.
template <> struct Store<uint16_t> { template <typename T> static uint16_t cast(T x) { return to_bf16(float(x)); } };
#ifdef __FLT16_MAX__
template <> struct Store<_Float16> { template <typename T> static _Float16 cast(T x) { return _Float16(float(x)); } };
#endif

template <typename T, typename O, bool HAS_OUT, bool WDIN, bool WDOUT>
void update_span(const T* __restrict__ g, T* __restrict__ m, T* __restrict__ w, O* __restrict__ out,
                 int64_t n, const T* c) {
    const T b1 = c[B1], b3 = c[B3], gs = c[GSCALE], din = c[D_IN], wdin = c[WD_IN];
    const T step = c[STEP], dout = c[D_OUT], wdout = c[WD_OUT];
    for (int64_t i = 0; i < n; ++i) {
        const T wi = w[i];
        T u = g[i] * gs;
        u = u / din;
        if (WDIN) {
            const T d = wi * wdin;
            u = u + d;
        }
        u = u * b3;
        T mi = m[i] * b1;
        mi = mi + u;
        m[i] = mi;
        T t = mi / dout;
        if (WDOUT) {
            const T d = wi * wdout;
            t = t + d;
        }
        t = t * step;
        const T wn = wi - t;
        w[i] = wn;
        if (HAS_OUT) out[i] = Store<O>::cast(wn);
    }
}

using SpanFn = void (*)(const void*, void*, void*, void*, int64_t, const void*);

template <typename T, typename O, bool HAS_OUT, bool WDIN, bool WDOUT>
void span_entry(const void* g, void* m, void* w, void* out, int64_t n, const void* c) {
    update_span<T, O, HAS_OUT, WDIN, WDOUT>(static_cast<const T*>(g), static_cast<T*>(m), static_cast<T*>(w),
                                            static_cast<O*>(out), n, static_cast<const T*>(c));
}

template <typename T, typename O, bool HAS_OUT>
SpanFn pick_wd(int wd_in, int wd_out) {
    if (wd_in && wd_out) return span_entry<T, O, HAS_OUT, true, true>;
    if (wd_in) return span_entry<T, O, HAS_OUT, true, false>;
    if (wd_out) return span_entry<T, O, HAS_OUT, false, true>;
    return span_entry<T, O, HAS_OUT, false, false>;
}

template <typename T>
SpanFn pick(int out_kind, int wd_in, int wd_out) {
    switch (out_kind) {
        case OUT_NONE: return pick_wd<T, T, false>(wd_in, wd_out);
        case OUT_F32: return pick_wd<T, float, true>(wd_in, wd_out);
        case OUT_F64: return pick_wd<T, double, true>(wd_in, wd_out);
        case OUT_BF16: return pick_wd<T, uint16_t, true>(wd_in, wd_out);
#ifdef __FLT16_MAX__
        case OUT_F16: return pick_wd<T, _Float16, true>(wd_in, wd_out);
#endif
        default: return nullptr;
    }
}

size_t out_size(int out_kind) {
    switch (out_kind) {
        case OUT_F32: return 4;
        case OUT_F64: return 8;
        case OUT_BF16: case OUT_F16: return 2;
        default: return 0;
    }
}

// A pool of worker threads. Between calls a worker polls for about SPIN_US, then sleeps
// on a condition variable: starting threads per call, or waking a sleeping one (an idle
// virtual CPU may take a millisecond to come back), costs as much as a 2**20-element
// update; OpenMP runtimes poll the same way. After fork() the child has none of the
// parent's threads: an atfork handler drops the pool there (leaking it, as its threads
// cannot be joined) and the child starts its own.
constexpr int64_t SPIN_US = 200;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

// Polls pred() for up to SPIN_US; whether it became true.
template <typename Pred>
bool spin_until(Pred pred) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(SPIN_US);
    for (;;) {
        for (int i = 0; i < 64; ++i) {
            if (pred()) return true;
            cpu_relax();
        }
        if (std::chrono::steady_clock::now() > until) return pred();
    }
}

struct Pool {
    std::mutex run_mu;  // one parallel call at a time (ctypes releases the GIL)
    std::mutex mu;
    std::condition_variable wake, done;
    std::vector<std::thread> threads;
    const std::function<void(int)>* job = nullptr;
    // (generation << 16) | threads of the current call, in one word so that a worker
    // never pairs one call's generation with another's thread count.
    std::atomic<uint64_t> state{0};
    std::atomic<int> pending{0};

    void worker(int k, uint64_t seen) {
        for (;;) {
            auto changed = [&] { return (state.load(std::memory_order_acquire) >> 16) != seen; };
            if (!spin_until(changed)) {
                std::unique_lock<std::mutex> lock(mu);
                wake.wait(lock, changed);
            }
            const uint64_t st = state.load(std::memory_order_acquire);
            seen = st >> 16;
            if (k < int(st & 0xFFFF)) {
                (*job)(k);
                if (pending.fetch_sub(1, std::memory_order_acq_rel) == 1) {
                    std::lock_guard<std::mutex> lock(mu);
                    done.notify_one();
                }
            }
        }
    }

    // Runs fn(k) for k in [0, n); the calling thread takes k = 0.
    void run(int n, const std::function<void(int)>& fn) {
        std::lock_guard<std::mutex> serial(run_mu);
        const uint64_t gen = state.load(std::memory_order_relaxed) >> 16;
        while (int(threads.size()) < n - 1) {
            const int k = int(threads.size()) + 1;
            threads.emplace_back([this, k, gen] { worker(k, gen); });
        }
        job = &fn;
        pending.store(n - 1, std::memory_order_relaxed);
        {
            std::lock_guard<std::mutex> lock(mu);
            state.store(((gen + 1) << 16) | uint64_t(n), std::memory_order_release);
        }
        wake.notify_all();
        fn(0);
        auto finished = [&] { return pending.load(std::memory_order_acquire) == 0; };
        if (!spin_until(finished)) {
            std::unique_lock<std::mutex> lock(mu);
            done.wait(lock, finished);
        }
    }
};

Pool* pool = nullptr;
std::once_flag atfork_once;

void forget_pool_in_child() { pool = nullptr; }

template <typename Fn>
void run_parallel(int n, Fn fn) {
    if (n <= 1) {
        fn(0);
        return;
    }
    std::call_once(atfork_once, [] { pthread_atfork(nullptr, nullptr, forget_pool_in_child); });
    if (pool == nullptr) pool = new Pool();
    const std::function<void(int)> job(fn);
    pool->run(n, job);
}

int threads_for(int64_t work, int nthreads, int64_t min_per_thread) {
    int64_t most = min_per_thread > 0 ? work / min_per_thread : nthreads;
    if (most > 1024) most = 1024;
    if (most > nthreads) most = nthreads;
    return most < 1 ? 1 : int(most);
}

template <typename T> struct Bits;
template <> struct Bits<float> { using U = uint32_t; static constexpr U ABS = 0x7FFFFFFFu; };
template <> struct Bits<double> { using U = uint64_t; static constexpr U ABS = 0x7FFFFFFFFFFFFFFFull; };

// Sum of squares (in double, 16 interleaved partial sums added in a fixed order) and
// max |x| of one block. The order depends on the block only, never on the threads. The
// max is an integer max over the bit patterns of |x| (read through an integer pointer:
// the build passes -fno-strict-aliasing), which order as the values do for non-negative
// floats and put NaN above inf; the compiler vectorises that reduction, not a float one.
// It runs on each 1024 elements right after the sum, while they are in L1.
template <typename T, bool MAX>
void block_stats(const T* __restrict__ x, int64_t n, double* sq, double* mx) {
    using U = typename Bits<T>::U;
    const U* __restrict__ xb = reinterpret_cast<const U*>(x);
    constexpr int K = 16;
    constexpr int64_t SUB = 1024;
    double acc[K];
    for (int j = 0; j < K; ++j) acc[j] = 0.0;
    U top = 0;
    int64_t i = 0;
    for (int64_t lo = 0; lo < n; lo += SUB) {
        const int64_t hi = n - lo < SUB ? n : lo + SUB;
        for (i = lo; i + K <= hi; i += K) {
            for (int j = 0; j < K; ++j) {
                const double v = double(x[i + j]);
                acc[j] += v * v;
            }
        }
        for (int j = 0; i < hi; ++i, ++j) {
            const double v = double(x[i]);
            acc[j] += v * v;
        }
        if (MAX) {
            for (int64_t k = lo; k < hi; ++k) {
                const U a = xb[k] & Bits<T>::ABS;
                top = a > top ? a : top;
            }
        }
    }
    double s = 0.0;
    for (int j = 0; j < K; ++j) s += acc[j];
    T m;
    std::memcpy(&m, &top, sizeof(m));
    *sq = s;
    *mx = double(m);
}

template <typename T>
void stats_impl(const T* g, const Frag* frags, int64_t nfrag, int want_max, double* sq, double* mx,
                int nthreads, int64_t block, int64_t min_per_thread) {
    struct Block {
        int64_t frag, start, numel;
    };
    std::vector<Block> blocks;
    int64_t total = 0;
    for (int64_t f = 0; f < nfrag; ++f) {
        for (int64_t s = 0; s < frags[f].numel; s += block) {
            const int64_t n = frags[f].numel - s < block ? frags[f].numel - s : block;
            blocks.push_back({f, frags[f].offset + s, n});
        }
        total += frags[f].numel;
    }
    const int64_t nb = int64_t(blocks.size());
    std::vector<double> bsq(nb), bmx(nb);
    const int nt = threads_for(total, nthreads, min_per_thread);
    run_parallel(nt, [&](int k) {
        const int64_t lo = nb * k / nt, hi = nb * (k + 1) / nt;
        for (int64_t b = lo; b < hi; ++b) {
            if (want_max)
                block_stats<T, true>(g + blocks[b].start, blocks[b].numel, &bsq[b], &bmx[b]);
            else
                block_stats<T, false>(g + blocks[b].start, blocks[b].numel, &bsq[b], &bmx[b]);
        }
    });
    for (int64_t f = 0; f < nfrag; ++f) {
        sq[f] = 0.0;
        mx[f] = 0.0;
    }
    for (int64_t b = 0; b < nb; ++b) {
        const int64_t f = blocks[b].frag;
        sq[f] += bsq[b];
        mx[f] = bmx[b] > mx[f] ? bmx[b] : mx[f];
    }
}

}  // namespace

extern "C" {

// Bit 0: bf16 output, bit 1: fp16 output.
int sn_features() {
    int f = 1;
#ifdef __FLT16_MAX__
    f |= 2;
#endif
    return f;
}

// dtype: 0 float32, 1 float64. frags: nfrag rows (layer, offset, numel). coeffs: [L, 8] of
// the tensors' dtype. wd_in / wd_out: whether the weight-decay terms are added (torch_impl
// adds them to every fragment when any fragment's coefficient is non-zero). Returns 0, or
// -1 for an unsupported combination (nothing is written then).
int sn_update(int dtype, int out_kind, int wd_in, int wd_out, const void* g, void* m, void* w, void* out,
              const int64_t* frags_raw, int64_t nfrag, const void* coeffs, int nthreads, int64_t min_per_thread) {
    const Frag* frags = reinterpret_cast<const Frag*>(frags_raw);
    if ((out_kind == OUT_NONE) != (out == nullptr)) return -1;
    SpanFn fn = dtype == 0 ? pick<float>(out_kind, wd_in, wd_out)
              : dtype == 1 ? pick<double>(out_kind, wd_in, wd_out) : nullptr;
    if (!fn) return -1;
    const size_t es = dtype == 0 ? 4 : 8, os = out_size(out_kind);
    int64_t total = 0;
    for (int64_t f = 0; f < nfrag; ++f) total += frags[f].numel;
    const int nt = threads_for(total, nthreads, min_per_thread);
    // Thread k takes elements [total*k/nt, total*(k+1)/nt) of the fragments laid end to
    // end, cut at multiples of 64 so that no two threads write one cache line.
    run_parallel(nt, [&](int k) {
        int64_t lo = (total * k / nt) & ~int64_t(63), hi = k + 1 == nt ? total : (total * (k + 1) / nt) & ~int64_t(63);
        int64_t base = 0;
        for (int64_t f = 0; f < nfrag && base < hi; ++f) {
            const int64_t n = frags[f].numel, a = lo > base ? lo - base : 0, b = hi - base < n ? hi - base : n;
            if (a < b) {
                const int64_t off = frags[f].offset + a;
                const char* c = static_cast<const char*>(coeffs) + frags[f].layer * NUM_COEFFS * es;
                fn(static_cast<const char*>(g) + off * es, static_cast<char*>(m) + off * es,
                   static_cast<char*>(w) + off * es, out ? static_cast<char*>(out) + off * os : nullptr, b - a, c);
            }
            base += n;
        }
    });
    return 0;
}

// Per fragment: sum of squares (double) and, when want_max, max |g| (else 0).
int sn_stats(int dtype, const void* g, const int64_t* frags_raw, int64_t nfrag, int want_max, double* sq,
             double* mx, int nthreads, int64_t block, int64_t min_per_thread) {
    const Frag* frags = reinterpret_cast<const Frag*>(frags_raw);
    if (block < 1) return -1;
    if (dtype == 0)
        stats_impl(static_cast<const float*>(g), frags, nfrag, want_max, sq, mx, nthreads, block, min_per_thread);
    else if (dtype == 1)
        stats_impl(static_cast<const double*>(g), frags, nfrag, want_max, sq, mx, nthreads, block, min_per_thread);
    else
        return -1;
    return 0;
}

}  // extern "C"
"""
