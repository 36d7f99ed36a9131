"""The step engine: per-layer statistics made global with ONE collective, and every
decision a step takes from them.

Every front end (``ShardedNovoGrad``'s flat shard, DeepSpeed's partitions, DTensor
local shards) computes, over the elements it holds, per-layer partial sums of squares
(and max-abs for ``norm_type=inf``), which layers have a gradient, and how many
elements are not finite. :meth:`StepEngine.reduce` packs them with this rank's error
(if any), a digest of the settings that must agree across ranks and GradScaler's inf
flag into one float64 vector and reduces it in one collective (an all-reduce; an
all-gather for ``norm_type=inf``, whose MAX cannot share a SUM). Every rank then holds
the same bits and takes the same decision:

- some rank had a problem (a bad gradient, an invalid hyperparameter): every rank
  raises, nothing changed;
- the ranks' settings differ: every rank raises, naming them;
- an element is not finite, GradScaler found an inf, or a layer's reduced sum of
  squares overflows the state dtype (finite on each rank, not in total): the step is
  skipped on every rank, at every world size alike;
- otherwise the clip factor comes from the global norm (computed in float64, so a
  total over many finite layers cannot overflow), and :func:`plan_update` turns the
  statistics into the new per-layer state and the elementwise coefficients.

The engine knows nothing of DeepSpeed, FSDP or DDP: a front end says which layers its
elements belong to, which group to reduce over, and how many ranks of that group hold
each element (its replication factor).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from . import collectives as C
from . import functional as F

__all__ = ["StepEngine", "Reduced", "plan_update", "settings_digest", "hyper_text", "stats_length", "DIGEST_COMPONENTS"]

# The digest travels as 8 one-byte components c. Over n ranks, sum(c) and sum(c*c)
# are exact in float64 and all ranks hold the same c iff n * sum(c*c) == sum(c)**2
# (Cauchy-Schwarz), exactly representable for n <= 2**18 ranks.
DIGEST_COMPONENTS = 8
_DISCARD = float(2 ** 26)  # more ranks than this could not tell problems from discards


def stats_length(num_layers: int, extra: int = 0) -> int:
    """Float64 values in the step's one all-reduce (norm_type=2): per-layer sums of squares
    and has-gradient counts, the non-finite count, GradScaler's flag, the problem flag,
    the digest's components and their squares, and ``extra`` values of the front end's
    (ZeRO-2: the arrival order of its L layers)."""
    return 2 * num_layers + 3 + 2 * DIGEST_COMPONENTS + extra


def settings_digest(text: str) -> bytes:
    """The bytes folded into the step's collective for ``text`` (settings that must agree)."""
    return hashlib.sha256(text.encode()).digest()[:DIGEST_COMPONENTS]


@dataclass
class Reduced:
    """The global statistics of one step, identical on every rank.

    Attributes:
        sumsq: float64 ``[L]`` per-layer sums of squares of the (unscaled) gradient.
        stat: float64 ``[L]`` the statistic NovoGrad uses: ``sumsq`` (L2) or max-abs (inf).
        has_grad: bool ``[L]``, layers with a gradient on some rank.
        skip: the step must be skipped (non-finite values, GradScaler's inf, overflow).
        reason: why it is skipped, for the log.
        total_norm: float64 0-dim, L2 norm of the whole (unscaled) gradient.
        extra: the front end's extra values, summed over the ranks, as a list (or None).
        holders: float64 ``[L]``, the number of ranks that hold a gradient for the layer,
            divided by its replication factor (a front end checks it is all or none).
    """

    sumsq: torch.Tensor
    stat: torch.Tensor
    has_grad: torch.Tensor
    skip: bool
    reason: str
    total_norm: torch.Tensor
    holders: Optional[torch.Tensor] = None
    extra: Optional[list] = None


class StepEngine:
    """Reduces a step's per-layer statistics over ``group`` in one collective.

    Args:
        num_layers: L, the number of layers (the same on every rank).
        group: the process group to reduce over (every rank holding a part of a layer).
        comm_device: the device the group's backend serves (CPU for gloo, CUDA for NCCL).
        norm_type: 2 or ``math.inf``.
        state_dtype: the dtype the second moments live in; a reduced sum of squares that
            does not fit it skips the step (default: torch.float32)
    """

    def __init__(self, num_layers: int, group, comm_device, *, norm_type: float,
                 state_dtype: torch.dtype = torch.float32):
        self.num_layers = int(num_layers)
        self.group = group
        self.comm_device = torch.device(comm_device)
        self.norm_type = 2 if norm_type == 2 else math.inf
        self.state_max = torch.finfo(state_dtype).max
        self.world_size = C.group_size(group)
        self.rank = C.group_rank(group)

    def _to_device(self, values) -> torch.Tensor:
        """The step's host-side values on the communication device in ONE copy; on CUDA
        from pinned memory without waiting (the step's one host sync is the decision).
        The staging buffer is reused: the previous step's decision already waited for it."""
        host = torch.tensor(values, dtype=torch.float64)
        if self.comm_device.type == "cpu":
            return host
        if getattr(self, "_stage", None) is None or self._stage.numel() != host.numel():
            self._stage = torch.empty(host.numel(), dtype=torch.float64, pin_memory=True)
        self._stage.copy_(host)
        return self._stage.to(self.comm_device, non_blocking=True)

    def reduce(self, sumsq: torch.Tensor, has_grad: torch.Tensor, nonfinite, *,
               maxabs: Optional[torch.Tensor] = None, replication: Optional[torch.Tensor] = None,
               problem: Optional[str] = None, digest: bytes = b"", found_inf=None, inv_scale=None,
               discard: bool = False, extra: Optional[torch.Tensor] = None) -> Optional[Reduced]:
        """Make this rank's partial statistics global. This needs to be called on all ranks.

        Args:
            sumsq: ``[L]`` partial sums of squares over this rank's elements.
            has_grad: ``[L]`` 1 where this rank holds a gradient for the layer.
            nonfinite: number (or 0-dim tensor) of non-finite gradient elements here.
            maxabs: ``[L]`` partial max-abs, required for ``norm_type=inf`` (default: None)
            replication: ``[L]`` how many ranks of the group hold each element; the sums
                are divided by it (default: None, every element held once)
            problem: this rank's error, or None; if any rank has one, every rank raises
                (default: None)
            digest: bytes that must be equal on every rank (default: b"")
            found_inf: GradScaler's inf flag on this rank, or None (default: None)
            inv_scale: 1 / loss scale: the gradients are scaled by its inverse; the
                statistics are unscaled here (default: None)
            discard: this rank drops the step's gradients instead of stepping (a
                ``zero_grad()`` after backward). If every rank does, returns None; if only
                some do, every rank raises instead of pairing the steppers' collectives
                with the others' next ones (default: False)
            extra: values summed over the ranks in the same collective and returned as
                ``Reduced.extra`` (default: None)

        Raises:
            RuntimeError: on every rank, when a rank had a problem, the digests differ, or
                no layer has a gradient anywhere. Nothing was changed.
        """
        L, dev, f64 = self.num_layers, self.comm_device, torch.float64
        if len(digest) > DIGEST_COMPONENTS:
            raise ValueError(f"digest of {len(digest)} bytes, at most {DIGEST_COMPONENTS}")
        comps = list(digest.ljust(DIGEST_COMPONENTS, b"\0"))
        # Problems count in units, discards in units of _DISCARD: both exact in float64.
        flag = (0.0 if problem is None else 1.0) + (_DISCARD if discard else 0.0)
        host = [flag] + [float(c) for c in comps] + [float(c * c) for c in comps]
        if found_inf is None or not isinstance(found_inf, torch.Tensor):
            host.append(0.0 if found_inf is None else float(found_inf))
            found = None
        else:
            found = found_inf.to(dev, f64).reshape(1)
        on_host = not isinstance(has_grad, torch.Tensor) or has_grad.device.type == "cpu"
        if on_host:
            host = [float(h) for h in (has_grad.tolist() if isinstance(has_grad, torch.Tensor) else has_grad)] + host
        extra_on_host = extra is not None and (not isinstance(extra, torch.Tensor) or extra.device.type == "cpu")
        n_extra = 0
        if extra_on_host:
            values = extra.reshape(-1).tolist() if isinstance(extra, torch.Tensor) else list(extra)
            n_extra = len(values)
            host = host + [float(x) for x in values]
        small = self._to_device(host)
        if extra_on_host:
            extra, small = small[len(small) - n_extra:], small[:len(small) - n_extra]
        has_part = small[:L] if on_host else has_grad.to(dev, f64).reshape(L)
        small = small[L:] if on_host else small
        D = DIGEST_COMPONENTS
        flags, comps1, comps2 = small[:1], small[1:1 + D], small[1 + D:1 + 2 * D]
        found = small[1 + 2 * D:2 + 2 * D] if found is None else found
        parts = [sumsq.to(dev, f64).reshape(L), has_part]
        inf_norm = self.norm_type != 2
        if inf_norm:
            if maxabs is None:
                raise ValueError("norm_type=inf needs the per-layer max-abs")
            parts.append(maxabs.to(dev, f64).reshape(L))
        nonfinite = torch.as_tensor(nonfinite, dtype=f64).to(dev).reshape(1)
        parts += [nonfinite, found, flags, comps1, comps2]
        if extra is not None:
            parts.append(extra.to(dev, f64).reshape(-1))
        vec = torch.cat(parts)
        if inf_norm:
            every = C.all_gather_stats(vec, self.group)
            total = every.sum(0)
            vec = torch.cat([total[:2 * L], every[:, 2 * L:3 * L].amax(0), total[3 * L:]])
        else:
            C.all_reduce_stats(vec, self.group)
        k = 3 * L if inf_norm else 2 * L
        sums, counts = vec[:L], vec[L:2 * L]
        nonfinite, found, bad = vec[k], vec[k + 1], vec[k + 2]
        s1 = vec[k + 3:k + 3 + DIGEST_COMPONENTS]
        s2 = vec[k + 3 + DIGEST_COMPONENTS:k + 3 + 2 * DIGEST_COMPONENTS]
        summed_extra = vec[k + 3 + 2 * DIGEST_COMPONENTS:] if extra is not None else None
        disagree = (s2 * self.world_size != s1.square()).any()
        if replication is not None:
            rep = replication.to(dev, f64)
            sums, counts = sums / rep, counts / rep
        has = counts > 0
        if inv_scale is not None:
            inv = torch.as_tensor(inv_scale, dtype=f64).to(dev)
            sums = sums * inv * inv
        stat = sums
        if inf_norm:
            stat = vec[2 * L:3 * L]
            if inv_scale is not None:
                stat = stat * inv
        sums = torch.where(has, sums, torch.zeros_like(sums))
        overflow = (has & ~(sums <= self.state_max)).any() if not inf_norm else torch.zeros((), dtype=torch.bool)
        total = sums.sum().sqrt()
        # The step's one host sync: every decision below is taken from these values.
        decided = torch.stack([bad, disagree.to(f64), nonfinite, found, overflow.to(dev, f64), has.any().to(f64)])
        if summed_extra is not None:
            decided = torch.cat([decided, summed_extra])
        decided = decided.tolist()
        bad, disagree, nonfinite, found, overflow, any_grad = decided[:6]
        summed_extra = decided[6:] if summed_extra is not None else None
        discards, bad = divmod(int(bad), int(_DISCARD))
        if discards == self.world_size:
            return None
        if discards:
            raise RuntimeError(f"{discards} of {self.world_size} ranks called zero_grad() after backward without "
                               f"step(), the others called step(){' (this rank: zero_grad)' if discard else ''}: "
                               "after a backward, every rank must call step(), or every rank zero_grad(); "
                               "nothing was changed on any rank")
        if bad:
            raise RuntimeError(f"rank {self.rank}: {problem}; nothing was changed on any rank" if problem
                               else "a problem on another rank (see its error); nothing was changed on any rank")
        if disagree:
            raise RuntimeError("optimizer settings differ across ranks (learning rate, betas, eps, weight_decay, "
                               "flags, max_grad_norm or bucket_size): every rank must use the same values at "
                               "every step; nothing was changed on any rank")
        if not any_grad:
            raise RuntimeError("step() called but no parameter has a gradient on any rank: "
                               "call backward() before step()")
        reason = ("non-finite gradient" if nonfinite else "GradScaler found an inf or NaN" if found
                  else "a layer's summed squared gradient overflows" if overflow else "")
        return Reduced(sumsq=sums, stat=stat, has_grad=has, skip=bool(reason), reason=reason, total_norm=total,
                       holders=counts, extra=summed_extra)


def plan_update(red: Reduced, v: torch.Tensor, v_max: torch.Tensor, t: torch.Tensor, hyper: F.LayerHyper, *,
                norm_type: float, max_grad_norm: Optional[float] = None, inv_scale=None) -> torch.Tensor:
    """The per-layer part of a step (not skipped): updates ``v``, ``v_max``, ``t`` in place
    and returns the ``[L, NUM_COEFFS]`` elementwise coefficients, on ``v``'s device and dtype.

    ``inv_scale`` (1 / loss scale) goes into the coefficients' gradient multiplier, so the
    elementwise kernel unscales as it reads. Clipping scales the gradient by
    ``max_grad_norm / (total_norm + 1e-6)`` when that is below 1, as torch's
    ``clip_grad_norm_`` does.
    """
    dtype, device = v.dtype, v.device
    stat = red.stat
    clip = torch.ones((), dtype=torch.float64, device=stat.device)
    if max_grad_norm is not None:
        clip = (max_grad_norm / (red.total_norm + 1e-6)).clamp(max=1.0)
        stat = stat * (clip * clip if norm_type == 2 else clip)
    gscale = clip if inv_scale is None else clip * torch.as_tensor(inv_scale, dtype=torch.float64).to(clip.device)
    v_new, v_max_new, t_new, coeffs = F.layer_update(
        stat.to(device, dtype), red.has_grad.to(device), v, v_max, t, hyper,
        norm_type=2 if norm_type == 2 else math.inf, gscale=gscale.to(device, dtype))
    # In place, so a state_dict() taken earlier stays one consistent (live) view.
    v.copy_(v_new)
    v_max.copy_(v_max_new)
    t.copy_(t_new)
    return coeffs


def hyper_text(groups: Sequence[dict], keys: Sequence[str], extra: str = "") -> str:
    """The text of the settings that must agree across ranks (see :func:`settings_digest`)."""
    rows = [";".join(f"{k}={float(g[k]) if k == 'lr' else g[k]!r}" for k in keys) for g in groups]
    return "\n".join(rows + [extra])
