"""Parameter counts (P) and layer counts (L) of real architectures, and the scaling cost model.

P and L are measured, not estimated: each architecture is instantiated on the meta
device (no memory is allocated) and its parameter tensors are counted. A "layer" is
one parameter tensor, as everywhere in this project.

The cost model gives per-rank memory (weights, gradients, optimizer state) and
per-rank communication per step for ShardedNovoGrad ZeRO-1/2 and DeepSpeed ZeRO-2
with AdamW, for a bf16 model with fp32 master weights. ``docs/scaling.md`` explains
each formula; ``launch/benchmark.py`` checks the optimizer-state formulas against
measured bytes.

    .venv/bin/python launch/param_counts.py            # P and L table, then the scaling tables
    .venv/bin/python launch/param_counts.py --json     # the same numbers as JSON
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch
import torch.nn as nn

__all__ = ["Arch", "ARCHS", "count", "optimizer_state_bytes", "memory_per_rank", "comm_per_rank",
           "stats_vector_floats"]

GIB = 2 ** 30


@dataclass(frozen=True)
class Arch:
    """A Llama-style decoder: RMSNorm, GQA attention without biases, SwiGLU MLP, untied head."""

    name: str
    layers: int
    d: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int


ARCHS: Dict[str, Arch] = {
    "7B": Arch("Llama-2-7B shape", layers=32, d=4096, ffn=11008, heads=32, kv_heads=32, vocab=32000),
    "70B": Arch("Llama-2-70B shape", layers=80, d=8192, ffn=28672, heads=64, kv_heads=8, vocab=32000),
    "400B": Arch("Llama-3.1-405B shape", layers=126, d=16384, ffn=53248, heads=128, kv_heads=8, vocab=128256),
}


class RMSNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))


class DecoderLayer(nn.Module):
    def __init__(self, a: Arch):
        super().__init__()
        head_dim = a.d // a.heads
        self.input_norm = RMSNorm(a.d)
        self.q_proj = nn.Linear(a.d, a.heads * head_dim, bias=False)
        self.k_proj = nn.Linear(a.d, a.kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(a.d, a.kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(a.heads * head_dim, a.d, bias=False)
        self.post_attention_norm = RMSNorm(a.d)
        self.gate_proj = nn.Linear(a.d, a.ffn, bias=False)
        self.up_proj = nn.Linear(a.d, a.ffn, bias=False)
        self.down_proj = nn.Linear(a.ffn, a.d, bias=False)


class Decoder(nn.Module):
    def __init__(self, a: Arch):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab, a.d)
        self.layers = nn.ModuleList(DecoderLayer(a) for _ in range(a.layers))
        self.norm = RMSNorm(a.d)
        self.lm_head = nn.Linear(a.d, a.vocab, bias=False)


def count(arch: Arch) -> Dict[str, int]:
    """``P`` (elements), ``L`` (parameter tensors) and the largest tensor, built on the meta device."""
    with torch.device("meta"):
        model = Decoder(arch)
    numels = [p.numel() for p in model.parameters()]
    return {"P": sum(numels), "L": len(numels), "largest": max(numels)}


# ---------------------------------------------------------------- cost model
def stats_vector_floats(L: int, zero_stage: int = 2) -> int:
    """Length of ShardedNovoGrad's one extra all-reduce (norm_type=2, float64 values): see
    :func:`sharded_novograd.engine.stats_length`; ZeRO-2 adds its 2L bucket-order values."""
    from sharded_novograd.engine import stats_length
    return stats_length(L, extra=2 * L if zero_stage == 2 else 0)


def optimizer_state_bytes(kind: str, P: int, L: int, N: int, param_bytes: int, align: int = 64,
                          largest: Optional[int] = None) -> float:
    """Predicted optimizer-state bytes on one rank.

    Args:
        kind: ``sharded`` (ShardedNovoGrad ZeRO-1 or 2), ``deepspeed_adamw``
            (DeepSpeed ZeRO-1/2 with Adam/AdamW), ``deepspeed_novograd`` (DeepSpeed
            ZeRO-1/2 with a NovoGrad client), ``novograd`` (unsharded NovoGrad),
            ``fsdp_novograd`` (NovoGrad on FSDP2 shards) or ``torch_zero``
            (ZeroRedundancyOptimizer with NovoGrad; whole tensors per rank, so the
            most loaded rank holds at least the largest tensor)
        P, L: elements and parameter tensors of the model.
        N: data-parallel ranks.
        param_bytes: bytes per element of the model's parameters (2 for bf16, 4 for fp32).
        align: ShardedNovoGrad's padding unit per rank (default: 64)
        largest: elements of the largest tensor, for ``torch_zero`` (default: None)
    """
    lowp = param_bytes < 4
    if kind == "sharded":
        shard = math.ceil(P / (N * align)) * align
        # exp_avg (fp32), the fp32 master for low-precision models, and three
        # replicated fp32 vectors of length L (v, v_max, step).
        return (4 + 4 * lowp) * shard + 3 * 4 * L
    if kind == "deepspeed_adamw":
        return 12 * math.ceil(P / N)  # fp32 master (kept even for fp32 models), exp_avg, exp_avg_sq
    if kind == "deepspeed_novograd":
        return 8 * math.ceil(P / N)  # fp32 master + exp_avg; the O(L) scalars are negligible
    if kind == "novograd":
        return param_bytes * P + 8 * L  # exp_avg in the parameter dtype; step and v per layer
    if kind == "fsdp_novograd":
        return param_bytes * math.ceil(P / N) + 8 * L
    if kind == "torch_zero":
        return param_bytes * max(math.ceil(P / N), largest or 0) + 8 * math.ceil(L / N)
    raise ValueError(f"Invalid kind: {kind!r}")


def memory_per_rank(method: str, P: int, L: int, N: int) -> Dict[str, float]:
    """Steady-state bytes per rank for a bf16 model with fp32 master weights.

    Buckets and activations are left out (they do not scale with P/N). Gradients:
    ZeRO-1 keeps the full bf16 ``.grad`` and reduces a full fp32 copy; ZeRO-2 keeps
    only the rank's fp32 gradient shard (ShardedNovoGrad) or a bf16 gradient
    partition that DeepSpeed upcasts to fp32 at step time (counted at its peak).
    """
    w = 2 * P
    if method == "sn_zero1":
        g = 2 * P + 4 * P
        s = optimizer_state_bytes("sharded", P, L, N, 2)
    elif method == "sn_zero2":
        g = 4 * P / N
        s = optimizer_state_bytes("sharded", P, L, N, 2)
    elif method == "ds_zero2_adamw":
        g = 2 * P / N + 4 * P / N
        s = optimizer_state_bytes("deepspeed_adamw", P, L, N, 2)
    else:
        raise ValueError(f"Invalid method: {method!r}")
    return {"weights": w, "grads": g, "optimizer": s, "total": w + g + s}


def comm_per_rank(method: str, P: int, L: int, N: int, grad_comm_bytes: int = 4) -> Dict[str, float]:
    """Bytes each rank sends per step with bandwidth-optimal (ring) collectives.

    An all-reduce of B bytes sends ``2 (N-1)/N B`` per rank; a reduce-scatter or an
    all-gather of a B-byte buffer sends ``(N-1)/N B``.

    Args:
        grad_comm_bytes: bytes per gradient element on the wire for ShardedNovoGrad
            (4: it reduces in the fp32 state dtype; DeepSpeed reduces bf16 gradients
            in bf16 by default) (default: 4)
    """
    f = (N - 1) / N
    extra = 0.0
    if method == "sn_zero1":
        grads, params = 2 * f * P * grad_comm_bytes, f * P * 2
        extra = 2 * f * 8 * stats_vector_floats(L, zero_stage=1)
    elif method == "sn_zero2":
        grads, params = f * P * grad_comm_bytes, f * P * 2
        extra = 2 * f * 8 * stats_vector_floats(L)
    elif method == "ds_zero2_adamw":
        grads, params = f * P * 2, f * P * 2
    else:
        raise ValueError(f"Invalid method: {method!r}")
    return {"grads": grads, "params": params, "extra": extra, "total": grads + params + extra}


# ---------------------------------------------------------------- tables
def _gib(x: float) -> str:
    if x >= 100 * GIB:
        return f"{x / GIB:,.0f}"
    if x >= 10 * GIB:
        return f"{x / GIB:.1f}"
    return f"{x / GIB:.2f}"


def _bytes(x: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if x >= scale:
            return f"{x / scale:.1f} {unit}"
    return f"{x:.0f} B"


def tables(ranks: List[int], alpha_s: float, bw_bytes_s: float) -> str:
    counts = {k: count(a) for k, a in ARCHS.items()}
    out = ["| model | shape | P (elements) | L (tensors) | largest tensor |", "|---|---|---:|---:|---:|"]
    for k, a in ARCHS.items():
        c = counts[k]
        out.append(f"| {k} | {a.layers} layers, d={a.d}, ffn={a.ffn}, heads={a.heads}/{a.kv_heads} kv, "
                   f"vocab={a.vocab} | {c['P']:,} | {c['L']:,} | {c['largest']:,} |")
    out += ["", "Per-rank memory in GiB, bf16 weights with fp32 master weights (activations and "
                "communication buckets left out):", "",
            "| model | N | weights (all) | grads SN Z1 | grads SN Z2 | grads DS Z2 | opt. state SN | "
            "opt. state DS AdamW | SN / DS state | total SN Z1 | total SN Z2 | total DS Z2 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in ARCHS:
        P, L = counts[k]["P"], counts[k]["L"]
        for N in ranks:
            z1, z2, ds = (memory_per_rank(m, P, L, N) for m in ("sn_zero1", "sn_zero2", "ds_zero2_adamw"))
            out.append(f"| {k} | {N} | {_gib(z2['weights'])} | {_gib(z1['grads'])} | {_gib(z2['grads'])} | "
                       f"{_gib(ds['grads'])} | {_gib(z2['optimizer'])} | {_gib(ds['optimizer'])} | "
                       f"{z2['optimizer'] / ds['optimizer']:.4f} | {_gib(z1['total'])} | {_gib(z2['total'])} | "
                       f"{_gib(ds['total'])} |")
    out += ["", f"Per-rank communication per step, bytes sent with ring collectives (bandwidth time at "
                f"{bw_bytes_s / 1e9:.0f} GB/s per rank, {alpha_s * 1e6:.0f} us latency per hop):", "",
            "| model | N | SN Z1 | SN Z2 | DS Z2 AdamW | SN extra all-reduce | extra / SN Z2 bytes | "
            "extra all-reduce time, ring / tree | SN Z2 bandwidth time |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in ARCHS:
        P, L = counts[k]["P"], counts[k]["L"]
        for N in ranks:
            z1, z2, ds = (comm_per_rank(m, P, L, N) for m in ("sn_zero1", "sn_zero2", "ds_zero2_adamw"))
            nbytes = 8 * stats_vector_floats(L)
            ring = 2 * (N - 1) * alpha_s + z2["extra"] / bw_bytes_s
            tree = 2 * math.ceil(math.log2(N)) * alpha_s + 2 * nbytes / bw_bytes_s
            out.append(f"| {k} | {N} | {_bytes(z1['total'])} | {_bytes(z2['total'])} | {_bytes(ds['total'])} | "
                       f"{_bytes(z2['extra'])} | {z2['extra'] / z2['total']:.1e} | {ring * 1e3:.2f} ms / "
                       f"{tree * 1e3:.3f} ms | {z2['total'] / bw_bytes_s:.2f} s |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", default="8,64,256,1024", help="comma-separated data-parallel sizes")
    ap.add_argument("--alpha-us", type=float, default=5.0, help="per-hop latency in microseconds")
    ap.add_argument("--bw-gbs", type=float, default=50.0, help="per-rank bandwidth in GB/s")
    ap.add_argument("--json", action="store_true", help="print P, L and the cost model as JSON")
    args = ap.parse_args(argv)
    ranks = [int(x) for x in args.ranks.split(",")]
    if args.json:
        rows = {}
        for k, a in ARCHS.items():
            c = count(a)
            rows[k] = {"arch": asdict(a), **c, "per_N": {
                N: {m: {"memory": memory_per_rank(m, c["P"], c["L"], N), "comm": comm_per_rank(m, c["P"], c["L"], N)}
                    for m in ("sn_zero1", "sn_zero2", "ds_zero2_adamw")} for N in ranks}}
        print(json.dumps(rows, indent=1))
        return
    print(tables(ranks, args.alpha_us * 1e-6, args.bw_gbs * 1e9))


if __name__ == "__main__":
    main()
