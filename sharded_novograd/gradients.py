"""Where ShardedNovoGrad's averaged gradient shard comes from.

Three gradient sources feed the step engine the same thing: this rank's shard of the
rank-averaged gradient, which layers have a gradient here, and the first local problem:

- ZeRO-1 (:func:`all_reduce_gradients`): every ``.grad`` is summed at ``step()``
  (reduce-scattered on NCCL, all-reduced on gloo).
- ZeRO-2 (:class:`GradientBuckets`): during backward, shard-aligned buckets are reduced
  to their owners as they fill.
- Averaged by someone else (:func:`take_averaged`): DDP (which HF Trainer, Accelerate
  and Lightning wrap the model in) already averaged ``.grad`` during backward; the
  optimizer only copies its own fragments, with no gradient collective.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch

from . import collectives as C
from .layout import ShardLayout

__all__ = ["GradientBuckets", "all_reduce_gradients", "take_averaged", "grad_problem", "ARRIVED"]

# A rank's arrival value for a layer that reached its hook: ARRIVED + its position in
# this step's arrivals (0 for none). Summed over N ranks, ``count * ARRIVED + sum of
# positions`` stays an exact float64 while N * L < 2**36 and N < 2**17.
ARRIVED = float(2 ** 36)


def grad_problem(layer: int, p: torch.Tensor) -> Optional[str]:
    """Why ``p.grad`` cannot be used for ``layer``, or None."""
    g = p.grad
    if g.is_sparse:
        return f"layer {layer} (shape {tuple(p.shape)}) has a sparse gradient; NovoGrad does not support " \
               "sparse gradients"
    if g.shape != p.shape:
        return f"layer {layer} has a gradient of shape {tuple(g.shape)}, expected {tuple(p.shape)}"
    return None


def all_reduce_gradients(params: Sequence[torch.Tensor], layout: ShardLayout, rank: int, buf: torch.Tensor,
                         shard: torch.Tensor, out: torch.Tensor, method: str, group):
    """ZeRO-1: average every ``.grad`` over the group (``buf``: padded_total elements and
    ``shard``: shard_size, both in the reduce dtype; ``out``: shard_size in the state
    dtype; all reused); returns ``(out holding the mean, has-gradient flags, first problem)``.
    Only the shard is divided (and cast), in one pass, not the whole buffer.
    This needs to be called on all ranks."""
    has = [0.0] * layout.num_layers
    problem = None
    for i, (p, off, numel) in enumerate(zip(params, layout.offsets, layout.numels)):
        dst = buf.narrow(0, off, numel)
        bad = grad_problem(i, p) if p.grad is not None else "no gradient"
        if p.grad is not None and bad is not None:
            problem = problem or bad
        if bad is None:
            dst.copy_(p.grad.reshape(-1))
            has[i] = 1.0
        else:
            dst.zero_()  # only what no gradient overwrites: layers without one, and the padding
    buf.narrow(0, layout.total, layout.padded_total - layout.total).zero_()
    return torch.div(C.reduce_gradients(buf, shard, method, group), C.group_size(group), out=out), has, problem


def take_averaged(params: Sequence[torch.Tensor], layout: ShardLayout, rank: int, shard: torch.Tensor):
    """Gradients already averaged over the group (DDP): copy this rank's fragments of
    ``.grad`` into ``shard``; returns ``(shard, has-gradient flags, first problem)``. No collective."""
    has = [0.0] * layout.num_layers
    problem = None
    for i, p in enumerate(params):
        if p.grad is not None:
            bad = grad_problem(i, p)
            problem = problem or bad
            has[i] = 0.0 if bad else 1.0
    covered = 0
    for f in layout.fragments[rank]:
        dst = shard.narrow(0, f.offset_in_shard, f.numel)
        p = params[f.layer]
        if has[f.layer]:
            dst.copy_(p.grad.reshape(-1).narrow(0, f.offset_in_layer, f.numel))
        else:
            dst.zero_()
        covered = max(covered, f.offset_in_shard + f.numel)
    shard.narrow(0, covered, shard.numel() - covered).zero_()
    return shard, has, problem


class GradientBuckets:
    """ZeRO-2 gradient reduction, overlapped with backward.

    Each rank's shard is cut into buckets of at most ``bucket_size`` elements, so a
    bucket has exactly one owner; shards smaller than half a bucket are grouped
    instead, ``bucket_size // shard_size`` whole shards to a bucket (all-reduced in
    one call; with ``"reduce_scatter"``, one reduce per owner, or one reduce-scatter
    when the bucket holds every shard). A post-accumulate-grad hook copies each layer's
    gradient into the buckets it overlaps and frees ``.grad``; a bucket whose layers
    have all arrived is reduced asynchronously to its owner. Buckets are sent in one
    order that every rank shares, so every rank issues the same collectives in the
    same order even when their graphs use different parameters: descending flat offset
    at first, then (:meth:`set_order`) the order in which their last layer arrived at
    the previous step, summed over the ranks in the step's one collective, so a layer
    that backward never reaches (unused) holds back only the buckets it is in, not all
    those after it. A layer that the running backward will not reach on this rank
    (:meth:`skip`, known from the autograd engine at the first hook) holds back
    nothing here. Buckets still incomplete when backward ends are sent then (an
    end-of-backward callback), or at ``step()`` when no backward ran.
    At most ``max_in_flight`` buckets are in flight: peak gradient memory is a few
    buckets plus the shard. Bucket buffers and the shard are reused across steps
    (fresh large buffers cost a page fault per 4 KiB on CPU).
    """

    def __init__(self, layout: ShardLayout, rank: int, bucket_size: int, dtype, device, method: str, group,
                 max_in_flight: int = 2, shard_dtype=None):
        S = layout.shard_size
        self.layout, self.rank, self.dtype, self.device = layout, rank, dtype, device  # dtype: on the wire
        self.method, self.group, self.max_in_flight = method, group, max_in_flight
        W = layout.world_size
        self.pool: List[torch.Tensor] = []
        # This rank's buckets tile its range, so draining them rewrites every element.
        self.shard_grad = torch.empty(S, dtype=shard_dtype or dtype, device=device)
        # (flat start, length, owners). A shard of at least a bucket is cut into buckets
        # with one owner; smaller shards are grouped, k whole shards to a bucket, so a
        # step issues about P / bucket_size bucket collectives, not at least N.
        k = max(1, bucket_size // S)
        if k == 1:
            self.ranges = [(r * S + lo, min(bucket_size, S - lo), (r,)) for r in range(W) for lo in range(0, S, bucket_size)]
        else:
            self.ranges = [(r * S, (min(r + k, W) - r) * S, tuple(range(r, min(r + k, W)))) for r in range(0, W, k)]
        self.bucket_len = max(n for _, n, _ in self.ranges)
        self._mine: Optional[torch.Tensor] = None  # this rank's part of a bucket of every shard, reduce-scattered
        # For each layer: (bucket, offset in layer, offset in bucket, numel).
        self.pieces: List[List[tuple]] = [[] for _ in range(layout.num_layers)]
        self.members: List[int] = [0] * len(self.ranges)
        self.contents: List[List[tuple]] = [[] for _ in self.ranges]  # (layer, offset in bucket, numel)
        for b, (start, n, _) in enumerate(self.ranges):
            for layer, (off, numel) in enumerate(zip(layout.offsets, layout.numels)):
                lo, hi = max(off, start), min(off + numel, start + n)
                if lo < hi:
                    self.pieces[layer].append((b, lo - off, lo - start, hi - lo))
                    self.contents[b].append((layer, lo - start, hi - lo))
                    self.members[b] += 1
        # Padding inside each bucket: the only part no layer writes.
        self.gaps = []
        for b, (start, n, _) in enumerate(self.ranges):
            end = max((o + k for _, o, k in self.contents[b]), default=0)
            self.gaps.append((end, n - end) if end < n else None)
        self.order = list(range(len(self.ranges) - 1, -1, -1))
        self.reset()

    def set_order(self, summed: Sequence[float]) -> None:
        """Send buckets by the mean arrival position of their last layer, over the ranks it
        reached (ties: descending offset). A layer skipped on some ranks keeps the place
        it has where it arrives when the ranks that skipped it knew they would
        (:meth:`skip`); a layer reached nowhere, or one whose buckets waited for it on
        some rank, goes last.

        ``summed`` holds the L arrival values (see :data:`ARRIVED`) and the L counts of
        ranks that waited, summed over the ranks: identical on every rank (the step's
        reduced values), as the send order is part of the collective protocol."""
        L = self.layout.num_layers
        layer_keys = []
        for v, waited in zip(summed[:L], summed[L:]):
            count = math.floor(v / ARRIVED)
            layer_keys.append((v - count * ARRIVED) / count if count and not waited else math.inf)
        keys = [max((layer_keys[layer] for layer, _, _ in self.contents[b]), default=-1.0)
                for b in range(len(self.ranges))]
        self.order = sorted(range(len(self.ranges)), key=lambda b: (keys[b], -b))

    def reset(self) -> None:
        self.peak_elements = 0  # most gradient elements buffered at once, this step
        self.accumulated = False  # shard_grad holds earlier micro-batches' means: drains add
        self.ever = [False] * self.layout.num_layers  # layers with a gradient in any micro-batch
        self.waited = [False] * self.layout.num_layers  # unreached layers waited for until backward ended
        self._reset_backward()

    def next_micro_batch(self) -> None:
        """After a backward whose buckets were all sent: wait for them (the owners add the
        mean into the shard) and get ready for the next backward's buckets."""
        self.finish()
        self.ever = [a or b for a, b in zip(self.ever, self.arrived)]
        self.accumulated = True
        self._reset_backward()

    def has_grad(self) -> List[float]:
        return [1.0 if a or b else 0.0 for a, b in zip(self.arrived, self.ever)]

    def _reset_backward(self) -> None:
        self.buffers: Dict[int, torch.Tensor] = {}
        self.backing: Dict[int, torch.Tensor] = {}
        self.pending = list(self.members)
        self.arrived = [False] * self.layout.num_layers
        self.unreached = [False] * self.layout.num_layers  # skip()ped in this backward
        self.sent = [False] * len(self.ranges)
        self.pos = 0  # buckets sent this step: order[:pos]
        self.in_flight: List[tuple] = []

    def _buffer(self, b: int) -> torch.Tensor:
        if b not in self.buffers:
            backing = self.pool.pop() if self.pool else torch.empty(self.bucket_len, dtype=self.dtype,
                                                                    device=self.device)
            self.backing[b] = backing
            # Reused storage: every element is written before the send (layers that
            # arrive are copied in, the others are zeroed in _send, padding here).
            self.buffers[b] = backing.narrow(0, 0, self.ranges[b][1])
            if self.gaps[b] is not None:
                self.buffers[b].narrow(0, *self.gaps[b]).zero_()
            self.peak_elements = max(self.peak_elements, sum(t.numel() for t in self.buffers.values()))
        return self.buffers[b]

    def add(self, layer: int, grad: torch.Tensor) -> None:
        """Take ``layer``'s gradient (callers check it has not arrived nor been sent);
        send every bucket that is now next and complete."""
        # A hook's cost is mostly tensor calls (about 1 µs each on CPU): no detach unless
        # the gradient has a history (create_graph=True), no narrow of a whole layer.
        flat = (grad.detach() if grad.requires_grad else grad).reshape(-1)
        self.arrived[layer] = True
        pieces = self.pieces[layer]
        if len(pieces) == 1 and not self.unreached[layer]:
            b, _, boff, n = pieces[0]
            self._buffer(b).narrow(0, boff, n).copy_(flat)
            self.pending[b] -= 1
            self._send_ready()
            return
        if self.unreached[layer]:
            # Its buckets stopped waiting for it (skip()) and none was sent: fill every
            # piece before any of them can go.
            for b, off, boff, n in self.pieces[layer]:
                self._buffer(b).narrow(0, boff, n).copy_(flat.narrow(0, off, n))
            self._send_ready()
            return
        # Highest bucket first, sending as we go: a layer larger than a bucket never
        # has all of its buckets alive at once.
        for b, off, boff, n in reversed(self.pieces[layer]):
            self._buffer(b).narrow(0, boff, n).copy_(flat.narrow(0, off, n))
            self.pending[b] -= 1
            self._send_ready()

    def skip(self, layer: int) -> None:
        """This backward will not reach ``layer`` on this rank: its buckets stop waiting
        for it (it contributes zeros, as at the end of backward); send those now complete."""
        self.unreached[layer] = True
        for b, _, _, _ in self.pieces[layer]:
            self.pending[b] -= 1
        self._send_ready()

    def _send_ready(self) -> None:
        while self.pos < len(self.order) and self.pending[self.order[self.pos]] == 0:
            self._send(self.order[self.pos])

    def _send(self, b: int) -> None:
        owners = self.ranges[b][2]
        buf = self._buffer(b)
        for layer, off, n in self.contents[b]:
            if not self.arrived[layer]:  # no gradient on this rank: it contributes zeros
                buf.narrow(0, off, n).zero_()
        if self._mine is None and len(owners) == self.layout.world_size > 1:
            self._mine = torch.empty(self.layout.shard_size, dtype=self.dtype, device=self.device)
        work = C.start_bucket_reduce(buf, owners, self._mine, self.method, self.group)
        self.in_flight.append((b, work))
        self.sent[b] = True
        self.pos += 1
        while len(self.in_flight) > self.max_in_flight:
            self._drain()

    def _drain(self) -> None:
        b, work = self.in_flight.pop(0)
        work.wait()
        buf = self.buffers.pop(b)
        start, n, owners = self.ranges[b]
        if self.rank in owners:
            # The owner's copy out of the bucket also makes the sum a mean: one pass, not two.
            S = self.layout.shard_size
            if len(owners) == 1:
                lo, src = start - self.rank * S, buf
            elif self.method == "reduce_scatter" and len(owners) == self.layout.world_size:
                lo, src = 0, self._mine  # the reduce-scatter's output
            else:  # whole shards: this rank's part of the sum
                lo, src = 0, buf.narrow(0, (self.rank - owners[0]) * S, S)
            dst = self.shard_grad.narrow(0, lo, src.numel())
            if self.accumulated:
                dst.add_(src.div(self.layout.world_size))
            else:
                torch.div(src, self.layout.world_size, out=dst)
        self.pool.append(self.backing.pop(b))

    def too_late(self, layer: int) -> bool:
        """Whether a bucket holding ``layer`` was already sent this step."""
        pieces = self.pieces[layer]
        if len(pieces) == 1:
            return self.sent[pieces[0][0]]
        return any(self.sent[b] for b, _, _, _ in pieces)

    def started(self) -> bool:
        return any(self.arrived) or self.pos > 0

    def send_all(self) -> None:
        while self.pos < len(self.order):
            self._send(self.order[self.pos])

    def finish(self) -> torch.Tensor:
        """Send what is left, wait for everything; return this rank's averaged gradient shard."""
        self.send_all()
        while self.in_flight:
            self._drain()
        return self.shard_grad
