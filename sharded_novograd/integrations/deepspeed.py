"""DeepSpeed integration: NovoGrad, exact under ZeRO stages 0, 1 and 2.

Under ZeRO-1/2, DeepSpeed swaps every param group of the client optimizer for ONE flat
fp32 partition per rank, cut at arbitrary element offsets, and calls ``step()`` once per
group with ``param_groups`` narrowed to that group (its ``BF16_Optimizer`` calls it once
with every group). A layer-wise optimizer stepped on that tensor would compute its norms
over the whole partition, which is silently wrong. Instead, the first time a
:class:`~sharded_novograd.NovoGrad` is stepped on such a partition, it binds itself to
the per-parameter fragment map DeepSpeed publishes (``param._hp_mapping``), found from
the DeepSpeed optimizer that is stepping it: plain ``deepspeed.initialize(optimizer=
NovoGrad(...))``, as accelerate and HF Trainer call it, is exact. Each step then computes
this rank's partial per-layer statistics of the partition's gradient and hands them to
the step engine (:mod:`sharded_novograd.engine`), which makes them global with one
collective of O(L) floats over the ZeRO data-parallel group and takes every decision
from it; the fused NovoGrad update is then applied to the partition. Stage 0 hands the
optimizer whole tensors, where the reference step is already exact.

:func:`initialize` wraps ``deepspeed.initialize`` as a convenience: it also honours
``"optimizer": {"type": "NovoGrad"}`` in the config, refuses settings that cannot be
exact before DeepSpeed builds anything, and binds at initialization.

See ``docs/deepspeed.md`` for usage, what is exact and why, and what is refused.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .. import collectives as C
from .. import engine as E
from .. import functional as F
from .. import kernels as K
from ..layout import Fragment, FragmentTable
from ..reference import NovoGrad

__all__ = ["initialize", "DeepSpeedNovoGrad"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "DS_BUILD_OPS=0 pip install 'sharded-novograd[deepspeed]'"

# Hyperparameters a config's "optimizer": {"type": "NovoGrad", "params": {...}} may set.
# (DeepSpeed clips with its own "gradient_clipping", so not NovoGrad's max_grad_norm.)
_CONFIG_PARAMS = tuple(n for n in inspect.signature(NovoGrad.__init__).parameters
                       if n not in ("self", "params", "max_grad_norm"))
# A param group's settings that must agree across ranks at every step (folded into the
# step's one collective).
HYPER_KEYS = ("lr", "betas", "eps", "weight_decay", "grad_averaging", "amsgrad", "reg_inside_moment",
              "bias_correction", "init_zero", "norm_type")
# How far up the call stack to look for the DeepSpeed optimizer stepping a NovoGrad.
_MAX_FRAMES = 32
# The attribute a bound NovoGrad keeps its binding under (read by NovoGrad.step).
BINDING_ATTR = "_deepspeed_binding"

_GENUINE_INITIALIZE = None  # deepspeed.initialize as DeepSpeed defined it

_ZERO3_WHY = ("ZeRO-3 steps the optimizer once per sub-group of flat partitions and publishes no fragment map, so "
              "the layer-wise norms cannot be made exact; to shard the weights too, use FSDP2 (torch.distributed."
              "fsdp.fully_shard) with sharded_novograd.NovoGrad(model.parameters()), exact with one all-reduce per "
              "step (docs/fsdp2.md), or ZeRO stage 0, 1 or 2")


def _is_genuine(fn) -> bool:
    return getattr(fn, "__module__", None) == "deepspeed" and getattr(fn, "__qualname__", None) == "initialize"


def _remember_genuine(deepspeed) -> None:
    global _GENUINE_INITIALIZE
    if _GENUINE_INITIALIZE is None and _is_genuine(getattr(deepspeed, "initialize", None)):
        _GENUINE_INITIALIZE = deepspeed.initialize


if "deepspeed" in sys.modules:  # remember it before anyone can replace it with initialize()
    _remember_genuine(sys.modules["deepspeed"])


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError(f"sharded_novograd.integrations.deepspeed needs DeepSpeed; install it with "
                          f"{INSTALL_HINT}") from e
    _remember_genuine(deepspeed)
    return deepspeed


def _deepspeed_initialize(deepspeed):
    """DeepSpeed's own ``initialize``, even where ``deepspeed.initialize`` was replaced by this module's."""
    _remember_genuine(deepspeed)
    fn = deepspeed.initialize
    seen = 0
    while fn is not None and not _is_genuine(fn) and seen < 16:  # a wrapper made with functools.wraps
        fn, seen = getattr(fn, "__wrapped__", None), seen + 1
    if fn is not None and _is_genuine(fn):
        return fn
    if _GENUINE_INITIALIZE is not None:
        return _GENUINE_INITIALIZE
    raise RuntimeError("deepspeed.initialize was replaced before sharded_novograd.integrations.deepspeed saw "
                       "DeepSpeed's own function, so initialize() cannot call it. Plain deepspeed.initialize is "
                       "exact with NovoGrad: remove the replacement (or import sharded_novograd.integrations."
                       "deepspeed after deepspeed and before replacing it)")


@dataclass
class _Partition:
    """One param group's flat fp32 partition on this rank, as DeepSpeed laid it out."""

    index: int
    flat: torch.Tensor
    table: FragmentTable
    digest: int  # this rank's fragments, stored as state["layout"]
    hyper_key: Optional[Tuple] = field(default=None, repr=False)
    hyper: Optional[F.LayerHyper] = field(default=None, repr=False)

    @property
    def num_layers(self) -> int:
        return self.table.num_layers

    def layer_hyper(self, group: Dict) -> Tuple[Optional[F.LayerHyper], Optional[str]]:
        """The group's per-layer hyperparameters, or the reason they are invalid."""
        try:
            key = tuple(float(group[k]) if k == "lr" else group[k] for k in HYPER_KEYS)
            if key != self.hyper_key:
                F.validate_hyperparameters(group)
                self.hyper = F.LayerHyper.from_groups([group], [0] * self.num_layers, torch.float32,
                                                      self.flat.device)
                self.hyper_key = key
        except (KeyError, TypeError, ValueError) as e:
            return None, f"param group {self.index}: {e}"
        return self.hyper, None


class _Binding:
    """A NovoGrad bound to DeepSpeed's ZeRO-1/2 partitions: their fragment tables and the
    step engine that reduces their statistics over the data-parallel group."""

    def __init__(self, partitions: Dict[int, _Partition], process_group, comm_device: torch.device, setting: str):
        self.partitions = partitions
        self.process_group = process_group
        self.comm_device = comm_device
        self.setting = setting
        self.rank = C.group_rank(process_group)
        self._engines: Dict[Tuple, E.StepEngine] = {}

    def step(self, opt: NovoGrad, closure=None):
        """One step of the param groups ``opt`` holds now (DeepSpeed narrows them to the
        groups it steps). This needs to be called on all ranks of the data-parallel group."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for group in opt.param_groups:
            params = group["params"]
            part = self.partitions.get(id(params[0])) if len(params) == 1 else None
            if part is None or part.flat is not params[0]:
                raise RuntimeError("a param group does not hold the DeepSpeed partition this NovoGrad was bound "
                                   "to; do not edit param_groups['params'] of a NovoGrad inside a DeepSpeed engine")
            work.append((group, part))
        if work:
            self._step_partitions(opt, work)
        return loss

    def _engine(self, work, inf: bool) -> E.StepEngine:
        key = (tuple(part.index for _, part in work), inf)
        if key not in self._engines:
            self._engines[key] = E.StepEngine(sum(part.num_layers for _, part in work), self.process_group,
                                              self.comm_device, norm_type=math.inf if inf else 2)
        return self._engines[key]

    def _step_partitions(self, opt: NovoGrad, work: List[Tuple[Dict, _Partition]]) -> None:
        # L-inf groups need the per-layer max-abs; a call mixing them with L2 groups
        # (BF16_Optimizer steps every group at once) reduces both in one all-gather.
        inf = any(group["norm_type"] != 2 for group, _ in work)
        dev = self.comm_device
        problems, grads, hypers, sumsq, maxabs = [], [], [], [], []
        nonfinite = torch.zeros((), dtype=torch.float64, device=dev)
        for group, part in work:
            L, flat = part.num_layers, part.flat
            grad, problem = flat.grad, None
            hyper, bad_hyper = part.layer_hyper(group)
            state = opt.state.get(flat)
            if grad is None:
                problem = f"DeepSpeed stepped param group {part.index} without a gradient partition"
            elif grad.numel() != flat.numel():
                problem = (f"the gradient of param group {part.index} has {grad.numel()} elements, its partition "
                           f"{flat.numel()}")
            elif bad_hyper is not None:
                problem = bad_hyper
            elif state and state.get("layout") != part.digest:
                problem = (f"the optimizer state of param group {part.index} was saved with another ZeRO "
                           "partitioning (data-parallel world size, rank or parameters differ); DeepSpeed "
                           "checkpoints of NovoGrad resume only at the same world size with the same model")
            if problem is not None:
                problems.append(problem)
                grads.append(None)
                hypers.append(None)
                sumsq.append(torch.zeros(L, dtype=torch.float32, device=dev))
                maxabs.append(torch.zeros(L, dtype=torch.float32, device=dev))
                continue
            if grad.dtype != flat.dtype or grad.shape != flat.shape or not grad.is_contiguous():
                grad = grad.to(flat.dtype).reshape(flat.shape).contiguous()
            st = K.partial_stats(grad, part.table, max_abs=inf)
            grads.append(grad)
            hypers.append(hyper)
            # On the backend's device: no host sync before the collective.
            sumsq.append(st[:L].to(dev))
            maxabs.append(st[L:2 * L].to(dev))
            nonfinite = nonfinite + st[2 * L].to(dev, torch.float64)
        eng = self._engine(work, inf)
        digest = E.settings_digest(E.hyper_text([group for group, _ in work], HYPER_KEYS, self.setting))
        # The step's one collective. DeepSpeed gives every layer a gradient (zeros where
        # autograd left none), and each element lies on exactly one rank.
        red = eng.reduce(torch.cat(sumsq), torch.ones(eng.num_layers, device=dev), nonfinite,
                         maxabs=torch.cat(maxabs) if inf else None,
                         problem="; ".join(problems) or None, digest=digest)
        if red.skip:
            if self.rank == 0:
                logger.warning("NovoGrad step skipped on every rank: %s", red.reason)
            return
        offset = 0
        for (group, part), grad, hyper in zip(work, grads, hypers):
            L, flat = part.num_layers, part.flat
            rows = slice(offset, offset + L)
            offset += L
            layer_inf = group["norm_type"] != 2
            mine = E.Reduced(sumsq=red.sumsq[rows], stat=(red.stat if layer_inf else red.sumsq)[rows],
                             has_grad=red.has_grad[rows], skip=False, reason="", total_norm=red.total_norm)
            state = opt.state[flat]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(flat)
                state["exp_avg_sq"] = torch.zeros(L, dtype=torch.float32, device=flat.device)
                state["step"] = torch.zeros(L, dtype=torch.float32, device=flat.device)
                state["layout"] = part.digest
            if group["amsgrad"] and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = state["exp_avg_sq"].clone()
            coeffs = E.plan_update(mine, state["exp_avg_sq"], state.get("max_exp_avg_sq", state["exp_avg_sq"]),
                                   state["step"], hyper, norm_type=math.inf if layer_inf else 2)
            # exp_avg and the partition are updated in place: DeepSpeed holds views of both.
            K.fused_update(grad, state["exp_avg"], flat, None, part.table, coeffs)

    def check_state_dict(self, opt: NovoGrad, state_dict: Dict) -> None:
        """Raise ValueError if ``state_dict`` was saved under another partitioning."""
        saved = state_dict.get("param_groups", [])
        for gi, (sg, group) in enumerate(zip(saved, opt.param_groups)):
            part = self.partitions.get(id(group["params"][0]))
            st = state_dict.get("state", {}).get(sg["params"][0]) if len(sg["params"]) == 1 else None
            if part is None or not st:
                continue
            if st.get("layout") != part.digest or tuple(st["exp_avg"].shape) != tuple(part.flat.shape):
                raise ValueError(
                    f"optimizer state of param group {gi} was saved with another ZeRO partitioning (data-"
                    "parallel world size, rank or parameters differ); DeepSpeed's ZeRO-1/2 checkpoints of "
                    "NovoGrad resume only at the same world size with the same model")


class _ConstructionStep:
    """What a DeepSpeed wrapper's construction-time step does to NovoGrad: nothing.

    DeepSpeed's stage-0 fp16/bf16 wrappers (``initialize_optimizer_states``) call
    ``step()`` once with all-zero gradients to allocate state. The reference never saw
    that step: it must not start the moments (v = 0, step = 1) nor apply weight decay.
    """

    @staticmethod
    def step(opt, closure=None):
        return None


def _bind(opt: NovoGrad, groups: Sequence[Tuple[Sequence[torch.Tensor], torch.Tensor, Any, torch.Tensor]],
          setting: str) -> _Binding:
    """Bind ``opt`` to ``(trainable params, flat fp32 partition, data-parallel group, flat
    low-precision buffer)`` per param group. This needs to be called on all ranks of the
    data-parallel group."""
    process_groups = {id(pg) for _, _, pg, _ in groups}
    if len(process_groups) != 1:
        _refuse("param groups partitioned over different data-parallel groups (mixture of experts)",
                "NovoGrad's step reduces over one group")
    pg = groups[0][2]
    comm_device = _accelerator_device()
    rank, world = C.group_rank(pg), C.group_size(pg)
    problems, plan, partitions = [], [], {}
    for gi, (layers, flat, _, lp_flat) in enumerate(groups):
        if flat.dtype != torch.float32:
            _refuse(f"{setting} with {flat.dtype} master weights", "exact NovoGrad needs fp32 master weights: "
                    "unset bf16_master_weights_and_gradients / fp16_master_weights_and_gradients")
        frags = []
        for li, p in enumerate(layers):
            plan.append(f"group {gi}: layer {li} shape={tuple(p.shape)}")
            if getattr(p, "_dp_group", pg) is not pg:
                problems.append(f"layer {li} of group {gi} belongs to another data-parallel group")
            m = getattr(p, "_hp_mapping", None)  # None: no element of this layer on this rank
            if m is None:
                continue
            hp, lp = m.hp_fragment_address, m.lp_fragment_address
            if hp.numel != lp.numel or lp.start + lp.numel > p.numel() or hp.start + hp.numel > flat.numel():
                problems.append(f"inconsistent DeepSpeed fragment map for layer {li} of group {gi}: hp {hp}, "
                                f"lp {lp}, layer numel {p.numel()}, partition {flat.numel()}")
                continue
            # Where the layer really lies in DeepSpeed's flat buffer must be where the map
            # says: a permuted flat order (round_robin_gradients) would break this.
            if lp_flat is not None:
                same = p.untyped_storage().data_ptr() == lp_flat.untyped_storage().data_ptr()
                where = p.storage_offset() - lp_flat.storage_offset() + lp.start
                if not same or where != rank * flat.numel() + hp.start:
                    problems.append(f"DeepSpeed's fragment map puts layer {li} of group {gi} at partition offset "
                                    f"{hp.start}, but the layer lies elsewhere in the flat buffer (is the flat "
                                    "order permuted, as round_robin_gradients does?)")
                    continue
            frags.append(Fragment(li, lp.start, hp.start, hp.numel))
        frags.sort(key=lambda f: f.offset_in_shard)
        for a, b in zip(frags, frags[1:]):
            if a.offset_in_shard + a.numel > b.offset_in_shard:
                problems.append(f"DeepSpeed fragments of layers {a.layer} and {b.layer} of group {gi} overlap in "
                                "the partition")
        table = FragmentTable.from_fragments(frags, flat.numel(), len(layers))
        mine = [f"world_size={world}", f"rank={rank}", f"partition={flat.numel()}", f"layers={len(layers)}"]
        mine += [f"{f.layer}:{f.offset_in_layer}:{f.offset_in_shard}:{f.numel}" for f in frags]
        # An int: torch's Optimizer.load_state_dict turns a str into the text of a generator.
        digest = int.from_bytes(hashlib.sha256("\n".join(mine).encode()).digest()[:8], "big") >> 1
        partitions[id(flat)] = _Partition(gi, flat, table, digest)
    # A rank that failed a check must still meet the others, so that all raise together.
    mine = None if not problems else problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
    bad = C.agree(mine, pg, comm_device)
    if bad:
        raise RuntimeError(f"NovoGrad cannot bind to {setting}'s partitions: "
                           + "; ".join(f"rank {r}: {msg}" for r, msg in bad))
    # Ranks that disagree on the layers would exchange vectors of different lengths.
    C.check_same_plan(plan, hashlib.sha256("\n".join(plan).encode()).digest(), pg, comm_device)
    binding = _Binding(partitions, pg, comm_device, setting)
    setattr(opt, BINDING_ATTR, binding)
    if rank == 0:
        logger.info("NovoGrad bound to %s partitions of %d param groups", setting, len(groups))
    return binding


def _bind_wrapper(wrapper, opt: NovoGrad) -> _Binding:
    """Bind ``opt`` to the DeepSpeed optimizer ``wrapper`` that wraps it. This needs to be
    called on all ranks; settings that cannot be exact raise ValueError on every rank."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if getattr(wrapper, "optimizer", None) is not opt:
        raise RuntimeError(f"DeepSpeed's {type(wrapper).__name__} does not wrap this NovoGrad")
    if getattr(opt, "max_grad_norm", None) is not None:
        _refuse("NovoGrad(max_grad_norm=...) inside a DeepSpeed engine", 'DeepSpeed clips the averaged gradient '
                'itself: set "gradient_clipping" in the config (0.0 turns clipping off)')
    if getattr(wrapper, "has_moe_layers", False):
        _refuse("mixture-of-experts layers", "expert groups are partitioned over other process groups")
    if isinstance(wrapper, DeepSpeedZeroOptimizer):
        stage = 2 if wrapper.partition_gradients else 1
        _refuse_zero_flags(wrapper.round_robin_gradients, wrapper.elastic_checkpoint)
        if getattr(wrapper, "zenflow", False):
            _refuse("ZenFlow", "it steps parts of the partition at different times")
        if getattr(wrapper, "torch_autocast_gradscaler", None) is not None:
            _refuse('"torch_autocast" with float16', "DeepSpeed then steps through a torch GradScaler whose inf "
                    "check is taken on each rank's partition alone, so ranks can skip different steps; use "
                    '"fp16": {"enabled": true} or bf16')
        groups = list(zip(wrapper.bit16_groups, wrapper.single_partition_of_fp32_groups,
                          wrapper.real_dp_process_group, wrapper.bit16_groups_flat))
        return _bind(opt, groups, f"ZeRO stage {stage}")
    if isinstance(wrapper, BF16_Optimizer):
        groups = list(zip(wrapper.bf16_groups, wrapper.fp32_groups_flat_partition, wrapper.real_dp_process_group,
                          wrapper.bf16_groups_flat))
        return _bind(opt, groups, "BF16_Optimizer")
    _refuse(f"DeepSpeed's {type(wrapper).__name__}", "NovoGrad binds to ZeRO stage 0, the ZeRO-1/2 optimizer "
            "and BF16_Optimizer only")


def _stepping_wrapper(opt: NovoGrad):
    """The DeepSpeed optimizer whose method is calling ``opt.step()``, and that method's name.

    DeepSpeed hands its wrapper the client optimizer (``wrapper.optimizer``) and steps it
    from the wrapper's own methods, so the wrapper is on the call stack.
    """
    frame = inspect.currentframe()
    try:
        for _ in range(_MAX_FRAMES):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                break
            owner = frame.f_locals.get("self")
            if owner is None or owner is opt:
                continue
            try:
                wrapped = owner.__dict__.get("optimizer") if hasattr(owner, "__dict__") else None
            except Exception:  # noqa: BLE001 - an unrelated object on the stack
                wrapped = None
            if wrapped is opt and type(owner).__module__.startswith("deepspeed."):
                return owner, frame.f_code.co_name
        return None, None
    finally:
        del frame


def bind_on_step(opt: NovoGrad, flattened: bool):
    """What steps ``opt`` when DeepSpeed steps it (called by :meth:`NovoGrad.step`): a binding
    to DeepSpeed's partitions, a no-op for a construction-time step, or None for the
    reference step. This needs to be called on all ranks.

    Args:
        opt: the NovoGrad being stepped.
        flattened: whether its param groups hold DeepSpeed's flat partitions instead of
            the parameters it was built with.
    """
    wrapper, method = _stepping_wrapper(opt)
    given = getattr(opt, "_layers_given", ())
    if any(hasattr(p, "ds_id") for p in given):
        _refuse('"zero_optimization": {"stage": 3}', _ZERO3_WHY)
    if wrapper is not None and method == "initialize_optimizer_states":
        return _ConstructionStep
    if not flattened:
        return None
    if wrapper is None:
        raise RuntimeError("NovoGrad is being stepped on DeepSpeed's flattened ZeRO partition, where its per-layer "
                           "norms would span several layers or part of one, and no DeepSpeed optimizer it can bind "
                           "to (ZeRO stage 1/2 or BF16_Optimizer) is stepping it; build the engine with "
                           "deepspeed.initialize(model=..., optimizer=NovoGrad(...), config=...) and step it with "
                           "engine.step()")
    return _bind_wrapper(wrapper, opt)


class DeepSpeedNovoGrad(NovoGrad):
    r"""The :class:`~sharded_novograd.NovoGrad` that :func:`initialize` hands to DeepSpeed.

    Arguments and math are :class:`~sharded_novograd.NovoGrad`'s, and so is the binding:
    a plain NovoGrad binds itself to DeepSpeed's partitions at its first step; this
    subclass is bound by :func:`initialize` (so that unexact settings fail there) and
    ignores steps taken while DeepSpeed is being built. Once bound to ZeRO-1/2
    partitions, each param group holds one flat fp32 partition and its state is, under
    ``optimizer.state[partition]``:

    - ``exp_avg``: the first moment, partition-shaped, so DeepSpeed's fragment tools
      (``deepspeed.utils.safe_get_full_optimizer_state(param, "exp_avg")``) see it;
    - ``exp_avg_sq``, ``step`` (and ``max_exp_avg_sq`` with amsgrad): one entry per layer
      of the group, in DeepSpeed's order of the group's trainable parameters, identical
      on every rank;
    - ``layout``: a fingerprint of this rank's fragments, checked when a checkpoint is
      loaded so that a different partitioning fails loudly.

    Each :meth:`step` call runs ONE collective of O(L) floats over the data-parallel group
    for the groups it is handed (DeepSpeed's ZeRO-1/2 optimizer calls it once per param
    group per iteration; ``BF16_Optimizer`` once per iteration).
    """

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)
        # True while deepspeed.initialize runs: DeepSpeed's stage-0 bf16/fp16 wrapper calls
        # step() once with all-zero gradients, which must not start NovoGrad's moments.
        self._paused = False

    @classmethod
    def _adopt(cls, optimizer: NovoGrad) -> "DeepSpeedNovoGrad":
        """A DeepSpeedNovoGrad sharing ``optimizer``'s param group dicts (so schedulers still steer them)."""
        if optimizer.state:
            raise ValueError("the NovoGrad passed to initialize() has already taken steps; pass a fresh one "
                             "(load earlier state with engine.load_checkpoint after initialize)")
        return cls(optimizer.param_groups, **optimizer.defaults)

    @property
    def is_bound(self) -> bool:
        """Whether the optimizer steps DeepSpeed's ZeRO-1/2 partitions through their fragment map."""
        return self.__dict__.get(BINDING_ATTR) is not None

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step.

        Once bound, this needs to be called on all ranks of the data-parallel group
        (DeepSpeed does so).

        Args:
            closure: a closure that re-evaluates the model and returns the loss (default: None)
        """
        if self._paused:
            return None
        binding = self.__dict__.get(BINDING_ATTR)
        if binding is not None:
            return binding.step(self, closure)
        return _novograd_step(self, closure)

    def load_state_dict(self, state_dict: Dict) -> None:
        """Load a :meth:`state_dict`; once bound, only one saved with the same partitioning."""
        binding = self.__dict__.get(BINDING_ATTR)
        if binding is not None:
            binding.check_state_dict(self, state_dict)
        super().load_state_dict(state_dict)


def _novograd_step(opt: NovoGrad, closure):
    # torch wraps each optimizer class's step() to run step hooks; DeepSpeedNovoGrad.step
    # already ran them, so take NovoGrad's step from under that wrapper.
    step = inspect.unwrap(NovoGrad.step, stop=lambda f: not getattr(f, "hooked", False))
    return step(opt, closure)


# ---------------------------------------------------------------------- initialize
def initialize(*args, **kwargs):
    """``deepspeed.initialize`` with NovoGrad made exact under ZeRO stages 0, 1 and 2.

    Takes the same arguments and returns the same ``(engine, optimizer, dataloader,
    lr_scheduler)``. The NovoGrad comes from one of:

    - ``"optimizer": {"type": "NovoGrad", "params": {...}}`` in the config (a dict or a
      JSON path; the type is compared case-insensitively; ``params`` takes
      :class:`~sharded_novograd.NovoGrad`'s keyword arguments, ``"norm_type": "inf"`` for
      L-inf). The section is removed before the config reaches DeepSpeed, which cannot
      build it;
    - ``optimizer=`` a :class:`~sharded_novograd.NovoGrad` (adopted: its param group dicts
      are shared, its state must be empty) or a callable returning one.

    With a NovoGrad, ``"zero_allow_untested_optimizer": true`` is set unless the config
    sets it. Any other optimizer is passed to ``deepspeed.initialize`` untouched.

    Raises ValueError, before DeepSpeed builds anything, for settings the binding cannot
    make exact: ZeRO stage 3, ``round_robin_gradients: true``, ``elastic_checkpoint:
    true``. This needs to be called on all ranks.
    """
    deepspeed = _import_deepspeed()
    ds_initialize = _deepspeed_initialize(deepspeed)  # never this function, even where it replaced DeepSpeed's
    bound = inspect.signature(ds_initialize).bind(*args, **kwargs)
    a = bound.arguments
    config, from_args = _take_config(a, deepspeed)
    client = a.get("optimizer")
    section = config.get("optimizer") if isinstance(config, dict) else None
    if isinstance(section, dict) and str(section.get("type", "")).lower() == "novograd":
        if client is not None:
            raise ValueError("the DeepSpeed config names optimizer type NovoGrad and optimizer= was also passed; "
                             "give one of them")
        hyper = _config_params(section.get("params") or {})
        client = _NovoGradFactory(hyper)
        config = {k: v for k, v in config.items() if k != "optimizer"}
    elif not (isinstance(client, NovoGrad) or callable(client) and not isinstance(client, torch.optim.Optimizer)):
        _refuse_sharded(client)
        return ds_initialize(**a)  # another optimizer, or DeepSpeed's own: nothing to bind

    built: List[DeepSpeedNovoGrad] = []
    if config is not None:
        _refuse_config(config)
        config.setdefault("zero_allow_untested_optimizer", True)
    a["optimizer"] = _prepare(client, built) if isinstance(client, NovoGrad) else _Adopting(client, built)
    _give_config(a, config, from_args)
    result = ds_initialize(**a)
    engine = result[0]
    if len(built) != 1 or engine.basic_optimizer is not built[0]:
        raise RuntimeError("DeepSpeed did not use the NovoGrad it was given")
    _bind_engine(engine, built[0])
    built[0]._paused = False
    return result


class _NovoGradFactory:
    """The callable DeepSpeed calls with its model parameters, for a config-defined NovoGrad."""

    def __init__(self, hyper: Dict):
        self.hyper = hyper

    def __call__(self, params):
        return DeepSpeedNovoGrad(params, **self.hyper)


class _Adopting:
    """Wraps an optimizer callable: DeepSpeed calls it, the NovoGrad it returns is adopted."""

    def __init__(self, fn, built: List[DeepSpeedNovoGrad]):
        self.fn, self.built = fn, built

    def __call__(self, params):
        opt = self.fn(params)
        if not isinstance(opt, NovoGrad):
            raise TypeError(f"the optimizer callable returned {type(opt).__name__}, not a NovoGrad; use "
                            "deepspeed.initialize for other optimizers")
        return _prepare(opt, self.built)


def _prepare(opt: NovoGrad, built: List[DeepSpeedNovoGrad]) -> DeepSpeedNovoGrad:
    if not isinstance(opt, DeepSpeedNovoGrad):
        if type(opt) is not NovoGrad:
            raise TypeError(f"{type(opt).__name__} subclasses NovoGrad; initialize() can only bind NovoGrad "
                            "itself or DeepSpeedNovoGrad")
        opt = DeepSpeedNovoGrad._adopt(opt)
    if opt.is_bound:
        raise ValueError("this DeepSpeedNovoGrad is already bound to another DeepSpeed engine")
    opt._paused = True
    built.append(opt)
    return opt


def _refuse_sharded(opt) -> None:
    from ..sharded import ShardedNovoGrad
    if isinstance(opt, ShardedNovoGrad):
        raise TypeError("ShardedNovoGrad partitions the model itself and cannot run inside a DeepSpeed engine; "
                        "pass NovoGrad (or the config's optimizer section) and let DeepSpeed's ZeRO shard it")


def _take_config(a: Dict, deepspeed) -> Tuple[Optional[Dict], bool]:
    """The config as a dict copy (None if absent), and whether it came from ``args.deepspeed_config``."""
    raw = a.get("config") if a.get("config") is not None else a.get("config_params")
    from_args = False
    args = a.get("args")
    if raw is None and args is not None:
        raw = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
        from_args = raw is not None
    if raw is None:
        return None, False
    if isinstance(raw, dict):
        return copy.deepcopy(raw), from_args
    loader = getattr(deepspeed, "load_ds_config", None)
    if loader is not None:
        return loader(raw), from_args
    if isinstance(raw, (str, os.PathLike)):
        with open(raw, encoding="utf-8") as f:
            return json.load(f), from_args
    raise ValueError(f"Invalid DeepSpeed config: {raw!r} (expected a dict or a path to a JSON file)")


def _give_config(a: Dict, config: Optional[Dict], from_args: bool) -> None:
    if config is None:
        return  # DeepSpeed explains what is missing
    a["config"] = config
    a.pop("config_params", None)
    if from_args:
        args = copy.copy(a["args"])
        for name in ("deepspeed_config", "deepscale_config"):
            if hasattr(args, name):
                setattr(args, name, None)
        a["args"] = args


def _config_params(params: Dict) -> Dict:
    if not isinstance(params, dict):
        raise ValueError(f"Invalid NovoGrad params in the DeepSpeed config: {params!r} (expected an object)")
    out = {}
    for k, v in params.items():
        if k not in _CONFIG_PARAMS:
            raise ValueError(f"Invalid NovoGrad parameter {k!r} in the DeepSpeed config (expected one of "
                             f"{', '.join(_CONFIG_PARAMS)})")
        if k == "norm_type" and isinstance(v, str) and v.lower() in ("inf", "infinity"):
            v = math.inf
        if k == "betas" and isinstance(v, list):
            v = tuple(v)
        out[k] = v
    return out


def _refuse(setting: str, why: str):
    raise ValueError(f"sharded_novograd.integrations.deepspeed refuses {setting}: {why}")


def _refuse_config(config: Dict) -> None:
    zero = config.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        return
    if int(zero.get("stage", 0) or 0) >= 3:
        _refuse('"zero_optimization": {"stage": 3}', _ZERO3_WHY)
    _refuse_zero_flags(bool(zero.get("round_robin_gradients", False)), bool(zero.get("elastic_checkpoint", False)))


def _refuse_zero_flags(round_robin: bool, elastic: bool) -> None:
    if round_robin:
        _refuse('"round_robin_gradients": true', "it permutes the flat order of the parameters, and the fragment "
                "map DeepSpeed publishes (param._hp_mapping) does not follow that order; set it to false")
    if elastic:
        _refuse('"elastic_checkpoint": true', "elastic ZeRO checkpoints drop the per-layer second moments; set "
                "it to false (checkpoints then resume at the same data-parallel world size)")


def _accelerator_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator
    return torch.device(get_accelerator().current_device_name())


def _bind_engine(engine, opt: DeepSpeedNovoGrad) -> None:
    """Bind ``opt`` to what ``engine`` built around it. This needs to be called on all ranks."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    stage = engine.zero_optimization_stage()
    wrapper = engine.optimizer
    if stage >= 3:
        _refuse('"zero_optimization": {"stage": 3}', _ZERO3_WHY)
    if wrapper is opt or (isinstance(wrapper, FP16_UnfusedOptimizer) and wrapper.optimizer is opt):
        return  # stage 0: whole tensors, the reference step is exact
    _bind_wrapper(wrapper, opt)
