"""ZeRO-2 under backwards whose graph changes: layers skipped per rank and per step
(stochastic depth, routing), and backwards nested in backwards (reentrant activation
checkpointing).

Each scenario is compared with the single-process reference NovoGrad fed the mean of
every rank's gradient, in float64 (tolerance 1e-10 relative: summation order only).
Guards against: a layer skipped on one rank held back every bucket after it there, so
that rank buffered nearly the whole model's gradients; a checkpointed (reentrant) last
block ended the optimizer's backward early, and every later gradient raised "two
backwards ran before step()".
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from sharded_novograd import NovoGrad, ShardedNovoGrad

from .cases import close_ratio
from .distributed import shared_world

WIDTH, DEPTH, BUCKET = 32, 8, 128  # 1,056 elements per block, 8 buckets and more each


def _blocks(seed=0):
    torch.manual_seed(seed)
    return torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH).double() for _ in range(DEPTH))


def _forward(blocks, x, skip=(), reentrant=()):
    for i, blk in enumerate(blocks):
        if i in skip:
            continue
        if i in reentrant:
            x = checkpoint(lambda t, blk=blk: torch.tanh(blk(t)), x, use_reentrant=True)
        else:
            x = torch.tanh(blk(x))
    return x.square().mean()


def _batch(rank, step):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, WIDTH, dtype=torch.float64, generator=g).requires_grad_()


def _pair(**kwargs):
    """The model under ShardedNovoGrad, and an identical copy under the reference NovoGrad."""
    model, ref_model = _blocks(), _blocks()
    return (model, ShardedNovoGrad(model.parameters(), lr=0.01, bucket_size=BUCKET, **kwargs),
            ref_model, NovoGrad(ref_model.parameters(), lr=0.01))


def _reference_step(ref_model, ref, world, micro_batches):
    """One reference step fed the mean of every rank's gradient; ``micro_batches(r)``
    lists rank r's micro-batches as (batch step, skipped blocks)."""
    for r in range(world):
        for b, skip in micro_batches(r):
            (_forward(ref_model, _batch(r, b), skip) / world).backward()
    ref.step()
    ref.zero_grad()


def _error(model, ref_model):
    return max(close_ratio(p, q, 1e-10, 1e-12) for p, q in zip(model.parameters(), ref_model.parameters()))


def _run(rank, world, plan, steps=5, **kwargs):
    """``plan(step, rank) -> (skip, reentrant)``. Returns the error against the reference,
    the peak buffered gradient elements per step, and whether every bucket left during
    backward."""
    model, opt, ref_model, ref = _pair(**kwargs)
    peaks, all_sent = [], []
    for step in range(steps):
        skip, reentrant = plan(step, rank)
        _forward(model, _batch(rank, step), skip, reentrant).backward()
        bk = opt._buckets
        peaks.append(bk.peak_elements)
        all_sent.append(bk.pos == len(bk.order))
        opt.step()
        opt.zero_grad()
        _reference_step(ref_model, ref, world, lambda r: [(step, plan(step, r)[0])])
    return {"err": _error(model, ref_model), "peaks": peaks, "all_sent": all_sent, "shard": opt.layout.shard_size}


def _skips(step, rank):
    # Each step a different block is skipped, on some ranks only, mostly late blocks
    # (the first that backward reaches), which used to hold back the most buckets.
    pattern = [(), (DEPTH - 1,), (DEPTH - 2, 3), (), (DEPTH - 1, 1)]
    return (pattern[(step + rank) % len(pattern)], ())


def checkpointing_turned_on(rank, world):
    """Steps 0-1 plain, then block 3 inside a reentrant checkpoint: at step 2 the outer
    backward's engine does not see block 3, its buckets leave without it, and then the
    nested backward reaches it. Every rank raises, nothing changes, and the next steps
    (which wait for block 3) are exact."""
    model, opt, ref_model, ref = _pair()
    out = {"error": None}
    for step in range(5):
        reentrant = (3,) if step >= 2 else ()
        _forward(model, _batch(rank, step), (), reentrant).backward()
        if step == 2:
            before = [p.detach().clone() for p in model.parameters()]
            try:
                opt.step()
            except RuntimeError as e:
                out["error"] = str(e)
            out["unchanged"] = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
            opt.zero_grad()
            continue
        opt.step()
        opt.zero_grad()
        _reference_step(ref_model, ref, world, lambda r: [(step, ())])
    out["err"] = _error(model, ref_model)
    return out


def conditional_micro_batches(rank, world, context, last=lambda step: {"skip": (2,)}):
    """Two micro-batches, the first inside ``context`` (no_sync or accumulate); by
    default block 2 (a conditional branch, an expert) is used by the first only: the
    last backward does not reach it, and what the first left must still be reduced.
    ``last(step)`` gives the last micro-batch's ``skip`` and ``reentrant`` blocks."""
    model, opt, ref_model, ref = _pair()
    for step in range(4):
        with getattr(opt, context)():
            _forward(model, _batch(rank, 10 * step)).backward()
        _forward(model, _batch(rank, 10 * step + 1), **last(step)).backward()
        opt.step()
        opt.zero_grad()
        _reference_step(ref_model, ref, world, lambda r: [(10 * step, ()), (10 * step + 1, last(step).get("skip", ()))])
    return _error(model, ref_model)


def frozen_later(rank, world):
    """Block 5 frozen (requires_grad=False) from step 2 on, as fine-tuning recipes do:
    it is no longer reachable, holds back nothing, and stays as it was."""
    model, opt, ref_model, ref = _pair()
    peaks = []
    for step in range(5):
        if step == 2:
            for m in (model, ref_model):
                m[5].requires_grad_(False)
            frozen = [p.detach().clone() for p in model[5].parameters()]
        _forward(model, _batch(rank, step)).backward()
        peaks.append(opt._buckets.peak_elements)
        opt.step()
        opt.zero_grad()
        _reference_step(ref_model, ref, world, lambda r: [(step, ())])
    kept = all(torch.equal(a, p) for a, p in zip(frozen, model[5].parameters()))
    return {"err": _error(model, ref_model), "peaks": peaks, "kept": kept}


def replaced_by_another_optimizer(rank, world):
    """``del opt`` after some ZeRO-2 steps, then torch's SGD on the same model: the
    ShardedNovoGrad must be gone at once (no reference cycle left for the garbage
    collector), or its gradient hooks would keep taking .grad away from SGD."""
    import gc
    import weakref

    model = _blocks()
    opt = ShardedNovoGrad(model.parameters(), lr=0.01, bucket_size=BUCKET)
    for step in range(2):
        _forward(model, _batch(rank, step)).backward()
        opt.step()
        opt.zero_grad()
    gc.disable()
    try:
        alive = weakref.ref(opt)
        del opt
        freed = alive() is None
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        _forward(model, _batch(rank, 9)).backward()
        grads = all(p.grad is not None for p in model.parameters())
        sgd.step()
    finally:
        gc.enable()
    return {"freed": freed, "grads": grads}


def scenarios(rank, world):
    return {
        "skipped": _run(rank, world, _skips),
        "reentrant_last": _run(rank, world, lambda s, r: ((), (DEPTH - 1,))),
        "reentrant_all": _run(rank, world, lambda s, r: ((), tuple(range(DEPTH)))),
        "skipped_and_reentrant": _run(rank, world, lambda s, r: (_skips(s, r)[0], (2, 5))),
        # The last block checkpointed from step 2 on: the first hook of the backward runs
        # inside the nested backward, which must not be taken for the whole one.
        "reentrant_last_later": _run(rank, world, lambda s, r: ((), (DEPTH - 1,) if s >= 2 else ())),
        "turned_on": checkpointing_turned_on(rank, world),
        # Buckets live from the first backward, which meets the nested backward first.
        "own_from_the_start": _run(rank, world, lambda s, r: ((), (2, 5)), grads_averaged=False),
        # A checkpointed block skipped on rank 0 before its first use there (LayerDrop):
        # never reached by an outermost backward, so never taken for unreached.
        "dropped_before_first_use": _run(rank, world, lambda s, r: ((3,) if s < 2 and r == 0 else (), (3,))),
        "no_sync_conditional": conditional_micro_batches(rank, world, "no_sync"),
        "accumulate_conditional": conditional_micro_batches(rank, world, "accumulate"),
        # From step 2 the last micro-batch checkpoints block 2 (reentrant): the outer
        # backward does not see it, and its no_sync .grad must wait for the nested one.
        "no_sync_then_checkpointed": conditional_micro_batches(
            rank, world, "no_sync", lambda step: {"reentrant": (2,) if step >= 2 else ()}),
        "frozen_later": frozen_later(rank, world),
        "replaced": replaced_by_another_optimizer(rank, world),
    }


def results(world):
    return shared_world(scenarios, world, timeout=240.0, collective_timeout=30.0)


def _exact_with_every_bucket_sent_in_backward(world, name):
    for r in results(world):
        o = r[name]
        assert o["err"] <= 1.0, o
        assert all(o["all_sent"][1:]), o  # after the first step, which only watches


@pytest.mark.parametrize("world", [2, 3])
def test_layers_skipped_on_some_ranks_hold_back_no_bucket(world):
    """Check that blocks skipped on some ranks, a different one each step, leave the result
    exact and keep every rank's buffered gradients to a few buckets (the shard is
    thousands of elements; the old order buffered most of it on the skipping rank)."""
    for r in results(world):
        o = r["skipped"]
        assert o["err"] <= 1.0, o
        assert all(o["all_sent"][1:]), o
        assert max(o["peaks"][1:]) <= 6 * BUCKET < o["shard"], o


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", ["reentrant_last", "reentrant_all", "reentrant_last_later"])
def test_reentrant_checkpointing_of_the_last_blocks(world, name):
    """Check that a backward nested in the outer one (reentrant checkpointing of the last
    block, or of every block) neither ends the optimizer's backward early nor loses
    exactness: every bucket still leaves during backward."""
    _exact_with_every_bucket_sent_in_backward(world, name)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", ["own_from_the_start", "dropped_before_first_use"])
def test_reentrant_blocks_met_before_the_optimizer_saw_them(world, name):
    """Check that a nested backward is not mistaken for an unreached layer when the
    optimizer has not yet seen that block reached: with buckets live from the first
    backward (grads_averaged=False), and for a checkpointed block skipped on one rank
    before its first use there."""
    _exact_with_every_bucket_sent_in_backward(world, name)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", ["no_sync_conditional", "accumulate_conditional", "no_sync_then_checkpointed"])
def test_layer_used_only_by_earlier_micro_batches(world, name):
    """Check that a block used by the first micro-batch only (no_sync or accumulate) is
    reduced with the rest, and that one the last micro-batch reaches only through a
    reentrant checkpoint gets both micro-batches' gradients."""
    for r in results(world):
        assert r[name] <= 1.0, r[name]


@pytest.mark.parametrize("world", [2, 3])
def test_skipped_layers_with_reentrant_checkpointing(world):
    """Check that layers reached only by a nested backward are never taken for skipped ones
    (the outer backward's engine does not see them) while skipped blocks still are."""
    _exact_with_every_bucket_sent_in_backward(world, "skipped_and_reentrant")


@pytest.mark.parametrize("world", [2, 3])
def test_layer_first_reached_by_a_nested_backward_raises_everywhere(world):
    """Check that a block reached for the first time through a nested backward, after its
    bucket left without it, makes every rank raise with nothing changed (the layer is
    named on the rank that saw it), and that the following steps are exact."""
    for rank, r in enumerate(results(world)):
        o = r["turned_on"]
        assert o["error"].startswith(f"rank {rank}: layer 6 received a gradient in a backward that, when it "
                                     "started, was not going to reach it"), o
        assert "use_reentrant=False" in o["error"] and o["unchanged"], o
        assert o["err"] <= 1.0, o


@pytest.mark.parametrize("world", [2, 3])
def test_block_frozen_during_training(world):
    """Check that a block frozen after the optimizer was built stays unchanged, holds back
    no bucket, and leaves the rest exact."""
    for r in results(world):
        o = r["frozen_later"]
        assert o["err"] <= 1.0 and o["kept"], o
        assert max(o["peaks"][1:]) <= 6 * BUCKET, o


@pytest.mark.parametrize("world", [2])
def test_deleted_optimizer_lets_go_of_the_gradients(world):
    """Check that a deleted ShardedNovoGrad is freed at once and its hooks no longer take
    the gradients that the next optimizer needs."""
    for r in results(world):
        assert r["replaced"] == {"freed": True, "grads": True}, r["replaced"]
