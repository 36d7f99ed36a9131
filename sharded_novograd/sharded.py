"""ShardedNovoGrad: NovoGrad with ZeRO-1/2 sharding over a torch.distributed group.

The optimizer facade. The jobs of a step live in their own modules and flow one way:
:mod:`.flat` (the flat parameter buffer, re-adoption of moved parameters),
:mod:`.gradients` (this rank's averaged gradient shard: ZeRO-1, ZeRO-2 buckets, or
averaged by DDP), :mod:`.engine` (the one collective and every decision taken from it)
and :mod:`.kernels` (the fused update).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import warnings
import weakref
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from . import collectives as C
from . import engine as E
from . import functional as F
from . import kernels as K
from .backward import BackwardTracker
from .flat import FlatParams
from .gradients import ARRIVED, GradientBuckets, all_reduce_gradients, grad_problem, take_averaged
from .layout import DEFAULT_ALIGN, ShardLayout

__all__ = ["ShardedNovoGrad"]

logger = logging.getLogger(__name__)

# Default ZeRO-2 bucket sizes, in elements. CPU/gloo: 4 MiB of fp32 gave the fastest
# steps in launch/benchmark.py (the 50M-parameter MLP: 546 ms against 610 ms with 16 MiB
# at N=2). CUDA: 32 MiB, the order of DDP's 25 MB buckets (not yet measured here).
DEFAULT_BUCKET_SIZE = {"cpu": 1 << 20, "cuda": 1 << 23}
# Above that, the default bucket grows with the model so that a step issues at most
# about MAX_BUCKET_CALLS bucket collectives (plus one per owner whose range ends in a
# partial bucket), whatever the model size: a 70B model gets 68M-element buckets.
MAX_BUCKET_CALLS = 1024


def default_bucket_size(device_type: str, elements: int) -> int:
    """ZeRO-2's bucket size (elements) when none is given, for ``elements`` in the flat buffer."""
    floor = DEFAULT_BUCKET_SIZE.get(device_type, DEFAULT_BUCKET_SIZE["cuda"])
    return max(floor, -(-int(elements) // MAX_BUCKET_CALLS))

_OWNER = "_sharded_novograd_owner"
_HYPER_KEYS = ("lr", "betas", "eps", "weight_decay", "grad_averaging", "amsgrad", "reg_inside_moment",
               "bias_correction", "init_zero", "norm_type")

# GradScaler hands itself to optimizers whose step() takes `grad_scaler` (the only way
# it lets an optimizer record the inf decision that its update() reads), and warns
# that this will change; the step below handles both that and the attribute form.
warnings.filterwarnings("ignore", message="GradScaler is going to stop passing itself", category=FutureWarning)


def _wait_hook(owner, ranges, module, args):
    opt = owner()
    if opt is not None:
        opt.wait_params(ranges)


def _hook(owner, layer, p):
    # A weak reference, so a dropped optimizer's hooks neither keep it alive nor act.
    opt = owner()
    if opt is not None:
        opt._on_grad(layer, p)


class ShardedNovoGrad(torch.optim.Optimizer):
    r"""NovoGrad whose first moments (and fp32 master weights) are sharded over ranks.

    The math is :class:`sharded_novograd.NovoGrad`'s, exactly: the per-layer norms are
    summed from every rank's fragments with one all-reduce of O(L) floats per step.
    Build it identically on every rank of ``process_group``.

    At construction the trainable parameters (``requires_grad=True``; others are left
    alone) become views of one flat buffer; rank 0's values are broadcast to all
    ranks, as DDP does. Rank r owns an element-balanced contiguous range of that
    buffer and keeps ``exp_avg`` (and, for bf16/fp16 parameters, fp32 master weights)
    for that range only. Each :meth:`step`:

    1. re-adopts parameters that were moved or replaced since the last step
       (``model.to(device)``, ``p.data = ...``): their current values are the truth.
       A change that cannot be exact (dtype, shape) raises on every rank.
    2. averages gradients over the group, unless someone else did. ZeRO-2: during
       backward, a hook copies each gradient into shard-aligned buckets and frees
       ``.grad``; each complete bucket is reduced asynchronously to its owner (see
       :meth:`no_sync` for accumulation). ZeRO-1: all gradients are all-reduced at
       ``step()`` and ``.grad`` is kept. A model wrapped in DDP (as HF Trainer,
       Accelerate and Lightning do) is detected at its first backward: DDP already
       averaged ``.grad``, so the optimizer takes its fragments with no collective.
    3. computes per-layer partial statistics of the shard and reduces them with the
       settings digest and GradScaler's inf flag in ONE collective, which decides
       overflow, clipping and agreement for every rank at once,
    4. updates the replicated per-layer second moments and, with a fused kernel, the
       shard's ``exp_avg`` and weights,
    5. gathers the updated shards into the flat parameter buffer.

    A layer whose ``.grad`` is None on every rank is left untouched. A gradient with
    an inf or NaN on any rank, or whose summed squares overflow, skips the step on
    every rank, changing nothing (counted in :attr:`skipped_steps`). With
    ``torch.amp.GradScaler``, ``scaler.step(opt)`` unscales inside the step and every
    rank takes the same inf decision.

    Args:
        params, lr, betas, eps, weight_decay, grad_averaging, amsgrad,
        reg_inside_moment, bias_correction, init_zero, norm_type: as for
            :class:`sharded_novograd.NovoGrad`.
        process_group: the data-parallel group (default: None, the world group)
        zero_stage: 1 (gradients all-reduced) or 2 (gradients reduce-scattered) (default: 2)
        max_grad_norm: clip the averaged gradient to this global L2 norm (default: None)
        grads_averaged: None detects a DDP-wrapped model at the first backward; True
            says someone else averages ``.grad`` over the group (DDP), False that the
            optimizer does (default: None)
        fused: kernel choice (see :mod:`sharded_novograd.kernels`): None picks Triton on
            CUDA and the compiled one-pass kernels on CPU where they build, True demands
            a one-pass kernel, False forces torch (default: None)
        collective_method: ``"auto"``, ``"reduce_scatter"`` or ``"all_reduce"``, see
            :mod:`sharded_novograd.collectives` (default: "auto")
        align: the flat buffer is padded to a multiple of ``world_size * align``
            elements (default: 64)
        bucket_size: ZeRO-2 gradient bucket size in elements; None picks 2**20 on CPU
            and 2**23 on CUDA, or for larger models (above 1,024 such buckets: 8.6e9
            elements on CUDA) enough that a step issues at most about 1,024 bucket
            reductions plus one per rank (:func:`default_bucket_size`) (default: None)
        reduce_dtype: the dtype gradients are summed in over the ranks, as FSDP2's
            ``MixedPrecisionPolicy(reduce_dtype=...)``; None sums in the state dtype (fp32
            for bf16/fp16 models: exact averaging at twice the bytes of bf16);
            ``torch.bfloat16`` halves the gradient traffic of a bf16 model, rounding the
            sum to bf16 (default: None)
    """

    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable, lr: float = 1e-3, betas=(0.95, 0.98), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, grad_averaging: bool = False, amsgrad: bool = False,
                 reg_inside_moment: bool = True, bias_correction: bool = False, init_zero: bool = False,
                 norm_type: float = 2, process_group=None, zero_stage: int = 2,
                 max_grad_norm: Optional[float] = None, grads_averaged: Optional[bool] = None,
                 fused: Optional[bool] = None, collective_method: str = "auto", align: int = DEFAULT_ALIGN,
                 bucket_size: Optional[int] = None, reduce_dtype: Optional[torch.dtype] = None):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, grad_averaging=grad_averaging, amsgrad=amsgrad,
                        reg_inside_moment=reg_inside_moment, bias_correction=bias_correction,
                        init_zero=init_zero, norm_type=norm_type)
        F.validate_hyperparameters(defaults)
        if zero_stage not in (1, 2) or isinstance(zero_stage, bool):
            raise ValueError(f"Invalid zero_stage: {zero_stage!r} (expected 1 or 2)")
        if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
                                          or not 0 < max_grad_norm < math.inf):
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r} (expected None or a finite float > 0)")
        if bucket_size is not None and (isinstance(bucket_size, bool) or not isinstance(bucket_size, int)
                                        or bucket_size < 1):
            raise ValueError(f"Invalid bucket_size: {bucket_size!r} (expected None or an int >= 1, in elements)")
        if fused not in (None, True, False):
            raise ValueError(f"Invalid fused: {fused!r} (expected None, True or False)")
        if reduce_dtype is not None and (not isinstance(reduce_dtype, torch.dtype)
                                         or not reduce_dtype.is_floating_point):
            raise ValueError(f"Invalid reduce_dtype: {reduce_dtype!r} (expected None or a floating-point torch.dtype)")
        if grads_averaged not in (None, True, False):
            raise ValueError(f"Invalid grads_averaged: {grads_averaged!r} (expected None, True or False)")
        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            raise RuntimeError("ShardedNovoGrad needs an initialized process group: call "
                               "torch.distributed.init_process_group() first (torchrun sets up the environment)")
        super().__init__(params, defaults)
        seen = set()
        for gi, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                if id(p) in seen:
                    raise ValueError(f"parameter {j} of param group {gi} (shape {tuple(p.shape)}) appears more "
                                     "than once in params; pass each parameter once")
                seen.add(id(p))
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
        self._method_request = collective_method
        self.method = C.pick_method(collective_method, self.process_group, self._first_device())
        self.rank = C.group_rank(self.process_group)
        self.world_size = C.group_size(self.process_group)
        # "unknown" until the first backward shows whether DDP averaged the gradients.
        self._source = {None: "unknown", True: "averaged", False: "own"}[grads_averaged]
        self._bucket_request = bucket_size
        self._reduce_dtype_request = reduce_dtype
        self._build(align)
        self._pending_gather: List[tuple] = []  # (flat start, flat end, work) after attach()
        self._attached = False
        self._sync = True
        self._backward = BackwardTracker(self.layout.num_layers, self._after_backward)
        self._hooked: Dict[int, Tuple[int, int]] = {}  # layer -> (id, version) of .grad when its hook ran
        self._reduced_elsewhere = False  # the last backward's gradients were written by DDP
        self._sync_backwards = 0  # backwards outside no_sync() since the last step
        self._accumulating = False  # inside accumulate()
        self._backward_since_step = False
        self._reset_arrivals()
        self._grad_flat = None  # ZeRO-1's gradient buffer, reused across steps
        self._grad_shard = None  # the shard buffer for gradients averaged elsewhere
        self._device_parts()
        owner = weakref.ref(self)
        for i, p in enumerate(self._params):
            setattr(p, _OWNER, owner)
            p.register_post_accumulate_grad_hook(functools.partial(_hook, owner, i))
        self._skipped = 0
        self._grad_norm = float("nan")
        self._total_norm = None

    def _reset_arrivals(self) -> None:
        # ZeRO-2: the order of this step's gradient arrivals, summed over the ranks in the
        # step's collective (ARRIVED + position; 0 where the layer got none), orders the
        # next step's buckets.
        self._arrival = [0.0] * len(getattr(self, "_params", ()))
        self._arrivals = 0

    def _device_parts(self) -> None:
        """The step engine and ZeRO-2's buckets for the parameters' current device (at
        construction, and again when the model moved to another device)."""
        self._engine = E.StepEngine(self.layout.num_layers, self.process_group, self.device,
                                    norm_type=self.norm_type, state_dtype=self.state_dtype)
        self._buckets = None
        if self.zero_stage == 2:
            self._buckets = GradientBuckets(self.layout, self.rank, self.bucket_size, self.reduce_dtype,
                                            self.device, self.method, self.process_group,
                                            shard_dtype=self.state_dtype)

    def _first_device(self) -> torch.device:
        for g in self.param_groups:
            for p in g["params"]:
                return p.device
        return torch.device("cpu")

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
        self._frozen: List[Tuple[int, int, torch.Tensor]] = []  # (group, index in group, param) not trained
        index = 0
        for gi, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                if p.requires_grad:
                    self._params.append(p)
                    self._layer_group.append(gi)
                    self._param_index.append(index)
                else:
                    self._frozen.append((gi, j, p))
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
        self.param_dtype = first.dtype
        self.state_dtype = torch.promote_types(first.dtype, torch.float32)
        self.reduce_dtype = self._reduce_dtype_request or self.state_dtype
        self.layout = ShardLayout(tuple(tuple(p.shape) for p in self._params), self.world_size, align)
        self.bucket_size = None
        if self.zero_stage == 2:
            self.bucket_size = self._bucket_request or default_bucket_size(first.device.type,
                                                                           self.layout.padded_total)
        lines = self.layout.describe() + [f"dtype={self.param_dtype}", f"zero_stage={self.zero_stage}",
                                          f"norm_type={self.norm_type}", f"method={self.method}",
                                          f"bucket_size={self.bucket_size}", f"max_grad_norm={self.max_grad_norm}",
                                          f"reduce_dtype={self.reduce_dtype}"]
        lines += [f"layer {i}: group={g}" for i, g in enumerate(self._layer_group)]
        self._plan_digest = hashlib.sha256("\n".join(lines).encode()).digest()
        C.check_same_plan(lines, self._plan_digest, self.process_group, first.device)

        self._store = FlatParams(self._params, self.layout, self.rank, self.process_group)
        S, L = self.layout.shard_size, self.layout.num_layers
        self._exp_avg = torch.zeros(S, dtype=self.state_dtype, device=self.device)
        self._v = torch.zeros(L, dtype=self.state_dtype, device=self.device)
        self._v_max = torch.zeros(L, dtype=self.state_dtype, device=self.device)
        self._t = torch.zeros(L, dtype=self.state_dtype, device=self.device)
        self._table = self.layout.table(self.rank)
        self._hyper_key = None
        self._hyper = None
        self._digest = b""
        K.use_triton(self._exp_avg, self.fused)  # fail now, not at the first step
        if self.rank == 0:
            logger.info("ShardedNovoGrad: %d layers, %d elements, %d ranks x %d elements, zero_stage=%d, "
                        "method=%s", L, self.layout.total, self.world_size, S, self.zero_stage, self.method)

    # The flat storage, for the state-dict code and checkpoints.
    device = property(lambda self: self._store.device)
    _flat = property(lambda self: self._store.flat)
    _shard = property(lambda self: self._store.shard)
    _master = property(lambda self: self._store.master)
    _lowp = property(lambda self: self._store.lowp)

    def _mark_params_synced(self) -> None:
        self._store.mark_synced()

    def _layer_hyper(self) -> Tuple[Optional[str], Optional[F.LayerHyper]]:
        """``(problem, hyper)``: the per-layer hyperparameter vectors, rebuilt only when a
        group's values changed, or the reason they are invalid (raised on every rank)."""
        key = tuple(tuple(float(g["lr"]) if k == "lr" and _is_number(g["lr"]) else g[k] for k in _HYPER_KEYS)
                    for g in self.param_groups)
        if key != self._hyper_key:
            try:
                for g in self.param_groups:
                    F.validate_hyperparameters(g)
            except ValueError as e:
                return f"{e} (param_groups changed after construction)", None
            old = self._hyper_key
            if old is not None and self._hyper is not None and all(
                    a[1:] == b[1:] for a, b in zip(old, key)):  # only the learning rates changed
                self._hyper = self._hyper.with_lr(self.param_groups, self._layer_group)
            else:
                self._hyper = F.LayerHyper.from_groups(self.param_groups, self._layer_group,
                                                       self.state_dtype, self.device)
            self._hyper_key = key
            self._digest_base = E.hyper_text(self.param_groups, _HYPER_KEYS)
            self._digest = None
        if self._digest is None:
            self._digest = E.settings_digest(f"{self._digest_base}\nsource={self._source}\n"
                                             f"adoptions={self._store.adoptions}")
        return None, self._hyper

    # ------------------------------------------------------------------ stepping
    @property
    def grad_norm(self) -> float:
        """Global L2 norm of the rank-averaged gradient at the last step (before clipping)."""
        if self._total_norm is not None:
            self._grad_norm, self._total_norm = float(self._total_norm), None
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
        """Steps skipped on every rank because a gradient held an inf or NaN (or overflowed)."""
        return self._skipped

    @property
    def grads_averaged(self) -> Optional[bool]:
        """Whether ``.grad`` arrives averaged by someone else (DDP); None until the first backward."""
        return {"unknown": None, "averaged": True, "own": False}[self._source]

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank (shards plus the O(L) vectors)."""
        tensors = [self._exp_avg, self._v, self._v_max, self._t]
        if self._lowp is not None:
            tensors.append(self._master)
        return sum(t.numel() * t.element_size() for t in tensors)

    def _on_grad(self, layer: int, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook: note the gradient; ZeRO-2 hands it to its buckets and frees it."""
        g = p.grad
        if getattr(p, _OWNER, lambda: None)() is not self or g is None:
            return  # a newer ShardedNovoGrad took over this parameter
        # When this backward ends (after DDP, if any, wrote its averaged gradients), the
        # tracker calls _after_backward: it looks at what happened to .grad and sends
        # every ZeRO-2 bucket still open.
        first = self._backward.arrived(layer)
        self._hooked[layer] = (id(g), g._version)
        self._backward_since_step = True
        bk = self._buckets
        if bk is None:
            return
        self._arrival[layer] = ARRIVED + self._arrivals
        self._arrivals += 1
        if self._source != "own" or not self._sync:
            return  # step() takes it from .grad
        if first:
            # Layers this backward will not reach here hold back no bucket. One holding
            # what earlier backwards (no_sync) left in .grad waits for the end of this
            # backward, which takes that .grad (a nested backward may still add to it).
            idle = [i for i in range(self.layout.num_layers) if not bk.arrived[i] and not bk.unreached[i]]
            for i in self._backward.unreached(self._params, idle):
                if self._params[i].grad is None:
                    bk.skip(i)
        if bk.arrived[layer] or bk.too_late(layer) or grad_problem(layer, p):
            return  # step() reports the problem on every rank
        bk.add(layer, g)
        p.grad = None
        del self._hooked[layer]

    def _after_backward(self) -> None:
        written = False
        for layer, (gid, version) in self._hooked.items():
            g = self._params[layer].grad
            if g is None or id(g) != gid or g._version != version:
                written = True  # someone reduced the gradients during backward: DDP
                break
        self._reduced_elsewhere = written
        self._sync_backwards += 1 if self._sync and not self._accumulating else 0
        if self._source == "unknown" and written:
            # Otherwise the source stays unknown until step(): a first backward inside
            # DDP's no_sync() writes nothing either.
            self._source = "averaged"
            self._digest = None
            if self.rank == 0:
                logger.info("ShardedNovoGrad: the model is wrapped in DDP, which averages the gradients: "
                            "the optimizer reduces none")
        if self._source == "own" and self._buckets is not None and self._sync:
            bk = self._buckets
            for i in range(self.layout.num_layers):
                if not bk.arrived[i] and not bk.unreached[i]:
                    # This layer's buckets waited for it until now; it sends the .grad of
                    # backwards inside no_sync() that this one did not reach, or zeros.
                    bk.waited[i] = True
                    self._take_leftover(i)
            # Like DDP: send every bucket still open (layers unused on this rank
            # contribute zeros), so that all of this step's bucket collectives are issued
            # inside backward on every rank and cannot pair up with a collective the
            # caller issues between backward and step().
            bk.send_all()
            if self._accumulating:
                bk.next_micro_batch()
        self._hooked = {layer: v for layer, v in self._hooked.items() if self._params[layer].grad is not None}

    def _take_leftover(self, layer: int) -> None:
        """ZeRO-2: hand ``layer``'s ``.grad``, left by an earlier backward, to the buckets
        (a bad gradient stays for step() to report)."""
        p, bk = self._params[layer], self._buckets
        if p.grad is None or bk.too_late(layer) or grad_problem(layer, p) is not None:
            return
        bk.add(layer, p.grad)
        p.grad = None
        self._hooked.pop(layer, None)

    @contextlib.contextmanager
    def accumulate(self):
        """Accumulate micro-batches into the gradient shard (ZeRO-2), as DeepSpeed's ZeRO-2 does.

        Wrap all micro-batches but the last, as with :meth:`no_sync`. Each backward inside
        reduces its buckets as usual and each owner adds the mean into its fp32 (state
        dtype) shard: gradient memory stays a few buckets plus the shard, and the sum is
        kept in the state dtype, at the cost of one gradient reduction per micro-batch.
        :meth:`no_sync` is the other trade: no traffic until the last backward, but the
        full ``.grad`` in the parameter dtype meanwhile. Elsewhere (ZeRO-1, a DDP model,
        the first step) gradients accumulate in ``.grad`` as with :meth:`no_sync`.
        """
        previous, self._accumulating = self._accumulating, True
        try:
            yield
        finally:
            self._accumulating = previous

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally: inside this context, backward leaves them in ``.grad``.

        Wrap all micro-batches but the last; the last backward (outside the context)
        reduces the accumulated sum, so k micro-batches equal one large batch. (A model
        wrapped in DDP accumulates with DDP's own ``no_sync()`` instead.)
        """
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients, including those ZeRO-2 already took from ``.grad`` during backward.

        After a backward without :meth:`step`, this is a collective (the gradients are
        dropped on every rank, or every rank raises when only some drop them): call it on
        all ranks at the same point, as a training loop does.
        """
        super().zero_grad(set_to_none)
        self._backward.reset()
        self._hooked = {}
        self._sync_backwards = 0
        dropping = self._backward_since_step
        self._backward_since_step = False
        if self._buckets is not None and (self._buckets.started() or (dropping and self._source == "unknown")):
            self._buckets.finish()  # in the first step, step() would send every bucket
            self._buckets.reset()
        if dropping:
            # A rank that drops a backward's gradients issues what a step() would, up to
            # its statistics collective, which tells the others: all dropping is fine,
            # some is an error on every rank (instead of mismatched collectives).
            if self._buckets is None and self._source != "averaged":
                self._zero1_reduce()
            L = self.layout.num_layers
            zeros = torch.zeros(L, dtype=torch.float64)
            self._engine.reduce(zeros, zeros, 0, maxabs=zeros if self.norm_type != 2 else None,
                                digest=self._digest or b"", discard=True, extra=self._arrival_vector())
            self._reset_arrivals()

    def _local_problems(self) -> Optional[str]:
        """Problems found before any collective: parameters that cannot be re-adopted,
        parameters unfrozen after construction. Re-adopts moved parameters."""
        for gi, j, p in self._frozen:
            if p.requires_grad or p.grad is not None:
                return (f"parameter {j} of param group {gi} (shape {tuple(p.shape)}) had requires_grad=False when "
                        "ShardedNovoGrad was built, so it is not part of its fixed layout, but now has "
                        f"{'a gradient' if p.grad is not None else 'requires_grad=True'}; build the optimizer "
                        "after choosing which parameters train")
        moved = self._store.check()
        if not moved:
            return None
        why = self._store.why_not_adoptable(moved)
        if why is not None:
            return why
        old = self.device
        self._store.adopt()
        if self.device != old:
            # The backend that serves the new device decides the collectives (gloo -> NCCL).
            self.method = C.pick_method(self._method_request, self.process_group, self.device)
            for name in ("_exp_avg", "_v", "_v_max", "_t"):
                setattr(self, name, getattr(self, name).to(self.device))
            self._device_parts()
            self._grad_flat = self._grad_shard = None
            self._hyper_key = None
        self._digest = None
        if self.rank == 0:
            logger.warning("ShardedNovoGrad: %d parameters were moved or replaced since the last step "
                           "(model.to(), p.data = ...); took their current values on %s as the truth",
                           len(moved), self.device)
        return None

    def _arrival_vector(self) -> Optional[List[float]]:
        """ZeRO-2's extra values in the step's collective: the arrivals, then 1 for each
        layer whose buckets waited for it until backward ended on this rank."""
        if self._buckets is None:
            return None
        return self._arrival + [1.0 if w else 0.0 for w in self._buckets.waited]

    def _reduce_gradients(self, problem: Optional[str]):
        """This rank's shard of the rank-averaged gradient, the local has-gradient flags
        per layer, and the first local problem found (or None). The mean's 1/N is applied
        as the shard leaves the reduction (not folded into the step's scale: the squares
        of an N-times larger sum would overflow N**2 times sooner)."""
        lay = self.layout
        if self._source == "unknown":
            self._source = "own"  # no DDP wrote the gradients of the backwards before this step
            self._digest = None
            if self._buckets is not None and self._sync_backwards > 1:
                problem = problem or ("two backwards ran before step() outside `with optimizer.no_sync():`; with "
                                      "zero_stage=2, accumulate micro-batches inside no_sync() for all but the "
                                      "last backward")
        elif self._source == "own" and self._reduced_elsewhere:
            problem = problem or (
                "the gradients were averaged during backward by someone else (the model was wrapped in "
                "DistributedDataParallel after the optimizer's first step?), and the optimizer would average them "
                "again: build the optimizer with grads_averaged=True, or wrap the model before the first backward")
        if self._source == "averaged":
            if self._grad_shard is None:
                self._grad_shard = torch.empty(lay.shard_size, dtype=self.state_dtype, device=self.device)
            shard, has, bad = take_averaged(self._params, lay, self.rank, self._grad_shard)
            if problem is None and bad is None and any(has) and not self._reduced_elsewhere:
                bad = ("the last backward's gradients were not averaged by DDP (backward inside DDP's no_sync(), "
                       "or the model is no longer wrapped in DDP): step() after a backward that DDP reduced")
            return shard, has, problem or bad
        if self._buckets is None:  # ZeRO-1: reduce everything, keep .grad
            shard, has, bad = self._zero1_reduce()
            return shard, has, problem or bad
        bk = self._buckets  # ZeRO-2: most gradients already left during backward
        for i, p in enumerate(self._params):
            if p.grad is None:
                continue
            if bk.unreached[i] and bk.too_late(i):
                problem = problem or (
                    f"layer {i} received a gradient in a backward that, when it started, was not going to reach "
                    "it (a backward nested in it, such as reentrant activation checkpointing, reached the layer "
                    "for the first time), after its bucket had been reduced. The next steps will wait for it; "
                    "checkpoint(..., use_reentrant=False) avoids nested backwards")
                continue
            if bk.arrived[i] or bk.too_late(i):
                problem = problem or (
                    f"layer {i} received a gradient after backward had already reduced it (or its bucket). "
                    "With zero_stage=2, accumulate micro-batches inside `with optimizer.no_sync():` for all but "
                    "the last backward. If the model was wrapped in DistributedDataParallel after the first "
                    "step, build the optimizer with grads_averaged=True (or wrap the model before the first "
                    "backward, where it is detected). A parameter used both inside and outside a reentrant "
                    "activation checkpoint gets two gradients in one backward: use checkpoint(..., "
                    "use_reentrant=False)")
                continue
            bad = grad_problem(i, p)
            problem = problem or bad
            if bad is None:
                bk.add(i, p.grad)
        has = bk.has_grad()
        return bk.finish(), has, problem

    def _zero1_reduce(self):
        lay = self.layout
        if self._grad_flat is None:
            self._grad_flat = torch.empty(lay.padded_total, dtype=self.reduce_dtype, device=self.device)
            self._grad_wire = torch.empty(lay.shard_size, dtype=self.reduce_dtype, device=self.device)
        if self._grad_shard is None:
            self._grad_shard = torch.empty(lay.shard_size, dtype=self.state_dtype, device=self.device)
        return all_reduce_gradients(self._params, lay, self.rank, self._grad_flat, self._grad_wire,
                                    self._grad_shard, self.method, self.process_group)

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None, grad_scaler=None):
        """Perform a single optimization step. This needs to be called on all ranks.

        Args:
            closure: a closure that re-evaluates the model and returns the loss (default: None)
            grad_scaler: set by ``torch.amp.GradScaler.step(optimizer)``: the gradients are
                unscaled inside the step, and the scaler's inf decision is the one all
                ranks take (default: None)
        """
        self.wait_params()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        inv_scale, scaler_state = self._scaler_inputs(grad_scaler)
        try:
            problem = self._local_problems()
            shard_grad, has, problem = self._reduce_gradients(problem)
            bad_hyper, hyper = self._layer_hyper()
            problem = problem or bad_hyper
            skipped = self._update(shard_grad, has, problem, hyper, inv_scale)
            if scaler_state is not None:
                found = torch.full((), 1.0 if skipped else 0.0, dtype=torch.float32, device=grad_scaler._scale.device)
                scaler_state["found_inf_per_device"] = {found.device: found}
        finally:
            self._backward.reset()
            self._hooked = {}
            self._sync_backwards = 0
            self._backward_since_step = False
            self._reset_arrivals()
            if self._buckets is not None:
                self._buckets.reset()
                for p in self._params:
                    p.grad = None
        return loss

    def _scaler_inputs(self, grad_scaler):
        """``(inv_scale, the scaler's per-optimizer state)`` for a GradScaler step."""
        scale = getattr(self, "grad_scale", None)
        if grad_scaler is None:
            # The attribute form (GradScaler without the keyword): it already decided
            # found_inf from .grad, which under ZeRO-2 is empty.
            if scale is not None and self._buckets is not None:
                raise RuntimeError("torch.amp.GradScaler must pass itself to ShardedNovoGrad.step (as it does for "
                                   "optimizers whose step() takes grad_scaler): call scaler.step(optimizer)")
            return (None if scale is None else 1.0 / scale.double()), None
        from torch.amp.grad_scaler import OptState
        state = grad_scaler._per_optimizer_states[id(self)]
        # After an explicit scaler.unscale_(opt), .grad holds unscaled gradients, but
        # those ZeRO-2 already sent during backward are still scaled.
        if state["stage"] is OptState.UNSCALED and self._buckets is None:
            return None, state
        if state["stage"] is OptState.UNSCALED and self._source != "own":
            return None, state
        return 1.0 / grad_scaler._scale.double(), state

    def _update(self, shard_grad, has, problem, hyper, inv_scale) -> bool:
        """The engine's decisions and the fused update; returns whether the step was skipped."""
        max_abs = self.norm_type != 2
        st = K.partial_stats(shard_grad, self._table, max_abs=max_abs, fused=self.fused)
        L = self.layout.num_layers
        # L2: the kernel counts non-finite elements and overflowed sums (both skip). L-inf
        # never squares: only non-finite elements skip, and they make the max-abs non-finite.
        nonfinite = (~torch.isfinite(st[L:2 * L])).sum() if max_abs else st[2 * L]
        red = self._engine.reduce(st[:L], has, nonfinite,
                                  maxabs=st[L:2 * L] if max_abs else None, problem=problem,
                                  digest=self._digest or b"", inv_scale=inv_scale, extra=self._arrival_vector())
        if red.extra is not None:
            self._buckets.set_order(red.extra)
        if red.skip:
            self._skipped += 1
            self._grad_norm, self._total_norm = float("nan"), None
            if self.rank == 0:
                logger.warning("%s: step skipped on every rank (%d so far)", red.reason, self._skipped)
            return True
        coeffs = E.plan_update(red, self._v, self._v_max, self._t, hyper, norm_type=self.norm_type,
                               max_grad_norm=self.max_grad_norm, inv_scale=inv_scale)
        self._store.resync_master()
        K.fused_update(shard_grad, self._exp_avg, self._master, self._lowp, self._table, coeffs,
                       scratch_grad=True, fused=self.fused)
        if self._attached:
            # In pieces the next forward can wait for one by one (on NCCL too).
            self._pending_gather = C.start_gather_shards(self._flat, self.layout.shard_size, self.method,
                                                         self.process_group, chunk=self._gather_chunk())
        else:
            C.gather_shards(self._flat, self.layout.shard_size, self.method, self.process_group)
            self._mark_params_synced()
        self._total_norm = red.total_norm
        return False

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

    def _gather_chunk(self) -> int:
        # About 8 pieces per owner, at least a ZeRO-2 bucket's worth (latency per call).
        floor = self.bucket_size or DEFAULT_BUCKET_SIZE.get(self.device.type, DEFAULT_BUCKET_SIZE["cuda"])
        return max(-(-self.layout.shard_size // 8), min(floor, self.layout.shard_size))

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
        pairs = [("exp_avg", self._exp_avg), ("exp_avg_sq", self._v), ("step", self._t),
                 ("max_exp_avg_sq", self._v_max)]
        if self._lowp is not None and "master_weight" in st:
            pairs.append(("master_weight", self._master))
        for name, dst in pairs:  # every check before any write
            t = st.get(name)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(dst.shape) or not t.dtype.is_floating_point:
                got = (f"shape {tuple(t.shape)}, dtype {t.dtype}" if isinstance(t, torch.Tensor)
                       else type(t).__name__)
                raise ValueError(f"state dict entry {name!r} has {got}; this optimizer expects shape "
                                 f"{tuple(dst.shape)} (floating point); nothing was loaded")
        for name, dst in pairs:
            dst.copy_(st[name])
        if self._lowp is not None and "master_weight" not in st:
            self._master.copy_(self._shard)
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

    def consolidated_state_dict(self, to_rank: Optional[int] = None) -> Optional[Dict]:
        """The whole optimizer state in :class:`NovoGrad`'s ``state_dict`` format.

        World-size free: :class:`NovoGrad` built on the same parameters loads it, and so
        does :meth:`load_consolidated_state_dict` at any world size. Master weights of
        bf16/fp16 models are not part of it (the model's parameters are). The layers'
        ``exp_avg`` are views of one buffer of the whole state (4 bytes per parameter for
        fp32 state), with no further copy. This needs to be called on all ranks.

        Args:
            to_rank: None gives the state dict on every rank; a group rank gives it on that
                rank only (one gather, the others return None and hold nothing extra)
                (default: None)
        """
        self.wait_params()
        lay, S = self.layout, self.layout.shard_size
        if to_rank is not None:
            if isinstance(to_rank, bool) or not isinstance(to_rank, int) or not 0 <= to_rank < self.world_size:
                raise ValueError(f"Invalid to_rank: {to_rank!r} (expected None or a group rank in "
                                 f"[0, {self.world_size}))")
            mine = to_rank == self.rank
            full = torch.empty(lay.padded_total if mine else 0, dtype=self.state_dtype, device=self.device)
            C.gather_shards_to(full, self._exp_avg, to_rank, self.process_group)
            if not mine:
                return None
        else:
            full = torch.zeros(lay.padded_total, dtype=self.state_dtype, device=self.device)
            full.narrow(0, self.rank * S, S).copy_(self._exp_avg)
            C.gather_shards(full, S, self.method, self.process_group)
        steps, vs, vmaxs = self._t.tolist(), self._v, self._v_max
        state = {}
        for i, (p, off, n) in enumerate(zip(self._params, lay.offsets, lay.numels)):
            if steps[i] == 0:
                continue
            st = {"step": torch.tensor(float(steps[i])),
                  "exp_avg": full.narrow(0, off, n).view(p.shape),
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


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) or (isinstance(x, torch.Tensor) and x.numel() == 1)
