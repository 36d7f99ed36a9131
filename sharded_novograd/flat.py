"""Flat parameter storage for ShardedNovoGrad, and re-adoption of moved parameters.

The trainable parameters become views of one flat buffer laid out by
:class:`~sharded_novograd.layout.ShardLayout`; this rank's shard of it is what the
fused update writes, and the gather fills in the rest. Training stacks move or replace
parameters after the optimizer exists (``model.to(device)`` makes new storage,
``p.data = ...`` replaces it); a step that then updated the flat buffer would update a
private copy while the model stays unchanged. :meth:`FlatParams.check` finds such
parameters in O(L) at every step; :meth:`FlatParams.adopt` takes their current values
and device as the truth and makes them views of a new flat buffer again, or returns
the reason that cannot be exact (a dtype or shape changed).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from . import collectives as C
from .layout import ShardLayout

__all__ = ["FlatParams", "LOW_PRECISION"]

LOW_PRECISION = (torch.bfloat16, torch.float16)


class FlatParams:
    """The flat buffer that ``params`` are views of, with this rank's shard and master weights.

    Args:
        params: the trainable parameters, in layout order.
        layout: their layout over the group.
        rank: this rank's index in the group.
        group: the process group (rank 0's values are broadcast at construction).
    """

    def __init__(self, params: Sequence[torch.Tensor], layout: ShardLayout, rank: int, group):
        self.params = list(params)
        self.layout, self.rank, self.group = layout, rank, group
        self.dtype = self.params[0].dtype
        self.state_dtype = torch.promote_types(self.dtype, torch.float32)
        self.adoptions = 0  # times the parameters were re-adopted (must agree across ranks)
        self._place(self.params[0].device)
        C.broadcast_flat(self.flat, group, src=0)
        self._take_master()

    def _place(self, device: torch.device) -> None:
        """Make a new flat buffer on ``device`` holding the parameters' current values."""
        lay = self.layout
        flat = torch.zeros(lay.padded_total, dtype=self.dtype, device=device)
        for p, off, n in zip(self.params, lay.offsets, lay.numels):
            view = flat.narrow(0, off, n).view(p.shape)
            view.copy_(p.detach())
            p.data = view
        self.flat = flat
        self.device = flat.device
        self.shard = flat.narrow(0, self.rank * lay.shard_size, lay.shard_size)
        self.lowp = self.shard if self.dtype in LOW_PRECISION else None
        self._ptrs = [flat.data_ptr() + off * flat.element_size() for off in lay.offsets]

    # ------------------------------------------------------------------ detachment
    def check(self) -> List[int]:
        """Layers that are no longer views of the flat buffer (O(L), no collective). A
        0-element view has no address (data_ptr() is 0): only its device and dtype count."""
        flat = self.flat
        return [i for i, (p, ptr) in enumerate(zip(self.params, self._ptrs))
                if (p.data_ptr() != ptr and p.numel()) or p.device != flat.device or p.dtype != flat.dtype]

    def why_not_adoptable(self, moved: Sequence[int]) -> Optional[str]:
        """Why the parameters in ``moved`` cannot be re-adopted exactly, or None."""
        devices = {p.device for p in self.params}
        for i in moved:
            p = self.params[i]
            if p.dtype != self.dtype:
                return (f"layer {i} (shape {tuple(p.shape)}) changed dtype from {self.dtype} to {p.dtype} after "
                        "the optimizer was built (model.half(), .to(dtype)?); the optimizer's state and master "
                        "weights are laid out for the old dtype: cast the model first, then build the optimizer")
            if tuple(p.shape) != tuple(self.layout.shapes[i]):
                return (f"layer {i} changed shape from {tuple(self.layout.shapes[i])} to {tuple(p.shape)} after "
                        "the optimizer was built; build a new optimizer for the new parameters")
        if len(devices) > 1:
            return (f"the parameters are on several devices ({', '.join(sorted(map(str, devices)))}) after the "
                    "model was moved; move the whole model to one device")
        return None

    def adopt(self) -> None:
        """Take every parameter's current values and device as the truth: a new flat
        buffer on that device, every parameter a view of it, master weights from it."""
        self._place(self.params[0].device)
        self._take_master()
        self.adoptions += 1

    # ------------------------------------------------------------------ master weights
    def _take_master(self) -> None:
        # fp32 models need no master copy: the shard itself is updated.
        self.master = self.shard.to(self.state_dtype) if self.lowp is not None else self.shard
        self.mark_synced()

    def version(self) -> int:
        # Each Parameter keeps its own version counter (p.data was re-pointed to the
        # flat buffer), so in-place writes through p bump p's, not the buffer's.
        return self.flat._version + sum(p._version for p in self.params)

    def mark_synced(self) -> None:
        self._synced_version = self.version()

    def resync_master(self) -> None:
        """bf16/fp16: if the parameters were written since the last step (say by
        ``model.load_state_dict``), they are the truth; take the master weights from them."""
        if self.lowp is not None and self.version() != self._synced_version:
            self.master.copy_(self.shard)
