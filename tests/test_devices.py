"""Collectives chosen by the backend that serves the tensors' device.

A process group made without a backend, or with one per device type
(``"cpu:gloo,cuda:nccl"``), answers ``dist.get_backend`` with ``"undefined"`` or that
whole string, never ``"nccl"``: deciding by it picked the gloo method (an all-reduce
per bucket and one broadcast per owner) on NCCL. ``pick_method`` now asks which
backend serves the device of the parameters. Real gloo groups where they exist here;
the NCCL configurations, which need CUDA, through ``get_backend_config``'s string.
(The kernels' device guard is tested in tests/test_kernels.py.)
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from sharded_novograd import ShardedNovoGrad
from sharded_novograd import collectives as C

from .distributed import run_world


def _real_groups(rank, world):
    out = {"world": (dist.get_backend_config(), C.pick_method("auto", dist.group.WORLD, "cpu"),
                     C.pick_method("auto", dist.group.WORLD, torch.device("cuda", 0)),
                     C.pick_method("auto", dist.group.WORLD))}
    cpu_only = dist.new_group([0, 1], backend="cpu:gloo")
    out["cpu_only"] = (dist.get_backend_config(cpu_only), C.pick_method("auto", cpu_only, "cpu"))
    try:
        C.pick_method("auto", cpu_only, "cuda")
    except RuntimeError as e:
        out["cpu_only_cuda_error"] = str(e)
    asked, real = [], C.pick_method
    C.pick_method = lambda method, group, device=None: asked.append(device) or real(method, group, device)
    try:
        opt = ShardedNovoGrad([torch.nn.Parameter(torch.ones(5))], process_group=cpu_only)
    finally:
        C.pick_method = real
    out["optimizer"] = (opt.method, asked)
    return out


def test_pick_method_on_real_gloo_groups():
    """Check, on 2 gloo ranks, that CPU and CUDA tensors of a gloo group take the gloo method,
    that a group with only a CPU backend refuses CUDA tensors with an error naming its
    backends, and that ShardedNovoGrad decides by its parameters' device."""
    for out in run_world(_real_groups, 2, timeout=120):
        assert out["world"] == ("cpu:gloo,cuda:gloo", "all_reduce", "all_reduce", "all_reduce")
        assert out["cpu_only"] == ("cpu:gloo", "all_reduce")
        assert "no backend for cuda tensors (its backends: cpu:gloo)" in out["cpu_only_cuda_error"]
        assert out["optimizer"] == ("all_reduce", [torch.device("cpu")])


# get_backend's answer, get_backend_config's answer, device -> method
CONFIGS = [
    ("undefined", "cpu:gloo,cuda:nccl", "cuda", "reduce_scatter"),  # init_process_group() on a GPU machine
    ("undefined", "cpu:gloo,cuda:nccl", "cpu", "all_reduce"),
    ("cpu:gloo,cuda:nccl", "cpu:gloo,cuda:nccl", torch.device("cuda", 3), "reduce_scatter"),
    ("nccl", "cuda:nccl", "cuda", "reduce_scatter"),
    ("gloo", "cpu:gloo,cuda:gloo", "cuda", "all_reduce"),
    ("mpi", "mpi", "cuda", "all_reduce"),  # one backend for every device
]


@pytest.mark.parametrize("reported,config,device,method", CONFIGS)
def test_pick_method_by_the_backend_serving_the_device(monkeypatch, reported, config, device, method):
    """Check that "auto" follows the backend serving the device, whatever get_backend reports."""
    monkeypatch.setattr(dist, "get_backend", lambda group=None: reported)
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: config)
    assert C.pick_method("auto", object(), device) == method
    assert C.pick_method("all_reduce", object(), device) == "all_reduce"  # explicit choices stay


def test_pick_method_refuses_a_device_no_backend_serves(monkeypatch):
    """Check that CPU tensors on an NCCL-only group raise naming the group's backends, and
    that an unknown method raises a ValueError."""
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cuda:nccl")
    with pytest.raises(RuntimeError, match=r"no backend for cpu tensors \(its backends: cuda:nccl\)"):
        C.pick_method("auto", object(), "cpu")
    with pytest.raises(RuntimeError, match="no backend for cpu"):
        C.pick_method("reduce_scatter", object(), "cpu")
    with pytest.raises(ValueError, match="Invalid collective method: 'ring'"):
        C.pick_method("ring", object(), "cpu")
