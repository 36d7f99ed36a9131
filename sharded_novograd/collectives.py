"""Every torch.distributed call of the project goes through this module.

Functions take a process group and never create one nor read the environment. All
tensors handed to a collective are 1-D and contiguous: gloo ignores strides and
silently returns wrong results for anything else.

The ZeRO-2 gradient reduction and the parameter gather come in two methods, chosen
per backend (measured, see docs/design.md):

- ``"reduce_scatter"``: each shard-aligned gradient bucket is reduced to its owner
  only (together, one reduce-scatter; a model of one bucket is one reduce-scatter),
  and parameters are all-gathered: the bandwidth-optimal pair on NCCL.
- ``"all_reduce"``: each bucket is all-reduced and its owner keeps it, and parameters
  are broadcast once per owner: the fastest pair on gloo, whose reduce-scatter and
  all-gather are not bandwidth-optimal.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "METHODS", "backend_for", "pick_method", "group_rank", "group_size", "check_same_plan", "broadcast_flat",
    "reduce_gradients", "gather_shards", "gather_shards_to", "all_reduce_stats", "all_gather_stats", "all_reduce_flags",
    "start_bucket_reduce", "start_gather_shards", "all_gather_text", "agree",
]

METHODS = ("auto", "reduce_scatter", "all_reduce")


def _flat(t: torch.Tensor) -> torch.Tensor:
    if t.dim() != 1 or not t.is_contiguous():
        raise RuntimeError(f"collectives need 1-D contiguous tensors, got shape {tuple(t.shape)} "
                           f"stride {t.stride()}")
    return t


def _gather_into(output: torch.Tensor, input: torch.Tensor, group, async_op: bool = False):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(_flat(output), _flat(input), group=group, async_op=async_op)


def group_rank(group) -> int:
    return dist.get_rank(group)


def group_size(group) -> int:
    return dist.get_world_size(group)


def backend_for(group, device=None) -> str:
    """The name of the backend that serves ``device``'s tensors in ``group`` (``"nccl"``, ``"gloo"``, ...).

    A group made without a backend (``init_process_group()``, which
    :func:`torch.distributed.get_backend` reports as ``"undefined"``) or with one per device
    (``"cpu:gloo,cuda:nccl"``, reported as that whole string) has a backend per device
    type; :func:`torch.distributed.get_backend_config` lists them.

    Args:
        group: the process group.
        device: the device of the tensors the collectives carry; None takes CUDA when the
            group serves CUDA and CUDA is available, else CPU (default: None)

    Raises:
        RuntimeError: no backend of ``group`` serves ``device``.
    """
    config = dist.get_backend_config(group)
    served = {}
    for entry in config.split(","):
        dev, sep, name = entry.strip().partition(":")
        if sep:
            served[dev.strip()] = name.strip().lower()
        else:  # one backend for every device type
            served = {"": dev.strip().lower()}
    if "" in served:
        return served[""]
    if device is None:
        kind = "cuda" if "cuda" in served and torch.cuda.is_available() else "cpu"
    else:
        kind = torch.device(device).type
    if kind not in served:
        raise RuntimeError(f"the process group has no backend for {kind} tensors (its backends: {config}); "
                           f"create it with a backend for {kind}, for example "
                           f"init_process_group(\"{'nccl' if kind == 'cuda' else 'gloo'}\"), or move the "
                           f"parameters to a device it serves ({', '.join(sorted(served))})")
    return served[kind]


def pick_method(method: str, group, device=None) -> str:
    """Resolve ``"auto"`` to the faster method for the backend that serves ``device`` in ``group``.

    Args:
        method: ``"auto"``, ``"reduce_scatter"`` or ``"all_reduce"``.
        group: the process group.
        device: the device of the tensors (the parameters); see :func:`backend_for`
            (default: None)

    Raises:
        ValueError: an unknown ``method``.
        RuntimeError: ``device`` is given and no backend of ``group`` serves it.
    """
    if method not in METHODS:
        raise ValueError(f"Invalid collective method: {method!r} (expected one of {METHODS})")
    if method != "auto" and device is None:
        return method
    backend = backend_for(group, device)
    if method != "auto":
        return method
    return "reduce_scatter" if backend == "nccl" else "all_reduce"


def check_same_plan(lines: List[str], digest: bytes, group, device) -> None:
    """Raise RuntimeError on every rank unless all ranks built the same plan.

    All ranks all-gather a 32-byte digest; only when they differ do they exchange the
    plan's text, to name the first difference. This needs to be called on all ranks.
    """
    n = group_size(group)
    mine = torch.tensor(list(digest), dtype=torch.uint8, device=device).to(torch.int32)
    every = torch.empty(n * mine.numel(), dtype=torch.int32, device=device)
    _gather_into(every, mine, group)
    every = every.view(n, -1)
    if bool((every == every[0]).all()):
        return
    texts: List[Optional[List[str]]] = [None] * n
    dist.all_gather_object(texts, lines, group=group)
    for r in range(1, n):
        if texts[r] == texts[0]:
            continue
        for i in range(max(len(texts[0]), len(texts[r]))):
            a = texts[0][i] if i < len(texts[0]) else "<missing>"
            b = texts[r][i] if i < len(texts[r]) else "<missing>"
            if a != b:
                raise RuntimeError(f"optimizer plans (parameter layouts and settings) differ across ranks: "
                                   f"rank 0 has '{a}' but rank {r} has '{b}'. Every rank must build the "
                                   f"optimizer from the same parameters in the same order, with the same settings.")
    raise RuntimeError("optimizer plans (parameter layouts and settings) differ across ranks")


def broadcast_flat(flat: torch.Tensor, group, src: int = 0) -> None:
    """Broadcast ``flat`` from group rank ``src``. This needs to be called on all ranks."""
    dist.broadcast(_flat(flat), src=dist.get_global_rank(group, src), group=group)


def reduce_gradients(flat: torch.Tensor, shard: torch.Tensor, method: str, group) -> torch.Tensor:
    """Sum ZeRO-1's flat gradient buffer over the group; returns this rank's shard of the sum.

    ``"reduce_scatter"`` (NCCL) reduce-scatters into ``shard`` (half an all-reduce's
    bytes); ``"all_reduce"`` (gloo, whose reduce-scatter is slower) sums in place and
    returns the shard's view. The caller divides by the group size (folded into the
    step's scale). This needs to be called on all ranks.
    """
    n, r, S = group_size(group), group_rank(group), shard.numel()
    if method == "reduce_scatter" and n > 1:
        fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        fn(_flat(shard), _flat(flat), op=dist.ReduceOp.SUM, group=group)
        return shard
    dist.all_reduce(_flat(flat), op=dist.ReduceOp.SUM, group=group)
    return flat.narrow(0, r * S, S)


def gather_shards(flat: torch.Tensor, shard_size: int, method: str, group) -> None:
    """Fill ``flat`` in place with every rank's shard ``flat[r*S:(r+1)*S]``.

    This needs to be called on all ranks.
    """
    for _, _, work in start_gather_shards(flat, shard_size, method, group):
        work.wait()


def start_gather_shards(flat: torch.Tensor, shard_size: int, method: str, group, chunk: Optional[int] = None):
    """Start :func:`gather_shards` without waiting: returns ``[(start, end, work)]``, the
    flat range each pending collective fills. This needs to be called on all ranks.

    ``chunk`` (elements) asks for pieces that can be waited for one at a time, to overlap
    the gather with the next forward: each owner's range is broadcast in chunks of at
    most that size, whatever ``method`` (one all-gather of the whole buffer could only
    be waited for whole; per-chunk all-gathers would need a staging copy of the buffer,
    while broadcasts write in place and move the same bytes per rank).
    """
    n, r = group_size(group), group_rank(group)
    _flat(flat)
    if n == 1:
        return []
    if method == "reduce_scatter" and chunk is None:
        mine = flat.narrow(0, r * shard_size, shard_size)
        # NCCL documents the in-place form (input is the rank's slice of the output).
        work = _gather_into(flat, mine if backend_for(group, flat.device) == "nccl" else mine.clone(), group,
                            async_op=True)
        return [(0, flat.numel(), work)]
    step = shard_size if chunk is None else max(1, min(int(chunk), shard_size))
    out = []
    for k in range(n):
        src = dist.get_global_rank(group, k)
        for lo in range(k * shard_size, (k + 1) * shard_size, step):
            hi = min(lo + step, (k + 1) * shard_size)
            out.append((lo, hi, dist.broadcast(flat.narrow(0, lo, hi - lo), src=src, group=group, async_op=True)))
    return out


def gather_shards_to(flat: torch.Tensor, shard: torch.Tensor, dst: int, group) -> None:
    """Every rank's ``shard`` into ``flat`` (N shards back to back) on group rank ``dst``
    only; ``flat`` is not touched elsewhere (pass any tensor). This needs to be called on all ranks."""
    n, r = group_size(group), group_rank(group)
    rows = list(_flat(flat).view(n, -1)) if r == dst else None
    dist.gather(_flat(shard), rows, dst=dist.get_global_rank(group, dst), group=group)


def all_reduce_stats(vec: torch.Tensor, group) -> torch.Tensor:
    """Sum the packed per-layer statistics in place: the step's one O(L) collective."""
    dist.all_reduce(_flat(vec), op=dist.ReduceOp.SUM, group=group)
    return vec


def all_gather_stats(vec: torch.Tensor, group) -> torch.Tensor:
    """Gather every rank's packed statistics as a ``[N, len(vec)]`` tensor (one collective).

    Used for norm_type=inf, whose per-layer MAX and whole-gradient SUM cannot share
    one all-reduce.
    """
    n = group_size(group)
    out = torch.empty(n * vec.numel(), dtype=vec.dtype, device=vec.device)
    _gather_into(out, _flat(vec), group)
    return out.view(n, -1)


def all_reduce_flags(flags: torch.Tensor, group) -> torch.Tensor:
    """Sum small per-rank flags so that every rank takes the same decision."""
    dist.all_reduce(_flat(flags), op=dist.ReduceOp.SUM, group=group)
    return flags


class _Works:
    """Several async collectives waited for as one."""

    def __init__(self, works):
        self.works = works

    def wait(self) -> None:
        for w in self.works:
            w.wait()


def start_bucket_reduce(bucket: torch.Tensor, owners: Sequence[int], mine: Optional[torch.Tensor],
                        method: str, group):
    """Start summing a gradient bucket owned by the group ranks ``owners``; returns the work handle.

    ``owners`` are consecutive ranks, each owning an equal whole part of the bucket, in
    order. ``"all_reduce"`` sums the whole bucket on every rank in one call, which
    gloo does faster; each owner reads its part. ``"reduce_scatter"`` sums each part
    only on its owner: every rank of the group owning a part is one reduce-scatter
    into ``mine`` (a model of one bucket); otherwise one reduce per owner, landing in
    the owner's part of the bucket. Only an owner may read the result. This needs to
    be called on all ranks, in the same bucket order.
    """
    if method != "reduce_scatter":
        return dist.all_reduce(_flat(bucket), op=dist.ReduceOp.SUM, group=group, async_op=True)
    if len(owners) == group_size(group) and len(owners) > 1:
        fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        return fn(_flat(mine), _flat(bucket), op=dist.ReduceOp.SUM, group=group, async_op=True)
    part = bucket.numel() // len(owners)
    return _Works([dist.reduce(bucket.narrow(0, i * part, part), dst=dist.get_global_rank(group, r),
                               op=dist.ReduceOp.SUM, group=group, async_op=True)
                   for i, r in enumerate(owners)])


def all_gather_text(text: str, group, device) -> List[str]:
    """Every rank's ``text``, in group rank order, on every rank (two collectives).

    Used to exchange small metadata (file checksums, error messages) without pickling.
    This needs to be called on all ranks.
    """
    n = group_size(group)
    data = text.encode("utf-8")
    lengths = torch.empty(n, dtype=torch.int64, device=device)
    _gather_into(lengths, torch.tensor([len(data)], dtype=torch.int64, device=device), group)
    width = max(1, int(lengths.max()))
    mine = torch.zeros(width, dtype=torch.uint8)
    if data:
        mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    every = torch.empty(n * width, dtype=torch.uint8, device=device)
    _gather_into(every, mine.to(device), group)
    rows = every.view(n, width).cpu()
    return [bytes(rows[r, :int(lengths[r])].tolist()).decode("utf-8") for r in range(n)]


def agree(problem: Optional[str], group, device) -> List[tuple]:
    """Every rank's problem as ``[(rank, message), ...]``, identical on every rank.

    One all-reduce of a flag when no rank has a problem; the messages are gathered
    only when some rank has one. A rank that fails a local check must still call
    this, so that every rank raises together instead of the others waiting in the
    next collective. This needs to be called on all ranks.
    """
    flag = torch.tensor([0.0 if problem is None else 1.0], device=device)
    if not all_reduce_flags(flag, group).item():
        return []
    texts = all_gather_text("" if problem is None else problem or "unknown problem", group, device)
    return [(r, t) for r, t in enumerate(texts) if t]
