"""The two models of the training-step benchmark, and their deterministic data.

- ``gpt``: a small causal transformer over bytes (vocabulary 256), pre-norm blocks,
  untied output head. Every parameter is at least 1-D (DeepSpeed cannot broadcast
  0-dim parameters).
- ``mlp``: a wide three-layer perceptron of about 50M fp32 parameters, with a batch
  small enough that the step is dominated by gradient communication and the
  optimizer rather than by the matmuls.

Both return the mean loss from ``forward(x, y)``, so that DDP, FSDP2 and a DeepSpeed
engine drive them the same way. Batches depend only on ``(seed, step, rank)``: every
variant sees the same data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ModelSpec", "MODELS", "build_model", "make_batch", "shardable_units"]


@dataclass(frozen=True)
class ModelSpec:
    """Sizes of one benchmark model (batch is per rank)."""

    kind: str
    batch: int
    dims: Tuple[Tuple[str, int], ...]

    def dim(self, name: str) -> int:
        return dict(self.dims)[name]


MODELS: Dict[str, ModelSpec] = {
    "gpt": ModelSpec("gpt", batch=4, dims=(("vocab", 256), ("d", 256), ("layers", 4), ("heads", 4),
                                          ("seq", 128), ("ffn", 1024))),
    # For the harness's smoke test only.
    "tiny": ModelSpec("gpt", batch=2, dims=(("vocab", 256), ("d", 32), ("layers", 2), ("heads", 2),
                                           ("seq", 16), ("ffn", 64))),
    "mlp": ModelSpec("mlp", batch=8, dims=(("d_in", 1024), ("hidden", 6144), ("d_out", 1024))),
}


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ByteGPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int, ffn: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads, ffn) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for blk in self.blocks:
            h = blk(h)
        logits = self.head(self.norm(h))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


class WideMLP(nn.Module):
    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc2(F.gelu(self.fc1(x))))
        return F.mse_loss(self.fc3(h), y)


def build_model(spec: ModelSpec, seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model with weights drawn from ``seed``: identical on every rank and variant."""
    torch.manual_seed(seed)
    if spec.kind == "gpt":
        model = ByteGPT(**dict(spec.dims))
    elif spec.kind == "mlp":
        model = WideMLP(**dict(spec.dims))
    else:
        raise ValueError(f"Invalid model kind: {spec.kind!r} (expected 'gpt' or 'mlp')")
    return model.to(dtype)


def make_batch(spec: ModelSpec, seed: int, step: int, rank: int,
               dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch at ``step``; a pure function of its arguments."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
    if spec.kind == "gpt":
        seq = torch.randint(0, spec.dim("vocab"), (spec.batch, spec.dim("seq") + 1), generator=g)
        return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    x = torch.randn(spec.batch, spec.dim("d_in"), generator=g).to(dtype)
    return x, torch.randn(spec.batch, spec.dim("d_out"), generator=g).to(dtype)


def shardable_units(model: nn.Module):
    """The submodules FSDP2 wraps one by one (then the root), as a user would."""
    if isinstance(model, ByteGPT):
        return list(model.blocks)
    return [model.fc1, model.fc2, model.fc3]
