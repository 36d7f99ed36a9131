"""DeepSpeed integration: NovoGrad, exact under ZeRO stages 0, 1 and 2.

Under ZeRO-1/2, DeepSpeed swaps every param group of the client optimizer for ONE flat
fp32 partition per rank, cut at arbitrary element offsets, and calls ``step()`` once per
group with ``param_groups`` narrowed to that group (its ``BF16_Optimizer`` calls it once
with every group). A layer-wise optimizer stepped on that tensor computes its norms over
the whole partition, which is silently wrong. :func:`initialize` wraps
``deepspeed.initialize`` and binds the optimizer to the per-parameter fragment map
DeepSpeed publishes (``param._hp_mapping``): each step it computes this rank's partial
per-layer statistics of the partition's gradient, makes them global with one collective
of O(L) floats over the ZeRO data-parallel group, and applies the fused NovoGrad update
to the partition. Stage 0 hands the optimizer whole tensors, where the reference
:class:`~sharded_novograd.NovoGrad` step is already exact.

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
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .. import collectives as C
from .. import functional as F
from .. import kernels as K
from ..layout import Fragment, FragmentTable
from ..reference import NovoGrad

__all__ = ["initialize", "DeepSpeedNovoGrad"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "DS_BUILD_OPS=0 pip install 'sharded-novograd[deepspeed]'"

# Hyperparameters a config's "optimizer": {"type": "NovoGrad", "params": {...}} may set.
_CONFIG_PARAMS = tuple(n for n in inspect.signature(NovoGrad.__init__).parameters if n not in ("self", "params"))


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError(f"sharded_novograd.integrations.deepspeed needs DeepSpeed; install it with "
                          f"{INSTALL_HINT}") from e
    return deepspeed


@dataclass
class _Partition:
    """One param group's flat fp32 partition on this rank, as DeepSpeed laid it out."""

    flat: torch.Tensor
    table: FragmentTable
    process_group: Any
    comm_device: torch.device
    digest: str
    hyper_key: Optional[Tuple] = field(default=None, repr=False)
    hyper: Optional[F.LayerHyper] = field(default=None, repr=False)

    @property
    def num_layers(self) -> int:
        return self.table.num_layers

    def layer_hyper(self, group: Dict) -> F.LayerHyper:
        keys = ("lr", "betas", "eps", "weight_decay", "grad_averaging", "amsgrad", "reg_inside_moment",
                "bias_correction", "init_zero", "norm_type")
        key = tuple(float(group[k]) if k == "lr" else group[k] for k in keys)
        if key != self.hyper_key:
            F.validate_hyperparameters(group)
            self.hyper = F.LayerHyper.from_groups([group], [0] * self.num_layers, torch.float32, self.flat.device)
            self.hyper_key = key
        return self.hyper


class DeepSpeedNovoGrad(NovoGrad):
    r"""The :class:`~sharded_novograd.NovoGrad` that :func:`initialize` hands to DeepSpeed.

    Arguments and math are :class:`~sharded_novograd.NovoGrad`'s. Until it is bound (ZeRO
    stage 0, or used outside :func:`initialize`) it steps exactly like NovoGrad. Once
    :func:`initialize` has bound it to DeepSpeed's ZeRO-1/2 partitions, each param group
    holds one flat fp32 partition and its state is, under ``optimizer.state[partition]``:

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
        self._partitions: Dict[int, _Partition] = {}
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
        return bool(self._partitions)

    # ------------------------------------------------------------------ binding
    def _bind(self, groups: Sequence[Tuple[Sequence[torch.Tensor], torch.Tensor, Any]], setting: str) -> None:
        """Bind to ``(trainable params, flat fp32 partition, data-parallel group)`` per param group.

        This needs to be called on all ranks of the data-parallel group.
        """
        if len(groups) != len(self.param_groups):
            raise RuntimeError(f"{setting} has {len(groups)} param groups but the optimizer has "
                               f"{len(self.param_groups)}")
        process_groups = {id(pg) for _, _, pg in groups}
        if len(process_groups) != 1:
            raise ValueError("param groups are partitioned over different data-parallel groups (mixture of "
                             "experts); sharded_novograd.integrations.deepspeed does not support that")
        comm_device = _accelerator_device()
        plan = []
        partitions = {}
        for gi, ((layers, flat, pg), group) in enumerate(zip(groups, self.param_groups)):
            if len(group["params"]) != 1 or group["params"][0] is not flat:
                raise RuntimeError(f"param group {gi} does not hold {setting}'s flat partition")
            if flat.dtype != torch.float32:
                raise ValueError(f"{setting} keeps master weights in {flat.dtype}; exact NovoGrad needs fp32 "
                                 "master weights: unset bf16_master_weights_and_gradients / "
                                 "fp16_master_weights_and_gradients")
            frags = []
            for li, p in enumerate(layers):
                m = getattr(p, "_hp_mapping", None)  # None: no element of this layer on this rank
                if m is None:
                    continue
                hp, lp = m.hp_fragment_address, m.lp_fragment_address
                if hp.numel != lp.numel or lp.start + lp.numel > p.numel():
                    raise RuntimeError(f"inconsistent DeepSpeed fragment map for layer {li} of group {gi}: "
                                       f"hp {hp}, lp {lp}, layer numel {p.numel()}")
                frags.append(Fragment(li, lp.start, hp.start, hp.numel))
            frags.sort(key=lambda f: f.offset_in_shard)
            for a, b in zip(frags, frags[1:]):
                if a.offset_in_shard + a.numel > b.offset_in_shard:
                    raise RuntimeError(f"DeepSpeed fragments of layers {a.layer} and {b.layer} of group {gi} "
                                       "overlap in the partition")
            table = FragmentTable.from_fragments(frags, flat.numel(), len(layers))
            rank, world = C.group_rank(pg), C.group_size(pg)
            mine = [f"world_size={world}", f"rank={rank}", f"partition={flat.numel()}", f"layers={len(layers)}"]
            mine += [f"{f.layer}:{f.offset_in_layer}:{f.offset_in_shard}:{f.numel}" for f in frags]
            digest = hashlib.sha256("\n".join(mine).encode()).hexdigest()
            partitions[id(flat)] = _Partition(flat, table, pg, comm_device, digest)
            plan += [f"group {gi}: layer {li} shape={tuple(p.shape)}" for li, p in enumerate(layers)]
        # Ranks that disagree on the layers would exchange vectors of different lengths.
        C.check_same_plan(plan, hashlib.sha256("\n".join(plan).encode()).digest(), groups[0][2], comm_device)
        self._partitions = partitions

    # ------------------------------------------------------------------ stepping
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
        if not self._partitions:
            return _novograd_step(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for group in self.param_groups:
            params = group["params"]
            part = self._partitions.get(id(params[0])) if len(params) == 1 else None
            if part is None or part.flat is not params[0]:
                raise RuntimeError("a param group does not hold the DeepSpeed partition this optimizer was bound "
                                   "to; do not edit param_groups['params'] of a bound DeepSpeedNovoGrad")
            if part.flat.grad is not None:
                work.append((group, part))
        if work:
            self._step_partitions(work)
        return loss

    def _step_partitions(self, work: List[Tuple[Dict, _Partition]]) -> None:
        grads, stats, use_max = [], [], []
        for group, part in work:
            grad = part.flat.grad
            if grad.dtype != part.flat.dtype or grad.shape != part.flat.shape or not grad.is_contiguous():
                grad = grad.to(part.flat.dtype).reshape(part.flat.shape).contiguous()
            grads.append(grad)
            st = K.partial_stats(grad, part.table, max_abs=group["norm_type"] != 2)
            L, inf = part.num_layers, group["norm_type"] != 2
            stats.append((st[L:2 * L] if inf else st[:L]).to(torch.float32))
            use_max.append(torch.full((L,), inf, dtype=torch.bool))
        comm_device = work[0][1].comm_device
        vec = torch.cat(stats).to(comm_device)
        mask = torch.cat(use_max).to(comm_device)
        # The step's one collective: per-layer sums of squares add up over the ranks'
        # fragments; L-inf groups need a MAX, so they share one all-gather instead.
        if bool(mask.any()):
            every = C.all_gather_stats(vec, work[0][1].process_group)
            vec = torch.where(mask, every.amax(0), every.sum(0))
        else:
            C.all_reduce_stats(vec, work[0][1].process_group)
        offset = 0
        for (group, part), grad in zip(work, grads):
            L, flat = part.num_layers, part.flat
            stat = vec[offset:offset + L].to(flat.device)
            offset += L
            state = self.state[flat]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(flat)
                state["exp_avg_sq"] = torch.zeros(L, dtype=torch.float32, device=flat.device)
                state["step"] = torch.zeros(L, dtype=torch.float32, device=flat.device)
                state["layout"] = part.digest
            if group["amsgrad"] and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = state["exp_avg_sq"].clone()
            # DeepSpeed gives every layer a gradient (zeros where autograd left none).
            has_grad = torch.ones(L, dtype=torch.bool, device=flat.device)
            v, v_max, t, coeffs = F.layer_update(
                stat, has_grad, state["exp_avg_sq"], state.get("max_exp_avg_sq", state["exp_avg_sq"]),
                state["step"], part.layer_hyper(group), norm_type=2 if group["norm_type"] == 2 else math.inf)
            # exp_avg and the partition are updated in place: DeepSpeed holds views of both.
            K.fused_update(grad, state["exp_avg"], flat, None, part.table, coeffs)
            state["exp_avg_sq"].copy_(v)
            state["step"].copy_(t)
            if group["amsgrad"]:
                state["max_exp_avg_sq"].copy_(v_max)

    # ------------------------------------------------------------------ state
    def load_state_dict(self, state_dict: Dict) -> None:
        """Load a :meth:`state_dict`; once bound, only one saved with the same partitioning."""
        if self._partitions:
            saved = state_dict.get("param_groups", [])
            for gi, (sg, group) in enumerate(zip(saved, self.param_groups)):
                part = self._partitions.get(id(group["params"][0]))
                st = state_dict.get("state", {}).get(sg["params"][0]) if len(sg["params"]) == 1 else None
                if part is None or not st:
                    continue
                if st.get("layout") != part.digest or tuple(st["exp_avg"].shape) != tuple(part.flat.shape):
                    raise ValueError(
                        f"optimizer state of param group {gi} was saved with another ZeRO partitioning (data-"
                        "parallel world size, rank or parameters differ); DeepSpeed's ZeRO-1/2 checkpoints of "
                        "DeepSpeedNovoGrad resume only at the same world size with the same model")
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
    bound = inspect.signature(deepspeed.initialize).bind(*args, **kwargs)
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
        return deepspeed.initialize(**a)  # another optimizer, or DeepSpeed's own: nothing to bind

    built: List[DeepSpeedNovoGrad] = []
    if config is not None:
        _refuse_config(config)
        config.setdefault("zero_allow_untested_optimizer", True)
    a["optimizer"] = _prepare(client, built) if isinstance(client, NovoGrad) else _Adopting(client, built)
    _give_config(a, config, from_args)
    result = deepspeed.initialize(**a)
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
        _refuse('"zero_optimization": {"stage": 3}', "ZeRO-3 steps the optimizer once per sub-group of flat "
                "partitions and publishes no fragment map, so the layer-wise norms cannot be made exact; to shard "
                "the weights too, use FSDP2 (torch.distributed.fsdp.fully_shard) with sharded_novograd.NovoGrad("
                "model.parameters()), exact with one all-reduce per step (docs/fsdp2.md), or ZeRO stage 0, 1 or 2")
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
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    stage = engine.zero_optimization_stage()
    wrapper = engine.optimizer
    if stage >= 3:
        _refuse('"zero_optimization": {"stage": 3}', "ZeRO-3 steps the optimizer once per sub-group of flat "
                "partitions and publishes no fragment map, so the layer-wise norms cannot be made exact; to shard "
                "the weights too, use FSDP2 (torch.distributed.fsdp.fully_shard) with sharded_novograd.NovoGrad("
                "model.parameters()), exact with one all-reduce per step (docs/fsdp2.md), or ZeRO stage 0, 1 or 2")
    if wrapper is opt or (isinstance(wrapper, FP16_UnfusedOptimizer) and wrapper.optimizer is opt):
        return  # stage 0: whole tensors, the reference step is exact
    if isinstance(wrapper, DeepSpeedZeroOptimizer):
        _refuse_zero_flags(wrapper.round_robin_gradients, wrapper.elastic_checkpoint)
        if getattr(wrapper, "zenflow", False):
            _refuse("ZenFlow", "it steps parts of the partition at different times")
        if wrapper.has_moe_layers:
            _refuse("mixture-of-experts layers", "expert groups are partitioned over other process groups")
        if wrapper.optimizer is not opt:
            raise RuntimeError("DeepSpeed's ZeRO optimizer does not wrap the NovoGrad it was given")
        opt._bind(list(zip(wrapper.bit16_groups, wrapper.single_partition_of_fp32_groups,
                           wrapper.real_dp_process_group)), f"ZeRO stage {stage}")
    elif isinstance(wrapper, BF16_Optimizer):
        if wrapper.has_moe_layers:
            _refuse("mixture-of-experts layers", "expert groups are partitioned over other process groups")
        if wrapper.optimizer is not opt:
            raise RuntimeError("DeepSpeed's BF16_Optimizer does not wrap the NovoGrad it was given")
        opt._bind(list(zip(wrapper.bf16_groups, wrapper.fp32_groups_flat_partition,
                           wrapper.real_dp_process_group)), "BF16_Optimizer")
    else:
        _refuse(f"DeepSpeed's {type(wrapper).__name__}", "the binding knows ZeRO stage 0, the ZeRO-1/2 optimizer "
                "and BF16_Optimizer only")
    if torch.distributed.get_rank() == 0:
        logger.info("NovoGrad bound to %s partitions of %d param groups", type(wrapper).__name__,
                    len(opt.param_groups))
