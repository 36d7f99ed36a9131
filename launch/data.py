"""The embedded dataset: this machine's Python standard library sources, as bytes.

Files are the ``.py`` files under ``sysconfig``'s stdlib path (``site-packages`` and
caches excluded), in sorted order of their relative path, read until ``max_bytes``.
A file goes to validation when a CRC-32 of its relative path, scaled to [0, 1),
falls under ``val_fraction`` (when none does, the file with the smallest value), so
the split depends on the files read, never on the ranks. Each training step's
sequences are a pure function of ``(seed, step)``: rank r takes the r-th slice of
the step's global batch, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
import zlib
from dataclasses import dataclass
from typing import List, Tuple

import torch

__all__ = ["Corpus", "load_corpus", "train_batch", "val_windows"]

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor  # uint8
    val: torch.Tensor  # uint8
    files: int
    val_files: int
    root: str
    digest: str  # sha256 of the train and validation bytes: ranks must agree


def _sources(root: str) -> List[str]:
    rels = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in _SKIP_DIRS]
        for f in files:
            if f.endswith(".py"):
                rels.append(os.path.relpath(os.path.join(d, f), root))
    return sorted(rels)


def load_corpus(max_bytes: int, val_fraction: float, seq_len: int) -> Corpus:
    root = sysconfig.get_paths()["stdlib"]
    blobs: List[Tuple[float, bytes]] = []  # (hash of the path in [0, 1), contents)
    total = 0
    for rel in _sources(root):
        if total >= max_bytes:
            break
        try:
            with open(os.path.join(root, rel), "rb") as f:
                blob = f.read(max_bytes - total)
        except OSError:
            continue
        if blob:
            total += len(blob)
            blobs.append((zlib.crc32(rel.encode()) / 2**32, blob))
    is_val = [h < val_fraction for h, _ in blobs]
    if blobs and not any(is_val):  # few files: hold out the one with the smallest hash
        is_val[min(range(len(blobs)), key=lambda i: blobs[i][0])] = True
    train = [b for (_, b), v in zip(blobs, is_val) if not v]
    val = [b for (_, b), v in zip(blobs, is_val) if v]
    n_files, n_val = len(blobs), len(val)
    train_b, val_b = b"\n".join(train), b"\n".join(val)
    for name, b in (("training", train_b), ("validation", val_b)):
        if len(b) < 2 * (seq_len + 1):
            raise RuntimeError(f"the {name} split has {len(b)} bytes, too few for seq_len={seq_len}: "
                               f"raise max_bytes (now {max_bytes}) or val_fraction, or lower seq_len "
                               f"(standard library read from {root})")
    digest = hashlib.sha256(train_b + b"\0" + val_b).hexdigest()
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    return Corpus(as_tensor(train_b), as_tensor(val_b), n_files, n_val, root, digest)


def _windows(data: torch.Tensor, starts: torch.Tensor, seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    idx = starts.view(-1, 1) + torch.arange(seq_len + 1).view(1, -1)
    chunk = data[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


def _step_seed(seed: int, step: int) -> int:
    h = hashlib.blake2b(f"{seed}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


def train_batch(corpus: Corpus, seed: int, step: int, rank: int, world_size: int, batch_size: int,
                seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets ``[batch_size, seq_len]`` of ``rank`` at 0-based ``step``."""
    g = torch.Generator().manual_seed(_step_seed(seed, step))
    starts = torch.randint(0, corpus.train.numel() - seq_len - 1, (world_size * batch_size,), generator=g)
    return _windows(corpus.train, starts[rank * batch_size:(rank + 1) * batch_size], seq_len)


def val_windows(corpus: Corpus, n_windows: int, rank: int, world_size: int,
                seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's share (round-robin) of ``n_windows`` evenly spaced validation windows."""
    last = corpus.val.numel() - seq_len - 1
    starts = torch.linspace(0, last, n_windows).long()[rank::world_size]
    return _windows(corpus.val, starts, seq_len)
