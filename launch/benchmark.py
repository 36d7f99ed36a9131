"""Side-by-side training-step benchmark of sharded and unsharded optimizers.

One torchrun invocation runs every variant, one after the other, on the same models,
seed, data and number of steps, and measures per variant:

- step time (median, p20, p80 over the timed steps; each step's time is the slowest
  rank's), and its ratio to ShardedNovoGrad ZeRO-2 measured in the same run;
- optimizer-state bytes on each rank;
- peak RSS of each rank while the variant ran (the kernel's high-water mark is reset
  before each variant; the RSS at that moment is reported too, so the part of the
  peak owed to the variant itself is the difference);
- the number and bytes of collectives in one steady-state step, counted by wrapping
  the ``torch.distributed`` collectives (DeepSpeed's ``deepspeed.comm`` and FSDP2 end
  in them; DDP's gradient all-reduce is routed through them with torch's stock
  ``allreduce_hook``). Bytes are the size of the whole buffer each collective works
  on: the tensor of an all-reduce or broadcast, the gathered output of an all-gather,
  the input of a reduce-scatter;
- the largest absolute parameter difference from the first variant (DDP + NovoGrad,
  the unsharded reference) at the end of the run.

Run (one process per rank; ``launch/run_benchmark.sh`` runs N=2 and N=4 and rebuilds
the report)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 launch/benchmark.py \\
        --out runs/benchmark/n2_gpt [--models gpt,mlp] [--variants all] [--warmup 3] \\
        [--steps 10] [--rounds 2] [--profile]
    python launch/benchmark.py report --inputs runs/benchmark/n2_gpt ... --docs docs

Each run writes ``results.csv`` (variant, model, world_size, metric, p20, p50, p80,
device, torch_version, note), ``results.json`` and ``results.md`` into ``--out``.
For per-rank quantities (bytes, RSS, collectives) the p20/p50/p80 columns are
quantiles over ranks; for step times, over steps.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import datetime
import functools
import gc
import json
import logging
import math
import os
import platform
import sys
import threading
import time
import traceback
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_models  # noqa: E402
import param_counts  # noqa: E402

logger = logging.getLogger("benchmark")

CSV_COLUMNS = ["variant", "model", "world_size", "metric", "p20", "p50", "p80", "device", "torch_version", "note"]
REFERENCE = "ddp_novograd"
BASELINE = "sharded_zero2"

# NovoGrad and AdamW hyperparameters shared by every variant.
NOVOGRAD_HP = dict(lr=1e-3, betas=(0.95, 0.98), eps=1e-8, weight_decay=0.01)
ADAMW_HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
SMALL_COLLECTIVE = 64 * 1024  # bytes: the report lists collectives up to this size one by one
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DS_BUCKET = 20_000_000  # elements; DeepSpeed's default (5e8) would allocate 2 GB fp32 buffers


# ---------------------------------------------------------------- collective counting
class CollectiveCounter:
    """Counts calls and bytes of the torch.distributed collectives while enabled.

    The wrappers are installed once, before DeepSpeed or FSDP look the functions up
    (DeepSpeed keeps references to some of them), on both ``torch.distributed`` and
    ``torch.distributed.distributed_c10d``. A collective that calls another (e.g.
    ``_all_gather_base``) counts once, as the outer call.
    """

    # name -> argument holding the whole buffer (a tensor, or a list of tensors)
    FUNCTIONS = {
        "all_reduce": "tensor", "all_reduce_coalesced": "tensors", "broadcast": "tensor", "reduce": "tensor",
        "all_gather_into_tensor": "output_tensor", "all_gather_single": "output_tensor",
        "_all_gather_base": "output_tensor", "reduce_scatter_tensor": "input",
        "reduce_scatter_single": "input", "_reduce_scatter_base": "input", "all_gather": "tensor_list",
        "reduce_scatter": "input_list", "all_to_all_single": "input", "all_gather_coalesced": "output_tensor_lists",
        "gather": "tensor", "scatter": "tensor", "barrier": None, "all_gather_object": None,
        "broadcast_object_list": None,
    }

    def __init__(self):
        self.enabled = False
        self.calls: List[tuple] = []
        self._local = threading.local()
        self._installed = False

    def install(self) -> None:
        if self._installed:
            return
        import inspect
        c10d = dist.distributed_c10d
        for name, arg in self.FUNCTIONS.items():
            orig = getattr(c10d, name, None)
            if orig is None:
                continue
            wrapped = self._wrap(name, orig, arg, inspect.signature(orig))
            setattr(c10d, name, wrapped)
            if getattr(dist, name, None) is orig:
                setattr(dist, name, wrapped)
        self._installed = True

    def _wrap(self, name, orig, arg, sig):
        counter = self

        @functools.wraps(orig)
        def wrapper(*args, **kwargs):
            depth = getattr(counter._local, "depth", 0)
            if counter.enabled and depth == 0:
                nbytes = 0
                if arg is not None:
                    try:
                        nbytes = _nbytes(sig.bind(*args, **kwargs).arguments.get(arg))
                    except TypeError:
                        nbytes = 0
                counter.calls.append((name, nbytes))
            counter._local.depth = depth + 1
            try:
                return orig(*args, **kwargs)
            finally:
                counter._local.depth = depth

        return wrapper

    @contextlib.contextmanager
    def counting(self):
        self.calls = []
        self.enabled = True
        try:
            yield self
        finally:
            self.enabled = False

    def summary(self) -> Dict:
        by_name: Dict[str, List[int]] = {}
        for name, nbytes in self.calls:
            entry = by_name.setdefault(name, [0, 0])
            entry[0] += 1
            entry[1] += nbytes
        return {"count": len(self.calls), "bytes": sum(b for _, b in self.calls), "by_name": by_name,
                "calls": [list(c) for c in self.calls]}


def _nbytes(obj) -> int:
    if torch.is_tensor(obj):
        t = obj.to_local() if hasattr(obj, "to_local") else obj
        return t.numel() * t.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return 0


COUNTER = CollectiveCounter()


# ---------------------------------------------------------------- memory
def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def reset_peak_rss() -> int:
    """Return freed memory to the OS, reset the RSS high-water mark; return the RSS in bytes."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (Linux >= 4.0)
    return _proc_status_kib("VmRSS") * 1024


def peak_rss() -> int:
    return _proc_status_kib("VmHWM") * 1024


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensors (DTensors count their local shard)."""
    seen, total = set(), 0
    for t in tensors:
        if not torch.is_tensor(t):
            continue
        if hasattr(t, "to_local"):
            t = t.to_local()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if t.numel() == 0 or key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def optimizer_state_tensors(opt: torch.optim.Optimizer):
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                yield v


# ---------------------------------------------------------------- variants
class Variant:
    """One way of training the model: build, step, report."""

    name = ""
    label = ""

    def __init__(self, spec: bench_models.ModelSpec, args, rank: int, world: int):
        self.spec, self.args, self.rank, self.world = spec, args, rank, world
        self.model = bench_models.build_model(spec, args.seed, DTYPES[args.dtype])
        self.setup()

    def setup(self) -> None:
        raise NotImplementedError

    def batch(self, step: int):
        return bench_models.make_batch(self.spec, self.args.seed, step, self.rank, DTYPES[self.args.dtype])

    def step(self, step: int) -> float:
        raise NotImplementedError

    def state_bytes(self) -> int:
        raise NotImplementedError

    def full_params(self) -> Dict[str, torch.Tensor]:
        """Every parameter, whole, as fp32 on the CPU (collective for sharded models)."""
        out = {}
        for n, p in self.model.named_parameters():
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[n] = t.detach().float().cpu().clone()
        return out

    def close(self) -> None:
        pass


def _ddp(model):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP
    ddp = DDP(model, broadcast_buffers=False)
    # torch's stock Python all-reduce hook: the same collective as the built-in one,
    # but visible to the collective counter.
    ddp.register_comm_hook(None, default_hooks.allreduce_hook)
    return ddp


class DDPNovoGrad(Variant):
    name, label = "ddp_novograd", "DDP + NovoGrad (unsharded reference)"

    def setup(self):
        from sharded_novograd import NovoGrad
        self.ddp = _ddp(self.model)
        self.opt = NovoGrad(self.model.parameters(), **NOVOGRAD_HP)

    def step(self, step):
        self.opt.zero_grad(set_to_none=True)
        loss = self.ddp(*self.batch(step))
        loss.backward()
        self.opt.step()
        return float(loss)

    def state_bytes(self):
        return tensor_bytes(optimizer_state_tensors(self.opt))


class TorchZeroNovoGrad(DDPNovoGrad):
    name, label = "torch_zero_novograd", "torch ZeroRedundancyOptimizer(NovoGrad) + DDP"

    def setup(self):
        from torch.distributed.optim import ZeroRedundancyOptimizer
        from sharded_novograd import NovoGrad
        self.ddp = _ddp(self.model)
        # Whole tensors per rank: NovoGrad's per-tensor norm stays exact.
        self.opt = ZeroRedundancyOptimizer(self.model.parameters(), optimizer_class=NovoGrad,
                                           parameters_as_bucket_view=self.args.zero_bucket_view, **NOVOGRAD_HP)

    def state_bytes(self):
        return tensor_bytes(optimizer_state_tensors(self.opt.optim))


class FSDP2NovoGrad(Variant):
    name, label = "fsdp2_novograd", "FSDP2 (fully_shard) + sharded_novograd.NovoGrad on its DTensor parameters"

    def setup(self):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (self.world,))
        for unit in bench_models.shardable_units(self.model):
            fully_shard(unit, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        self.params = list(self.model.parameters())
        self.opt = self.make_optimizer()

    def make_optimizer(self):
        from sharded_novograd import NovoGrad
        return NovoGrad(self.params, **NOVOGRAD_HP)

    def step(self, step):
        self.opt.zero_grad(set_to_none=True)
        loss = self.model(*self.batch(step))
        loss.backward()
        self.before_step()
        self.opt.step()
        return float(loss)

    def before_step(self):
        pass

    def state_bytes(self):
        return tensor_bytes(optimizer_state_tensors(self.opt))


class FSDP2LocalNovoGrad(FSDP2NovoGrad):
    name, label = "fsdp2_novograd_local", "FSDP2 (fully_shard) + NovoGrad on each rank's local shards"

    def make_optimizer(self):
        return None  # built at the first step, see before_step

    def before_step(self):
        # FSDP2 re-creates its sharded storage at lazy initialisation (the first
        # forward), so the optimizer is built on the local tensors after that. They are
        # leaf tensors sharing storage with FSDP2's sharded parameters: NovoGrad sees
        # each rank's dim-0 slice as if it were the whole layer (per-fragment norms).
        from sharded_novograd import NovoGrad
        with torch.no_grad():
            locals_ = [p.to_local() for p in self.params]
        if self.opt is None:
            self.locals = locals_
            self.opt = NovoGrad(self.locals, **NOVOGRAD_HP)
        for loc, now in zip(self.locals, locals_):
            if loc.data_ptr() != now.data_ptr():
                raise RuntimeError("FSDP2 moved its sharded parameters; the local-shard optimizer lost them")
        for loc, p in zip(self.locals, self.params):
            loc.grad = None if p.grad is None else p.grad.to_local()

    def step(self, step):
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        for p in self.params:  # the optimizer does not own these: clear them here
            p.grad = None
        loss = self.model(*self.batch(step))
        loss.backward()
        self.before_step()
        self.opt.step()
        return float(loss)


class FSDP2AdamW(FSDP2NovoGrad):
    name, label = "fsdp2_adamw", "FSDP2 (fully_shard) + torch AdamW (foreach) on its DTensor parameters"

    def make_optimizer(self):
        return torch.optim.AdamW(self.params, foreach=True, **ADAMW_HP)


class FSDP2TPNovoGrad(FSDP2NovoGrad):
    name = "fsdp2_tp_novograd"
    label = "2-D mesh (dp=N/2, tp=2): MLP tensor parallel + FSDP2 + sharded_novograd.NovoGrad"

    def setup(self):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
        if self.world % 2:
            raise RuntimeError("the 2-D mesh needs an even number of ranks (tp=2)")
        mesh = init_device_mesh("cpu", (self.world // 2, 2), mesh_dim_names=("dp", "tp"))
        units = bench_models.shardable_units(self.model)
        mlps = [u for u in units if hasattr(u, "fc2")] or [self.model]
        for m in mlps:  # fc1 split by columns, fc2 by rows: the Megatron MLP
            parallelize_module(m, mesh["tp"], {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
        for unit in units:
            fully_shard(unit, mesh=mesh["dp"])
        fully_shard(self.model, mesh=mesh["dp"])
        self.params = list(self.model.parameters())
        self.opt = self.make_optimizer()

    def batch(self, step: int):
        # Both tp ranks must see the same input: each dp group trains on the batches of
        # its two ranks, concatenated, so the global mean gradient is the reference's.
        first = 2 * (self.rank // 2)
        parts = [bench_models.make_batch(self.spec, self.args.seed, step, r, DTYPES[self.args.dtype])
                 for r in (first, first + 1)]
        return tuple(torch.cat(t) for t in zip(*parts))


def _deepspeed_config(spec, optimizer: Dict, dtype: str) -> Dict:
    return {
        "bf16": {"enabled": dtype == "bf16"},
        "train_micro_batch_size_per_gpu": spec.batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told otherwise
        "steps_per_print": 10 ** 9,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                              "reduce_bucket_size": DS_BUCKET, "allgather_bucket_size": DS_BUCKET},
        "optimizer": optimizer,
    }


def _import_deepspeed():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops
    # The shared-memory op would JIT-compile for about a minute; gloo needs none of it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    with contextlib.suppress(Exception):
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo")
    return deepspeed


class DeepSpeedAdamW(Variant):
    name, label = "deepspeed_zero2_adamw", "DeepSpeed ZeRO-2 + AdamW (torch_adam)"

    def setup(self):
        deepspeed = _import_deepspeed()
        cfg = _deepspeed_config(self.spec, {"type": "AdamW", "params": {**_ds_hp(ADAMW_HP), "torch_adam": True}},
                                self.args.dtype)
        self.engine, _, _, _ = deepspeed.initialize(model=self.model, model_parameters=self.model.parameters(),
                                                    config=cfg)

    def step(self, step):
        loss = self.engine(*self.batch(step))
        self.engine.backward(loss)
        self.engine.step()
        return float(loss)

    def state_bytes(self):
        zero = self.engine.optimizer
        client = getattr(zero, "optimizer", zero)
        if hasattr(client, "state_bytes"):
            state = client.state_bytes()
        else:
            state = tensor_bytes(optimizer_state_tensors(client))
        # DeepSpeed keeps an fp32 master partition even for fp32 models: it is optimizer state.
        master = tensor_bytes(getattr(zero, "single_partition_of_fp32_groups", []))
        return state + master

    def close(self):
        with contextlib.suppress(Exception):
            self.engine.destroy()
        self.engine = None


def _ds_hp(hp):
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in hp.items()}


class DeepSpeedNovoGrad(DeepSpeedAdamW):
    name, label = "deepspeed_zero2_novograd", "DeepSpeed ZeRO-2 + NovoGrad (sharded_novograd.integrations)"

    def setup(self):
        _import_deepspeed()
        from sharded_novograd.integrations import deepspeed as sn_deepspeed
        cfg = _deepspeed_config(self.spec, {"type": "NovoGrad", "params": _ds_hp(NOVOGRAD_HP)}, self.args.dtype)
        self.engine, _, _, _ = sn_deepspeed.initialize(model=self.model, model_parameters=self.model.parameters(),
                                                       config=cfg)


class Sharded(Variant):
    name, label, stage = "sharded_zero2", "ShardedNovoGrad zero_stage=2", 2

    def setup(self):
        from sharded_novograd import ShardedNovoGrad
        self.opt = ShardedNovoGrad(self.model.parameters(), zero_stage=self.stage, **NOVOGRAD_HP)

    def step(self, step):
        self.opt.zero_grad(set_to_none=True)
        loss = self.model(*self.batch(step))
        loss.backward()
        self.opt.step()
        return float(loss)

    def state_bytes(self):
        return self.opt.state_bytes()


class ShardedZero1(Sharded):
    name, label, stage = "sharded_zero1", "ShardedNovoGrad zero_stage=1", 1


VARIANTS: Dict[str, type] = {v.name: v for v in (DDPNovoGrad, TorchZeroNovoGrad, FSDP2NovoGrad, FSDP2AdamW, FSDP2TPNovoGrad,
                                                  FSDP2LocalNovoGrad,
                                                  DeepSpeedAdamW, DeepSpeedNovoGrad, ShardedZero1, Sharded)}
# Variants whose math is not NovoGrad's: their distance from the reference means nothing.
OTHER_ALGORITHM = {"deepspeed_zero2_adamw", "fsdp2_adamw"}


# ---- ZeRO-Offload pair: the optimizer step runs on the CPU (DeepSpeedCPUAdam against
# NovoGrad's one-pass CPU kernel). Not in "all": DeepSpeed JIT-builds its cpu_adam op
# with g++ on first use (minutes, once per machine); name the variants to run them.
def _offload(cfg: Dict) -> Dict:
    cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    cfg["zero_force_ds_cpu_optimizer"] = False  # DeepSpeed refuses a client optimizer under offload otherwise
    return cfg


class DeepSpeedOffloadAdam(DeepSpeedAdamW):
    name, label = "deepspeed_zero2_offload_adam", "DeepSpeed ZeRO-2 offload_optimizer=cpu + DeepSpeedCPUAdam"

    def setup(self):
        deepspeed = _import_deepspeed()
        # Without torch_adam, DeepSpeed's offload path builds DeepSpeedCPUAdam (AdamW mode).
        cfg = _offload(_deepspeed_config(self.spec, {"type": "AdamW", "params": _ds_hp(ADAMW_HP)}, self.args.dtype))
        self.engine, _, _, _ = deepspeed.initialize(model=self.model, model_parameters=self.model.parameters(),
                                                    config=cfg)


class DeepSpeedOffloadNovoGrad(DeepSpeedAdamW):
    name, label = "deepspeed_zero2_offload_novograd", "DeepSpeed ZeRO-2 offload_optimizer=cpu + NovoGrad"

    def setup(self):
        _import_deepspeed()
        from sharded_novograd.integrations import deepspeed as sn_deepspeed
        cfg = _offload(_deepspeed_config(self.spec, {"type": "NovoGrad", "params": _ds_hp(NOVOGRAD_HP)},
                                         self.args.dtype))
        self.engine, _, _, _ = sn_deepspeed.initialize(model=self.model, model_parameters=self.model.parameters(),
                                                       config=cfg)


OFFLOAD_VARIANTS: Dict[str, type] = {v.name: v for v in (DeepSpeedOffloadAdam, DeepSpeedOffloadNovoGrad)}
OTHER_ALGORITHM.add("deepspeed_zero2_offload_adam")
VARIANTS.update(OFFLOAD_VARIANTS)


# ---------------------------------------------------------------- running
def _quantiles(values: List[float]):
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return (float("nan"),) * 3
    t = torch.tensor(vals, dtype=torch.float64)
    return tuple(float(torch.quantile(t, q)) for q in (0.2, 0.5, 0.8))


def _gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _short_error(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return msg[:300]


@contextlib.contextmanager
def _maybe_profile(args, rank: int, variant: str, model: str):
    """With --profile, write rank 0's torch.profiler table of the step to the output directory."""
    if not args.profile or rank != 0:
        yield
        return
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        yield
    path = os.path.join(args.out, f"profile_{model}_{variant}")
    with open(path + ".txt", "w") as f:
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70))
    prof.export_chrome_trace(path + ".json")


def run_variant(cls, spec, model_name, args, rank, world, ref_path) -> Dict:
    """Run one variant on every rank; return rank 0's record (others return None)."""
    result: Dict = {"variant": cls.name, "label": cls.label, "model": model_name}
    rss_start = reset_peak_rss()
    error, variant, times, losses, comm = None, None, [], [], None
    n_steps = args.warmup + args.steps
    try:
        variant = cls(spec, args, rank, world)
        for s in range(n_steps):
            if s == args.warmup - 1:  # the last warm-up step: steady state, not timed
                with _maybe_profile(args, rank, cls.name, model_name), COUNTER.counting():
                    losses.append(variant.step(s))
                comm = COUNTER.summary()
                continue
            if s >= args.warmup:
                dist.barrier()
                t0 = time.perf_counter()
                losses.append(variant.step(s))
                times.append(time.perf_counter() - t0)
            else:
                losses.append(variant.step(s))
    except Exception as e:  # noqa: BLE001 - reported in the table, and every rank agrees below
        COUNTER.enabled = False
        error = _short_error(e)
        if rank == 0 or args.verbose:
            logger.warning("%s on %s failed on rank %d:\n%s", cls.name, model_name, rank, traceback.format_exc())
    peak = peak_rss()
    errors = _gather(error)
    first_error = next((e for e in errors if e), None)
    if first_error:
        result["error"] = first_error
        if variant is not None:
            variant.close()
        del variant
        gc.collect()
        return result if rank == 0 else None

    # Per-step time of the slowest rank.
    t = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    per_rank = _gather({"state_bytes": variant.state_bytes(), "rss_start": rss_start, "rss_peak": peak,
                        "comm": comm, "final_loss": losses[-1]})
    full = variant.full_params()
    diff = float("nan")
    if rank == 0:
        if cls.name == REFERENCE:
            torch.save(full, ref_path)
            diff = 0.0
            init = dict(bench_models.build_model(spec, args.seed, DTYPES[args.dtype]).named_parameters())
            # How far training moved the weights: the scale against which diffs are read.
            result["reference_update"] = max(float((full[k] - init[k].detach().float()).abs().max()) for k in full)
            del init
        elif os.path.exists(ref_path) and cls.name not in OTHER_ALGORITHM:
            ref = torch.load(ref_path, weights_only=True)
            diff = max(float((full[k] - ref[k]).abs().max()) for k in ref)
            scale = max(float(v.abs().max()) for v in ref.values())
            result["max_abs_param"] = scale
            del ref
    del full
    variant.close()
    del variant
    gc.collect()
    if rank != 0:
        return None
    result.update({
        "step_times": t.tolist(),
        "state_bytes": [r["state_bytes"] for r in per_rank],
        "rss_start": [r["rss_start"] for r in per_rank],
        "rss_peak": [r["rss_peak"] for r in per_rank],
        "comm": [r["comm"] for r in per_rank],
        "final_loss": sum(r["final_loss"] for r in per_rank) / world,
        "max_param_diff": diff,
    })
    return result


def model_facts(spec, dtype: str) -> Dict:
    # Built on the CPU, not the meta device: meta initialisers import modules that
    # would stay in every variant's RSS.
    model = bench_models.build_model(spec, 0, DTYPES[dtype])
    numels = [p.numel() for p in model.parameters()]
    return {"P": sum(numels), "L": len(numels), "largest": max(numels),
            "param_bytes": DTYPES[dtype].itemsize, "dtype": dtype}


def predicted_state(variant: str, facts: Dict, world: int) -> Optional[float]:
    kind = {"ddp_novograd": "novograd", "torch_zero_novograd": "torch_zero", "fsdp2_novograd": "fsdp_novograd",
            "fsdp2_novograd_local": "fsdp_novograd", "deepspeed_zero2_adamw": "deepspeed_adamw",
            "deepspeed_zero2_novograd": "deepspeed_novograd", "sharded_zero1": "sharded",
            "sharded_zero2": "sharded"}.get(variant)
    if kind is None:
        return None
    return param_counts.optimizer_state_bytes(kind, facts["P"], facts["L"], world, facts["param_bytes"],
                                              largest=facts["largest"])


def to_rows(records: List[Dict], world: int, device: str) -> List[Dict]:
    """CSV rows; the step-time ratio is taken against the baseline of the same run."""
    rows = []
    base = {r["model"]: _quantiles(r["step_times"])[1] for r in records
            if r["variant"] == BASELINE and "error" not in r}
    fsdp_adamw = {r["model"]: _quantiles(r["step_times"])[1] for r in records
                  if r["variant"] == "fsdp2_adamw" and "error" not in r}

    def row(rec, metric, q, note=""):
        rows.append({"variant": rec["variant"], "model": rec["model"], "world_size": world, "metric": metric,
                     "p20": q[0], "p50": q[1], "p80": q[2], "device": device, "torch_version": torch.__version__,
                     "note": note})

    for rec in records:
        if "error" in rec:
            row(rec, "status", ("", "", ""), rec["error"])
            continue
        st = _quantiles(rec["step_times"])
        row(rec, "step_time_s", st)
        b = base.get(rec["model"])
        row(rec, "step_time_ratio_vs_" + BASELINE, ("", st[1] / b if b else float("nan"), ""),
            "ratio of medians")
        if rec["variant"] == "fsdp2_novograd" and fsdp_adamw.get(rec["model"]):
            row(rec, "step_time_ratio_vs_fsdp2_adamw", ("", st[1] / fsdp_adamw[rec["model"]], ""),
                "ratio of medians, same run")
        row(rec, "opt_state_bytes", _quantiles(rec["state_bytes"]), "quantiles over ranks")
        pred = rec.get("predicted_state_bytes")
        if pred is not None:
            row(rec, "opt_state_bytes_predicted", (pred, pred, pred), "cost model, most loaded rank")
        row(rec, "peak_rss_bytes", _quantiles(rec["rss_peak"]), "quantiles over ranks")
        row(rec, "rss_at_start_bytes", _quantiles(rec["rss_start"]), "quantiles over ranks")
        row(rec, "collectives_per_step", _quantiles([c["count"] for c in rec["comm"]]), _comm_note(rec["comm"][0]))
        row(rec, "collective_bytes_per_step", _quantiles([c["bytes"] for c in rec["comm"]]), "")
        d = rec["max_param_diff"]
        row(rec, "max_abs_param_diff_vs_reference", (d, d, d),
            "different algorithm" if rec["variant"] in OTHER_ALGORITHM else "")
        if "reference_update" in rec:
            u = rec["reference_update"]
            row(rec, "max_abs_param_update", (u, u, u), "largest weight change over the run")
        row(rec, "final_loss", (rec["final_loss"],) * 3, "mean over ranks")
    return rows


def _comm_note(comm: Dict) -> str:
    return "; ".join(f"{name} x{n} ({_mb(b)})" for name, (n, b) in sorted(comm["by_name"].items()))


def _mb(b: float) -> str:
    return f"{b / 1e6:.1f} MB" if b >= 1e5 else f"{b / 1e3:.2f} kB"


def device_string() -> str:
    return f"cpu-gloo ({os.cpu_count()} cores)"


def run(args) -> None:
    COUNTER.install()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.collective_timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(message)s")
    os.makedirs(args.out, exist_ok=True)
    names = [v for v in VARIANTS if v not in OFFLOAD_VARIANTS] if args.variants == "all" else args.variants.split(",")
    for n in names:
        if n not in VARIANTS:
            raise SystemExit(f"unknown variant {n!r}; choose from {', '.join(VARIANTS)}")
    if REFERENCE in names:  # the reference runs first: the others compare with it
        names.remove(REFERENCE)
        names.insert(0, REFERENCE)
    records = []
    t_start = time.time()
    for spec_name in args.models.split(","):
        spec = bench_models.MODELS[spec_name]
        facts = model_facts(spec, args.dtype)
        model_name = spec_name if args.dtype == "fp32" else f"{spec_name}-{args.dtype}"
        ref_path = os.path.join(args.out, f".reference_{model_name}.pt")
        if rank == 0 and os.path.exists(ref_path):
            os.remove(ref_path)
        first: Dict[str, Dict] = {}
        # Rounds interleave the variants (ABC ABC ...) so that a change in machine load
        # during the run hits every variant alike; timed steps of all rounds are pooled,
        # every other metric comes from the first round.
        for rnd in range(args.rounds):
            for name in names:
                t0 = time.time()
                rec = run_variant(VARIANTS[name], spec, model_name, args, rank, world, ref_path)
                if rank != 0:
                    continue
                if name in first:
                    if "error" not in rec and "error" not in first[name]:
                        first[name]["step_times"] += rec["step_times"]
                        first[name]["rounds"] += 1
                    rec = first[name]
                else:
                    rec["facts"] = facts
                    rec["predicted_state_bytes"] = predicted_state(name, facts, world)
                    rec["rounds"] = 1
                    first[name] = rec
                    records.append(rec)
                if "error" in rec:
                    logger.info("%-26s %-4s unavailable: %s", name, model_name, rec["error"])
                else:
                    logger.info("%-26s %-4s round %d  median %.4f s  state %.1f MB  diff %.2e  (%.0f s)", name,
                                model_name, rnd, _quantiles(rec["step_times"])[1], max(rec["state_bytes"]) / 1e6,
                                rec["max_param_diff"], time.time() - t0)
        if rank == 0 and os.path.exists(ref_path):
            os.remove(ref_path)
    if rank == 0:
        meta = {"world_size": world, "device": device_string(), "torch": torch.__version__,
                "python": platform.python_version(), "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
                "seed": args.seed, "threads": args.threads, "command": " ".join(args.command_line),
                "wall_s": time.time() - t_start, "load_avg": os.getloadavg(),
                "labels": {k: v.label for k, v in VARIANTS.items()}}
        rows = to_rows(records, world, meta["device"])
        write_csv(os.path.join(args.out, "results.csv"), rows)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"meta": meta, "records": records}, f, indent=1)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(markdown_tables([{"meta": meta, "records": records}]))
        logger.info("wrote %s/results.{csv,json,md} in %.0f s", args.out, meta["wall_s"])
    dist.destroy_process_group()


def write_csv(path: str, rows: List[Dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


# ---------------------------------------------------------------- report
def _fmt_mb(b) -> str:
    return f"{b / 2 ** 20:,.1f}"


def markdown_tables(runs: List[Dict]) -> str:
    """One table per (model, world size)."""
    out = []
    for run_ in runs:
        meta, records = run_["meta"], run_["records"]
        N = meta["world_size"]
        for model in dict.fromkeys(r["model"] for r in records):
            recs = [r for r in records if r["model"] == model]
            facts = recs[0]["facts"]
            rounds, warmup, steps = recs[0].get("schedule", (meta.get("rounds", 1), meta["warmup"], meta["steps"]))
            base = next((_quantiles(r["step_times"])[1] for r in recs
                         if r["variant"] == BASELINE and "error" not in r), None)
            out.append(f"#### {model}, N={N} (P={facts['P']:,} {facts.get('dtype', 'fp32')} parameters in "
                       f"L={facts['L']} tensors; "
                       f"{rounds} x ({warmup} warm-up + {steps} timed steps))\n")
            ref = next((r for r in recs if r["variant"] == REFERENCE and "reference_update" in r), None)
            if facts.get("dtype", "fp32") != "fp32":
                out.append("The reference keeps its moments in the model's dtype, the sharded optimizers in fp32: "
                           "the parameter differences below are not an exactness test.\n")
            elif ref is not None:
                out.append(f"Over the {warmup + steps} steps the reference moved no weight by more than "
                           f"{ref['reference_update']:.2e}: the scale for the parameter differences.\n")
            out.append("| variant | step p50 ms [p20, p80] | vs SN ZeRO-2 | optimizer state MiB/rank "
                       "(predicted) | peak RSS MiB/rank (at start) | collectives/step: count, MB | "
                       "max abs param diff vs reference |")
            out.append("|---|---|---:|---|---|---|---|")
            for r in recs:
                label = meta["labels"].get(r["variant"], r["variant"])
                if "error" in r:
                    out.append(f"| {label} | unavailable: {r['error'].replace('|', '/')} | | | | | |")
                    continue
                p20, p50, p80 = _quantiles(r["step_times"])
                ratio = f"{p50 / base:.2f}x" if base else "n/a"
                sb = r["state_bytes"]
                state = _fmt_mb(max(sb)) if max(sb) == min(sb) else f"{_fmt_mb(min(sb))}-{_fmt_mb(max(sb))}"
                if r.get("predicted_state_bytes") is not None:
                    state += f" ({_fmt_mb(r['predicted_state_bytes'])})"
                rss = f"{_fmt_mb(max(r['rss_peak']))} ({_fmt_mb(max(r['rss_start']))})"
                c = r["comm"][0]
                comm = f"{c['count']}, {c['bytes'] / 1e6:.1f}"
                if r["variant"] in OTHER_ALGORITHM:
                    diff = "n/a (AdamW)"
                else:
                    diff = f"{r['max_param_diff']:.2e}"
                out.append(f"| {label} | {p50 * 1e3:.1f} [{p20 * 1e3:.1f}, {p80 * 1e3:.1f}] | {ratio} | {state} | "
                           f"{rss} | {comm} | {diff} |")
            out.append("")
            fsdp = {r["variant"]: _quantiles(r["step_times"])[1] for r in recs
                    if r["variant"] in ("fsdp2_novograd", "fsdp2_adamw") and "error" not in r}
            if len(fsdp) == 2:
                out.append(f"FSDP2 + sharded_novograd.NovoGrad / FSDP2 + torch AdamW, median step time: "
                           f"{fsdp['fsdp2_novograd'] / fsdp['fsdp2_adamw']:.2f}x\n")
            out.append("Collectives in one steady-state step (rank 0):\n")
            for r in recs:
                if "error" in r:
                    continue
                c = r["comm"][0]
                small = [f"{n} of {b:,} B" for n, b in c.get("calls", []) if b <= SMALL_COLLECTIVE]
                line = f"- {r['variant']}: {_comm_note(c)}"
                if small:
                    line += f"; those under {SMALL_COLLECTIVE // 1024} KiB: {', '.join(small)}"
                out.append(line)
            out.append("")
    return "\n".join(out)


BEGIN, END = "<!-- BEGIN training-step-benchmark -->", "<!-- END training-step-benchmark -->"
SCALE_BEGIN, SCALE_END = "<!-- BEGIN measured-state-bytes -->", "<!-- END measured-state-bytes -->"


def _load_runs(inputs: List[str]) -> List[Dict]:
    """Load runs, merging those of one world size (e.g. one invocation per model)."""
    by_world: Dict[int, Dict] = {}
    for d in inputs:
        with open(os.path.join(d, "results.json")) as f:
            run_ = json.load(f)
        meta = run_["meta"]
        meta["commands"] = [(meta["command"], meta["wall_s"], meta["load_avg"])]
        for r in run_["records"]:
            r["schedule"] = (meta.get("rounds", 1), meta["warmup"], meta["steps"])
        if meta["world_size"] in by_world:
            merged = by_world[meta["world_size"]]
            merged["records"] += run_["records"]
            merged["meta"]["commands"] += meta["commands"]
        else:
            by_world[meta["world_size"]] = run_
    return [by_world[n] for n in sorted(by_world)]


def plots(runs: List[Dict], docs: str) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    models = list(dict.fromkeys(r["model"] for run_ in runs for r in run_["records"]))
    for metric, fname, ylabel in (("ratio", "bench_step_time_ratio.png",
                                   "median step time / ShardedNovoGrad ZeRO-2 (bars: p20-p80)"),
                                  ("state", "bench_optimizer_bytes.png",
                                   "optimizer state per rank (MiB, max over ranks)")):
        fig, axes = plt.subplots(len(models), len(runs), figsize=(5.5 * len(runs), 3.6 * len(models)), squeeze=False)
        for i, model in enumerate(models):
            for j, run_ in enumerate(runs):
                ax = axes[i][j]
                recs = [r for r in run_["records"] if r["model"] == model]
                if not recs:
                    ax.set_axis_off()
                    ax.set_title(f"{model}, N={run_['meta']['world_size']}: not measured", fontsize=10)
                    continue
                base = next((_quantiles(r["step_times"])[1] for r in recs
                             if r["variant"] == BASELINE and "error" not in r), None)
                names, vals, lo, hi, texts = [], [], [], [], []
                for r in recs:
                    names.append(r["variant"])
                    if "error" in r or (metric == "ratio" and not base):
                        vals.append(0.0)
                        lo.append(0.0)
                        hi.append(0.0)
                        texts.append(" unavailable" if "error" in r else " no baseline")
                        continue
                    if metric == "ratio":
                        q = _quantiles(r["step_times"])
                        vals.append(q[1] / base)
                        lo.append(q[1] / base - q[0] / base)
                        hi.append(q[2] / base - q[1] / base)
                        texts.append(f" {vals[-1]:.2f}")
                    else:
                        vals.append(max(r["state_bytes"]) / 2 ** 20)
                        lo.append(0.0)
                        hi.append(0.0)
                        texts.append(f" {vals[-1]:,.1f}")
                colors = ["tab:green" if n.startswith("sharded") else "tab:gray" for n in names]
                ax.barh(names, vals, color=colors, xerr=[lo, hi] if metric == "ratio" else None,
                        error_kw={"lw": 0.8, "capsize": 2})
                if metric == "ratio":
                    ax.axvline(1.0, color="k", lw=0.8, ls="--")
                for y, (v, h, text) in enumerate(zip(vals, hi, texts)):
                    ax.text(v + h, y, text, va="center", fontsize=8)
                ax.invert_yaxis()
                ax.set_title(f"{model}, N={run_['meta']['world_size']}", fontsize=10)
                ax.set_xlabel(ylabel, fontsize=8)
                ax.tick_params(labelsize=8)
                ax.margins(x=0.2)
        fig.suptitle(f"CPU gloo, torch {runs[0]['meta']['torch']}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(docs, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _replace_section(path: str, begin: str, end: str, body: str, heading: str) -> None:
    text = open(path).read() if os.path.exists(path) else ""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        post = rest.split(end, 1)[1]
        text = pre + block + post
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + f"{heading}\n\n{block}\n"
    with open(path, "w") as f:
        f.write(text)


def report(args) -> None:
    runs = _load_runs(args.inputs)
    os.makedirs(args.docs, exist_ok=True)
    rows = []
    for run_ in runs:
        rows += to_rows(run_["records"], run_["meta"]["world_size"], run_["meta"]["device"])
    write_csv(os.path.join(args.docs, "bench_train_step.csv"), rows)
    pngs = plots(runs, args.docs)
    lines = []
    for run_ in runs:
        for command, wall, load in run_["meta"].get("commands", [(run_["meta"]["command"], run_["meta"]["wall_s"],
                                                                   run_["meta"]["load_avg"])]):
            lines.append(f"- `{command}` ({wall:.0f} s wall; load average at its end "
                         f"{', '.join(f'{x:.1f}' for x in load)} on {os.cpu_count()} cores)")
    body = "\n".join([
        f"Measured on {runs[0]['meta']['device']}, torch {runs[0]['meta']['torch']}, Python "
        f"{runs[0]['meta']['python']}, OMP_NUM_THREADS=1. Regenerate everything below (tables, "
        "`docs/bench_train_step.csv`, plots) with:", "",
        "```bash", args.regenerate_command or "bash launch/run_benchmark.sh", "```", "",
        "which ran:", "", *lines, "",
        *(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs), "",
        "#### Targets\n", targets(runs), "",
        markdown_tables(runs),
    ])
    _replace_section(os.path.join(args.docs, "benchmarks.md"), BEGIN, END, body,
                     "## Training step benchmark (CPU, gloo)")
    scaling = os.path.join(args.docs, "scaling.md")
    if os.path.exists(scaling):
        _replace_section(scaling, SCALE_BEGIN, SCALE_END, state_validation(runs), "## Measured vs predicted")
    print("\n".join([os.path.join(args.docs, "bench_train_step.csv"), *pngs, os.path.join(args.docs, "benchmarks.md")]))


def targets(runs: List[Dict]) -> str:
    """The project's targets, checked against this report's measurements."""
    out = ["| target | model | N | measured | verdict |", "|---|---|---:|---|---|"]

    def get(recs, name):
        return next((r for r in recs if r["variant"] == name and "error" not in r), None)

    for run_ in runs:
        N = run_["meta"]["world_size"]
        for model in dict.fromkeys(r["model"] for r in run_["records"]):
            recs = [r for r in run_["records"] if r["model"] == model]
            sn, ds, ddp = get(recs, BASELINE), get(recs, "deepspeed_zero2_adamw"), get(recs, REFERENCE)
            if sn is None:
                continue
            f = sn["facts"]
            bound = (4 + 4 * (f["param_bytes"] < 4)) * f["P"] / N + 64 * 4 * 2 + 3 * 4 * f["L"]
            got = max(sn["state_bytes"])
            out.append(f"| state bytes/rank <= (4 + 4*[bf16]) P/N + O(L) (fp32 model: 4P/N) | {model} | {N} | "
                       f"{got:,} vs {bound:,.0f} | {'met' if got <= bound else 'MISSED'} |")
            if ds:
                ratio = max(sn["state_bytes"]) / max(ds["state_bytes"])
                want = 2 / 3 if f["param_bytes"] < 4 else 1 / 3
                out.append(f"| state bytes <= {want:.2f}x DeepSpeed ZeRO-2 AdamW ({f.get('dtype', 'fp32')}) | "
                           f"{model} | {N} | {ratio:.4f}x | {'met' if ratio <= want + 1e-3 else 'MISSED'} |")
            for name in ("sharded_zero1", BASELINE):
                r = get(recs, name)
                if r is None or "calls" not in r["comm"][0]:
                    continue
                extra, bulk = split_sharded_calls(r["comm"][0]["calls"], f, N, 1 if name == "sharded_zero1" else 2)
                ok = len(extra) == 1 and bulk == (4 + f["param_bytes"]) * padded_total(f["P"], N)
                out.append(f"| {name}: exactly one collective beyond gradient reduction and parameter gather, "
                           f"of O(L) floats | {model} | {N} | {len(extra)} x {8 * param_counts.stats_vector_floats(f['L'], 1 if name == 'sharded_zero1' else 2)} B (O(L) fp64, "
                           f"L={f['L']}); the others move {bulk:,} B = fp32 gradients + parameters of padded P | "
                           f"{'met' if ok else 'MISSED'} |")
            if N == 2 and f.get("dtype", "fp32") == "fp32":  # the bf16 run is a short memory check
                p50 = _quantiles(sn["step_times"])[1]
                for other, label in ((ddp, "DDP + NovoGrad"), (ds, "DeepSpeed ZeRO-2 AdamW")):
                    if other is None:
                        continue
                    ratio = p50 / _quantiles(other["step_times"])[1]
                    out.append(f"| ZeRO-2 step time <= 1.0x {label} | {model} | {N} | {ratio:.2f}x | "
                               f"{'met' if ratio <= 1.0 else 'MISSED'} |")
    return "\n".join(out)


def padded_total(P: int, N: int, align: int = 64) -> int:
    """ShardedNovoGrad's flat buffer length (see sharded_novograd.layout)."""
    return max(N * align, -(-P // (N * align)) * N * align)


def split_sharded_calls(calls, facts: Dict, N: int, zero_stage: int = 2):
    """ShardedNovoGrad's step collectives: the statistics all-reduce(s) of 2L+19 (ZeRO-2: 4L+19) fp64
    values, and the total bytes of all the others (gradient reduction, parameter gather)."""
    stats = 8 * param_counts.stats_vector_floats(facts["L"], zero_stage)
    extra = [c for c in calls if c[0] == "all_reduce" and c[1] == stats]
    return extra, sum(c[1] for c in calls) - sum(c[1] for c in extra)


def state_validation(runs: List[Dict]) -> str:
    out = ["| model | N | variant | measured bytes/rank (min-max) | predicted | measured / predicted |",
           "|---|---:|---|---:|---:|---:|"]
    for run_ in runs:
        N = run_["meta"]["world_size"]
        for r in run_["records"]:
            if "error" in r or r.get("predicted_state_bytes") is None:
                continue
            lo, hi, pred = min(r["state_bytes"]), max(r["state_bytes"]), r["predicted_state_bytes"]
            meas = f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"
            out.append(f"| {r['model']} | {N} | {r['variant']} | {meas} | {int(pred):,} | {hi / pred:.4f} |")
    return "\n".join(out)


def parse(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        ap = argparse.ArgumentParser(description="Merge benchmark runs into docs/ (tables, CSV, plots).")
        ap.add_argument("--inputs", nargs="+", required=True, help="output directories of benchmark runs")
        ap.add_argument("--docs", default="docs", help="where benchmarks.md, the CSV and the plots go")
        ap.add_argument("--regenerate-command", default="", help="command shown in the docs")
        args = ap.parse_args(argv[1:])
        args.mode = "report"
        return args
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/benchmark", help="output directory (default: runs/benchmark)")
    ap.add_argument("--models", default="gpt,mlp", help="comma-separated, from: " + ", ".join(bench_models.MODELS))
    ap.add_argument("--variants", default="all", help="'all' or comma-separated, from: " + ", ".join(VARIANTS))
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps; the last one counts collectives")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--rounds", type=int, default=1, help="run the whole sequence of variants this many times")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                    help="model dtype; with bf16 the reference keeps bf16 moments, so differences from it are not "
                         "an exactness test (models are reported as <name>-bf16)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    ap.add_argument("--zero-bucket-view", action=argparse.BooleanOptionalAction, default=True,
                    help="ZeroRedundancyOptimizer parameters_as_bucket_view (one broadcast per rank)")
    ap.add_argument("--collective-timeout", type=float, default=300.0, help="seconds before a stuck collective fails")
    ap.add_argument("--verbose", action="store_true", help="every rank logs variant failures")
    ap.add_argument("--profile", action="store_true",
                    help="profile the last warm-up step on rank 0 (torch.profiler table and trace in --out)")
    args = ap.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        ap.error("--warmup, --steps and --rounds must be >= 1")
    args.mode = "run"
    args.command_line = ["OMP_NUM_THREADS=1", "torchrun", "--standalone",
                         f"--nproc_per_node={os.environ.get('WORLD_SIZE', '?')}",
                         "launch/benchmark.py", *argv]
    return args


def main(argv=None) -> None:
    args = parse(argv)
    if args.mode == "report":
        report(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
