"""Gradient checkpoints: ``with loss.backward():`` blocks.

A lane opens a backward session when it reaches ``with loss.backward(**kw):``;
the backward pass starts at the block's first ``x.grad`` (or at its end).
While it runs, tensor hooks hand each requested gradient to the waiting lane,
in the order autograd computes them (the reverse of the forward), and what the
lane writes (``x.grad = v``, in-place edits) is the gradient that flows on.
For an invoke, ``x`` is a view of its rows: the hook sits on the batch tensor
and the lane sees (and writes) its rows of the gradient.

The pass computes every gradient in the loss's graph except those of the
traced model's parameters: their ``.grad`` is left as it was (a saliency run
would otherwise leave, and keep adding to, a gradient the size of the model).
A parameter the block is already waiting for when the pass starts (its
``p.grad`` is the block's first request) is computed and accumulated as usual.
Every other leaf (a tensor of the user's own with ``requires_grad``) gets its
``.grad`` as plain PyTorch gives it; plain ``loss.backward()`` outside a block
is PyTorch's own, untouched.
"""

from __future__ import annotations

import torch
from torch.autograd.graph import GradientEdge


class BackwardSession:
    __slots__ = ("end_waiting", "fired", "hooks", "kwargs", "loss", "site", "skipped", "state",
                 "waiting")

    def __init__(self, loss, kwargs: dict, site: int) -> None:
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"`with x.backward():` needs a tensor, got {type(loss).__name__}")
        self.loss = loss
        self.kwargs = kwargs
        self.site = site
        self.state = "new"  # -> "running" -> "done"
        self.waiting: dict[int, list] = {}  # id(tensor) -> [(lane, request, rows)]
        self.fired: set[int] = set()
        self.hooks: list = []
        self.end_waiting: list = []
        self.skipped: set[int] = set()  # ids of the model's parameters left out of the pass

    def remove_hooks(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()

    def run(self, params) -> None:
        """``torch.autograd.backward(loss, **kwargs)`` without accumulating into the
        ``.grad`` of ``params`` (the traced model's parameters) that nobody waits for."""
        kwargs = self.kwargs
        loss = self.loss
        if "inputs" in kwargs or loss.grad_fn is None:
            # The user chose the inputs (or torch says what is wrong with the loss).
            torch.autograd.backward(loss, **kwargs)
            return
        inputs = self._inputs({id(p) for p in params})
        if inputs:
            torch.autograd.backward(loss, inputs=inputs, **kwargs)

    def _inputs(self, params: set[int]) -> list:
        """One gradient edge per node of the loss's graph, except the accumulators
        of parameters in ``params`` nobody waits for: every other gradient is
        computed as by a plain backward (tensor hooks and ``retain_grad`` fire, the
        user's own leaves accumulate), and no parameter gradient is even computed
        (backward formulas skip outputs no input needs)."""
        waited = self.waiting
        inputs = []
        seen = set()
        stack = [self.loss.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            var = getattr(node, "variable", None)  # AccumulateGrad: a leaf's accumulator
            if var is not None and id(var) in params and id(var) not in waited:
                self.skipped.add(id(var))
                continue
            inputs.append(GradientEdge(node, 0))
            stack.extend(fn for fn, _ in node.next_functions)
        return inputs

    def missed(self, tensor) -> str:
        """Why no gradient reached ``tensor`` (for the error)."""
        if id(tensor) in self.skipped:
            return (
                "it is a parameter of the model, and a backward block computes parameter "
                "gradients only for one it waits for when the pass starts (make `p.grad` "
                "the block's first request, or call plain `loss.backward()` in the trace and "
                "read `p.grad` after it)"
            )
        return "the loss does not depend on it (or it was replaced in place after it was read)"
