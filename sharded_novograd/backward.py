"""What one backward does to an optimizer's parameters, seen from their gradient hooks.

:class:`BackwardTracker` answers two questions ZeRO-2's buckets need during backward:

- **When does this backward end?** An end-of-backward callback is queued from the
  first gradient hook. A backward can run inside another one (reentrant activation
  checkpointing runs the checkpointed segment's backward from the outer backward's
  node); its callbacks run when the inner one ends, while the outer one still has
  gradients to deliver. The callback sees that the engine is still executing a node
  of an outer backward (:func:`torch._C._current_autograd_node`), marks the layers
  that arrived in the inner one as *nested*, and waits for that node to finish (a
  post-hook on it) to queue itself again, in the outer backward.
- **Which layers will this backward not reach?** At the first hook, the autograd
  engine knows every node it is going to execute
  (:func:`torch._C._will_engine_execute_node`, what
  :func:`torch.autograd.graph.register_multi_grad_hook` uses). A layer whose gradient
  accumulator is not among them gets no gradient on this rank in this backward, so
  its buckets need not wait for it. The engine only knows the nodes of the backward
  that is running, and a nested one's layers are invisible to the outer one. So only
  layers that an earlier outermost backward on this rank reached are predicted
  (a layer reached so far only by nested backwards, or never, could be reached by a
  nested one now), never those seen arriving in a nested backward (any graph task
  other than the outermost one, told apart when the outermost ends), and nothing is predicted from a first hook that runs inside a nested backward (one
  started from an autograd Function's backward, as reentrant checkpointing does).
"""

from __future__ import annotations

import sys
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Set

import torch

__all__ = ["BackwardTracker"]

_queue_callback = torch.autograd.Variable._execution_engine.queue_callback
# The engine runs every Python autograd Function's backward through this method: a
# backward started below it on the stack is nested in another one.
_FUNCTION_BACKWARD = torch.autograd.function.BackwardCFunction.apply.__code__


def _inside_function_backward() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _FUNCTION_BACKWARD:
            return True
        frame = frame.f_back
    return False


class BackwardTracker:
    """Follows the backwards that reach ``num_layers`` parameters.

    Args:
        num_layers: number of parameters (layers), indexed as in the layout.
        on_end: a bound method, called once when the outermost backward ends, after the
            callbacks that were queued before this tracker's first one (DDP's) have run.
            Held weakly: the tracker does not keep its owner (the optimizer) alive.
    """

    def __init__(self, num_layers: int, on_end: Callable[[], None]):
        self._on_end = weakref.WeakMethod(on_end)
        self.nested: Set[int] = set()  # layers seen arriving in a backward nested in another
        self.outer: Set[int] = set()  # layers seen arriving in an outermost backward
        self._nodes: List[Optional[torch.autograd.graph.Node]] = [None] * num_layers  # gradient accumulators
        self._queued = False
        self._first_task: Optional[int] = None
        self._task_layers: Dict[int, List[int]] = {}  # graph task -> layers that arrived in it

    def reset(self) -> None:
        """Forget the backward in progress (step() and zero_grad(): a backward that raised
        never ran its callbacks). Layers that arrived in another graph task than its first
        hook's count as nested: which task was outermost is not known."""
        self._queued = False
        for task, layers in self._task_layers.items():
            if task != self._first_task:
                self.nested.update(layers)
        self._task_layers = {}

    def arrived(self, layer: int) -> bool:
        """Note that ``layer``'s gradient hook ran; True at the first hook of a backward."""
        task = torch._C._current_graph_task_id()
        node = torch._C._current_autograd_node()  # in this hook: the layer's gradient accumulator
        if node is not None:
            self._nodes[layer] = node
        self._task_layers.setdefault(task, []).append(layer)
        if self._queued:
            return False
        self._queued = True
        self._first_task = task
        _queue_callback(self._task_end)
        return True

    def unreached(self, params: Sequence[torch.Tensor], candidates: Sequence[int]) -> List[int]:
        """Of ``candidates``, the layers the running backward will not reach, when that is
        known for certain (else none): layers an earlier outermost backward reached.
        Call it from a gradient hook."""
        if _inside_function_backward():
            return []  # the engine knows only this nested backward's nodes
        will = torch._C._will_engine_execute_node
        out = []
        for layer in candidates:
            if layer in self.nested or layer not in self.outer:
                continue
            node = self._nodes[layer]
            if node is not None and will(node):
                continue
            p = params[layer]
            if not p.requires_grad:  # frozen since: no gradient can reach it
                out.append(layer)
                continue
            # The cached accumulator may be stale (p.data moved to another device or
            # dtype gets a new one): ask the parameter for its current one.
            node = torch.autograd.graph.get_gradient_edge(p).node
            self._nodes[layer] = node
            if not will(node):
                out.append(layer)
        return out

    def _task_end(self) -> None:
        task = torch._C._current_graph_task_id()
        outer = torch._C._current_autograd_node()
        if outer is not None:
            # A backward nested in another one ended; the outer one goes on.
            handle = []

            def resume(grad_inputs, grad_outputs):
                handle[0].remove()
                _queue_callback(self._task_end)  # now in the outer backward

            handle.append(outer.register_hook(resume))
            return
        # The outermost backward ended: every other graph task was nested in it.
        for other, layers in self._task_layers.items():
            (self.outer if other == task else self.nested).update(layers)
        self._task_layers = {}
        # Queued again from here: DDP's own end-of-backward callback, queued after
        # ours, runs in between and writes the averaged gradients.
        _queue_callback(self._backward_end)

    def _backward_end(self) -> None:
        self._queued = False
        on_end = self._on_end()
        if on_end is not None:
            on_end()
