"""Run a function on N gloo ranks in forked processes, with a hard deadline.

Ranks rendezvous through a ``file://`` store in a temporary directory (no ports).
A rank's exception is re-raised in the test with that rank's traceback; a world
that does not finish by the deadline is killed and fails the test instead of
hanging CI.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import tempfile
import time
import traceback
from typing import Any, Callable, List

import torch
import torch.distributed as dist

__all__ = ["run_world", "shared_world", "RankError"]


class RankError(AssertionError):
    pass


def _child(fn, rank, world_size, init_file, result_file, collective_timeout, args):
    # A forked child hangs in its first multi-threaded op if the parent used the
    # OpenMP pool; one thread per rank avoids that (and oversubscribing 2 cores).
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=collective_timeout))
        try:
            out = ("ok", fn(rank, world_size, *args))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        out = ("error", traceback.format_exc())
    with open(result_file + ".tmp", "wb") as f:
        pickle.dump(out, f)
    os.replace(result_file + ".tmp", result_file)
    os._exit(0)


def _failed(result_file: str) -> bool:
    if not os.path.exists(result_file):
        return True
    with open(result_file, "rb") as f:
        return pickle.load(f)[0] == "error"


def run_world(fn: Callable[..., Any], world_size: int, *args, timeout: float = 180.0,
              collective_timeout: float = 60.0) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return every rank's result."""
    ctx = mp.get_context("fork")
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rdzv")
        results = [os.path.join(tmp, f"rank{r}.pkl") for r in range(world_size)]
        procs = [ctx.Process(target=_child, args=(fn, r, world_size, init_file, results[r], collective_timeout,
                                                  args), daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(p.is_alive() for p in procs):
            if any(not p.is_alive() and _failed(f) for p, f in zip(procs, results)):
                # The others are likely blocked in a collective with the failed rank.
                deadline = min(deadline, time.monotonic() + 5.0)
            time.sleep(0.05)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        outs = []
        for r in range(world_size):
            if not os.path.exists(results[r]):
                outs.append(("error", f"rank {r} produced no result (exit code {procs[r].exitcode})"))
                continue
            with open(results[r], "rb") as f:
                outs.append(pickle.load(f))
        errors = [(r, o[1]) for r, o in enumerate(outs) if o[0] == "error"]
        if errors:
            r, tb = errors[0]
            raise RankError(f"rank {r} of {world_size} failed:\n{tb}")
        if hung:
            raise RankError(f"ranks {hung} of {world_size} did not finish within {timeout} s")
        return [o[1] for o in outs]


_SHARED = {}


def shared_world(fn: Callable[..., Any], world_size: int, *args, **kwargs) -> List[Any]:
    """:func:`run_world` once per distinct call; every later call gets the same results.

    Many tests read one world's results (start-up dominates on 2 cores). A failed
    world is not re-run: each test that asks for it re-raises the same error.
    """
    key = (fn, world_size, args, tuple(sorted(kwargs.items())))
    if key not in _SHARED:
        try:
            _SHARED[key] = (run_world(fn, world_size, *args, **kwargs), None)
        except RankError as e:
            _SHARED[key] = (None, e)
    results, error = _SHARED[key]
    if error is not None:
        raise error
    return results
