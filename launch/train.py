"""Train a small byte-level GPT, data-parallel, with ShardedNovoGrad or a baseline optimizer.

Started by torchrun (``env://``), the deepspeed launcher, ``mpirun`` (ranks found with
mpi4py) or as one plain process. ``python launch/train.py --help`` lists every option;
docs/usage.md has the launch commands. Only rank 0 logs. Every run writes
``OUT/metrics.jsonl`` (one JSON object per record), ``OUT/run.json`` (the resolved
settings) and, at the end, ``OUT/loss.png``.

Optimizers:

- ``sharded-novograd``: :class:`sharded_novograd.ShardedNovoGrad`; the model is not
  wrapped in DDP (the optimizer averages gradients). ``--dtype bf16`` makes the
  parameters bf16; the optimizer keeps fp32 master weights.
- ``novograd`` / ``adamw``: :class:`sharded_novograd.NovoGrad` / ``torch.optim.AdamW``
  on a DDP model whose parameters stay fp32; ``--dtype bf16`` runs forward and
  backward under ``torch.autocast(bfloat16)``.
- ``deepspeed``: ``sharded_novograd.integrations.deepspeed.initialize`` with the
  DeepSpeed JSON of ``--ds-config``, which owns the optimizer's hyperparameters,
  clipping and precision; the schedule here scales the JSON's learning rate.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
# Import the helpers as the package ``launch`` and keep this directory off sys.path,
# so that its module names (config, data, model) cannot shadow anything installed.
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    sys.path[0] = _ROOT
elif _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import datetime  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Dict, List, Optional  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from launch import config as cfg  # noqa: E402
from launch.data import load_corpus, train_batch, val_windows  # noqa: E402
from launch.model import VOCAB, ByteGPT  # noqa: E402

logger = logging.getLogger("train")


# ---------------------------------------------------------------------------- processes
@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str
    device: torch.device


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi_discovery() -> str:
    """Set the env:// variables from MPI: rank 0 picks the rendezvous address and port."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError("started by an MPI launcher (OMPI_COMM_WORLD_RANK or PMI_RANK is set) but mpi4py "
                           "is not installed: pip install mpi4py (or the project's [mpi] extra)") from None
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = node.Get_rank(), node.Get_size()
    addr = os.environ.get("MASTER_ADDR")
    if addr is None:
        # One node: loopback needs no resolvable hostname. Several: rank 0's hostname.
        addr = "127.0.0.1" if local_size == size else socket.gethostname()
    port = os.environ.get("MASTER_PORT") or str(_free_port())
    addr, port = comm.bcast((addr, port), root=0)
    node.Free()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(local_size), MASTER_ADDR=addr, MASTER_PORT=port)
    return "mpirun"


def init_distributed() -> DistEnv:
    """Join (or, for a plain process, create) the default process group: gloo on CPU, nccl on CUDA."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        launcher = "torchrun/deepspeed (env://)"
    elif "OMPI_COMM_WORLD_RANK" in os.environ or "PMI_RANK" in os.environ:
        launcher = _mpi_discovery()
    else:
        launcher = "single process"
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPUs: "
                               "start at most one process per GPU")
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
        if "OMP_NUM_THREADS" not in os.environ:
            # The deepspeed launcher and mpirun leave OMP unset: without this, every rank
            # would use every core and the ranks would fight over them.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=10)
        # torchrun's agent keeps one TCP store across restart attempts (--max-restarts);
        # keys a failed attempt left there can make the next one connect to dead ranks
        # (pytorch/pytorch#135712). A prefix per attempt keeps them apart.
        store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"attempt{attempt}/", store), rank=rank,
                                world_size=world, timeout=timeout)
    return DistEnv(rank, world, local_rank, local_world, launcher, device)


class _TqdmHandler(logging.Handler):
    def emit(self, record):
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # noqa: BLE001 - logging must never kill training
            self.handleError(record)


def setup_logging(rank: int) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


# ---------------------------------------------------------------------------- schedule
def lr_factor(step: int, steps: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate for the update that follows ``step`` completed updates."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    # 0 at the first update after warm-up, 1 at the last one.
    progress = min(1.0, (step - warmup) / max(1, steps - warmup - 1))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _optimizer_state_bytes(opt) -> int:
    if hasattr(opt, "state_bytes"):
        return int(opt.state_bytes())
    return _tensor_bytes(v for st in opt.state.values() for v in st.values())


def _atomic_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- runners
class Runner:
    """One optimizer's way of running a step, evaluating and checkpointing."""

    def __init__(self, conf: Dict[str, Any], env: DistEnv, model: torch.nn.Module):
        self.conf, self.env, self.model = conf, env, model
        self.autocast = False

    def _loss(self, module, x, y):
        with torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = module(x)
        return F.cross_entropy(logits.float().view(-1, VOCAB), y.reshape(-1))

    def train_step(self, x, y) -> torch.Tensor:
        raise NotImplementedError

    @property
    def param_groups(self) -> List[Dict]:
        return self.opt.param_groups

    def grad_norm(self) -> float:
        raise NotImplementedError

    def state_bytes(self) -> int:
        return _optimizer_state_bytes(self.opt)

    @torch.no_grad()
    def eval_loss_sum(self, x, y) -> torch.Tensor:
        module = self.model
        was = module.training
        module.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.env.device)
        for i in range(0, x.shape[0], self.conf["batch_size"]):
            xb, yb = x[i:i + self.conf["batch_size"]], y[i:i + self.conf["batch_size"]]
            total += self._loss(module, xb, yb).double() * xb.shape[0]
        module.train(was)
        return total

    def named_parameters(self):
        return self.model.named_parameters()

    def save(self, path: str) -> None:
        raise NotImplementedError

    def load(self, path: str) -> None:
        raise NotImplementedError


class ShardedRunner(Runner):
    def __init__(self, conf, env, model):
        from sharded_novograd import ShardedNovoGrad

        super().__init__(conf, env, model)
        dtype = torch.bfloat16 if conf["dtype"] == "bf16" else torch.float32
        model.to(device=env.device, dtype=dtype)
        self.opt = ShardedNovoGrad(model.parameters(), lr=conf["lr"], betas=tuple(conf["betas"]), eps=conf["eps"],
                                   weight_decay=conf["weight_decay"], grad_averaging=conf["grad_averaging"],
                                   zero_stage=conf["zero_stage"], max_grad_norm=conf["max_grad_norm"] or None)

    def train_step(self, x, y):
        loss = self._loss(self.model, x, y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def grad_norm(self):
        return float(self.opt.grad_norm)

    def save(self, path):
        from sharded_novograd import checkpoint

        checkpoint.save(path, self.opt, model=self.model)

    def load(self, path):
        from sharded_novograd import checkpoint

        checkpoint.load(path, self.opt, model=self.model)


class DDPRunner(Runner):
    def __init__(self, conf, env, model):
        from torch.nn.parallel import DistributedDataParallel as DDP

        from sharded_novograd import NovoGrad

        super().__init__(conf, env, model)
        model.to(env.device)
        self.autocast = conf["dtype"] == "bf16"
        self.ddp = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        kw = dict(lr=conf["lr"], betas=tuple(conf["betas"]), eps=conf["eps"], weight_decay=conf["weight_decay"])
        if conf["optimizer"] == "novograd":
            self.opt = NovoGrad(model.parameters(), grad_averaging=conf["grad_averaging"], **kw)
        else:
            self.opt = torch.optim.AdamW(model.parameters(), **kw)
        self._norm = torch.zeros(())

    def train_step(self, x, y):
        loss = self._loss(self.ddp, x, y)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        # With no limit, the scale is exactly 1.0 and the gradients are unchanged.
        self._norm = torch.nn.utils.clip_grad_norm_(params, self.conf["max_grad_norm"] or math.inf)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def grad_norm(self):
        return float(self._norm)

    def save(self, path):
        if self.env.rank == 0:
            os.makedirs(path, exist_ok=True)
            tmp = os.path.join(path, f"state.pt.tmp{os.getpid()}")
            torch.save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}, tmp)
            os.replace(tmp, os.path.join(path, "state.pt"))
        dist.barrier()

    def load(self, path):
        sd = torch.load(os.path.join(path, "state.pt"), map_location=self.env.device, weights_only=True)
        self.model.load_state_dict(sd["model"])
        self.opt.load_state_dict(sd["optimizer"])


def _ds_config_path(path: str) -> str:
    if os.path.isabs(path) or os.path.exists(path):
        return path
    return os.path.join(_ROOT, path)


def _deepspeed_config(conf: Dict[str, Any]) -> Dict[str, Any]:
    path = _ds_config_path(conf["ds_config"])
    try:
        with open(path, encoding="utf-8") as f:
            ds = json.load(f)
    except FileNotFoundError:
        raise cfg.ConfigError(f"DeepSpeed config not found: {conf['ds_config']} (--ds-config)") from None
    if "scheduler" in ds:
        raise cfg.ConfigError(f"{path}: remove the 'scheduler' section: the learning rate schedule comes from "
                              "the training config (schedule, warmup_steps, min_lr_ratio)")
    if ds.get("gradient_accumulation_steps", 1) != 1:
        raise cfg.ConfigError(f"{path}: gradient_accumulation_steps is {ds['gradient_accumulation_steps']}, but "
                              "train.py takes one micro-batch per step: set it to 1 or remove it")
    # The batch is the training config's; DeepSpeed only checks its own arithmetic with these.
    micro = ds.get("train_micro_batch_size_per_gpu")
    if micro is not None and micro != conf["batch_size"]:
        logger.info("DeepSpeed config %s: train_micro_batch_size_per_gpu %s replaced by batch_size %d", path, micro,
                    conf["batch_size"])
    ds.pop("train_batch_size", None)
    ds.update(train_micro_batch_size_per_gpu=conf["batch_size"], gradient_accumulation_steps=1)
    bf16 = conf["dtype"] == "bf16"
    if ds.get("fp16", {}).get("enabled", False):
        raise cfg.ConfigError(f"{path}: fp16 is enabled, but train.py supports only --dtype fp32 or bf16")
    if "bf16" in ds and bool(ds["bf16"].get("enabled", False)) != bf16:
        raise cfg.ConfigError(f"{path}: bf16.enabled is {ds['bf16'].get('enabled', False)} but --dtype is "
                              f"{conf['dtype']}; make them agree or remove the bf16 section")
    ds.setdefault("bf16", {})["enabled"] = bf16
    return ds


class DeepSpeedRunner(Runner):
    def __init__(self, conf, env, model):
        super().__init__(conf, env, model)
        ds_conf = _deepspeed_config(conf)
        try:
            from sharded_novograd.integrations import deepspeed as sn_deepspeed
        except ImportError as e:
            raise RuntimeError(f"--optimizer deepspeed needs sharded_novograd.integrations.deepspeed and "
                               f"DeepSpeed: {e}") from None
        if env.device.type == "cpu":
            # The CPU accelerator JIT-compiles a shared-memory op at first init (about a minute
            # with g++); gloo does the same work, so skip it.
            import deepspeed.ops

            getattr(deepspeed.ops, "__compatible_ops__", {})["deepspeed_shm_comm"] = False
        self.engine, self.opt, _, _ = sn_deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                              config=ds_conf)
        self.model = self.engine.module

    def train_step(self, x, y):
        logits = self.engine(x)
        loss = F.cross_entropy(logits.float().view(-1, VOCAB), y.reshape(-1))
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    def grad_norm(self):
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def state_bytes(self):
        zero = self.opt
        client = getattr(zero, "optimizer", zero)
        n = _optimizer_state_bytes(client)
        # ZeRO-1/2 keep fp32 master partitions outside the client optimizer's state.
        n += _tensor_bytes(getattr(zero, "single_partition_of_fp32_groups", []) or [])
        return n

    def save(self, path):
        self.engine.save_checkpoint(os.path.dirname(path), tag=os.path.basename(path))

    def load(self, path):
        load_path, _ = self.engine.load_checkpoint(os.path.dirname(path), tag=os.path.basename(path))
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint at {path}")


RUNNERS = {"sharded-novograd": ShardedRunner, "novograd": DDPRunner, "adamw": DDPRunner,
           "deepspeed": DeepSpeedRunner}


# ---------------------------------------------------------------------------- checkpoints
def save_checkpoint(runner: Runner, conf, env: DistEnv, step: int) -> None:
    """Write ``checkpoint_dir/step_N`` and then point ``latest.json`` at it. Collective."""
    root = conf["checkpoint_dir"]
    name = f"step_{step:08d}"
    runner.save(os.path.join(root, name))
    dist.barrier()
    if env.rank == 0:
        _atomic_json(os.path.join(root, "latest.json"), {"step": step, "dir": name, "optimizer": conf["optimizer"],
                                                         "world_size": env.world_size})
    dist.barrier()
    logger.info("checkpoint: %s", os.path.join(root, name))


def load_checkpoint(runner: Runner, conf) -> int:
    """Load the latest checkpoint of ``checkpoint_dir``; return its step (0 when there is none). Collective."""
    root = conf["checkpoint_dir"]
    latest = os.path.join(root, "latest.json")
    if not os.path.exists(latest):
        logger.warning("resume: no checkpoint in %s (no latest.json); starting from step 0", root)
        return 0
    with open(latest, encoding="utf-8") as f:
        meta = json.load(f)
    if meta["optimizer"] != conf["optimizer"]:
        raise RuntimeError(f"the checkpoint in {root} was written with --optimizer {meta['optimizer']}, "
                           f"this run uses {conf['optimizer']}")
    runner.load(os.path.join(root, meta["dir"]))
    dist.barrier()
    logger.info("resumed from %s at step %d (saved by %d ranks)", os.path.join(root, meta["dir"]), meta["step"],
                meta["world_size"])
    return int(meta["step"])


# ---------------------------------------------------------------------------- main
def _check_same_data(digest: str, env: DistEnv) -> None:
    mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.int64, device=env.device)
    ref = mine.clone()
    dist.broadcast(ref, src=0)
    bad = torch.tensor([0 if torch.equal(mine, ref) else 1], dtype=torch.int64, device=env.device)
    dist.all_reduce(bad)
    if bad.item():
        raise RuntimeError(f"ranks read different standard-library sources (this rank's digest {digest[:12]}): "
                           "every node must run the same Python version")


def _gather_ints(value: int, env: DistEnv) -> List[int]:
    out = torch.zeros(env.world_size, dtype=torch.int64, device=env.device)
    mine = torch.tensor([value], dtype=torch.int64, device=env.device)
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, mine)
    return out.tolist()


def _mean_over_ranks(x: torch.Tensor, env: DistEnv) -> float:
    x = x.detach().double().reshape(1).clone()
    dist.all_reduce(x)
    return float(x.item()) / env.world_size


def evaluate(runner: Runner, corpus, conf, env: DistEnv) -> float:
    x, y = val_windows(corpus, conf["eval_windows"], env.rank, env.world_size, conf["seq_len"])
    sums = torch.stack([runner.eval_loss_sum(x.to(env.device), y.to(env.device)),
                        torch.tensor(float(x.shape[0]), dtype=torch.float64, device=env.device)])
    dist.all_reduce(sums)
    return float(sums[0] / sums[1])


def _open_metrics(path: str, resume_step: int):
    rows = []
    if resume_step > 0 and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            rows = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
    f = open(path, "w", encoding="utf-8")
    f.writelines(rows)
    f.flush()
    return f


def run(conf: Dict[str, Any], env: DistEnv) -> Dict[str, Any]:
    t_start = time.perf_counter()
    out = conf["out"] or os.path.join("runs", f"{conf['config_name']}-{conf['optimizer']}")
    metrics_path, plot_path = os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss.png")
    if env.rank == 0:
        os.makedirs(out, exist_ok=True)
        if conf["checkpoint_dir"]:
            os.makedirs(conf["checkpoint_dir"], exist_ok=True)
    logger.info("launcher: %s, %d rank(s), device %s, torch %s", env.launcher, env.world_size, env.device,
                torch.__version__)

    corpus = load_corpus(conf["max_bytes"], conf["val_fraction"], conf["seq_len"])
    _check_same_data(corpus.digest, env)
    logger.info("data: %d files of %s (%d held out), %d train / %d validation bytes, sha256 %s", corpus.files,
                corpus.root, corpus.val_files, corpus.train.numel(), corpus.val.numel(), corpus.digest[:12])

    torch.manual_seed(conf["seed"])
    model = ByteGPT(conf["n_layer"], conf["n_head"], conf["d_model"], conf["seq_len"])
    n_params = sum(p.numel() for p in model.parameters())
    runner = RUNNERS[conf["optimizer"]](conf, env, model)
    logger.info("model: %d parameters in %d tensors; optimizer %s, dtype %s", n_params,
                len(list(model.parameters())), conf["optimizer"], conf["dtype"])

    # Before loading: a checkpoint restores the scheduled (not the peak) learning rate.
    base_lrs = [g["lr"] for g in runner.param_groups]
    start = load_checkpoint(runner, conf) if conf["resume"] else 0
    if env.rank == 0:
        _atomic_json(os.path.join(out, "run.json"), {
            "config": conf, "world_size": env.world_size, "launcher": env.launcher, "device": str(env.device),
            "torch": torch.__version__, "parameters": n_params, "data_sha256": corpus.digest,
            "data_files": corpus.files, "train_bytes": corpus.train.numel(), "val_bytes": corpus.val.numel(),
            "resumed_from_step": start})
    metrics = _open_metrics(metrics_path, start) if env.rank == 0 else None

    steps, B, T = conf["steps"], conf["batch_size"], conf["seq_len"]
    tokens_per_step = B * T * env.world_size
    bar = None
    if env.rank == 0 and conf["progress"]:
        from tqdm import tqdm
        bar = tqdm(total=steps, initial=start, desc="train", dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
    loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
    n_since, t_mark = 0, time.perf_counter()
    last: Dict[str, Any] = {}
    last_step = min(steps, conf["stop_after"]) if conf["stop_after"] else steps
    for step in range(start, last_step):
        factor = lr_factor(step, steps, conf["warmup_steps"], conf["schedule"], conf["min_lr_ratio"])
        for g, base in zip(runner.param_groups, base_lrs):
            g["lr"] = base * factor
        x, y = train_batch(corpus, conf["seed"], step, env.rank, env.world_size, B, T)
        loss = runner.train_step(x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True))
        loss_sum += loss.double()
        n_since += 1
        done = step + 1
        do_eval = done % conf["eval_every"] == 0 or done == steps
        if done % conf["log_every"] == 0 or do_eval or done == last_step:
            if env.device.type == "cuda":
                torch.cuda.synchronize()
            step_time = (time.perf_counter() - t_mark) / n_since
            row = {"step": done, "train_loss": _mean_over_ranks(loss_sum / n_since, env),
                   "lr": runner.param_groups[0]["lr"], "grad_norm": runner.grad_norm(),
                   "step_time_s": step_time, "tokens_per_s": tokens_per_step / step_time,
                   "opt_state_bytes": _gather_ints(runner.state_bytes(), env)}
            if do_eval:
                row["val_loss"] = evaluate(runner, corpus, conf, env)
            row["elapsed_s"] = time.perf_counter() - t_start
            last.update(row)
            if metrics is not None:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            msg = (f"step {done}/{steps} loss {row['train_loss']:.4f} lr {row['lr']:.3g} "
                   f"grad_norm {row['grad_norm']:.3g} {row['tokens_per_s']:.0f} tok/s")
            if "val_loss" in row:
                msg += f" val_loss {row['val_loss']:.4f}"
            if bar is not None:
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
            logger.info(msg)
            loss_sum.zero_()
            n_since = 0
        ckpt_now = conf["checkpoint_dir"] and (done == last_step or (conf["checkpoint_every"]
                                                                  and done % conf["checkpoint_every"] == 0))
        if ckpt_now:
            save_checkpoint(runner, conf, env, done)
        if bar is not None:
            bar.update(1)
        if n_since == 0:
            t_mark = time.perf_counter()
    if bar is not None:
        bar.close()

    if conf["save_model"] and env.rank == 0:  # every rank holds the whole model
        state = {name: p.detach().float().cpu().clone() for name, p in runner.named_parameters()}
        if os.path.dirname(conf["save_model"]):
            os.makedirs(os.path.dirname(conf["save_model"]), exist_ok=True)
        torch.save(state, conf["save_model"])
        logger.info("model parameters: %s", conf["save_model"])
    if env.rank == 0:
        metrics.close()
        from launch.plot import plot_runs, read_metrics

        plot_runs(plot_path, [(f"{conf['optimizer']} ({conf['dtype']})", read_metrics(metrics_path))],
                  title=f"{conf['config_name']}: {env.world_size} rank(s), {last_step} of {steps} steps")
        wall = time.perf_counter() - t_start
        logger.info("done in %.1f s: final train loss %s, val loss %s", wall,
                    f"{last['train_loss']:.4f}" if "train_loss" in last else "n/a",
                    f"{last['val_loss']:.4f}" if "val_loss" in last else "n/a")
        logger.info("metrics: %s", os.path.abspath(metrics_path))
        logger.info("plot: %s", os.path.abspath(plot_path))
    # Tear down together: a gloo rank that leaves while another still works can abort.
    dist.barrier()
    return last


def main(argv: Optional[List[str]] = None) -> int:
    conf = cfg.parse(argv)
    env = init_distributed()
    setup_logging(env.rank)
    try:
        run(conf, env)
    except cfg.ConfigError as e:
        logger.error("error: %s", e)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
