"""ShardedNovoGrad: NovoGrad with ZeRO-1/2 sharding over a torch.distributed group."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import weakref
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from . import collectives as C
from . import functional as F
from . import kernels as K
from .layout import DEFAULT_ALIGN, ShardLayout

__all__ = ["ShardedNovoGrad"]

logger = logging.getLogger(__name__)

_LOW_PRECISION = (torch.bfloat16, torch.float16)
# Default ZeRO-2 bucket sizes, in elements. CPU/gloo: 4 MiB of fp32 gave the fastest
# steps in launch/benchmark.py (the 50M-parameter MLP: 546 ms against 610 ms with 16 MiB
# at N=2). CUDA: 32 MiB, the order of DDP's 25 MB buckets (not yet measured here).
DEFAULT_BUCKET_SIZE = {"cpu": 1 << 20, "cuda": 1 << 23}
_OWNER = "_sharded_novograd_owner"


def _wait_hook(owner, ranges, module, args):
    opt = owner()
    if opt is not None:
        opt.wait_params(ranges)


def _hook(owner, layer, p):
    # A weak reference, so a dropped optimizer's hooks neither keep it alive nor act.
    opt = owner()
    if opt is not None:
        opt._on_grad(layer, p)


class _GradientBuckets:
    """ZeRO-2 gradient reduction, overlapped with backward.

    Each rank's shard is cut into buckets of at most ``bucket_size`` elements, so a
    bucket has exactly one owner. A post-accumulate-grad hook copies each layer's
    gradient into the buckets it overlaps and frees ``.grad``; a bucket whose layers
    have all arrived is reduced asynchronously to its owner. Buckets are sent in one
    fixed order (descending flat offset, the order backward produces gradients), so
    every rank issues the same collectives in the same order even when their graphs
    use different parameters; buckets still incomplete when backward ends are sent
    then (an end-of-backward callback), or at ``step()`` when no backward ran.
    At most ``max_in_flight`` buckets are in flight: peak gradient memory is a few
    buckets plus the shard. Bucket buffers and the shard are reused across steps
    (fresh large buffers cost a page fault per 4 KiB on CPU).
    """

    def __init__(self, layout: ShardLayout, rank: int, bucket_size: int, dtype, device, method: str, group,
                 max_in_flight: int = 2):
        S = layout.shard_size
        self.layout, self.rank, self.dtype, self.device = layout, rank, dtype, device
        self.method, self.group, self.max_in_flight = method, group, max_in_flight
        self.bucket_len = min(bucket_size, S)
        self.pool: List[torch.Tensor] = []
        # This rank's buckets tile its range, so draining them rewrites every element.
        self.shard_grad = torch.empty(S, dtype=dtype, device=device)
        self.ranges = [(r * S + lo, min(bucket_size, S - lo), r)  # (flat start, length, owner)
                       for r in range(layout.world_size) for lo in range(0, S, bucket_size)]
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
        self.reset()

    def reset(self) -> None:
        self.peak_elements = 0  # most gradient elements buffered at once, this step
        self.buffers: Dict[int, torch.Tensor] = {}
        self.backing: Dict[int, torch.Tensor] = {}
        self.pending = list(self.members)
        self.arrived = [False] * self.layout.num_layers
        self.next_to_send = len(self.ranges) - 1
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
        flat = grad.detach().reshape(-1)
        self.arrived[layer] = True
        # Highest bucket first, sending as we go: a layer larger than a bucket never
        # has all of its buckets alive at once.
        for b, off, boff, n in reversed(self.pieces[layer]):
            self._buffer(b).narrow(0, boff, n).copy_(flat.narrow(0, off, n))
            self.pending[b] -= 1
            while self.next_to_send >= 0 and self.pending[self.next_to_send] == 0:
                self._send(self.next_to_send)

    def _send(self, b: int) -> None:
        owner = self.ranges[b][2]
        buf = self._buffer(b)
        for layer, off, n in self.contents[b]:
            if not self.arrived[layer]:  # no gradient on this rank: it contributes zeros
                buf.narrow(0, off, n).zero_()
        work = C.start_bucket_reduce(buf, owner, self.method, self.group)
        self.in_flight.append((b, work))
        self.next_to_send = b - 1
        while len(self.in_flight) > self.max_in_flight:
            self._drain()

    def _drain(self) -> None:
        b, work = self.in_flight.pop(0)
        work.wait()
        buf = self.buffers.pop(b)
        start, n, owner = self.ranges[b]
        if owner == self.rank:
            self.shard_grad.narrow(0, start - self.rank * self.layout.shard_size, n).copy_(buf)
        self.pool.append(self.backing.pop(b))

    def too_late(self, layer: int) -> bool:
        """Whether a bucket holding ``layer`` was already sent this step."""
        return any(b > self.next_to_send for b, _, _, _ in self.pieces[layer])

    def started(self) -> bool:
        return any(self.arrived) or self.next_to_send < len(self.ranges) - 1

    def send_all(self) -> None:
        while self.next_to_send >= 0:
            self._send(self.next_to_send)

    def finish(self) -> torch.Tensor:
        """Send what is left, wait for everything; return this rank's summed gradient shard."""
        self.send_all()
        while self.in_flight:
            self._drain()
        return self.shard_grad


class ShardedNovoGrad(torch.optim.Optimizer):
    r"""NovoGrad whose first moments (and fp32 master weights) are sharded over ranks.

    The math is :class:`sharded_novograd.NovoGrad`'s, exactly: the per-layer norms are
    summed from every rank's fragments with one all-reduce of O(L) floats per step.
    Build it identically on every rank of ``process_group``; do NOT wrap the model in
    DDP: the optimizer averages gradients (mean over ranks) itself.

    At construction the trainable parameters (``requires_grad=True``; others are left
    alone) become views of one flat buffer; rank 0's values are broadcast to all
    ranks, as DDP does. Rank r owns an element-balanced contiguous range of that
    buffer and keeps ``exp_avg`` (and, for bf16/fp16 parameters, fp32 master weights)
    for that range only. Each :meth:`step`:

    1. averages gradients over the group. ZeRO-2: during backward, a hook copies each
       gradient into shard-aligned buckets and frees ``.grad``; each complete bucket
       is reduced asynchronously to its owner (see :meth:`no_sync` for accumulation).
       ZeRO-1: all gradients are all-reduced at ``step()`` and ``.grad`` is kept.
    2. computes per-layer partial statistics of the shard and all-reduces them in ONE
       collective, which also decides clipping and overflow for every rank at once,
    3. updates the replicated per-layer second moments and, with a fused kernel, the
       shard's ``exp_avg`` and weights,
    4. gathers the updated shards into the flat parameter buffer.

    A layer whose ``.grad`` is None on every rank is left untouched. A gradient with
    an inf or NaN on any rank skips the step on every rank, changing nothing
    (counted in :attr:`skipped_steps`).

    Args:
        params, lr, betas, eps, weight_decay, grad_averaging, amsgrad,
        reg_inside_moment, bias_correction, init_zero, norm_type: as for
            :class:`sharded_novograd.NovoGrad`.
        process_group: the data-parallel group (default: None, the world group)
        zero_stage: 1 (gradients all-reduced) or 2 (gradients reduce-scattered) (default: 2)
        max_grad_norm: clip the averaged gradient to this global L2 norm (default: None)
        fused: kernel choice: None picks Triton on CUDA and torch elsewhere, True
            demands Triton, False forces torch (default: None)
        collective_method: ``"auto"``, ``"reduce_scatter"`` or ``"all_reduce"``, see
            :mod:`sharded_novograd.collectives` (default: "auto")
        align: the flat buffer is padded to a multiple of ``world_size * align``
            elements (default: 64)
        bucket_size: ZeRO-2 gradient bucket size in elements; None picks 2**20 on CPU
            and 2**23 on CUDA (default: None)
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas=(0.95, 0.98), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, grad_averaging: bool = False, amsgrad: bool = False,
                 reg_inside_moment: bool = True, bias_correction: bool = False, init_zero: bool = False,
                 norm_type: float = 2, process_group=None, zero_stage: int = 2,
                 max_grad_norm: Optional[float] = None, fused: Optional[bool] = None,
                 collective_method: str = "auto", align: int = DEFAULT_ALIGN,
                 bucket_size: Optional[int] = None):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, grad_averaging=grad_averaging, amsgrad=amsgrad,
                        reg_inside_moment=reg_inside_moment, bias_correction=bias_correction,
                        init_zero=init_zero, norm_type=norm_type)
        F.validate_hyperparameters(defaults)
        if zero_stage not in (1, 2):
            raise ValueError(f"Invalid zero_stage: {zero_stage!r} (expected 1 or 2)")
        if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not max_grad_norm > 0):
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r} (expected None or a float > 0)")
        if bucket_size is not None and (isinstance(bucket_size, bool) or not isinstance(bucket_size, int)
                                        or bucket_size < 1):
            raise ValueError(f"Invalid bucket_size: {bucket_size!r} (expected None or an int >= 1, in elements)")
        if fused not in (None, True, False):
            raise ValueError(f"Invalid fused: {fused!r} (expected None, True or False)")
        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            raise RuntimeError("ShardedNovoGrad needs an initialized process group: call "
                               "torch.distributed.init_process_group() first (torchrun sets up the environment)")
        super().__init__(params, defaults)
        norm_types = {2 if g["norm_type"] == 2 else math.inf for g in self.param_groups}
        if len(norm_types) != 1:
            raise ValueError(f"Invalid norm_type: param groups mix {sorted(norm_types)}; "
                             "all groups must use the same norm_type")
        self.norm_type = norm_types.pop()
        self.zero_stage = zero_stage
        self.max_grad_norm = max_grad_norm
        self.fused = fused
        self.process_group = process_group if process_group is not None else torch.distributed.group.WORLD
        if C.group_rank(self.process_group) < 0:
            raise RuntimeError("this process is not a member of the process_group passed to ShardedNovoGrad")
        self.method = C.pick_method(collective_method, self.process_group,
                                    next((p.device for g in self.param_groups for p in g["params"]), None))
        self.rank = C.group_rank(self.process_group)
        self.world_size = C.group_size(self.process_group)
        self._build(align)
        self._mark_params_synced()
        self._pending_gather: List[tuple] = []  # (flat start, flat end, work) after attach()
        self._attached = False
        self._sync = True
        self._flush_queued = False
        self._buckets = None
        self._grad_flat = None  # ZeRO-1's gradient buffer, reused across steps
        if zero_stage == 2:
            if bucket_size is None:
                bucket_size = DEFAULT_BUCKET_SIZE.get(self.device.type, DEFAULT_BUCKET_SIZE["cuda"])
            self._buckets = _GradientBuckets(self.layout, self.rank, bucket_size, self.state_dtype, self.device,
                                             self.method, self.process_group)
            owner = weakref.ref(self)
            for i, p in enumerate(self._params):
                setattr(p, _OWNER, owner)
                p.register_post_accumulate_grad_hook(functools.partial(_hook, owner, i))
        self._skipped = 0
        self._grad_norm = float("nan")

    # ------------------------------------------------------------------ set-up
    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "layout", None) is not None:
            raise RuntimeError("ShardedNovoGrad cannot add param groups after construction: "
                               "the flat layout is fixed; pass every group to the constructor")
        super().add_param_group(param_group)
        F.validate_hyperparameters(self.param_groups[-1])

    def _build(self, align: int) -> None:
        self._params: List[torch.Tensor] = []
        self._layer_group: List[int] = []
        self._param_index: List[int] = []  # torch state_dict index of each layer
        index = 0
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.requires_grad:
                    self._params.append(p)
                    self._layer_group.append(gi)
                    self._param_index.append(index)
                index += 1
        if not self._params:
            raise ValueError("ShardedNovoGrad got no parameter with requires_grad=True")
        first = self._params[0]
        for i, p in enumerate(self._params):
            if p.device != first.device:
                raise ValueError(f"parameters are on different devices: layer 0 on {first.device}, "
                                 f"layer {i} on {p.device}; move the model to one device first")
            if p.dtype != first.dtype:
                raise ValueError(f"parameters have different dtypes: layer 0 is {first.dtype}, "
                                 f"layer {i} is {p.dtype}; cast the model to one dtype first")
        if not first.dtype.is_floating_point:
            raise ValueError(f"parameters must be floating point, got {first.dtype}")
        if first.is_sparse:
            raise ValueError("ShardedNovoGrad does not support sparse parameters")
        self.device, self.param_dtype = first.device, first.dtype
        self.state_dtype = torch.promote_types(first.dtype, torch.float32)
        self.layout = ShardLayout(tuple(tuple(p.shape) for p in self._params), self.world_size, align)
        lines = self.layout.describe() + [f"dtype={self.param_dtype}", f"zero_stage={self.zero_stage}",
                                          f"norm_type={self.norm_type}", f"method={self.method}"]
        lines += [f"layer {i}: group={g}" for i, g in enumerate(self._layer_group)]
        self._plan_digest = hashlib.sha256("\n".join(lines).encode()).digest()
        C.check_same_plan(lines, self._plan_digest, self.process_group, self.device)

        lay, S = self.layout, self.layout.shard_size
        self._flat = torch.zeros(lay.padded_total, dtype=self.param_dtype, device=self.device)
        for p, off, n in zip(self._params, lay.offsets, lay.numels):
            view = self._flat.narrow(0, off, n).view_as(p)
            view.copy_(p.detach())
            p.data = view
        C.broadcast_flat(self._flat, self.process_group, src=0)
        self._shard = self._flat.narrow(0, self.rank * S, S)
        if self.param_dtype in _LOW_PRECISION:
            self._master = self._shard.to(self.state_dtype)
            self._lowp = self._shard
        else:
            self._master, self._lowp = self._shard, None  # fp32 models need no master copy
        L = lay.num_layers
        self._exp_avg = torch.zeros(S, dtype=self.state_dtype, device=self.device)
        self._v = torch.zeros(L, dtype=self.state_dtype, device=self.device)
        self._v_max = torch.zeros(L, dtype=self.state_dtype, device=self.device)
        self._t = torch.zeros(L, dtype=self.state_dtype, device=self.device)
        self._table = lay.table(self.rank)
        self._hyper_key = None
        self._hyper = None
        K.use_triton(self._exp_avg, self.fused)  # fail now, not at the first step
        if self.rank == 0:
            logger.info("ShardedNovoGrad: %d layers, %d elements, %d ranks x %d elements, zero_stage=%d, "
                        "method=%s", L, lay.total, self.world_size, S, self.zero_stage, self.method)

    def _layer_hyper(self) -> F.LayerHyper:
        keys = ("lr", "betas", "eps", "weight_decay", "grad_averaging", "amsgrad", "reg_inside_moment",
                "bias_correction", "init_zero", "norm_type")
        key = tuple(tuple(float(g["lr"]) if k == "lr" else g[k] for k in keys) for g in self.param_groups)
        if key != self._hyper_key:
            for g in self.param_groups:
                F.validate_hyperparameters(g)
            self._hyper = F.LayerHyper.from_groups(self.param_groups, self._layer_group,
                                                   self.state_dtype, self.device)
            self._hyper_key = key
        return self._hyper

    # ------------------------------------------------------------------ stepping
    @property
    def grad_norm(self) -> float:
        """Global L2 norm of the rank-averaged gradient at the last step (before clipping)."""
        return self._grad_norm

    @property
    def layer_params(self) -> Tuple[torch.Tensor, ...]:
        """The trainable parameters in layout order: layer ``i`` is ``layer_params[i]``."""
        return tuple(self._params)

    @property
    def flat_params(self) -> torch.Tensor:
        """The flat buffer that every trainable parameter is a view of (padded)."""
        return self._flat

    @property
    def skipped_steps(self) -> int:
        """Steps skipped on every rank because a gradient held an inf or NaN."""
        return self._skipped

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank (shards plus the O(L) vectors)."""
        tensors = [self._exp_avg, self._v, self._v_max, self._t]
        if self._lowp is not None:
            tensors.append(self._master)
        return sum(t.numel() * t.element_size() for t in tensors)

    def _on_grad(self, layer: int, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook (ZeRO-2): hand the gradient to its buckets, free it."""
        g = p.grad
        if getattr(p, _OWNER, lambda: None)() is not self:
            return  # a newer ShardedNovoGrad took over this parameter
        bk = self._buckets
        if (not self._sync or g is None or bk.arrived[layer] or bk.too_late(layer)
                or self._grad_problem(layer, p)):
            return  # step() takes it from .grad, or reports the problem on every rank
        if not self._flush_queued:
            # Like DDP: when this backward ends, send every bucket still open (layers
            # unused on this rank contribute zeros), so that all of this step's bucket
            # collectives are issued inside backward on every rank and cannot pair up
            # with a collective the caller issues between backward and step().
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self._flush_queued = True
        bk.add(layer, g)
        p.grad = None

    def _end_of_backward(self) -> None:
        self._flush_queued = False
        self._buckets.send_all()

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally: inside this context, backward leaves them in ``.grad``.

        Wrap all micro-batches but the last; the last backward (outside the context)
        reduces the accumulated sum, so k micro-batches equal one large batch.
        """
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients, including those ZeRO-2 already took from ``.grad`` during backward.

        If a backward already sent buckets, this completes their collectives, so call it
        on all ranks at the same point (as a training loop does).
        """
        super().zero_grad(set_to_none)
        if self._buckets is not None and self._buckets.started():
            self._buckets.finish()
            self._buckets.reset()

    @staticmethod
    def _grad_problem(layer: int, p: torch.Tensor) -> Optional[str]:
        g = p.grad
        if g.is_sparse:
            return f"layer {layer} (shape {tuple(p.shape)}) has a sparse gradient; NovoGrad does not support " \
                   "sparse gradients"
        if g.shape != p.shape:
            return f"layer {layer} has a gradient of shape {tuple(g.shape)}, expected {tuple(p.shape)}"
        return None

    def _reduce_gradients(self):
        """This rank's shard of the rank-averaged gradient, the local has-gradient flags
        per layer, and the first local problem found (or None)."""
        lay, n = self.layout, self.world_size
        problem = None
        if self._buckets is None:  # ZeRO-1: all-reduce everything, keep .grad
            if self._grad_flat is None:
                self._grad_flat = torch.empty(lay.padded_total, dtype=self.state_dtype, device=self.device)
            flat = self._grad_flat.zero_()
            has = [0.0] * lay.num_layers
            for i, (p, off, numel) in enumerate(zip(self._params, lay.offsets, lay.numels)):
                if p.grad is None:
                    continue
                bad = self._grad_problem(i, p)
                problem = problem or bad
                if bad is None:
                    flat.narrow(0, off, numel).copy_(p.grad.reshape(-1))
                    has[i] = 1.0
            C.all_reduce_mean(flat, self.process_group)
            shard = flat.narrow(0, self.rank * lay.shard_size, lay.shard_size)
        else:  # ZeRO-2: most gradients already left during backward
            bk = self._buckets
            for i, p in enumerate(self._params):
                if p.grad is None:
                    continue
                if bk.arrived[i] or bk.too_late(i):
                    problem = problem or (f"layer {i} received a gradient after backward had already reduced "
                                          "it (or its bucket): with zero_stage=2, accumulate micro-batches "
                                          "inside `with optimizer.no_sync():` for all but the last backward, "
                                          "and assign gradients by hand only before backward or without one")
                    continue
                bad = self._grad_problem(i, p)
                problem = problem or bad
                if bad is None:
                    bk.add(i, p.grad)
            has = [1.0 if a else 0.0 for a in bk.arrived]
            shard = bk.finish().div_(n)
        return shard, torch.tensor(has, dtype=self.state_dtype, device=self.device), problem

    def _global_stats(self, shard_grad, has, problem):
        """Partial statistics of this shard, made global with ONE collective."""
        L = self.layout.num_layers
        st = K.partial_stats(shard_grad, self._table, max_abs=self.norm_type != 2,
                             fused=self.fused).to(self.state_dtype)
        bad = torch.tensor([1.0 if problem else 0.0], dtype=self.state_dtype, device=self.device)
        if self.norm_type == 2:
            vec = torch.cat([st[:L], has, st[2 * L:], bad])
            C.all_reduce_stats(vec, self.process_group)
            sumsq, stat, count, flags = vec[:L], vec[:L], vec[L:2 * L], vec[2 * L:]
        else:
            every = C.all_gather_stats(torch.cat([st, has, bad]), self.process_group)
            sumsq, stat = every[:, :L].sum(0), every[:, L:2 * L].amax(0)
            count, flags = every[:, 2 * L + 1:3 * L + 1].sum(0), every[:, [2 * L, 3 * L + 1]].sum(0)
        return sumsq, stat, count > 0, flags

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        """Perform a single optimization step. This needs to be called on all ranks.

        Args:
            closure: a closure that re-evaluates the model and returns the loss (default: None)
        """
        self.wait_params()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            shard_grad, has, problem = self._reduce_gradients()
            self._update(shard_grad, has, problem)
        finally:
            if self._buckets is not None:
                self._buckets.reset()
                for p in self._params:
                    p.grad = None
        return loss

    def _update(self, shard_grad, has, problem) -> None:
        sumsq, stat, has_grad, flags = self._global_stats(shard_grad, has, problem)
        nonfinite, bad, any_grad = torch.cat([flags, has_grad.any().to(flags.dtype).view(1)]).tolist()
        if bad:
            raise RuntimeError(f"invalid gradient on rank {self.rank}: {problem}; nothing was changed" if problem
                               else "invalid gradient on another rank (see its error); nothing was changed")
        if not any_grad:
            raise RuntimeError("step() called but no parameter has a gradient on any rank: "
                               "call backward() before step()")
        if nonfinite:
            self._skipped += 1
            self._grad_norm = float("nan")
            if self.rank == 0:
                logger.warning("non-finite gradient: step skipped on every rank (%d so far)", self._skipped)
            return
        total = torch.sqrt(torch.where(has_grad, sumsq, torch.zeros_like(sumsq)).sum())
        gscale = 1.0
        if self.max_grad_norm is not None:
            gscale = (self.max_grad_norm / (total + 1e-6)).clamp(max=1.0)
            stat = stat * (gscale * gscale if self.norm_type == 2 else gscale)
        v, v_max, t, coeffs = F.layer_update(stat, has_grad, self._v, self._v_max, self._t, self._layer_hyper(),
                                             norm_type=self.norm_type, gscale=gscale)
        # In place, so a state_dict() taken earlier stays one consistent (live) view.
        self._v.copy_(v)
        self._v_max.copy_(v_max)
        self._t.copy_(t)
        self._resync_master()
        K.fused_update(shard_grad, self._exp_avg, self._master, self._lowp, self._table, coeffs,
                       scratch_grad=True, fused=self.fused)
        if self._attached:
            self._pending_gather = C.start_gather_shards(self._flat, self.layout.shard_size, self.method,
                                                         self.process_group)
        else:
            C.gather_shards(self._flat, self.layout.shard_size, self.method, self.process_group)
            self._mark_params_synced()
        self._grad_norm = float(total)

    # ------------------------------------------------------------------ gather overlap
    def attach(self, module: torch.nn.Module) -> None:
        """Overlap each step's parameter gather with the next forward of ``module``.

        After this, :meth:`step` returns with the gather still in flight; a forward
        pre-hook on every submodule that owns trainable parameters waits for just the
        part of the gather that holds them, so early layers compute while later
        layers' parameters are still arriving. Anything else that reads or writes the
        parameters between ``step()`` and the next forward (evaluation without
        ``module``, logging weights, ``model.state_dict()``, loading weights) must call
        :meth:`wait_params` first; :meth:`step`, the state-dict methods and
        :mod:`sharded_novograd.checkpoint` do so themselves.
        """
        where = {id(p): (off, off + n) for p, off, n in zip(self._params, self.layout.offsets, self.layout.numels)}
        for sub in module.modules():
            ranges = [where[id(p)] for p in sub.parameters(recurse=False) if id(p) in where]
            if ranges:
                sub.register_forward_pre_hook(functools.partial(_wait_hook, weakref.ref(self), ranges))
        self._attached = True

    def wait_params(self, ranges=None) -> None:
        """Wait until the parameters (or the flat ``[start, end)`` ``ranges``) hold this
        step's values. A no-op unless :meth:`attach` was called."""
        if not self._pending_gather:
            return
        keep = []
        for lo, hi, work in self._pending_gather:
            if ranges is None or any(lo < b and a < hi for a, b in ranges):
                work.wait()
            else:
                keep.append((lo, hi, work))
        self._pending_gather = keep
        if not keep:
            self._mark_params_synced()

    def _params_version(self) -> int:
        # Each Parameter keeps its own version counter (p.data was re-pointed to the
        # flat buffer), so in-place writes through p bump p's, not the buffer's.
        return self._flat._version + sum(p._version for p in self._params)

    def _mark_params_synced(self) -> None:
        self._synced_version = self._params_version()

    def _resync_master(self) -> None:
        """bf16/fp16: if the parameters were written since the last step (say by
        ``model.load_state_dict``), they are the truth; take the master weights from them."""
        if self._lowp is not None and self._params_version() != self._synced_version:
            self._master.copy_(self._shard)

    # ------------------------------------------------------------------ state
    def _groups_for_state(self) -> List[Dict]:
        out, index = [], 0
        for g in self.param_groups:
            d = {k: v for k, v in g.items() if k != "params"}
            d["params"] = list(range(index, index + len(g["params"])))
            index += len(g["params"])
            out.append(d)
        return out

    def _layout_meta(self) -> Dict:
        return {"world_size": self.world_size, "rank": self.rank, "digest": self._plan_digest.hex(),
                "shard_size": self.layout.shard_size, "shapes": [list(s) for s in self.layout.shapes]}

    def state_dict(self) -> Dict:
        """This rank's part of the state, for a restart at the same world size.

        Use :mod:`sharded_novograd.checkpoint` or :meth:`consolidated_state_dict` to
        change world size.
        """
        self.wait_params()
        state = {"exp_avg": self._exp_avg, "exp_avg_sq": self._v, "step": self._t,
                 "max_exp_avg_sq": self._v_max, "skipped_steps": self._skipped}
        if self._lowp is not None:
            state["master_weight"] = self._master
        return {"state": state, "param_groups": self._groups_for_state(), "layout": self._layout_meta()}

    def load_state_dict(self, state_dict: Dict) -> None:
        """Load a :meth:`state_dict` saved by the same rank at the same world size."""
        self.wait_params()
        meta, mine = state_dict.get("layout"), self._layout_meta()
        if not isinstance(meta, dict):
            raise ValueError("not a ShardedNovoGrad state dict (no 'layout'); for a NovoGrad state dict "
                             "use load_consolidated_state_dict()")
        for k in ("world_size", "rank", "digest"):
            if meta.get(k) != mine[k]:
                raise ValueError(f"state dict was saved with {k}={meta.get(k)!r} but this optimizer has "
                                 f"{k}={mine[k]!r}; use sharded_novograd.checkpoint.load to reshard")
        st = state_dict["state"]
        self._check_groups(state_dict["param_groups"])
        for name, dst in (("exp_avg", self._exp_avg), ("exp_avg_sq", self._v), ("step", self._t),
                          ("max_exp_avg_sq", self._v_max)):
            dst.copy_(st[name])
        if self._lowp is not None:
            self._master.copy_(st["master_weight"] if "master_weight" in st else self._shard)
        self._mark_params_synced()
        self._skipped = int(st.get("skipped_steps", 0))
        self._load_groups(state_dict["param_groups"])

    def _check_groups(self, groups) -> None:
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(groups)} param groups, the optimizer has "
                             f"{len(self.param_groups)}")
        for i, (a, b) in enumerate(zip(groups, self.param_groups)):
            if len(a["params"]) != len(b["params"]):
                raise ValueError(f"param group {i} of the state dict has {len(a['params'])} parameters, "
                                 f"the optimizer's has {len(b['params'])}")

    def _load_groups(self, groups) -> None:
        for saved, group in zip(groups, self.param_groups):
            for k, v in saved.items():
                if k != "params":
                    group[k] = tuple(v) if k == "betas" else v
        self._hyper_key = None

    def consolidated_state_dict(self) -> Dict:
        """The whole optimizer state in :class:`NovoGrad`'s ``state_dict`` format, on every rank.

        World-size free: :class:`NovoGrad` built on the same parameters loads it, and so
        does :meth:`load_consolidated_state_dict` at any world size. Master weights of
        bf16/fp16 models are not part of it (the model's parameters are). This needs to
        be called on all ranks.
        """
        self.wait_params()
        lay, S = self.layout, self.layout.shard_size
        full = torch.zeros(lay.padded_total, dtype=self.state_dtype, device=self.device)
        full.narrow(0, self.rank * S, S).copy_(self._exp_avg)
        C.gather_shards(full, S, self.method, self.process_group)
        steps, vs, vmaxs = self._t.tolist(), self._v, self._v_max
        state = {}
        for i, (p, off, n) in enumerate(zip(self._params, lay.offsets, lay.numels)):
            if steps[i] == 0:
                continue
            st = {"step": torch.tensor(float(steps[i])),
                  "exp_avg": full.narrow(0, off, n).view(p.shape).clone(),
                  "exp_avg_sq": vs[i].clone()}
            if self.param_groups[self._layer_group[i]]["amsgrad"]:
                st["max_exp_avg_sq"] = vmaxs[i].clone()
            state[self._param_index[i]] = st
        return {"state": state, "param_groups": self._groups_for_state()}

    def load_consolidated_state_dict(self, state_dict: Dict) -> None:
        """Load a :class:`NovoGrad`-format state dict (e.g. from :meth:`consolidated_state_dict`).

        Every rank takes its own fragments. If the state dict does not fit on any rank,
        every rank raises and nothing changes. This needs to be called on all ranks.
        """
        self.wait_params()
        problem = None
        try:
            plan = self._plan_consolidated_load(state_dict)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            problem, plan = f"{type(e).__name__}: {e}", None
        problems = C.agree(problem, self.process_group, self.device)
        if problems:
            raise ValueError("cannot load consolidated state dict: " +
                             "; ".join(f"rank {r}: {msg}" for r, msg in problems))
        exp_avg, v, vmax, t = plan
        self._exp_avg.copy_(exp_avg)
        self._v.copy_(v)
        self._v_max.copy_(vmax)
        self._t.copy_(t)
        if self._lowp is not None:
            self._master.copy_(self._shard)
        self._mark_params_synced()
        self._load_groups(state_dict["param_groups"])

    def _plan_consolidated_load(self, sd):
        self._check_groups(sd["param_groups"])
        saved_ids = [i for g in sd["param_groups"] for i in g["params"]]
        exp_avg = torch.zeros_like(self._exp_avg)
        v, vmax, t = torch.zeros_like(self._v), torch.zeros_like(self._v_max), torch.zeros_like(self._t)
        owned = {}
        for f in self.layout.fragments[self.rank]:
            owned.setdefault(f.layer, []).append(f)
        for i, p in enumerate(self._params):
            st = sd["state"].get(saved_ids[self._param_index[i]])
            if not st:
                continue
            m = st["exp_avg"]
            if tuple(m.shape) != tuple(p.shape):
                raise ValueError(f"exp_avg of layer {i} has shape {tuple(m.shape)}, the parameter has "
                                 f"{tuple(p.shape)}")
            flat_m = m.detach().reshape(-1).to(device=self.device, dtype=self.state_dtype)
            for f in owned.get(i, []):
                exp_avg.narrow(0, f.offset_in_shard, f.numel).copy_(flat_m.narrow(0, f.offset_in_layer, f.numel))
            v[i] = float(st["exp_avg_sq"])
            vmax[i] = float(st.get("max_exp_avg_sq", st["exp_avg_sq"]))
            t[i] = float(st["step"])
        return exp_avg, v, vmax, t
